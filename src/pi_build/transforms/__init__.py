"""Observation and action transforms: small frozen dataclasses that each change one thing, composed
into a chain, in the manner of openpi's ``transforms.py``.

An input chain takes one observation as a dict in the model's terms and ends in model inputs:

    {"images": {camera: uint8 [h, w, 3]}, "image_masks": {camera: bool}, "state": float64 [d], "prompt": str}
        -> Normalize(state) -> ResizeImages(224) -> TokenizePrompt -> PadState(32)
        -> {"images", "image_masks", "state" [32], "tokens" [L], "token_mask" [L]}  --to_model_inputs-->  ModelInputs

An output chain takes one chunk ``{"actions": float [H, 32], "state": the raw state}`` back to a
robot's actions (Unnormalize -> AbsoluteActions -> the robot's own output transform). The robot
mappings live beside this module (``libero.py``). Facts these rely on, each checked in openpi:

- images are resized with padding by ``openpi_client.image_tools.resize_with_pad``: PIL bilinear on
  uint8, ratio = max(w / W, h / H), size int(dim / ratio), pasted at the floor of the centring offset
  onto black (the odd pixel goes bottom/right); images already W x H are left untouched. The model
  then maps uint8 to float32 x / 255 * 2 - 1. We use Pillow the same way, so the pixels match.
- normalization is z-score for pi0 and quantiles for pi0.5, unclipped; it runs on the raw state,
  before padding, with the stats cut to the state's length. Unnormalize pads the stats to 32 dims:
  z-score with mean 0 / std 1, quantile by leaving the extra dims unchanged.
- pi0.5's discrete-state prompt reads the normalized, unpadded state.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from PIL import Image

from pi_build.errors import InputError
from pi_build.model.norm_stats import NormStats
from pi_build.model.pi0 import Config, ModelInputs
from pi_build.model.tokenizer import PromptTokenizer
from pi_build.spec import CAMERAS

Data = dict[str, Any]
Transform = Callable[[Data], Data]


@dataclass(frozen=True)
class Compose:
    """Apply ``transforms`` in order."""

    transforms: tuple[Transform, ...]

    def __call__(self, data: Data) -> Data:
        for transform in self.transforms:
            data = transform(data)
        return data


# ----------------------------------------------------------------------------- images


def resize_with_pad(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize a uint8 [h, w, 3] image to fit [height, width] keeping its aspect ratio, pad with black.

    openpi_client's algorithm: PIL bilinear resize, centred, the odd padding pixel bottom/right.
    """
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    ratio = max(w / width, h / height)  # the same float expression as openpi, so sizes agree
    new_h, new_w = int(h / ratio), int(w / ratio)
    resized = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((new_w, new_h), resample=Image.BILINEAR))
    top, left = (height - new_h) // 2, (width - new_w) // 2
    out = np.zeros((height, width, image.shape[2]), dtype=np.uint8)
    out[top : top + new_h, left : left + new_w] = resized
    return out


def image_to_float(image: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1], computed in float32 as openpi does."""
    return image.astype(np.float32) / 255.0 * 2.0 - 1.0


@dataclass(frozen=True)
class ResizeImages:
    height: int
    width: int

    def __call__(self, data: Data) -> Data:
        return {**data, "images": {cam: resize_with_pad(img, self.height, self.width) for cam, img in data["images"].items()}}


# ----------------------------------------------------------------------------- normalization


def uses_quantile_norm(cfg: Config) -> bool:
    """openpi normalizes pi0 with z-scores and every other model type (pi0.5) with quantiles."""
    return cfg.pi05


def _quantiles(stats: NormStats) -> tuple[np.ndarray, np.ndarray]:
    if stats.q01 is None or stats.q99 is None:
        raise ValueError("quantile normalization (pi0.5) needs q01 and q99 in the norm stats")
    return stats.q01, stats.q99


def normalize(x: np.ndarray, stats: NormStats, *, quantile: bool) -> np.ndarray:
    """Normalize the last axis of x by stats cut to x's length (z-score, or quantiles to [-1, 1], unclipped)."""
    d = x.shape[-1]
    if d > len(stats.mean):
        raise ValueError(f"{d} values to normalize but the norm stats have only {len(stats.mean)} dims")
    if quantile:
        q01, q99 = (q[:d] for q in _quantiles(stats))
        return (x - q01) / (q99 - q01 + 1e-6) * 2.0 - 1.0
    return (x - stats.mean[:d]) / (stats.std[:d] + 1e-6)


def unnormalize(x: np.ndarray, stats: NormStats, *, quantile: bool) -> np.ndarray:
    """Inverse of ``normalize`` on the leading stats dims. Dims beyond the stats: z-score treats them as
    mean 0 / std 1 (x * (1 + 1e-6)); quantile leaves them unchanged (openpi's Unnormalize)."""
    d = len(stats.mean)
    if d > x.shape[-1]:
        raise ValueError(f"the norm stats have {d} dims but the values to unnormalize only {x.shape[-1]}")
    if quantile:
        q01, q99 = _quantiles(stats)
        head = (x[..., :d] + 1.0) / 2.0 * (q99 - q01 + 1e-6) + q01
        return np.concatenate([head, x[..., d:]], axis=-1)
    pad = x.shape[-1] - d
    mean = np.pad(stats.mean, (0, pad), constant_values=0.0)
    std = np.pad(stats.std, (0, pad), constant_values=1.0)
    return x * (std + 1e-6) + mean


def stats_of(norm_stats: Mapping[str, NormStats], key: str) -> NormStats:
    if key not in norm_stats:
        raise KeyError(f'norm stats have no "{key}" entry (found: {", ".join(norm_stats) or "none"})')
    return norm_stats[key]


@dataclass(frozen=True)
class Normalize:
    """Normalize ``data[key]`` (the state on the way in) by its stats."""

    norm_stats: Mapping[str, NormStats]
    quantile: bool
    key: str = "state"

    def __call__(self, data: Data) -> Data:
        return {**data, self.key: normalize(data[self.key], stats_of(self.norm_stats, self.key), quantile=self.quantile)}


@dataclass(frozen=True)
class Unnormalize:
    """Unnormalize ``data[key]`` (the actions on the way out) by its stats."""

    norm_stats: Mapping[str, NormStats]
    quantile: bool
    key: str = "actions"

    def __call__(self, data: Data) -> Data:
        return {**data, self.key: unnormalize(data[self.key], stats_of(self.norm_stats, self.key), quantile=self.quantile)}


# ----------------------------------------------------------------------------- prompt, state, actions


@dataclass(frozen=True)
class TokenizePrompt:
    """``prompt`` -> ``tokens`` and ``token_mask`` (padded to the tokenizer's length); with
    ``discrete_state`` the normalized state goes into the prompt too (pi0.5's format)."""

    tokenizer: PromptTokenizer
    discrete_state: bool = False

    def __call__(self, data: Data) -> Data:
        tokens, mask = self.tokenizer.tokenize(data["prompt"], data["state"] if self.discrete_state else None)
        return {**data, "tokens": tokens, "token_mask": mask}


@dataclass(frozen=True)
class PadState:
    """Zero-pad the state to the model's action dim."""

    dim: int

    def __call__(self, data: Data) -> Data:
        state = data["state"]
        if len(state) > self.dim:
            raise ValueError(f"state has {len(state)} dims, more than the model's action_dim {self.dim}")
        return {**data, "state": np.pad(state, (0, self.dim - len(state)))}


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """make_bool_mask(6, -1) == (True,) * 6 + (False,): positive n gives n Trues, negative n gives -n Falses."""
    return tuple(flag for n in dims for flag in [n > 0] * abs(n))


@dataclass(frozen=True)
class AbsoluteActions:
    """Add the raw state [B, d] to the action dims [B, H, :] where ``mask`` is True (models trained
    on delta actions)."""

    mask: tuple[bool, ...]
    action_dim: int

    def __call__(self, data: Data) -> Data:
        mask = np.asarray(self.mask, dtype=bool)
        n = len(mask)
        if n > self.action_dim:
            raise ValueError(f"delta_mask has {n} entries, more than action_dim {self.action_dim}")
        state = data["state"]
        padded = np.pad(state, ((0, 0), (0, self.action_dim - state.shape[1])))  # as openpi's padded state
        actions = data["actions"].copy()
        actions[..., :n] += np.where(mask, padded[:, :n], 0.0)[:, None, :]
        return {**data, "actions": actions}


@dataclass(frozen=True)
class KeepActionDims:
    """The first ``dims`` action dims: what the robot executes."""

    dims: int

    def __call__(self, data: Data) -> Data:
        return {**data, "actions": data["actions"][..., : self.dims]}


# ----------------------------------------------------------------------------- into the model


def to_model_inputs(items: Sequence[Data], device: str | torch.device = "cpu") -> ModelInputs:
    """Stack transformed observations into a batch of model inputs: images float [-1, 1] in CAMERAS
    order ([B, 3, 3, H, W]), masks, tokens, token masks and the padded float32 state."""
    if not items:
        raise InputError("no observations given")

    def one(item: Data) -> tuple[np.ndarray, ...]:
        images = np.stack([image_to_float(item["images"][cam]) for cam in CAMERAS]).transpose(0, 3, 1, 2)
        masks = np.array([item["image_masks"][cam] for cam in CAMERAS])
        return images, masks, item["tokens"], item["token_mask"], item["state"].astype(np.float32)

    images, masks, tokens, token_masks, states = (torch.from_numpy(np.stack(p)) for p in zip(*map(one, items), strict=True))
    return ModelInputs(images, masks, tokens, token_masks, states).to(device)


@dataclass(frozen=True)
class PolicyTransforms:
    """One checkpoint's input chain (one observation -> model terms) and output chain (a batch of
    model actions -> robot actions), for a runtime to hold."""

    model_cfg: Config
    inputs_chain: Compose
    outputs_chain: Compose

    @property
    def tokenizer(self) -> PromptTokenizer:
        """The tokenizer of the input chain's TokenizePrompt step."""
        return next(t.tokenizer for t in self.inputs_chain.transforms if isinstance(t, TokenizePrompt))

    def inputs(self, obs: Mapping | Sequence[Mapping], device: str | torch.device = "cpu") -> ModelInputs:
        observations = [obs] if isinstance(obs, Mapping) else list(obs)
        return to_model_inputs([self.inputs_chain(o) for o in observations], device)

    def outputs(self, raw_actions: np.ndarray | torch.Tensor, state: Any) -> np.ndarray:
        """Model actions [B, H, action_dim] -> robot actions [B, H, d] (float64, as openpi returns)."""
        return self.outputs_chain({"actions": raw_actions, "state": state})["actions"]
