"""One action chunk from the reference model, for `pi-run predict`: an .npz of model-level inputs
(images, image_masks, tokens, token_masks[, state][, noise]) gives the raw chunk [B, H, 32] in
normalized space; an .npz of a raw LIBERO observation (observation/image, observation/wrist_image,
observation/state, prompt) goes through the checkpoint's transforms and gives robot actions [1, H, 7].
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pi_build.errors import InputError
from pi_build.model.checkpoints import CheckpointInfo, load_checkpoint
from pi_build.model.pi0 import Config, ModelInputs

MODEL_LEVEL_KEYS = {"images", "image_masks", "tokens", "token_masks", "state", "noise"}
RAW_KEYS = {"observation/image", "observation/wrist_image", "observation/state", "prompt"}


def read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read {path} as .npz (pickled objects are refused): {exc}") from None


def model_level_inputs(arrays: dict[str, np.ndarray], cfg: Config, path: Path) -> tuple[ModelInputs, torch.Tensor | None]:
    """Check and convert the model-level keys; errors name the key, the shape and the file."""
    unknown = set(arrays) - MODEL_LEVEL_KEYS
    if unknown:
        raise InputError(f"{path}: unknown keys {sorted(unknown)}; model-level inputs take {sorted(MODEL_LEVEL_KEYS)}")
    required = ["images", "image_masks", "tokens", "token_masks"] + ([] if cfg.pi05 else ["state"])
    for key in required:
        if key not in arrays:
            raise InputError(f"{path}: missing key {key!r}")
    images = arrays["images"]
    if images.ndim != 5 or images.shape[2:] != (3, 224, 224):
        raise InputError(f"{path}: 'images' must be [B, C, 3, 224, 224], got {list(images.shape)}")
    b, c = images.shape[:2]
    expect = {"image_masks": (b, c), "tokens": (b, None), "token_masks": (b, arrays["tokens"].shape[-1])}
    if "state" in arrays:
        expect["state"] = (b, cfg.action_dim)
    if "noise" in arrays:
        expect["noise"] = (b, None, cfg.action_dim)
    for key, shape in expect.items():
        got = arrays[key].shape
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            raise InputError(f"{path}: {key!r} has shape {list(got)}, expected {[s if s is not None else '*' for s in shape]}")
    for key in ("images", "state", "noise"):
        if key in arrays and not np.isfinite(arrays[key]).all():
            raise InputError(f"{path}: {key!r} holds NaN or inf")
    if arrays["tokens"].max(initial=0) >= cfg.vocab_size or arrays["tokens"].min(initial=0) < 0:
        raise InputError(f"{path}: 'tokens' out of the vocabulary range [0, {cfg.vocab_size})")
    state = arrays.get("state")
    inputs = ModelInputs(
        torch.from_numpy(images.astype(np.float32)),
        torch.from_numpy(arrays["image_masks"].astype(bool)),
        torch.from_numpy(arrays["tokens"].astype(np.int64)),
        torch.from_numpy(arrays["token_masks"].astype(bool)),
        None if state is None else torch.from_numpy(state.astype(np.float32)),
    )
    noise = arrays.get("noise")
    return inputs, None if noise is None else torch.from_numpy(noise.astype(np.float32))


def predict_actions(checkpoint: Path, inputs_path: Path, *, steps: int, dtype: str, device: str, seed: int) -> tuple[np.ndarray, CheckpointInfo]:
    """The reference model's actions for the inputs in ``inputs_path``; noise from ``seed`` unless the inputs carry it."""
    from pi_build.transforms.libero import checkpoint_transforms

    arrays = read_npz(inputs_path)
    raw = bool(RAW_KEYS & set(arrays))
    model, info = load_checkpoint(checkpoint, dtype=getattr(torch, dtype), device=device)
    cfg = model.cfg
    if raw:
        obs = {k: (str(v) if k == "prompt" else v) for k, v in arrays.items()}
        transforms = checkpoint_transforms(info.path, cfg)
        try:
            model_inputs, noise = transforms.inputs(obs), None
        except (KeyError, ValueError, TypeError) as e:  # the observation's own problem: say which
            raise InputError(f"{inputs_path}: not a usable LIBERO observation: {str(e).strip(chr(39))}") from None
    else:
        model_inputs, noise = model_level_inputs(arrays, cfg, inputs_path)
    if noise is not None and noise.shape[1] != cfg.action_horizon:
        model.cfg = cfg = cfg.replace(action_horizon=noise.shape[1])
    if noise is None:
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn(model_inputs.batch_size, cfg.action_horizon, cfg.action_dim, generator=generator)
    if model_inputs.state is None:
        model_inputs.state = torch.zeros(model_inputs.batch_size, cfg.action_dim)  # pi0.5 does not read it
    actions = model.sample(model_inputs.to(device), noise.to(device), steps).float().cpu().numpy()
    return (transforms.outputs(actions, obs) if raw else actions), info
