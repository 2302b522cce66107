"""The two checkpoint layouts, openpi's PyTorch one and lerobot's: file names, tensor names, and
reading a folder's files without loading any weights.

    openpi:   model.safetensors, config.json, assets/<asset_id>/norm_stats.json
    lerobot:  model.safetensors (keys "model." + openpi's), config.json ("type": "pi0" | "pi05", ...),
              policy_preprocessor_step_<i>_normalizer_processor.safetensors (normalization stats)

What a real file holds, beyond the model's own tensors: openpi and lerobot write with
``safetensors.torch.save_model``, which stores a tied tensor once under the first of its names in
sorted order, so PaliGemma's token embedding appears only as ``paligemma.lm_head.weight``; and the
action expert is a ``GemmaForCausalLM`` whose (never used) vocabulary head is saved too. Only
safetensors and JSON are read: pickled weights (.bin, .pt) are refused, never unpickled.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from safetensors import SafetensorError, safe_open

from pi_build import io
from pi_build.errors import CheckpointError
from pi_build.model.pi0 import Config

Layout = Literal["openpi", "lerobot"]

WEIGHTS_FILE = "model.safetensors"
SHARD_INDEX_FILE = "model.safetensors.index.json"  # Hugging Face's sharded form
CONFIG_FILE = "config.json"
TOKENIZER_FILE = "tokenizer.model"  # pi-build's own addition: the sentencepiece model beside config.json
LEROBOT_PREFIX = "model."
LEROBOT_PREPROCESSOR_JSON = "policy_preprocessor.json"
LEROBOT_NORMALIZER_GLOB = "policy_preprocessor_step_*_normalizer_processor.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")

VISION_PREFIX = "paligemma_with_expert.paligemma.model.vision_tower.vision_model."
LLM_PREFIX = "paligemma_with_expert.paligemma.model.language_model."
EXPERT_PREFIX = "paligemma_with_expert.gemma_expert.model."
EMBED_KEY = LLM_PREFIX + "embed_tokens.weight"
# PaliGemma's output head, tied to EMBED_KEY: the name under which real checkpoints store the embedding.
LM_HEAD_KEY = "paligemma_with_expert.paligemma.lm_head.weight"
# The action expert's vocabulary head [257152, 1024]: saved by openpi and lerobot, used by neither.
EXPERT_LM_HEAD_KEY = "paligemma_with_expert.gemma_expert.lm_head.weight"
# Tensors that real checkpoints carry and the model does not use (LM_HEAD_KEY is read when it is
# the only copy of the embedding).
UNUSED_KEYS = frozenset({LM_HEAD_KEY, EXPERT_LM_HEAD_KEY})

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}
# openpi's Gemma variants (models/gemma.py): (width, depth, mlp_dim); "_lora" ones share the base shapes.
OPENPI_GEMMA_VARIANTS = {
    "gemma_2b": (2048, 18, 16384),
    "gemma_2b_lora": (2048, 18, 16384),
    "gemma_300m": (1024, 18, 4096),
    "gemma_300m_lora": (1024, 18, 4096),
    "dummy": (64, 4, 128),
}
# Where lerobot's pipelines put the normalizer (processor_pi0.py / processor_pi05.py): the file name carries it.
LEROBOT_NORMALIZER_STEP = {False: 6, True: 3}


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


def weight_files(folder: Path) -> list[Path]:
    """The safetensors file(s) of a checkpoint folder, refusing pickled weights."""
    single = folder / WEIGHTS_FILE
    if single.is_file():
        return [single]
    index = folder / SHARD_INDEX_FILE
    if index.is_file():
        weight_map = read_json(index).get("weight_map")
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
def open_tensors(files: list[Path]) -> Iterator[dict[str, tuple[Any, str]]]:
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


def detect_layout(names: list[str]) -> Layout:
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


def read_json(path: Path) -> dict[str, Any]:
    return io.read_json(path, CheckpointError)


def resolve_folder(path: Path) -> Path:
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


def is_lerobot_config(config_json: Mapping[str, Any]) -> bool:
    return "type" in config_json
