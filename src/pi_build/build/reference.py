"""The reference a build checks every engine against: the recipe's checkpoint loaded in float32 on
the build device, with the identity its engines record (``source`` in their manifests)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pi_build.engine.layers import Shapes, compute_dtype
from pi_build.model.checkpoints import load_checkpoint
from pi_build.model.pi0 import PiModel, config_to_dict
from pi_build.recipe import Recipe
from pi_build.runtime.pipeline import resolve_device


@dataclass(frozen=True)
class Reference:
    model: PiModel  # float32, with the recipe's horizon and prompt length
    checkpoint: Path  # the checkpoint folder: its tokenizer and norm stats go into the artifacts
    source: dict[str, Any]  # manifest["source"]: the checkpoint's name, the weights' sha256, the config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def shapes(self, recipe: Recipe, batch: int | None = None, prompt_len: int | None = None) -> Shapes:
        """The fixed shapes of one of the recipe's engines (default: its smallest batch size and its
        full prompt length); the tensors passed between engines are in their producer's compute dtype."""
        m, device = recipe.model, self.device.type
        return Shapes(batch=batch or min(m.batch), cameras=len(m.cameras), prompt_len=prompt_len or m.prompt_len, horizon=m.horizon,
                      steps=recipe.denoise.steps, image_token_dtype=compute_dtype(recipe.vision.precision, device),
                      kv_dtype=compute_dtype(recipe.kvcache.precision, device))


def load_reference(recipe: Recipe) -> Reference:
    """Load the recipe's checkpoint as the float32 reference on the build device."""
    device = resolve_device(recipe.model.device)
    checkpoint = recipe.checkpoint_path()
    # config_name makes the loader check every tensor against the recipe's preset
    model, info = load_checkpoint(checkpoint, dtype=torch.float32, device=device, config_name=recipe.model.config)
    # The recipe's shapes rule the engines: horizon, and the prompt length the tokenizer pads to.
    model.cfg = cfg = info.config.replace(action_horizon=recipe.model.horizon, max_token_len=recipe.model.prompt_len)
    source = {"checkpoint": checkpoint.name, "weights_sha256": weights_id(info.weight_sha256),
              "config": cfg.name, "pi05": cfg.pi05, "model_config": config_to_dict(cfg)}
    return Reference(model, checkpoint, source)


def weights_id(file_hashes: dict[str, str]) -> str:
    """One sha256 for the weights: the file's own for one file, else the hash of the sorted file hashes."""
    if len(file_hashes) == 1:
        return next(iter(file_hashes.values()))
    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(file_hashes.items())).encode()).hexdigest()
