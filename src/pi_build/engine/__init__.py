"""The three engine components, rewritten for speed from a reference model's weights.

Each component is an nn.Module with fixed-shape tensor inputs and outputs, so that it can be
exported (ONNX), quantized (FP8 linears), compiled (AOTInductor / TensorRT) and captured
(CUDA graphs) on its own; its module also says what the reference computes for its inputs
(the accuracy gates' truth) and what its inputs are for real observations (FP8 calibration):

    vision   images [B, C, 3, 224, 224]                          -> image_tokens [B, C*256, W]
    kvcache  image_tokens, image_masks [B, C], tokens [B, L],
             token_masks [B, L]                                  -> k, v [D, B, 1, S, 256], prefix_mask [B, S]
    denoise  x [B, H, 32], step [], k, v, prefix_mask, state [B, 32] -> x_next [B, H, 32]
             (one Euler step; ``denoise.denoise_loop`` runs it for every step: noise -> actions)

They compute what ``model.pi0.PiModel`` computes, with changes that are exact in real arithmetic
(floating-point rounding may differ; the accuracy gates measure by how much): see each module.
"""

from __future__ import annotations

from types import ModuleType

import torch
from torch import Tensor, nn

from pi_build.engine import denoise, kvcache, vision
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import PiModel
from pi_build.spec import Component, Precision

MODULES: dict[Component, ModuleType] = {Component.VISION: vision, Component.KVCACHE: kvcache, Component.DENOISE: denoise}
CLASSES: dict[Component, type[nn.Module]] = {
    Component.VISION: vision.VisionComponent,
    Component.KVCACHE: kvcache.KVCacheComponent,
    Component.DENOISE: denoise.DenoiseComponent,
}


def as_component(name: Component | str) -> Component:
    """The Component of a name, or a ValueError that lists the known ones."""
    try:
        return Component(name)
    except ValueError:
        raise ValueError(f"unknown component {name!r}; use one of {', '.join(Component)}") from None


def as_precision(name: Precision | str) -> Precision:
    try:
        return Precision(name)
    except ValueError:
        raise ValueError(f"unknown precision {name!r}; use one of {', '.join(Precision)}") from None


@torch.no_grad()
def build_component(model: PiModel, name: Component | str, shapes: Shapes, precision: Precision | str = Precision.FP32) -> nn.Module:
    """A component module from ``model``'s weights (held on the model's device), in eval mode."""
    cls = CLASSES[as_component(name)]
    device = next(model.parameters()).device
    return cls(model, shapes, as_precision(precision)).to(device).eval()


def build_components(model: PiModel, shapes: Shapes, precisions: dict[Component, Precision] | None = None) -> dict[Component, nn.Module]:
    precisions = precisions or {}
    return {c: build_component(model, c, shapes, precisions.get(c, Precision.FP32)) for c in Component}


@torch.no_grad()
def reference_outputs(model: PiModel, name: Component | str, inputs: tuple[Tensor, ...], steps: int) -> tuple[Tensor, ...]:
    """What the reference model computes for a component's inputs (the accuracy gates' truth).

    The reference runs in its own dtype: float inputs produced by lower-precision engines are upcast.
    """
    dtype = model.dtype
    inputs = tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float32 else t for t in inputs)
    return MODULES[as_component(name)].reference(model, inputs, steps)


@torch.no_grad()
def calibration_inputs(model: PiModel, name: Component, images: Tensor, image_masks: Tensor, tokens: Tensor,
                       token_masks: Tensor, state: Tensor, steps: int, horizon: int) -> list[tuple[Tensor, ...]]:
    """A component's inputs for one batch of real model inputs (the engines' cameras only), made by
    running the reference up to the component."""
    return MODULES[as_component(name)].calibration_inputs(model, images, image_masks, tokens, token_masks, state, steps, horizon)
