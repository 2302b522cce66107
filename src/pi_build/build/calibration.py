"""Inputs for FP8 calibration and for the end-to-end check: real observations turned into model
inputs with the checkpoint's own transforms, or generated ones.

``quantize.calibration`` in a recipe says which: "recorded" (the LIBERO observations shipped with
pi-build), "generated" (random inputs of the component's shapes), or a path to an .npz of raw
observations of your own robot. FlashRT's FP8 on Thor lost 6.6 points of LIBERO success when
calibrated on zero inputs: calibrate on real observations where you can.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor

from pi_build import engine
from pi_build.build.reference import Reference
from pi_build.model.pi0 import ModelInputs
from pi_build.recipe import Recipe
from pi_build.runtime.pipeline import select_cameras
from pi_build.spec import Component
from pi_build.transforms.libero import checkpoint_transforms, load_recorded_observations


def observation_batches(reference: Reference, source: str, samples: int, batch: int = 1) -> Iterator[ModelInputs]:
    """``samples`` batches of ``batch`` model inputs (all three cameras) from raw observations: the
    recorded LIBERO ones ("recorded") or an .npz of the same layout, through the checkpoint's transforms."""
    transforms = checkpoint_transforms(reference.checkpoint, reference.model.cfg)
    observations = load_recorded_observations(None if source == "recorded" else Path(source))
    for i in range(samples):
        chunk = [observations[(i * batch + j) % len(observations)] for j in range(batch)]
        yield transforms.inputs(chunk, device=reference.device)


def calibration_batches(reference: Reference, recipe: Recipe, component: Component, samples: int) -> list[tuple[Tensor, ...]]:
    """Inputs of ``component`` for calibration, per the recipe's quantize.calibration."""
    path = recipe.calibration_path()  # a user's .npz: checked to exist, errors name the recipe field
    source = str(path) if path is not None else recipe.quantize.calibration
    if source == "generated":
        probe = engine.build_component(reference.model, component, reference.shapes(recipe), "fp32")
        return [tuple(t.to(reference.device) for t in probe.example_inputs(torch.Generator().manual_seed(1000 + i)))
                for i in range(samples)]
    batches = []
    for inputs in observation_batches(reference, source, samples):
        images, image_masks = select_cameras(recipe.model.cameras, inputs.images, inputs.image_masks)
        batches += engine.calibration_inputs(reference.model, component, images, image_masks, inputs.tokens,
                                             inputs.token_masks, inputs.state, recipe.denoise.steps, recipe.model.horizon)
    return batches
