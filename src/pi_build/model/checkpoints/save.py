"""Writing checkpoints in openpi's or lerobot's layout (what their loaders read back), and random
ones of the real architecture for the demo, the tests and speed work (no weights can be downloaded).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from pi_build.io import atomic_dir, write_json
from pi_build.model.checkpoints.infer import variant_name
from pi_build.model.checkpoints.layout import (CONFIG_FILE, EMBED_KEY, EXPERT_LM_HEAD_KEY, LEROBOT_NORMALIZER_STEP, LEROBOT_PREFIX,
                                              LM_HEAD_KEY, TOKENIZER_FILE, WEIGHTS_FILE, Layout)
from pi_build.model.norm_stats import LEROBOT_FEATURES, to_json_lists
from pi_build.model.pi0 import IMAGE_SIZE, Config, PiModel, build_model, get_config


def _openpi_config_json(cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """The fields openpi's convert_jax_model_to_pytorch.py writes, plus pi05 and max_token_len
    (Pi0Config's names for them) because tensors cannot tell the prompt length."""
    return {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": variant_name(cfg.llm),
        "action_expert_variant": variant_name(cfg.expert),
        "precision": "bfloat16" if dtype == torch.bfloat16 else "float32",
        "pi05": cfg.pi05,
        "max_token_len": cfg.max_token_len,
    }


def _lerobot_config_json(cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """A lerobot PI0Config / PI05Config as draccus writes it (inference fields; the rest take lerobot's defaults)."""
    norm_mode = "QUANTILES" if cfg.pi05 else "MEAN_STD"
    return {
        "type": "pi05" if cfg.pi05 else "pi0",
        "n_obs_steps": 1,
        "paligemma_variant": variant_name(cfg.llm),
        "action_expert_variant": variant_name(cfg.expert),
        "dtype": "bfloat16" if dtype == torch.bfloat16 else "float32",
        "chunk_size": cfg.action_horizon,
        "n_action_steps": cfg.action_horizon,
        "max_state_dim": cfg.action_dim,
        "max_action_dim": cfg.action_dim,
        "num_inference_steps": 10,
        "image_resolution": [IMAGE_SIZE, IMAGE_SIZE],
        "empty_cameras": 0,
        "tokenizer_max_length": cfg.max_token_len,
        "normalization_mapping": {"VISUAL": "IDENTITY", "STATE": norm_mode, "ACTION": norm_mode},
        "push_to_hub": False,
    }


def _save_weights(model: PiModel, path: Path, prefix: str, dtype: torch.dtype) -> None:
    """One safetensors file, in the form openpi / lerobot write it: the embedding only under its tied
    LM-head name, plus the expert's unused LM head (zeros here) so that their strict loaders accept it.

    Tensors already in ``dtype`` on the CPU are passed by reference (save_file reads them in place),
    so only converted ones take extra memory.
    """
    tensors = {}
    for key, value in model.state_dict().items():
        name = LM_HEAD_KEY if key == EMBED_KEY else key
        tensors[prefix + name] = value.detach().to(device="cpu", dtype=dtype).contiguous()
    cfg = model.cfg
    tensors[prefix + EXPERT_LM_HEAD_KEY] = torch.zeros(cfg.vocab_size, cfg.expert.width, dtype=dtype)
    # save_model records each dropped tied name -> the name kept.
    _save_tensors(tensors, path, metadata={"format": "pt", prefix + EMBED_KEY: prefix + LM_HEAD_KEY})


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    save_file(tensors, path, metadata=metadata)
    # safetensors writes a 0600 temporary file and renames it; give it the mode any new file gets here (umask).
    probe = path.with_name(path.name + ".mode")
    probe.touch()
    shutil.copymode(probe, path)
    probe.unlink()


def save_checkpoint(
    model: PiModel,
    out_dir: Path,
    *,
    layout: Layout = "openpi",
    norm_stats: Mapping[str, Mapping[str, Any]] | None = None,
    asset_id: str = "libero",
    tokenizer_model: Path | None = None,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as a checkpoint folder ``out_dir`` that load_checkpoint (and openpi / lerobot) read.

    norm_stats: {"state": {"mean": ..., "std": ..., "q01": ..., "q99": ...}, "actions": {...}}, written
    as openpi's assets/<asset_id>/norm_stats.json or as lerobot's normalizer state file (that file
    only: lerobot's policy_pre/postprocessor.json pipelines are not written). tokenizer_model is
    copied in as tokenizer.model. ``dtype`` of the stored tensors: float32 or bfloat16 (all of them, as
    openpi's converter stores them). The folder is built beside out_dir and renamed into place, so
    out_dir never holds a partial checkpoint; an existing out_dir is an error unless ``overwrite``.
    """
    if layout not in ("openpi", "lerobot"):
        raise ValueError(f"layout must be 'openpi' or 'lerobot', got {layout!r}")
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dtype must be torch.float32 or torch.bfloat16, got {dtype}")
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True to replace it")
    stats = to_json_lists(norm_stats) if norm_stats is not None else None
    if tokenizer_model is not None and not Path(tokenizer_model).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer_model} does not exist")

    with atomic_dir(out_dir, replace=overwrite) as tmp:
        cfg = model.cfg
        if layout == "openpi":
            _save_weights(model, tmp / WEIGHTS_FILE, "", dtype)
            write_json(tmp / CONFIG_FILE, _openpi_config_json(cfg, dtype))
            if stats is not None:
                write_json(tmp / "assets" / asset_id / "norm_stats.json", {"norm_stats": stats})
        else:
            _save_weights(model, tmp / WEIGHTS_FILE, LEROBOT_PREFIX, dtype)
            write_json(tmp / CONFIG_FILE, _lerobot_config_json(cfg, dtype))
            if stats is not None:
                flat = {
                    f"{LEROBOT_FEATURES.get(name, name)}.{stat}": torch.tensor(values, dtype=torch.float32)
                    for name, per_stat in stats.items()
                    for stat, values in per_stat.items()
                }
                step = LEROBOT_NORMALIZER_STEP[cfg.pi05]
                _save_tensors(flat, tmp / f"policy_preprocessor_step_{step}_normalizer_processor.safetensors")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER_FILE)
    return out_dir


def make_random_checkpoint(
    config_name: str,
    out_dir: Path,
    *,
    seed: int = 0,
    layout: Layout = "openpi",
    dtype: torch.dtype = torch.float32,
    horizon: int | None = None,
    norm_stats: Mapping[str, Mapping[str, Any]] | None = None,
    tokenizer_model: Path | None = None,
    overwrite: bool = False,
) -> Path:
    """A checkpoint of model.build_model(config_name, seed=seed)'s random weights (demo, tests, speed work).

    ``horizon`` overrides the preset's action horizon (e.g. 10 for pi05_libero).
    """
    cfg = get_config(config_name)
    if horizon is not None:
        cfg = cfg.replace(action_horizon=horizon)
    # Built in the stored dtype so that a bfloat16 save converts only the few float32-policy tensors.
    model = build_model(cfg, seed=seed, dtype=dtype)
    return save_checkpoint(
        model,
        out_dir,
        layout=layout,
        norm_stats=norm_stats,
        tokenizer_model=tokenizer_model,
        dtype=dtype,
        overwrite=overwrite,
    )
