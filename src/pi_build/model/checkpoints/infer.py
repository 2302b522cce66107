"""The model Config of a checkpoint, from its tensor shapes and its config.json.

Everything about the model is read from the tensors themselves (pi0 vs pi0.5, widths, depths,
heads), so a folder's name never matters; config.json only supplies what tensors cannot say (the
action horizon, the prompt length) and is cross-checked where it does say something.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pi_build.errors import CheckpointError
from pi_build.model.checkpoints.layout import (EXPERT_PREFIX, LLM_PREFIX, VISION_PREFIX, CONFIG_FILE, EMBED_KEY, LM_HEAD_KEY,
                                              OPENPI_GEMMA_VARIANTS, is_lerobot_config)
from pi_build.model.pi0 import CONFIGS, IMAGE_SIZE, Config, GemmaConfig, SiglipConfig, get_config

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
    patch = _shape(shapes, VISION_PREFIX + "embeddings.patch_embedding.weight")  # [width, 3, p, p]
    positions = _shape(shapes, VISION_PREFIX + "embeddings.position_embedding.weight")[0]
    if positions != (IMAGE_SIZE // patch[2]) ** 2:
        raise CheckpointError(
            f"{VISION_PREFIX}embeddings.position_embedding.weight has {positions} rows; {IMAGE_SIZE}x{IMAGE_SIZE} images "
            f"in {patch[2]}-pixel patches need {(IMAGE_SIZE // patch[2]) ** 2} (other image sizes are not supported)"
        )
    embedding = shapes.get(EMBED_KEY) or _shape(shapes, LM_HEAD_KEY)
    return {
        "pi05": _detect_pi05(shapes),
        "vocab_size": embedding[0],
        "action_dim": _shape(shapes, "action_in_proj.weight")[1],
        "vision": {
            "width": patch[0],
            "depth": _depth(shapes, VISION_PREFIX + "encoder.layers."),
            "mlp_dim": _shape(shapes, VISION_PREFIX + "encoder.layers.0.mlp.fc1.weight")[0],
            "patch_size": patch[2],
        },
        "llm": _gemma_shapes(shapes, LLM_PREFIX),
        "expert": _gemma_shapes(shapes, EXPERT_PREFIX),
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


def _horizon_and_token_len(config_json: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """openpi's converter writes action_horizon (pi-build adds max_token_len); lerobot writes chunk_size and
    tokenizer_max_length."""
    if is_lerobot_config(config_json):
        return config_json.get("chunk_size"), config_json.get("tokenizer_max_length")
    return config_json.get("action_horizon"), config_json.get("max_token_len")


def _check_config_json(config_json: Mapping[str, Any], cfg: Config) -> None:
    """Errors where config.json contradicts what the tensors say."""

    def fail(what: str) -> None:
        raise CheckpointError(f"{CONFIG_FILE} contradicts the tensors: {what}")

    kind = "pi05" if cfg.pi05 else "pi0"
    if is_lerobot_config(config_json):
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


def variant_name(gemma: GemmaConfig) -> str:
    shape = (gemma.width, gemma.depth, gemma.mlp_dim)
    return next((name for name, s in OPENPI_GEMMA_VARIANTS.items() if s == shape and "lora" not in name), "custom")
