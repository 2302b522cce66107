"""Loading a pi0 / pi0.5 checkpoint folder (openpi or lerobot layout) into the reference model, and
reading the assets a runtime needs beside the weights (the tokenizer and the norm stats).

Loading builds the model on the meta device and assigns tensors one at a time, converted to their
final dtype as they are read, so a full-size model never exists twice in memory. A tensor that
needs no conversion (a float32 file loaded as float32 on the CPU) stays a copy-on-write view of the
memory-mapped file, as with torch.load(mmap=True): don't rewrite a checkpoint file in place while a
model loaded from it lives (save_checkpoint never does; it renames a new folder into place).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from pi_build.errors import CheckpointError
from pi_build.io import sha256_file
from pi_build.model import norm_stats
from pi_build.model.checkpoints.infer import infer_config
from pi_build.model.checkpoints.layout import (CONFIG_FILE, EMBED_KEY, FLOAT_DTYPES, LEROBOT_NORMALIZER_GLOB, LEROBOT_PREFIX,
                                              LEROBOT_PREPROCESSOR_JSON, LM_HEAD_KEY, TOKENIZER_FILE, UNUSED_KEYS,
                                              CheckpointInfo, Layout, detect_layout, is_lerobot_config, open_tensors,
                                              read_json, resolve_folder, weight_files)
from pi_build.model.pi0 import PiModel

# ----------------------------------------------------------------------------- norm stats and tokenizer


def _find_openpi_norm_stats(folder: Path, asset_id: str | None) -> tuple[Path | None, tuple[str, ...]]:
    """assets/<asset_id>/norm_stats.json; asset ids may hold a slash (openpi's LIBERO: physical-intelligence/libero)."""
    assets = folder / "assets"
    found = sorted(assets.rglob("norm_stats.json")) if assets.is_dir() else []
    asset_ids = tuple(p.parent.relative_to(assets).as_posix() for p in found)
    if asset_id is not None:
        if asset_id not in asset_ids:
            raise CheckpointError(
                f"no assets/{asset_id}/norm_stats.json in {folder}; asset ids present: {list(asset_ids)}"
            )
        return assets / asset_id / "norm_stats.json", asset_ids
    return (found[0] if len(found) == 1 else None), asset_ids


def _find_lerobot_normalizer(folder: Path) -> Path | None:
    """The normalizer's state file: named by policy_preprocessor.json when present, else found by its name pattern."""
    pipeline = folder / LEROBOT_PREPROCESSOR_JSON
    if pipeline.is_file():
        for step in read_json(pipeline).get("steps", []):
            if step.get("registry_name") == "normalizer_processor" and step.get("state_file"):
                path = folder / step["state_file"]
                if not path.is_file():
                    raise CheckpointError(f"{pipeline} names {step['state_file']}, which is not in {folder}")
                return path
        return None
    found = sorted(folder.glob(LEROBOT_NORMALIZER_GLOB))
    if len(found) > 1:
        raise CheckpointError(f"{folder} holds several normalizer files: {[p.name for p in found]}")
    return found[0] if found else None


def _find_norm_stats(folder: Path, layout: Layout, asset_id: str | None) -> tuple[Path | None, dict | None, tuple[str, ...]]:
    """(file, stats in openpi's {"state": {"mean": [...], ...}, "actions": {...}} form, openpi asset ids)."""
    if layout == "openpi":
        path, asset_ids = _find_openpi_norm_stats(folder, asset_id)
        return path, (norm_stats.read_openpi_file(path, CheckpointError) if path is not None else None), asset_ids
    path = _find_lerobot_normalizer(folder)
    return path, (norm_stats.read_lerobot_file(path, CheckpointError) if path is not None else None), ()


def read_assets(path: Path, *, asset_id: str | None = None) -> tuple[Path | None, dict | None]:
    """A checkpoint's tokenizer model and norm stats, without reading its weights: what a runtime
    needs beside engines. Layout as in load_checkpoint (a lerobot config.json says "type")."""
    folder = resolve_folder(path)
    config_path = folder / CONFIG_FILE
    layout: Layout = "lerobot" if config_path.is_file() and is_lerobot_config(read_json(config_path)) else "openpi"
    _, stats, asset_ids = _find_norm_stats(folder, layout, asset_id)
    if layout == "openpi" and stats is None and len(asset_ids) > 1:
        raise CheckpointError(f"{folder} has norm stats for several asset ids {list(asset_ids)}: choose one (asset_id)")
    tokenizer = folder / TOKENIZER_FILE
    return (tokenizer if tokenizer.is_file() else None), stats


# ----------------------------------------------------------------------------- loading


def _check_tensor_set(
    found: Mapping[str, tuple[tuple[int, ...], str]], expected: Mapping[str, tuple[int, ...]], prefix: str
) -> None:
    """Missing, unexpected, mis-shaped and non-float tensors; ``found`` has the embedding already resolved."""

    def listed(keys: list[str]) -> str:
        shown = ", ".join(repr(prefix + k) for k in keys[:8])
        return shown + (f" and {len(keys) - 8} more" if len(keys) > 8 else "")

    missing = sorted(set(expected) - set(found))
    if missing:
        raise CheckpointError(f"checkpoint is missing {len(missing)} tensor(s): {listed(missing)}")
    unexpected = sorted(set(found) - set(expected) - UNUSED_KEYS)
    if unexpected:
        raise CheckpointError(f"checkpoint has {len(unexpected)} unexpected tensor(s): {listed(unexpected)}")
    for key, shape in expected.items():
        found_shape, dtype = found[key]
        if tuple(found_shape) != tuple(shape):
            raise CheckpointError(f"tensor {prefix + key!r} has shape {list(found_shape)}, expected {list(shape)}")
        if dtype not in FLOAT_DTYPES:
            raise CheckpointError(
                f"tensor {prefix + key!r} has dtype {dtype}; expected a float tensor (F32, BF16 or F16)"
            )


def load_checkpoint(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    config_name: str | None = None,
    asset_id: str | None = None,
) -> tuple[PiModel, CheckpointInfo]:
    """Load an openpi or lerobot pi0 / pi0.5 checkpoint folder (or its model.safetensors).

    ``dtype``: float32, or bfloat16 with openpi's policy (model.PiModel.set_dtype). ``config_name``
    insists on a model.CONFIGS preset (an error if the tensors disagree). ``asset_id`` picks which
    openpi assets/<asset_id>/norm_stats.json to load when there are several.
    """
    folder = resolve_folder(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}")
    config_json = read_json(config_path)
    files = weight_files(folder)

    with open_tensors(files) as tensors:
        layout = detect_layout(list(tensors))
        prefix = LEROBOT_PREFIX if layout == "lerobot" else ""
        # Keys in openpi's form -> where to read them.
        source = {name[len(prefix) :]: handle_and_name for name, handle_and_name in tensors.items()}
        if EMBED_KEY not in source and LM_HEAD_KEY in source:
            source[EMBED_KEY] = source[LM_HEAD_KEY]  # the tied embedding, stored once as the LM head
        found = {}
        for key, (handle, name) in source.items():
            tensor_slice = handle.get_slice(name)
            found[key] = (tuple(tensor_slice.get_shape()), tensor_slice.get_dtype())
        shapes = {key: shape for key, (shape, _) in found.items()}

        cfg = infer_config(shapes, config_json, config_name)
        with torch.device("meta"):
            model = PiModel(cfg)
        model.set_dtype(dtype)  # on meta tensors: fixes each parameter's final dtype, allocates nothing
        expected = {key: tuple(p.shape) for key, p in model.state_dict().items()}
        _check_tensor_set(found, expected, prefix)

        for key in expected:
            module_name, _, attr = key.rpartition(".")
            module = model.get_submodule(module_name)
            old = getattr(module, attr)
            handle, name = source[key]
            value = handle.get_tensor(name).to(device=device, dtype=old.dtype)
            setattr(module, attr, nn.Parameter(value, requires_grad=old.requires_grad))
    model.eval()

    norm_stats_path, norm_stats, asset_ids = _find_norm_stats(folder, layout, asset_id)
    tokenizer = folder / TOKENIZER_FILE
    info = CheckpointInfo(
        path=folder,
        layout=layout,
        config=cfg,
        weight_sha256={f.name: sha256_file(f) for f in files},
        config_json=config_json,
        norm_stats_path=norm_stats_path,
        norm_stats=norm_stats,
        asset_ids=asset_ids,
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )
    return model, info
