"""Load and save pi0 / pi0.5 checkpoints: openpi's PyTorch layout and lerobot's.

Both layouts hold one safetensors file whose tensor names are the reference model's state-dict
keys (``model.py`` mirrors openpi's module tree), lerobot's with a ``model.`` prefix:

    openpi:   model.safetensors, config.json, assets/<asset_id>/norm_stats.json
    lerobot:  model.safetensors (keys "model." + openpi's), config.json ("type": "pi0" | "pi05", ...),
              policy_preprocessor_step_<i>_normalizer_processor.safetensors (normalization stats)

What a real file holds, beyond the model's own tensors: openpi and lerobot write with
``safetensors.torch.save_model``, which stores a tied tensor once under the first of its names in
sorted order, so PaliGemma's token embedding appears only as ``paligemma.lm_head.weight``; and the
action expert is a ``GemmaForCausalLM`` whose (never used) vocabulary head is saved too.

Everything about the model is read from the tensors themselves (pi0 vs pi0.5, widths, depths,
heads), so a folder's name never matters; config.json only supplies what tensors cannot say (the
action horizon, the prompt length) and is cross-checked where it does say something. Only
safetensors and JSON are read: pickled weights (.bin, .pt) are refused, never unpickled.

Loading builds the model on the meta device and assigns tensors one at a time, converted to their
final dtype as they are read, so a full-size model never exists twice in memory. A tensor that
needs no conversion (a float32 file loaded as float32 on the CPU) stays a copy-on-write view of the
memory-mapped file, as with torch.load(mmap=True): don't rewrite a checkpoint file in place while a
model loaded from it lives (save_checkpoint never does; it renames a new folder into place).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from pi_build.artifacts import file_sha256
from pi_build.model.pi0 import CONFIGS, IMAGE_SIZE, Config, GemmaConfig, PiModel, SiglipConfig, build_model, get_config

Layout = Literal["openpi", "lerobot"]

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # Hugging Face's sharded form
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # pi-build's own addition: the sentencepiece model beside config.json
LEROBOT_PREFIX = "model."
LEROBOT_PREPROCESSOR_JSON = "policy_preprocessor.json"
LEROBOT_NORMALIZER_GLOB = "policy_preprocessor_step_*_normalizer_processor.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

_VISION = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
_LLM = "paligemma_with_expert.paligemma.model.language_model."
_EXPERT = "paligemma_with_expert.gemma_expert.model."
EMBED_KEY = _LLM + "embed_tokens.weight"
# PaliGemma's output head, tied to EMBED_KEY: the name under which real checkpoints store the embedding.
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"
# The action expert's vocabulary head [257152, 1024]: saved by openpi and lerobot, used by neither.
EXPERT_LM_HEAD_KEY = "paligemma_with_expert.gemma_expert.lm_head.weight"
# Tensors that real checkpoints carry and the model does not use (LM_HEAD_KEY is read when it is
# the only copy of the embedding).
UNUSED_KEYS = frozenset({LM_HEAD_KEY, EXPERT_LM_HEAD_KEY})

_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# openpi's Gemma variants (models/gemma.py): (width, depth, mlp_dim); "_lora" ones share the base shapes.
OPENPI_GEMMA_VARIANTS = {
    "gemma_2b": (2048, 18, 16384),
    "gemma_2b_lora": (2048, 18, 16384),
    "gemma_300m": (1024, 18, 4096),
    "gemma_300m_lora": (1024, 18, 4096),
    "dummy": (64, 4, 128),
}
# Where lerobot's pipelines put the normalizer (processor_pi0.py / processor_pi05.py): the file name carries it.
_LEROBOT_NORMALIZER_STEP = {False: 6, True: 3}
# openpi's norm-stats names <-> lerobot's feature names.
_LEROBOT_FEATURES = {"state": "observation.state", "actions": "action"}


class CheckpointError(ValueError):
    """A checkpoint folder that cannot be loaded as it is; the message names the file or tensor."""


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What ``load_checkpoint`` found besides the weights."""

    path: Path  # the checkpoint folder
    layout: Layout
    config: Config
    weight_sha256: dict[str, str]  # weight file name -> sha256 hex digest of its bytes
    config_json: dict[str, Any]  # config.json as written
    norm_stats_path: Path | None  # openpi's norm_stats.json, or lerobot's normalizer .safetensors
    norm_stats: dict[str, dict[str, Any]] | None  # {"state": {"mean": [...], ...}, "actions": {...}}
    asset_ids: tuple[str, ...]  # openpi: every assets/<asset_id>/norm_stats.json present
    tokenizer_path: Path | None


# ----------------------------------------------------------------------------- reading tensors


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint folder, refusing pickled weights."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / SHARD_INDEX_FILE
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index}: no 'weight_map' naming the shard files")
        shards = [folder / name for name in sorted(set(weight_map.values()))]
        for shard in shards:
            if not shard.is_file():
                raise CheckpointError(f"{index} names shard {shard.name}, which is not in {folder}")
        return shards
    pickled = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickled:
        raise CheckpointError(
            f"{folder} holds pickled weights ({', '.join(pickled)}) and no {WEIGHTS_FILE}; pi-build never "
            "unpickles files (unpickling runs arbitrary code). Convert them to safetensors first."
        )
    raise CheckpointError(f"{folder} has no {WEIGHTS_FILE} (nor {SHARD_INDEX_FILE})")


@contextlib.contextmanager
def _open_tensors(files: list[Path]) -> Iterator[dict[str, tuple[Any, str]]]:
    """Opens the weight files lazily: yields {tensor name in file: (open file, name)}; reads no data."""
    with contextlib.ExitStack() as stack:
        tensors: dict[str, tuple[Any, str]] = {}
        for path in files:
            try:
                handle = stack.enter_context(safe_open(path, framework="pt", device="cpu"))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from e
            for name in handle.keys():
                if name in tensors:
                    raise CheckpointError(f"tensor {name!r} appears in more than one weight file ({path.name})")
                tensors[name] = (handle, name)
        yield tensors


def _detect_layout(names: list[str]) -> Layout:
    """lerobot prefixes every key with "model."; openpi's keys start at the model's own tree."""
    if not names:
        raise CheckpointError("the weight file holds no tensors")
    if all(name.startswith(LEROBOT_PREFIX) for name in names):
        return "lerobot"
    openpi_roots = (
        "paligemma_with_expert.",
        "action_in_proj.",
        "action_out_proj.",
        "state_proj.",
        "action_time_mlp_",
        "time_mlp_",
    )
    if any(name.startswith(openpi_roots) for name in names):
        return "openpi"
    raise CheckpointError(f"tensor names match neither openpi's nor lerobot's layout (e.g. {sorted(names)[0]!r})")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: not readable JSON: {e}") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


# ----------------------------------------------------------------------------- config from shapes


def _shape(shapes: Mapping[str, tuple[int, ...]], key: str) -> tuple[int, ...]:
    if key not in shapes:
        raise CheckpointError(f"missing tensor {key!r} (needed to work out the model's size)")
    return shapes[key]


def _depth(shapes: Mapping[str, tuple[int, ...]], layers_prefix: str) -> int:
    """Highest layer index + 1, so a layer missing in the middle shows up later as missing keys."""
    indices = {int(k[len(layers_prefix) :].split(".")[0]) for k in shapes if k.startswith(layers_prefix)}
    if not indices:
        raise CheckpointError(f"no tensors under {layers_prefix!r}")
    return max(indices) + 1


def _gemma_shapes(shapes: Mapping[str, tuple[int, ...]], prefix: str) -> dict[str, int]:
    """What the tensors say of a Gemma: width, depth, mlp dim and the q / kv projection widths."""
    q = _shape(shapes, prefix + "layers.0.self_attn.q_proj.weight")
    return {
        "width": q[1],
        "depth": _depth(shapes, prefix + "layers."),
        "mlp_dim": _shape(shapes, prefix + "layers.0.mlp.gate_proj.weight")[0],
        "q_rows": q[0],
        "kv_rows": _shape(shapes, prefix + "layers.0.self_attn.k_proj.weight")[0],
    }


def _gemma_signature(cfg: GemmaConfig) -> dict[str, int]:
    return {
        "width": cfg.width,
        "depth": cfg.depth,
        "mlp_dim": cfg.mlp_dim,
        "q_rows": cfg.num_heads * cfg.head_dim,
        "kv_rows": cfg.num_kv_heads * cfg.head_dim,
    }


def _signature(cfg: Config) -> dict[str, Any]:
    """Every architecture number that a checkpoint's tensor shapes determine."""
    v = cfg.vision
    return {
        "pi05": cfg.pi05,
        "vocab_size": cfg.vocab_size,
        "action_dim": cfg.action_dim,
        "vision": {"width": v.width, "depth": v.depth, "mlp_dim": v.mlp_dim, "patch_size": v.patch_size},
        "llm": _gemma_signature(cfg.llm),
        "expert": _gemma_signature(cfg.expert),
    }


def _detect_pi05(shapes: Mapping[str, tuple[int, ...]]) -> bool:
    """pi0.5 has the time MLP (time_mlp_*); pi0 has the state token and the action-time MLP."""
    pi05_keys = sorted(k for k in shapes if k.startswith("time_mlp_"))
    pi0_keys = sorted(k for k in shapes if k.startswith(("state_proj.", "action_time_mlp_")))
    if pi05_keys and pi0_keys:
        raise CheckpointError(f"tensors of both pi0 ({pi0_keys[0]!r}) and pi0.5 ({pi05_keys[0]!r}) are present")
    if not pi05_keys and not pi0_keys:
        raise CheckpointError("neither pi0's state_proj/action_time_mlp_* nor pi0.5's time_mlp_* tensors are present")
    return bool(pi05_keys)


def _signature_from_shapes(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    patch = _shape(shapes, _VISION + "embeddings.patch_embedding.weight")  # [width, 3, p, p]
    positions = _shape(shapes, _VISION + "embeddings.position_embedding.weight")[0]
    if positions != (IMAGE_SIZE // patch[2]) ** 2:
        raise CheckpointError(
            f"{_VISION}embeddings.position_embedding.weight has {positions} rows; {IMAGE_SIZE}x{IMAGE_SIZE} images "
            f"in {patch[2]}-pixel patches need {(IMAGE_SIZE // patch[2]) ** 2} (other image sizes are not supported)"
        )
    embedding = shapes.get(EMBED_KEY) or _shape(shapes, LM_HEAD_KEY)
    return {
        "pi05": _detect_pi05(shapes),
        "vocab_size": embedding[0],
        "action_dim": _shape(shapes, "action_in_proj.weight")[1],
        "vision": {
            "width": patch[0],
            "depth": _depth(shapes, _VISION + "encoder.layers."),
            "mlp_dim": _shape(shapes, _VISION + "encoder.layers.0.mlp.fc1.weight")[0],
            "patch_size": patch[2],
        },
        "llm": _gemma_shapes(shapes, _LLM),
        "expert": _gemma_shapes(shapes, _EXPERT),
    }


def _config_from_signature(sig: dict[str, Any]) -> Config:
    """A Config for an architecture that no preset matches.

    Shapes cannot split q_proj's rows into heads x head_dim, nor give SigLIP's head count: every
    openpi Gemma is multi-query (one KV head), so head_dim = k_proj rows; SigLIP So400m (width 1152)
    has 16 heads, and other SigLIP widths exist only in model.CONFIGS.
    """

    def gemma(g: dict[str, int]) -> GemmaConfig:
        head_dim = g["kv_rows"]
        if g["q_rows"] % head_dim:
            raise CheckpointError(f"q_proj has {g['q_rows']} rows, not a multiple of k_proj's {head_dim} (one KV head)")
        return GemmaConfig(g["width"], g["depth"], g["mlp_dim"], g["q_rows"] // head_dim, 1, head_dim)

    v = sig["vision"]
    if v["width"] != SiglipConfig().width:
        raise CheckpointError(
            f"SigLIP width {v['width']} matches no model config, so its number of attention heads is unknown"
        )
    vision = SiglipConfig(width=v["width"], depth=v["depth"], mlp_dim=v["mlp_dim"], patch_size=v["patch_size"])
    return Config(
        name="custom",
        pi05=sig["pi05"],
        vision=vision,
        llm=gemma(sig["llm"]),
        expert=gemma(sig["expert"]),
        vocab_size=sig["vocab_size"],
        action_dim=sig["action_dim"],
        max_token_len=200 if sig["pi05"] else 48,  # openpi's Pi0Config default
    )


def infer_config(
    shapes: Mapping[str, tuple[int, ...]], config_json: Mapping[str, Any] | None = None, config_name: str | None = None
) -> Config:
    """The model Config of a checkpoint, from its tensor shapes (keys in openpi's form) and config.json.

    The architecture comes from the shapes. A model.CONFIGS preset with the same shapes supplies
    its name and what shapes cannot tell (head counts); ``config_name`` insists on one preset and
    fails if the shapes disagree. The action horizon and prompt length come from config.json,
    else from the preset.
    """
    config_json = config_json or {}
    sig = _signature_from_shapes(shapes)
    if config_name is not None:
        preset = get_config(config_name)
        wanted = _signature(preset)
        if wanted != sig:
            diffs = [
                f"{field}: {config_name} has {wanted[field]}, the tensors {sig[field]}"
                for field in sig
                if wanted[field] != sig[field]
            ]
            raise CheckpointError(f"checkpoint does not match config {config_name!r}: " + "; ".join(diffs))
    else:
        matching = [cfg for cfg in CONFIGS.values() if _signature(cfg) == sig]
        preset = matching[0] if matching else _config_from_signature(sig)
    _check_config_json(config_json, preset)
    horizon, token_len = _horizon_and_token_len(config_json)
    return preset.replace(
        action_horizon=horizon if horizon is not None else preset.action_horizon,
        max_token_len=token_len if token_len is not None else preset.max_token_len,
    )


# ----------------------------------------------------------------------------- config.json


def _is_lerobot_config(config_json: Mapping[str, Any]) -> bool:
    return "type" in config_json


def _horizon_and_token_len(config_json: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """openpi's converter writes action_horizon (pi-build adds max_token_len); lerobot writes chunk_size and
    tokenizer_max_length."""
    if _is_lerobot_config(config_json):
        return config_json.get("chunk_size"), config_json.get("tokenizer_max_length")
    return config_json.get("action_horizon"), config_json.get("max_token_len")


def _check_config_json(config_json: Mapping[str, Any], cfg: Config) -> None:
    """Errors where config.json contradicts what the tensors say."""

    def fail(what: str) -> None:
        raise CheckpointError(f"{CONFIG_FILE} contradicts the tensors: {what}")

    kind = "pi05" if cfg.pi05 else "pi0"
    if _is_lerobot_config(config_json):
        if config_json["type"] not in ("pi0", "pi05"):
            raise CheckpointError(f"{CONFIG_FILE} says type {config_json['type']!r}; pi-build loads pi0 and pi05 only")
        if config_json["type"] != kind:
            fail(f"it says type {config_json['type']!r}, the tensors are {kind} ({_kind_evidence(cfg)})")
        action_dim = config_json.get("max_action_dim")
        if not cfg.pi05 and config_json.get("max_state_dim", cfg.action_dim) != cfg.action_dim:
            fail(f"max_state_dim {config_json['max_state_dim']}, but state_proj takes {cfg.action_dim}")
        resolution = config_json.get("image_resolution")
        if resolution is not None and list(resolution) != [IMAGE_SIZE, IMAGE_SIZE]:
            raise CheckpointError(
                f"{CONFIG_FILE}: image_resolution {resolution} is not supported (only {IMAGE_SIZE}x{IMAGE_SIZE})"
            )
        for feature in ("use_visual_memory", "use_proprioceptive_memory"):
            if config_json.get(feature):
                raise CheckpointError(f"{CONFIG_FILE}: {feature} (lerobot's MEM memory) is not supported")
    else:
        if "pi05" in config_json and bool(config_json["pi05"]) != cfg.pi05:
            fail(f"it says pi05={config_json['pi05']}, the tensors are {kind} ({_kind_evidence(cfg)})")
        action_dim = config_json.get("action_dim")
    if action_dim is not None and action_dim != cfg.action_dim:
        fail(f"action dim {action_dim}, but action_in_proj takes {cfg.action_dim}")
    for field, gemma in (("paligemma_variant", cfg.llm), ("action_expert_variant", cfg.expert)):
        variant = config_json.get(field)
        if variant in OPENPI_GEMMA_VARIANTS and OPENPI_GEMMA_VARIANTS[variant] != (
            gemma.width,
            gemma.depth,
            gemma.mlp_dim,
        ):
            fail(
                f"{field} {variant!r} is (width, depth, mlp) {OPENPI_GEMMA_VARIANTS[variant]}, "
                f"the tensors {(gemma.width, gemma.depth, gemma.mlp_dim)}"
            )


def _kind_evidence(cfg: Config) -> str:
    return "time_mlp_in present" if cfg.pi05 else "state_proj present, time_mlp_in absent"


def _variant_name(gemma: GemmaConfig) -> str:
    shape = (gemma.width, gemma.depth, gemma.mlp_dim)
    return next((name for name, s in OPENPI_GEMMA_VARIANTS.items() if s == shape and "lora" not in name), "custom")


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


def _read_openpi_norm_stats(path: Path) -> dict[str, dict[str, Any]]:
    stats = _read_json(path).get("norm_stats")
    if not isinstance(stats, dict):
        raise CheckpointError(f"{path}: expected {{'norm_stats': {{name: {{mean, std, ...}}}}}}")
    return stats


def _find_lerobot_normalizer(folder: Path) -> Path | None:
    """The normalizer's state file: named by policy_preprocessor.json when present, else found by its name pattern."""
    pipeline = folder / LEROBOT_PREPROCESSOR_JSON
    if pipeline.is_file():
        for step in _read_json(pipeline).get("steps", []):
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


def _read_lerobot_norm_stats(path: Path) -> dict[str, dict[str, Any]]:
    """lerobot's flat {"<feature>.<stat>": tensor} -> openpi's {name: {stat: list}} ("state", "actions")."""
    from_lerobot = {v: k for k, v in _LEROBOT_FEATURES.items()}
    stats: dict[str, dict[str, Any]] = {}
    with _open_tensors([path]) as tensors:
        for flat_key, (handle, name) in tensors.items():
            feature, _, stat = flat_key.rpartition(".")
            if not feature:
                raise CheckpointError(f"{path}: tensor {flat_key!r} is not named '<feature>.<stat>'")
            stats.setdefault(from_lerobot.get(feature, feature), {})[stat] = handle.get_tensor(name).double().tolist()
    return stats


def _norm_stats(folder: Path, layout: Layout, asset_id: str | None) -> tuple[Path | None, dict | None, tuple[str, ...]]:
    """(file, stats in openpi's {"state": {"mean": [...], ...}, "actions": {...}} form, openpi asset ids)."""
    if layout == "openpi":
        path, asset_ids = _find_openpi_norm_stats(folder, asset_id)
        return path, (_read_openpi_norm_stats(path) if path is not None else None), asset_ids
    path = _find_lerobot_normalizer(folder)
    return path, (_read_lerobot_norm_stats(path) if path is not None else None), ()


def read_assets(path: Path, *, asset_id: str | None = None) -> tuple[Path | None, dict | None]:
    """A checkpoint's tokenizer model and norm stats, without reading its weights: what a runtime
    needs beside engines. Layout as in load_checkpoint (a lerobot config.json says "type")."""
    folder = _resolve_folder(path)
    config_path = folder / CONFIG_FILE
    layout: Layout = "lerobot" if config_path.is_file() and _is_lerobot_config(_read_json(config_path)) else "openpi"
    _, stats, asset_ids = _norm_stats(folder, layout, asset_id)
    if layout == "openpi" and stats is None and len(asset_ids) > 1:
        raise CheckpointError(f"{folder} has norm stats for several asset ids {list(asset_ids)}: choose one (asset_id)")
    tokenizer = folder / TOKENIZER_FILE
    return (tokenizer if tokenizer.is_file() else None), stats


def _to_lists(norm_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """{name: {stat: array-like}} -> JSON-ready lists; None stats (openpi's optional q01/q99) dropped."""
    if not isinstance(norm_stats, Mapping) or not all(isinstance(s, Mapping) for s in norm_stats.values()):
        raise ValueError("norm_stats must map a name ('state', 'actions') to {stat name: values}")
    return {
        name: {
            stat: np.asarray(values, dtype=np.float64).tolist() for stat, values in stats.items() if values is not None
        }
        for name, stats in norm_stats.items()
    }


# ----------------------------------------------------------------------------- loading


def _resolve_folder(path: Path) -> Path:
    path = Path(path)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            raise CheckpointError(f"{path}: pi-build never unpickles weights; convert them to safetensors first")
        if path.suffix == ".safetensors":
            return path.parent
        raise CheckpointError(f"{path}: expected a checkpoint folder")
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    return path


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
        if dtype not in _FLOAT_DTYPES:
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
    folder = _resolve_folder(path)
    config_path = folder / CONFIG_FILE
    if not config_path.is_file():
        raise CheckpointError(f"{folder} has no {CONFIG_FILE}")
    config_json = _read_json(config_path)
    files = _weight_files(folder)

    with _open_tensors(files) as tensors:
        layout = _detect_layout(list(tensors))
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

    norm_stats_path, norm_stats, asset_ids = _norm_stats(folder, layout, asset_id)
    tokenizer = folder / TOKENIZER_FILE
    info = CheckpointInfo(
        path=folder,
        layout=layout,
        config=cfg,
        weight_sha256={f.name: file_sha256(f) for f in files},
        config_json=config_json,
        norm_stats_path=norm_stats_path,
        norm_stats=norm_stats,
        asset_ids=asset_ids,
        tokenizer_path=tokenizer if tokenizer.is_file() else None,
    )
    return model, info


# ----------------------------------------------------------------------------- saving


def _openpi_config_json(cfg: Config, dtype: torch.dtype) -> dict[str, Any]:
    """The fields openpi's convert_jax_model_to_pytorch.py writes, plus pi05 and max_token_len
    (Pi0Config's names for them) because tensors cannot tell the prompt length."""
    return {
        "action_dim": cfg.action_dim,
        "action_horizon": cfg.action_horizon,
        "paligemma_variant": _variant_name(cfg.llm),
        "action_expert_variant": _variant_name(cfg.expert),
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
        "paligemma_variant": _variant_name(cfg.llm),
        "action_expert_variant": _variant_name(cfg.expert),
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


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


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
    stats = _to_lists(norm_stats) if norm_stats is not None else None
    if tokenizer_model is not None and not Path(tokenizer_model).is_file():
        raise FileNotFoundError(f"tokenizer model {tokenizer_model} does not exist")

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        cfg = model.cfg
        if layout == "openpi":
            _save_weights(model, tmp / WEIGHTS_FILE, "", dtype)
            _write_json(tmp / CONFIG_FILE, _openpi_config_json(cfg, dtype))
            if stats is not None:
                _write_json(tmp / "assets" / asset_id / "norm_stats.json", {"norm_stats": stats})
        else:
            _save_weights(model, tmp / WEIGHTS_FILE, LEROBOT_PREFIX, dtype)
            _write_json(tmp / CONFIG_FILE, _lerobot_config_json(cfg, dtype))
            if stats is not None:
                flat = {
                    f"{_LEROBOT_FEATURES.get(name, name)}.{stat}": torch.tensor(values, dtype=torch.float32)
                    for name, per_stat in stats.items()
                    for stat, values in per_stat.items()
                }
                step = _LEROBOT_NORMALIZER_STEP[cfg.pi05]
                _save_tensors(flat, tmp / f"policy_preprocessor_step_{step}_normalizer_processor.safetensors")
        if tokenizer_model is not None:
            shutil.copyfile(tokenizer_model, tmp / TOKENIZER_FILE)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """rename(2) of the finished folder; an old out_dir is moved aside first and deleted after."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except BaseException:
        os.rename(old, out_dir)
        raise
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


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
