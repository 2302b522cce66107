"""From a raw LIBERO observation to ``ModelInputs``, and from model actions to robot actions.

This reproduces openpi's inference transforms for its LIBERO policies (``pi0_libero``,
``pi05_libero`` in ``src/openpi/training/config.py``), which run in this order
(``policies/policy_config.py``):

    inputs:  LiberoInputs -> Normalize -> ResizeImages(224) -> TokenizePrompt -> PadStatesAndActions(32)
             and, in the model, uint8 -> float32 x / 255 * 2 - 1
    outputs: Unnormalize -> [AbsoluteActions, pi0_libero only] -> LiberoOutputs (first 7 dims)

Facts this module relies on (each checked in openpi's source):
- Images are resized with padding by ``openpi_client.image_tools.resize_with_pad``: PIL bilinear
  on uint8, ratio = max(w / W, h / H), size int(dim / ratio), pasted at the floor of the centring
  offset onto black (the odd pixel goes bottom/right); images already W x H are left untouched.
  ``ResizeImages`` in the policy uses that PIL function, so the model-side jax/torch resize never
  runs at inference. We use Pillow the same way, so the pixels match exactly.
- A missing camera is ``np.zeros_like`` the base image (uint8 0 -> -1.0) with mask False; for
  LIBERO that is the right wrist.
- Normalization: z-score for pi0, quantiles for pi0.5 (openpi: ``use_quantile_norm = model_type
  != PI0``); no clipping. Normalize runs on the raw (8-dim) state, before padding, with the stats
  cut to the state's length. Unnormalize pads the stats to 32 dims: z-score with mean 0 / std 1,
  quantile by leaving the extra dims unchanged.
- pi0.5's discrete-state prompt reads the normalized, unpadded state; ``pi05_libero`` turns it off.
- ``pi0_libero`` was trained with an extra delta transform on dims 0-5 (``make_bool_mask(6, -1)``),
  so its inference policy adds the state back to those dims after unnormalizing; the gripper stays
  absolute. openpi adds unnormalize(normalize(state)); we add the raw state, equal up to rounding.
- The 180-degree flip of LIBERO's renders is done by the env client; ``libero_camera_image`` is
  the client-side helper.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pi_build.model.pi0 import Config, ModelInputs
from pi_build.recipe import CAMERAS  # model cameras, in the order the model reads them
from pi_build.model.tokenizer import PromptTokenizer

# openpi's LIBERO observation keys (the websocket request), and which camera each image feeds.
LIBERO_CAMERA_KEYS = {"base_0_rgb": "observation/image", "left_wrist_0_rgb": "observation/wrist_image"}
LIBERO_STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
LIBERO_STATE_DIM = 8  # eef position (3), axis-angle (3), gripper qpos (2)
LIBERO_ACTION_DIM = 7  # eef delta (6), gripper (1)


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


def libero_camera_image(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Env-side helper: LIBERO renders upside down; rotate 180 degrees, then resize-with-pad to ``size``."""
    _check_image(image, "LIBERO camera image")
    return resize_with_pad(np.ascontiguousarray(image[::-1, ::-1]), size, size)


# ----------------------------------------------------------------------------- normalization


@dataclass(frozen=True)
class NormStats:
    """Per-dimension statistics of one quantity (float64, as openpi loads them)."""

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """Read openpi's ``norm_stats.json`` (or a folder holding one): {"norm_stats": {key: {mean, std, q01, q99}}}.

    "state" and "actions" must be present; q01/q99 are optional here and required by pi0.5.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "norm_stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"norm stats file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("norm_stats"), dict):
        raise ValueError(f'{path}: expected a top-level "norm_stats" object')
    return norm_stats_from_dict(data["norm_stats"], str(path))


def norm_stats_from_dict(norm_stats: Mapping, path: str) -> dict[str, NormStats]:
    """{"state": {"mean": [...], "std": [...], "q01"?, "q99"?}, "actions": {...}} -> NormStats; ``path`` names the source in errors."""
    stats = {}
    for key, entry in norm_stats.items():
        if not isinstance(entry, dict):
            raise ValueError(f'{path}: "norm_stats/{key}" must be an object with mean and std')
        fields = {}
        for name in ("mean", "std", "q01", "q99"):
            if entry.get(name) is None:
                if name in ("mean", "std"):
                    raise ValueError(f'{path}: "norm_stats/{key}" has no "{name}"')
                continue
            try:
                values = np.asarray(entry[name], dtype=np.float64)
            except (TypeError, ValueError) as e:
                raise ValueError(f'{path}: "norm_stats/{key}/{name}" is not a list of numbers') from e
            if values.ndim != 1 or not np.isfinite(values).all():
                raise ValueError(f'{path}: "norm_stats/{key}/{name}" must be a 1-D list of finite numbers')
            fields[name] = values
        if len({len(v) for v in fields.values()}) != 1:
            lengths = {name: len(v) for name, v in fields.items()}
            raise ValueError(f'{path}: "norm_stats/{key}" fields differ in length: {lengths}')
        stats[key] = NormStats(**fields)
    for key in ("state", "actions"):
        if key not in stats:
            raise ValueError(f'{path}: "norm_stats" has no "{key}" entry (found: {", ".join(stats) or "none"})')
    return stats


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


def _stats(norm_stats: Mapping[str, NormStats], key: str) -> NormStats:
    if key not in norm_stats:
        raise KeyError(f'norm stats have no "{key}" entry (found: {", ".join(norm_stats) or "none"})')
    return norm_stats[key]


# ----------------------------------------------------------------------------- delta actions


def make_bool_mask(*dims: int) -> tuple[bool, ...]:
    """make_bool_mask(6, -1) == (True,) * 6 + (False,): positive n gives n Trues, negative n gives -n Falses."""
    return tuple(flag for n in dims for flag in [n > 0] * abs(n))


def libero_delta_mask(cfg: Config) -> tuple[bool, ...] | None:
    """openpi's pi0_libero adds the state back to action dims 0-5; pi05_libero has no delta transform."""
    return None if cfg.pi05 else make_bool_mask(6, -1)


# ----------------------------------------------------------------------------- validation


def _check_image(image: object, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 [height, width, 3] array, got {got}")
    if 0 in image.shape:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


def _check_state(state: object, name: str) -> np.ndarray:
    """A 1-D finite LIBERO state, as float64 (what openpi's arithmetic against float64 stats gives)."""
    array = np.asarray(state)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numbers, got dtype {array.dtype}")
    if array.shape != (LIBERO_STATE_DIM,):
        raise ValueError(f"{name} must have shape ({LIBERO_STATE_DIM},), got {array.shape}")
    if not np.isfinite(array).all():
        raise ValueError(f"{name} contains NaN or inf: {array.tolist()}")
    return array.astype(np.float64)


def _get(obs: Mapping, key: str) -> object:
    if not isinstance(obs, Mapping):
        raise TypeError(f"an observation must be a dict, got {type(obs).__name__}")
    if key not in obs:
        raise KeyError(f'observation has no "{key}" (keys: {", ".join(map(str, obs)) or "none"})')
    return obs[key]


def _prompt(obs: Mapping) -> str:
    prompt = _get(obs, PROMPT_KEY)
    if isinstance(prompt, np.ndarray) and prompt.ndim == 0:  # a numpy string scalar, as openpi accepts
        prompt = prompt.item()
    if not isinstance(prompt, str):
        raise ValueError(f'"{PROMPT_KEY}" must be a string, got {type(prompt).__name__}')
    return prompt


# ----------------------------------------------------------------------------- the policy transforms


def _one_observation(
    obs: Mapping, cfg: Config, tokenizer: PromptTokenizer, norm_stats: Mapping[str, NormStats], discrete_state: bool
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """images [C, 3, H, W] float32, image masks [C], tokens [L], token mask [L], state [action_dim] float32."""
    size = cfg.vision.image_size
    uint8_images = {cam: _check_image(_get(obs, key), f'"{key}"') for cam, key in LIBERO_CAMERA_KEYS.items()}
    uint8_images["right_wrist_0_rgb"] = np.zeros_like(uint8_images["base_0_rgb"])
    images = np.stack([image_to_float(resize_with_pad(uint8_images[cam], size, size)) for cam in CAMERAS])
    image_masks = np.array([cam in LIBERO_CAMERA_KEYS for cam in CAMERAS])

    state = normalize(
        _check_state(_get(obs, LIBERO_STATE_KEY), f'"{LIBERO_STATE_KEY}"'),
        _stats(norm_stats, "state"),
        quantile=uses_quantile_norm(cfg),
    )
    if len(state) > cfg.action_dim:
        raise ValueError(f"state has {len(state)} dims, more than the model's action_dim {cfg.action_dim}")
    tokens, token_mask = tokenizer.tokenize(_prompt(obs), state if discrete_state else None)
    padded_state = np.pad(state, (0, cfg.action_dim - len(state)))
    return images.transpose(0, 3, 1, 2), image_masks, tokens, token_mask, padded_state.astype(np.float32)


def observation_to_inputs(
    obs: Mapping | Sequence[Mapping],
    *,
    model_cfg: Config,
    tokenizer: PromptTokenizer,
    norm_stats: Mapping[str, NormStats],
    discrete_state_input: bool | None = None,
    device: str | torch.device = "cpu",
) -> ModelInputs:
    """One raw LIBERO observation (batch 1), or a list of them (batch B), as model inputs.

    An observation holds "observation/image" and "observation/wrist_image" (uint8 [h, w, 3], any
    size: resized with padding), "observation/state" (8 numbers) and "prompt" (str).
    ``discrete_state_input`` puts the state in the prompt (pi0.5 only); None means openpi's default,
    on for pi0.5 — but openpi's pi05_libero checkpoint was trained with it off.
    """
    discrete_state = model_cfg.pi05 if discrete_state_input is None else discrete_state_input
    if discrete_state and not model_cfg.pi05:
        raise ValueError("discrete_state_input is a pi0.5 option; pi0 reads the state in its action expert")
    if tokenizer.max_len != model_cfg.max_token_len:
        raise ValueError(
            f"tokenizer pads to {tokenizer.max_len} tokens, model {model_cfg.name} expects {model_cfg.max_token_len}"
        )
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than model "
            f"{model_cfg.name}'s vocabulary of {model_cfg.vocab_size}"
        )
    observations = [obs] if isinstance(obs, Mapping) else list(obs)
    if not observations:
        raise ValueError("no observations given")
    per_obs = [_one_observation(o, model_cfg, tokenizer, norm_stats, discrete_state) for o in observations]
    images, image_masks, tokens, token_masks, states = (
        torch.from_numpy(np.stack(parts)) for parts in zip(*per_obs, strict=True)
    )
    return ModelInputs(images, image_masks, tokens, token_masks, states).to(device)


def actions_to_env(
    raw_actions: np.ndarray | torch.Tensor,
    state: np.ndarray | Mapping | Sequence[Mapping],
    *,
    model_cfg: Config,
    norm_stats: Mapping[str, NormStats],
    delta_mask: Sequence[bool] | None = None,
    action_dim_out: int = LIBERO_ACTION_DIM,
) -> np.ndarray:
    """Model actions [B, H, action_dim] -> env actions [B, H, action_dim_out] (float64, as openpi returns).

    ``state`` is the raw state the actions were computed from: [8] or [B, 8], or the observation(s).
    Unnormalizes, adds the state to the dims where ``delta_mask`` is True (see ``libero_delta_mask``),
    keeps the first ``action_dim_out`` dims.
    """
    if isinstance(raw_actions, torch.Tensor):
        raw_actions = raw_actions.detach().float().cpu().numpy()
    # float32, the dtype openpi's model returns: its quantile inverse starts with float32 arithmetic.
    actions = np.asarray(raw_actions, dtype=np.float32)
    if actions.ndim != 3 or actions.shape[-1] != model_cfg.action_dim:
        raise ValueError(f"model actions must be [batch, horizon, {model_cfg.action_dim}], got shape {actions.shape}")
    if not np.isfinite(actions).all():
        raise ValueError("model actions contain NaN or inf")
    if not 1 <= action_dim_out <= model_cfg.action_dim:
        raise ValueError(f"action_dim_out must be in [1, {model_cfg.action_dim}], got {action_dim_out}")

    if isinstance(state, Mapping):
        state = [state]
    if isinstance(state, Sequence) and state and isinstance(state[0], Mapping):
        state = [_get(o, LIBERO_STATE_KEY) for o in state]
    states = np.asarray(state)
    states = states[None] if states.ndim == 1 else states
    if states.ndim != 2 or states.shape[0] != actions.shape[0]:
        expected = f"[{LIBERO_STATE_DIM}] or [batch={actions.shape[0]}, {LIBERO_STATE_DIM}]"
        raise ValueError(f"state must be {expected}, got shape {states.shape}")
    states = np.stack([_check_state(s, f"state {i}") for i, s in enumerate(states)])

    actions = unnormalize(actions, _stats(norm_stats, "actions"), quantile=uses_quantile_norm(model_cfg))
    if delta_mask is not None:
        mask = np.asarray(delta_mask, dtype=bool)
        dims = len(mask)
        if dims > model_cfg.action_dim:
            raise ValueError(f"delta_mask has {dims} entries, more than action_dim {model_cfg.action_dim}")
        padded = np.pad(states, ((0, 0), (0, model_cfg.action_dim - states.shape[1])))  # as openpi's padded state
        actions[..., :dims] += np.where(mask, padded[:, :dims], 0.0)[:, None, :]
    return actions[..., :action_dim_out]


@dataclass(frozen=True)
class PolicyTransforms:
    """The two transforms with one checkpoint's settings bundled, for a runtime to hold."""

    model_cfg: Config
    tokenizer: PromptTokenizer
    norm_stats: Mapping[str, NormStats]
    discrete_state_input: bool
    delta_mask: tuple[bool, ...] | None = None
    action_dim_out: int = LIBERO_ACTION_DIM

    @classmethod
    def libero(
        cls, model_cfg: Config, tokenizer: PromptTokenizer, norm_stats: Mapping[str, NormStats]
    ) -> PolicyTransforms:
        """openpi's pi0_libero / pi05_libero settings: delta actions for pi0 only, no state in the prompt."""
        delta_mask = libero_delta_mask(model_cfg)
        return cls(model_cfg, tokenizer, norm_stats, discrete_state_input=False, delta_mask=delta_mask)

    def inputs(self, obs: Mapping | Sequence[Mapping], device: str | torch.device = "cpu") -> ModelInputs:
        return observation_to_inputs(
            obs,
            model_cfg=self.model_cfg,
            tokenizer=self.tokenizer,
            norm_stats=self.norm_stats,
            discrete_state_input=self.discrete_state_input,
            device=device,
        )

    def outputs(
        self, raw_actions: np.ndarray | torch.Tensor, state: np.ndarray | Mapping | Sequence[Mapping]
    ) -> np.ndarray:
        return actions_to_env(
            raw_actions,
            state,
            model_cfg=self.model_cfg,
            norm_stats=self.norm_stats,
            delta_mask=self.delta_mask,
            action_dim_out=self.action_dim_out,
        )


def random_libero_norm_stats(seed: int = 0, state_dim: int = 8, action_dim: int = 7) -> dict[str, dict[str, list[float]]]:
    """Plausible norm stats for random-weight checkpoints (demo, tests): LIBERO's 8-dim state, 7-dim actions."""
    rng = np.random.default_rng(seed)

    def stats(dim: int) -> dict[str, list[float]]:
        mean = rng.normal(0.0, 0.3, dim)
        std = rng.uniform(0.2, 1.0, dim)
        return {"mean": mean.tolist(), "std": std.tolist(), "q01": (mean - 2 * std).tolist(), "q99": (mean + 2 * std).tolist()}

    return {"state": stats(state_dim), "actions": stats(action_dim)}


def select_cameras(cameras: Sequence[str], images: torch.Tensor, image_masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Model inputs carry every camera in CAMERAS order; engines take the recipe's ``cameras`` only."""
    idx = [CAMERAS.index(c) for c in cameras]
    return images[:, idx], image_masks[:, idx]
