"""LIBERO as a robot: its observation keys and cameras, its 8-dim state and 7-dim actions, and the
transform chains of openpi's LIBERO policies (``pi0_libero``, ``pi05_libero``).

openpi runs, in this order (``policies/policy_config.py``):

    inputs:  LiberoInputs -> Normalize -> ResizeImages(224) -> TokenizePrompt -> PadStatesAndActions(32)
    outputs: Unnormalize -> [AbsoluteActions, pi0_libero only] -> LiberoOutputs (first 7 dims)

Facts this module relies on (each checked in openpi's source):
- a missing camera is ``np.zeros_like`` the base image (uint8 0 -> -1.0) with mask False; for
  LIBERO that is the right wrist;
- ``pi05_libero`` turns pi0.5's discrete-state prompt off, so the state reaches that model nowhere;
- ``pi0_libero`` was trained with an extra delta transform on dims 0-5 (``make_bool_mask(6, -1)``),
  so its inference policy adds the state back to those dims after unnormalizing; the gripper stays
  absolute. openpi adds unnormalize(normalize(state)); we add the raw state, equal up to rounding;
- LIBERO renders upside down: the env client rotates its images 180 degrees
  (``libero_camera_image``) before sending them.

It also reads the LIBERO observations recorded once with pi-build (package data, made by
scripts/record_libero_observations.py): real requests for tests, calibration and demos without
the simulator.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pi_build.errors import InputError
from pi_build.model.norm_stats import NormStats
from pi_build.model.pi0 import Config, ModelInputs
from pi_build.model.tokenizer import PromptTokenizer
from pi_build.spec import Camera
from pi_build.transforms import (AbsoluteActions, Compose, Data, KeepActionDims, Normalize, PadState, PolicyTransforms,
                                 ResizeImages, TokenizePrompt, Unnormalize, make_bool_mask, resize_with_pad,
                                 to_model_inputs, uses_quantile_norm)

# openpi's LIBERO observation keys (the websocket request), and which camera each image feeds.
CAMERA_KEYS = {Camera.BASE: "observation/image", Camera.LEFT_WRIST: "observation/wrist_image"}
STATE_KEY = "observation/state"
PROMPT_KEY = "prompt"
STATE_DIM = 8  # eef position (3), axis-angle (3), gripper qpos (2)
ACTION_DIM = 7  # eef delta (6), gripper (1)
RECORDED_OBSERVATIONS = "libero_observations.npz"
OBSERVATION_ARRAYS = ("base", "wrist", "state", "prompt")  # arrays of an observations .npz


# ----------------------------------------------------------------------------- validation


def check_image(image: object, name: str) -> np.ndarray:
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} array of shape {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"{name} must be a uint8 [height, width, 3] array, got {got}")
    if 0 in image.shape:
        raise ValueError(f"{name} is empty: shape {image.shape}")
    return image


def check_state(state: object, name: str) -> np.ndarray:
    """A 1-D finite LIBERO state, as float64 (what openpi's arithmetic against float64 stats gives)."""
    array = np.asarray(state)
    if array.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be numbers, got dtype {array.dtype}")
    if array.shape != (STATE_DIM,):
        raise ValueError(f"{name} must have shape ({STATE_DIM},), got {array.shape}")
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


def libero_camera_image(image: np.ndarray, size: int = 224) -> np.ndarray:
    """Env-side helper: LIBERO renders upside down; rotate 180 degrees, then resize-with-pad to ``size``."""
    check_image(image, "LIBERO camera image")
    return resize_with_pad(np.ascontiguousarray(image[::-1, ::-1]), size, size)


# ----------------------------------------------------------------------------- the robot's own transforms


@dataclass(frozen=True)
class LiberoInputs:
    """A LIBERO request dict -> the model-terms dict, checked: the two cameras, the masked right
    wrist (zeros), the raw state (float64) and the prompt."""

    def __call__(self, obs: Data) -> Data:
        images = {cam: check_image(_get(obs, key), f'"{key}"') for cam, key in CAMERA_KEYS.items()}
        images[Camera.RIGHT_WRIST] = np.zeros_like(images[Camera.BASE])
        return {
            "images": images,
            "image_masks": {cam: cam in CAMERA_KEYS for cam in Camera},
            "state": check_state(_get(obs, STATE_KEY), f'"{STATE_KEY}"'),
            "prompt": _prompt(obs),
        }


def _states(state: Any, batch: int) -> np.ndarray:
    """The raw states [B, 8] the actions were computed from: [8], [B, 8], or the observation(s)."""
    if isinstance(state, Mapping):
        state = [state]
    if isinstance(state, Sequence) and state and isinstance(state[0], Mapping):
        state = [_get(o, STATE_KEY) for o in state]
    states = np.asarray(state)
    states = states[None] if states.ndim == 1 else states
    if states.ndim != 2 or states.shape[0] != batch:
        raise ValueError(f"state must be [{STATE_DIM}] or [batch={batch}, {STATE_DIM}], got shape {states.shape}")
    return np.stack([check_state(s, f"state {i}") for i, s in enumerate(states)])


@dataclass(frozen=True)
class CheckModelActions:
    """The model's actions [B, H, action_dim] as float32 (the dtype openpi's model returns: its quantile
    inverse starts with float32 arithmetic), finite; the raw states beside them as [B, 8]."""

    action_dim: int

    def __call__(self, data: Data) -> Data:
        raw = data["actions"]
        if isinstance(raw, torch.Tensor):
            raw = raw.detach().float().cpu().numpy()
        actions = np.asarray(raw, dtype=np.float32)
        if actions.ndim != 3 or actions.shape[-1] != self.action_dim:
            raise ValueError(f"model actions must be [batch, horizon, {self.action_dim}], got shape {actions.shape}")
        if not np.isfinite(actions).all():
            raise ValueError("model actions contain NaN or inf")
        return {"actions": actions, "state": _states(data["state"], actions.shape[0])}


def libero_delta_mask(cfg: Config) -> tuple[bool, ...] | None:
    """openpi's pi0_libero adds the state back to action dims 0-5; pi05_libero has no delta transform."""
    return None if cfg.pi05 else make_bool_mask(6, -1)


# ----------------------------------------------------------------------------- the chains


def input_chain(cfg: Config, tokenizer: PromptTokenizer, norm_stats: Mapping[str, NormStats],
                discrete_state_input: bool | None = None) -> Compose:
    """One LIBERO request -> model terms. ``discrete_state_input`` puts the state in the prompt
    (pi0.5 only); None means openpi's default, on for pi0.5 (but pi05_libero was trained with it off)."""
    discrete_state = cfg.pi05 if discrete_state_input is None else discrete_state_input
    if discrete_state and not cfg.pi05:
        raise ValueError("discrete_state_input is a pi0.5 option; pi0 reads the state in its action expert")
    if tokenizer.max_len != cfg.max_token_len:
        raise ValueError(f"tokenizer pads to {tokenizer.max_len} tokens, model {cfg.name} expects {cfg.max_token_len}")
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {tokenizer.vocab_size} pieces, more than model "
                         f"{cfg.name}'s vocabulary of {cfg.vocab_size}")
    size = cfg.vision.image_size
    return Compose((LiberoInputs(), Normalize(norm_stats, uses_quantile_norm(cfg)), ResizeImages(size, size),
                    TokenizePrompt(tokenizer, discrete_state), PadState(cfg.action_dim)))


def output_chain(cfg: Config, norm_stats: Mapping[str, NormStats], delta_mask: Sequence[bool] | None = None,
                 action_dim_out: int = ACTION_DIM) -> Compose:
    """Model actions [B, H, action_dim] + raw states -> env actions [B, H, action_dim_out], float64."""
    if not 1 <= action_dim_out <= cfg.action_dim:
        raise ValueError(f"action_dim_out must be in [1, {cfg.action_dim}], got {action_dim_out}")
    delta = (AbsoluteActions(tuple(delta_mask), cfg.action_dim),) if delta_mask is not None else ()
    return Compose((CheckModelActions(cfg.action_dim), Unnormalize(norm_stats, uses_quantile_norm(cfg)), *delta,
                    KeepActionDims(action_dim_out)))


def libero_transforms(cfg: Config, tokenizer: PromptTokenizer, norm_stats: Mapping[str, NormStats]) -> PolicyTransforms:
    """openpi's pi0_libero / pi05_libero settings: delta actions for pi0 only, no state in the prompt."""
    return PolicyTransforms(cfg, input_chain(cfg, tokenizer, norm_stats, discrete_state_input=False),
                            output_chain(cfg, norm_stats, libero_delta_mask(cfg)))


def checkpoint_transforms(checkpoint: Path, cfg: Config) -> PolicyTransforms:
    """The LIBERO transforms with a checkpoint folder's own tokenizer and norm stats (what a build
    and the reference's `pi-run predict` use; the runtime reads the copies carried by the engines)."""
    from pi_build.errors import CheckpointError
    from pi_build.model.checkpoints import TOKENIZER_FILE, read_assets
    from pi_build.model.norm_stats import parse_norm_stats

    tokenizer_path, raw_stats = read_assets(checkpoint)
    if raw_stats is None:
        raise CheckpointError(f"{checkpoint}: no norm stats (openpi: assets/<asset_id>/norm_stats.json; lerobot: the "
                              "normalizer processor file), needed to normalize states and actions")
    if tokenizer_path is None:
        raise CheckpointError(f"{checkpoint}: no {TOKENIZER_FILE} (the PaliGemma sentencepiece model) beside config.json")
    tokenizer = PromptTokenizer(tokenizer_path, max_len=cfg.max_token_len)
    return libero_transforms(cfg, tokenizer, parse_norm_stats(raw_stats, str(checkpoint)))


def observation_to_inputs(obs: Mapping | Sequence[Mapping], *, model_cfg: Config, tokenizer: PromptTokenizer,
                          norm_stats: Mapping[str, NormStats], discrete_state_input: bool | None = None,
                          device: str | torch.device = "cpu") -> ModelInputs:
    """One raw LIBERO observation (batch 1), or a list of them (batch B), as model inputs.

    An observation holds "observation/image" and "observation/wrist_image" (uint8 [h, w, 3], any
    size: resized with padding), "observation/state" (8 numbers) and "prompt" (str).
    """
    chain = input_chain(model_cfg, tokenizer, norm_stats, discrete_state_input)
    observations = [obs] if isinstance(obs, Mapping) else list(obs)
    return to_model_inputs([chain(o) for o in observations], device)


def actions_to_env(raw_actions: np.ndarray | torch.Tensor, state: np.ndarray | Mapping | Sequence[Mapping], *,
                   model_cfg: Config, norm_stats: Mapping[str, NormStats], delta_mask: Sequence[bool] | None = None,
                   action_dim_out: int = ACTION_DIM) -> np.ndarray:
    """Model actions [B, H, action_dim] -> env actions [B, H, action_dim_out] (float64, as openpi returns).

    ``state`` is the raw state the actions were computed from: [8] or [B, 8], or the observation(s).
    """
    chain = output_chain(model_cfg, norm_stats, delta_mask, action_dim_out)
    return chain({"actions": raw_actions, "state": state})["actions"]


# ----------------------------------------------------------------------------- recorded observations


def load_recorded_observations(path: Path | None = None) -> list[dict[str, Any]]:
    """Real LIBERO request dicts recorded once, for tests, calibration and demos without the simulator.

    ``path``: an .npz of the same layout (base, wrist [N, 224, 224, 3] uint8, state [N, 8],
    prompt [N] str; suite and task_id optional), e.g. a calibration set of your own; None = the
    set shipped with pi-build. Each dict has the openpi request keys plus `suite` and `task_id`.
    """
    if path is None:
        resource = importlib.resources.files("pi_build") / "data" / RECORDED_OBSERVATIONS
        with importlib.resources.as_file(resource) as file:
            return load_recorded_observations(Path(file))
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read observations from {path}: {exc}") from exc
    missing = [key for key in OBSERVATION_ARRAYS if key not in arrays]
    if missing:
        raise InputError(f"{path}: missing arrays {missing}; an observations .npz holds {list(OBSERVATION_ARRAYS)}")
    return [
        {
            CAMERA_KEYS[Camera.BASE]: arrays["base"][i],
            CAMERA_KEYS[Camera.LEFT_WRIST]: arrays["wrist"][i],
            STATE_KEY: arrays["state"][i],
            PROMPT_KEY: str(arrays["prompt"][i]),
            "suite": str(arrays["suite"][i]) if "suite" in arrays else "",
            "task_id": int(arrays["task_id"][i]) if "task_id" in arrays else -1,
        }
        for i in range(len(arrays["base"]))
    ]
