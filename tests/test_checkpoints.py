"""Checkpoint loading and saving: round trips in both layouts, the tied embedding, config inference
from tensor shapes, clear errors on bad folders, the bf16 dtype policy, and atomic saves."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pi_build.model.checkpoints import (
    CheckpointError,
    infer_config,
    load_checkpoint,
    make_random_checkpoint,
    save_checkpoint,
)
from pi_build.model.checkpoints import save as checkpoints
from pi_build.model.checkpoints.layout import EMBED_KEY, EXPERT_LM_HEAD_KEY, LM_HEAD_KEY
from pi_build.model.pi0 import CONFIGS, GemmaConfig, ModelInputs, PiModel, SiglipConfig, build_model, get_config

HORIZON = 7  # not any preset's horizon, so it must come from config.json


def random_inputs(model: PiModel, seed: int) -> tuple[ModelInputs, torch.Tensor]:
    cfg = model.cfg
    gen = torch.Generator().manual_seed(seed)
    b, tokens = 2, cfg.max_token_len
    token_masks = torch.arange(tokens)[None, :] < torch.tensor([[tokens - 3], [5]])
    inputs = ModelInputs(
        images=torch.rand(b, 3, 3, 224, 224, generator=gen) * 2 - 1,
        image_masks=torch.tensor([[True, True, False], [True, False, False]]),
        tokens=torch.randint(0, cfg.vocab_size, (b, tokens), generator=gen),
        token_masks=token_masks,
        state=torch.randn(b, cfg.action_dim, generator=gen),
    )
    noise = torch.randn(b, cfg.action_horizon, cfg.action_dim, generator=gen)
    return inputs, noise


def random_norm_stats(seed: int) -> dict[str, dict[str, list[float]]]:
    gen = torch.Generator().manual_seed(seed)
    # float32 values, so lerobot's float32 stats file holds them exactly.
    return {
        name: {stat: torch.randn(8, generator=gen).tolist() for stat in ("mean", "std", "q01", "q99")}
        for name in ("state", "actions")
    }


def rewrite_weights(folder: Path, edit) -> None:
    """Apply ``edit`` to the dict of tensors in folder/model.safetensors and write it back."""
    tensors = load_file(folder / "model.safetensors")
    edit(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.fixture
def pi0_dir(tmp_path: Path) -> Path:
    return make_random_checkpoint("pi0_tiny", tmp_path / "ckpt", seed=3, horizon=HORIZON)


# ----------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("layout", ["openpi", "lerobot"])
@pytest.mark.parametrize("name, misleading_folder", [("pi0_tiny", "pi05_model"), ("pi05_tiny", "pi0_model")])
def test_round_trip_detects_config_from_contents(tmp_path: Path, layout: str, name: str, misleading_folder: str):
    original = build_model(get_config(name).replace(action_horizon=HORIZON), seed=11)
    stats = random_norm_stats(5)
    tokenizer = tmp_path / "some.model"
    tokenizer.write_bytes(b"\x0a\x05fake sentencepiece bytes")
    saved = save_checkpoint(original, tmp_path / "first", layout=layout, norm_stats=stats, tokenizer_model=tokenizer)
    folder = saved.rename(tmp_path / misleading_folder)

    model, info = load_checkpoint(folder)

    cfg = info.config
    assert cfg.name == name and cfg.pi05 == name.startswith("pi05")
    assert (cfg.llm, cfg.expert, cfg.vision) == (original.cfg.llm, original.cfg.expert, original.cfg.vision)
    assert cfg.action_horizon == HORIZON
    assert cfg.max_token_len == (200 if cfg.pi05 else 48)
    assert info.layout == layout and info.path == folder
    assert info.weight_sha256 == {
        "model.safetensors": hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    }
    assert info.norm_stats == stats
    assert info.norm_stats_path is not None and info.norm_stats_path.is_file()
    assert info.tokenizer_path == folder / "tokenizer.model"
    assert info.tokenizer_path.read_bytes() == tokenizer.read_bytes()

    loaded_sd, original_sd = model.state_dict(), original.state_dict()
    assert loaded_sd.keys() == original_sd.keys()
    for key in original_sd:
        assert loaded_sd[key].dtype == torch.float32
        assert torch.equal(loaded_sd[key], original_sd[key]), key

    inputs, noise = random_inputs(original, seed=1)
    expected = original.sample(inputs, noise, steps=3)
    actions = model.sample(inputs, noise, steps=3)
    assert actions.shape == (2, HORIZON, 32)
    assert torch.equal(actions, expected)


def test_lerobot_layout_prefixes_every_key_and_writes_lerobot_config(tmp_path: Path):
    folder = make_random_checkpoint("pi05_tiny", tmp_path / "ckpt", layout="lerobot", horizon=HORIZON)
    with safe_open(folder / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert all(k.startswith("model.") for k in keys)
    assert "model.time_mlp_in.weight" in keys and "model.action_in_proj.weight" in keys
    config = json.loads((folder / "config.json").read_text())
    assert config["type"] == "pi05"
    assert (config["chunk_size"], config["tokenizer_max_length"], config["max_action_dim"]) == (HORIZON, 200, 32)


def test_openpi_config_json_has_the_converter_fields(pi0_dir: Path):
    config = json.loads((pi0_dir / "config.json").read_text())
    # convert_jax_model_to_pytorch.py writes these five.
    assert {"action_dim", "action_horizon", "paligemma_variant", "action_expert_variant", "precision"} <= config.keys()
    assert config["action_horizon"] == HORIZON and config["action_dim"] == 32 and config["precision"] == "float32"


def test_lerobot_normalizer_named_by_pipeline_json(tmp_path: Path):
    stats = random_norm_stats(9)
    folder = make_random_checkpoint("pi0_tiny", tmp_path / "ckpt", layout="lerobot", norm_stats=stats)
    (stale,) = folder.glob("policy_preprocessor_step_*_normalizer_processor.safetensors")
    stale.rename(folder / "policy_preprocessor_step_2_normalizer_processor.safetensors")
    pipeline = {
        "name": "policy_preprocessor",
        "steps": [
            {"registry_name": "rename_observations_processor", "config": {}},
            {"registry_name": "to_batch_processor", "config": {}},
            {
                "registry_name": "normalizer_processor",
                "config": {},
                "state_file": "policy_preprocessor_step_2_normalizer_processor.safetensors",
            },
        ],
    }
    (folder / "policy_preprocessor.json").write_text(json.dumps(pipeline))
    _, info = load_checkpoint(folder)
    assert info.norm_stats_path == folder / "policy_preprocessor_step_2_normalizer_processor.safetensors"
    assert info.norm_stats == stats


def test_openpi_nested_asset_id(pi0_dir: Path):
    stats = random_norm_stats(4)
    nested = pi0_dir / "assets" / "physical-intelligence" / "libero" / "norm_stats.json"
    nested.parent.mkdir(parents=True)
    nested.write_text(json.dumps({"norm_stats": stats}))
    _, info = load_checkpoint(pi0_dir)
    assert info.asset_ids == ("physical-intelligence/libero",) and info.norm_stats == stats
    assert info.norm_stats_path == nested


def test_sharded_checkpoint_loads(pi0_dir: Path):
    tensors = load_file(pi0_dir / "model.safetensors")
    keys = sorted(tensors)
    halves = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    for file, names in halves.items():
        save_file({k: tensors[k] for k in names}, pi0_dir / file)
    weight_map = {k: file for file, names in halves.items() for k in names}
    (pi0_dir / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (pi0_dir / "model.safetensors").unlink()

    model, info = load_checkpoint(pi0_dir)
    reference = build_model("pi0_tiny", seed=3)
    assert set(info.weight_sha256) == set(halves)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


# ----------------------------------------------------------------------------- tied embedding


def test_embedding_saved_tied_as_lm_head_and_recovered(pi0_dir: Path):
    with safe_open(pi0_dir / "model.safetensors", "pt") as f:
        keys = set(f.keys())
        lm_head = f.get_tensor(LM_HEAD_KEY)
    assert LM_HEAD_KEY in keys and EMBED_KEY not in keys
    assert EXPERT_LM_HEAD_KEY in keys  # what openpi's strict loader expects; unused

    model, _ = load_checkpoint(pi0_dir)
    reference = build_model("pi0_tiny", seed=3)
    assert torch.equal(lm_head, reference.llm.embed_tokens.weight)
    assert torch.equal(model.llm.embed_tokens.weight, reference.llm.embed_tokens.weight)


def test_explicit_embedding_wins_over_lm_head(pi0_dir: Path):
    embedding = torch.randn(512, 64)

    def add_embedding(tensors):
        tensors[EMBED_KEY] = embedding

    rewrite_weights(pi0_dir, add_embedding)
    model, _ = load_checkpoint(pi0_dir)
    assert torch.equal(model.llm.embed_tokens.weight, embedding)


# ----------------------------------------------------------------------------- config inference


@pytest.mark.parametrize("name", ["pi0", "pi05", "pi0_tiny", "pi05_tiny"])
def test_infer_config_from_shapes_alone(name: str):
    """Full-size configs are recognised from shapes (a meta model: nothing allocated), in the tied form."""
    with torch.device("meta"):
        model = PiModel(get_config(name))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    shapes[LM_HEAD_KEY] = shapes.pop(EMBED_KEY)
    assert infer_config(shapes, {}) == CONFIGS[name]
    assert infer_config(shapes, {"action_horizon": 10}).action_horizon == 10
    lerobot_json = {"type": "pi05" if CONFIGS[name].pi05 else "pi0", "chunk_size": 10, "tokenizer_max_length": 64}
    assert (infer_config(shapes, lerobot_json).action_horizon, infer_config(shapes, lerobot_json).max_token_len) == (
        10,
        64,
    )


def test_unknown_gemma_sizes_get_multi_query_heads():
    base = get_config("pi0_tiny")
    custom = base.replace(
        vision=SiglipConfig(width=1152, depth=1, mlp_dim=16),  # So400m's width: 16 heads
        llm=GemmaConfig(width=48, depth=3, mlp_dim=80, num_heads=4, num_kv_heads=1, head_dim=8),
    )
    with torch.device("meta"):
        model = PiModel(custom)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    cfg = infer_config(shapes, {})
    assert cfg.name == "custom"
    assert (cfg.llm, cfg.expert, cfg.vision) == (custom.llm, custom.expert, custom.vision)


def test_config_name_must_match_tensors(pi0_dir: Path):
    model, info = load_checkpoint(pi0_dir, config_name="pi0_tiny")
    assert info.config.name == "pi0_tiny" and info.config.action_horizon == HORIZON
    with pytest.raises(CheckpointError, match="pi05_tiny.*pi05"):
        load_checkpoint(pi0_dir, config_name="pi05_tiny")


# ----------------------------------------------------------------------------- errors


def test_missing_key_is_named(pi0_dir: Path):
    key = "paligemma_with_expert.gemma_expert.model.layers.1.mlp.up_proj.weight"
    rewrite_weights(pi0_dir, lambda t: t.pop(key))
    with pytest.raises(CheckpointError, match="missing") as e:
        load_checkpoint(pi0_dir)
    assert key in str(e.value)


def test_missing_embedding_and_lm_head_is_named(pi0_dir: Path):
    rewrite_weights(pi0_dir, lambda t: t.pop(LM_HEAD_KEY))
    with pytest.raises(CheckpointError, match=LM_HEAD_KEY.replace(".", r"\.")):
        load_checkpoint(pi0_dir)


def test_unexpected_key_is_named(pi0_dir: Path):
    key = "paligemma_with_expert.gemma_expert.model.layers.0.mlp.extra_proj.weight"
    rewrite_weights(pi0_dir, lambda t: t.update({key: torch.randn(3, 4)}))
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_checkpoint(pi0_dir)
    assert key in str(e.value)


def test_unexpected_key_named_with_lerobot_prefix(tmp_path: Path):
    folder = make_random_checkpoint("pi05_tiny", tmp_path / "ckpt", layout="lerobot")
    key = "model.proprio_history_proj.weight"
    rewrite_weights(folder, lambda t: t.update({key: torch.randn(64, 32)}))
    with pytest.raises(CheckpointError, match="unexpected") as e:
        load_checkpoint(folder)
    assert repr(key) in str(e.value)


def test_wrong_shape_names_key_and_shapes(pi0_dir: Path):
    key = "paligemma_with_expert.paligemma.model.language_model.layers.1.mlp.down_proj.weight"  # [64, 128]
    rewrite_weights(pi0_dir, lambda t: t.update({key: torch.randn(64, 127)}))
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(pi0_dir)
    message = str(e.value)
    assert key in message and "[64, 127]" in message and "[64, 128]" in message


def test_int_tensor_is_rejected(pi0_dir: Path):
    key = "action_out_proj.bias"
    rewrite_weights(pi0_dir, lambda t: t.update({key: torch.randint(0, 9, (32,), dtype=torch.int32)}))
    with pytest.raises(CheckpointError, match="I32") as e:
        load_checkpoint(pi0_dir)
    assert key in str(e.value)


def test_truncated_file_is_named(pi0_dir: Path):
    weights = pi0_dir / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt") as e:
        load_checkpoint(pi0_dir)
    assert str(weights) in str(e.value)


@pytest.mark.parametrize(
    "config_json",
    [
        {"pi05": True, "action_horizon": HORIZON},  # openpi fields
        {"type": "pi05", "chunk_size": HORIZON},  # lerobot fields
        {"action_horizon": HORIZON, "paligemma_variant": "gemma_2b"},  # a full-size Gemma, tiny tensors
    ],
)
def test_config_json_contradicting_tensors(pi0_dir: Path, config_json: dict):
    (pi0_dir / "config.json").write_text(json.dumps(config_json))
    with pytest.raises(CheckpointError, match="config.json contradicts the tensors"):
        load_checkpoint(pi0_dir)


def test_pickle_only_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "pytorch_model.bin").write_bytes(b"not going to be unpickled")
    with pytest.raises(CheckpointError, match=r"pytorch_model\.bin.*never unpickles"):
        load_checkpoint(folder)
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_checkpoint(folder / "pytorch_model.bin")


# ----------------------------------------------------------------------------- dtypes


def test_bf16_load_keeps_openpis_fp32_params(pi0_dir: Path, tmp_path: Path):
    # The selectors of openpi's PaliGemmaWithExpertModel.to_bfloat16_for_selected_params, applied to the
    # paligemma_with_expert tree; openpi leaves the top-level projections in float32.
    keep_fp32 = (
        "vision_tower.vision_model.embeddings.patch_embedding.weight",
        "vision_tower.vision_model.embeddings.patch_embedding.bias",
        "vision_tower.vision_model.embeddings.position_embedding.weight",
        "input_layernorm",
        "post_attention_layernorm",
        "model.norm",
    )
    pi05_dir = make_random_checkpoint("pi05_tiny", tmp_path / "pi05")
    for folder in (pi0_dir, pi05_dir):
        model, _ = load_checkpoint(folder, dtype=torch.bfloat16)
        reference, _ = load_checkpoint(folder)
        assert model.dtype == torch.bfloat16
        for key, value in model.state_dict().items():
            in_tree = key.startswith("paligemma_with_expert.")
            wanted = torch.bfloat16 if in_tree and not any(s in key for s in keep_fp32) else torch.float32
            assert value.dtype == wanted, key
            assert torch.equal(value, reference.state_dict()[key].to(wanted)), key


def test_bf16_file_loads_as_float32(tmp_path: Path):
    folder = make_random_checkpoint("pi05_tiny", tmp_path / "ckpt", dtype=torch.bfloat16)
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert f.get_slice("action_in_proj.weight").get_dtype() == "BF16"
    model, _ = load_checkpoint(folder)
    reference = build_model("pi05_tiny", seed=0)
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value.to(torch.bfloat16).float()), key


# ----------------------------------------------------------------------------- atomic save


def test_failed_save_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    model = build_model("pi0_tiny", seed=1)

    def half_write_then_fail(tensors, path, metadata=None):
        Path(path).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", half_write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(model, tmp_path / "out", norm_stats=random_norm_stats(0))
    assert list(tmp_path.iterdir()) == []


def test_existing_folder_needs_overwrite_and_is_replaced_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    out = make_random_checkpoint("pi0_tiny", tmp_path / "out", seed=1)
    with pytest.raises(FileExistsError):
        make_random_checkpoint("pi0_tiny", out, seed=2)

    real_save_file = checkpoints.save_file
    monkeypatch.setattr(checkpoints, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        make_random_checkpoint("pi0_tiny", out, seed=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the old checkpoint, untouched
    assert torch.equal(
        load_checkpoint(out)[0].action_in_proj.weight, build_model("pi0_tiny", seed=1).action_in_proj.weight
    )

    monkeypatch.setattr(checkpoints, "save_file", real_save_file)
    make_random_checkpoint("pi0_tiny", out, seed=2, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert torch.equal(
        load_checkpoint(out)[0].action_in_proj.weight, build_model("pi0_tiny", seed=2).action_in_proj.weight
    )
