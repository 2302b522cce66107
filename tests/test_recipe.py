"""Recipes: the shipped files load with the intended values; bad recipes and overrides are refused by name."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from pi_build.model.pi0 import CONFIGS
from pi_build.recipe import (
    Gate,
    RecipeError,
    load_recipe,
    parse_overrides,
    recipe_from_dict,
    recipe_hash,
)

RECIPES = Path(__file__).resolve().parents[1] / "recipes"

MINIMAL = """
name = "m"
[model]
checkpoint = "ckpt"
cameras = ["base_0_rgb", "left_wrist_0_rgb"]
prompt_len = 48
horizon = 50
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "recipe.toml"
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides: dict | None = None) -> str:
    with pytest.raises(RecipeError) as info:
        load_recipe(write(tmp_path, text), overrides)
    return str(info.value)


# ----------------------------------------------------------------------------- shipped recipes


def test_pi05_libero_recipe():
    r = load_recipe(RECIPES / "pi05_libero.toml")
    assert r.name == "pi05_libero"
    m = r.model
    assert (m.checkpoint, m.config, m.device, m.batch) == ("checkpoints/pi05_libero", "pi05", "cuda", (1,))
    assert m.cameras == ("base_0_rgb", "left_wrist_0_rgb") and m.masked_cameras == ("right_wrist_0_rgb",)
    # openpi's pi05_libero: 200 tokens (pi0.5's max_token_len), action_horizon 10.
    assert (m.prompt_len, m.horizon) == (CONFIGS["pi05"].max_token_len, 10) == (200, 10)
    assert [(c.backend, c.precision) for c in (r.vision, r.kvcache, r.denoise)] == [
        ("inductor", "bf16"), ("inductor", "fp8"), ("inductor", "bf16")
    ]
    assert r.denoise.steps == 10
    assert r.quantize.calibration == "recorded" and r.quantize.samples == 16
    assert r.gates.fp8 == Gate(0.99, 0.15) and r.gates.bf16 == Gate(0.999, 3e-2)
    assert r.component_gate("kvcache") == Gate(0.99, 0.15)
    assert r.component_gate("vision") == Gate(0.999, 3e-2)
    assert r.actions_gate() == r.gates.actions.fp8  # the least precise component is fp8


def test_pi0_libero_recipe():
    r = load_recipe(RECIPES / "pi0_libero.toml")
    m = r.model
    assert (r.name, m.config, m.checkpoint) == ("pi0_libero", "pi0", "checkpoints/pi0_libero")
    # openpi's pi0_libero: 48 tokens, the default action_horizon 50.
    assert (m.prompt_len, m.horizon) == (CONFIGS["pi0"].max_token_len, CONFIGS["pi0"].action_horizon) == (48, 50)
    assert m.cameras == ("base_0_rgb", "left_wrist_0_rgb") and m.masked_cameras == ("right_wrist_0_rgb",)
    assert (r.kvcache.precision, r.denoise.steps, m.device) == ("fp8", 10, "cuda")


def test_tiny_recipe():
    r = load_recipe(RECIPES / "tiny.toml")
    m = r.model
    assert (m.config, m.checkpoint, m.device, m.prompt_len, m.horizon) == ("pi05_tiny", "checkpoints/tiny", "auto", 200, 10)
    assert [c.precision for c in (r.vision, r.kvcache, r.denoise)] == ["fp32", "fp8", "fp32"]
    assert r.denoise.steps == 3
    assert r.component_gate("vision") == Gate(0.99999, 1e-4)


def test_defaults_for_omitted_fields(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL))
    assert (r.model.config, r.model.masked_cameras, r.model.batch, r.model.device) == (None, (), (1,), "auto")
    assert r.model.prompt_buckets is None and r.model.prompt_lengths == (48,)
    assert (r.vision.backend, r.vision.precision, r.denoise.steps) == ("inductor", "bf16", 10)
    assert r.quantize.calibration == "generated" and r.quantize.scaling == "tensor"
    assert "action_out" in r.quantize.keep_high_precision
    assert r.actions_gate() == r.gates.actions.bf16


def test_batch_sizes_and_prompt_buckets(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nbatch = [16, 1, 4]\nprompt_buckets = [32, 8]")))
    assert r.model.batch == (1, 4, 16) and r.model.prompt_buckets == (8, 32) and r.model.prompt_lengths == (8, 32, 48)
    assert "prompt_buckets" in error_of(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nprompt_buckets = [64]"))
    assert "twice" in error_of(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nbatch = [4, 4]"))
    assert "model.batch: must be >= 1" in error_of(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nbatch = [1, 0]"))


def test_partial_gate_keeps_other_default(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL + "[gates.fp8]\ncosine = 0.98\n[gates.actions.bf16]\nrel_err = 0.05\n"))
    assert r.gates.fp8 == Gate(0.98, 0.15)
    assert r.gates.actions.bf16.rel_err == 0.05 and r.gates.actions.bf16.cosine == 0.995


# ----------------------------------------------------------------------------- unknown fields


def test_unknown_top_level_field_named_with_file_and_suggestion(tmp_path):
    msg = error_of(tmp_path, "nmae = 'x'\n" + MINIMAL)
    assert "nmae" in msg and "recipe.toml" in msg and "'name'" in msg


def test_unknown_section_named(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "[visoin]\nprecision = 'fp32'\n")
    assert "visoin" in msg and "'vision'" in msg


def test_unknown_nested_field_named_with_dotted_key(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "[denoise]\nstepz = 3\n")
    assert "denoise.stepz" in msg and "did you mean 'denoise.steps'" in msg
    msg = error_of(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nbatchsize = 2"))
    assert "model.batchsize" in msg and "'model.batch'" in msg
    msg = error_of(tmp_path, MINIMAL + "[gates.actions]\ncosine = 0.99\n")
    assert "gates.actions.cosine" in msg and "fp32, bf16, fp8" in msg
    msg = error_of(tmp_path, MINIMAL + "[gates.fp8]\ncosin = 0.99\n")
    assert "gates.fp8.cosin" in msg and "'gates.fp8.cosine'" in msg


def test_steps_only_in_denoise(tmp_path):
    msg = error_of(tmp_path, MINIMAL + "[vision]\nsteps = 3\n")
    assert "vision.steps" in msg and "unknown field" in msg


# ----------------------------------------------------------------------------- bad values


@pytest.mark.parametrize(
    ("edit", "named", "detail"),
    [
        (("[vision]", "[vision]\nprecision = 'fp16'"), "vision.precision", "fp32, bf16, fp8"),
        (("[vision]", "[vision]\nbackend = 'onnx'"), "vision.backend", "inductor, tensorrt, eager"),
        (("[vision]", "[denoise]\nsteps = 0"), "denoise.steps", ">= 1"),
        (("[vision]", "[denoise]\nsteps = '3'"), "denoise.steps", "integer"),
        (("[vision]", "[denoise]\nsteps = 2.5"), "denoise.steps", "integer"),
        (("horizon = 50", "horizon = 50\nbatch = 0"), "model.batch", ">= 1"),
        (("horizon = 50", "horizon = 50\nbatch = true"), "model.batch", "integer"),
        (("horizon = 50", "horizon = 0"), "model.horizon", ">= 1"),
        (("horizon = 50", "horizon = 50\ndevice = 'gpu'"), "model.device", "auto, cuda, cpu"),
        (("horizon = 50", "horizon = 50\nconfig = 'pi1'"), "model.config", "pi05_tiny"),
        (('"left_wrist_0_rgb"]', '"wrist"]'), "model.cameras", "'wrist' is not one of"),
        (('"left_wrist_0_rgb"]', '"left_wrist_0_rgb", "base_0_rgb"]'), "model.cameras", "twice"),
        (('["base_0_rgb", "left_wrist_0_rgb"]', '["left_wrist_0_rgb", "base_0_rgb"]'), "model.cameras", "order"),
        (('["base_0_rgb", "left_wrist_0_rgb"]', "[]"), "model.cameras", "at least one"),
        (("horizon = 50", "horizon = 50\nmasked_cameras = ['left_wrist_0_rgb']"), "model.masked_cameras", "left_wrist_0_rgb also listed"),
        (("horizon = 50", "horizon = 50\ndevice = 'cpu'\n[kvcache]\nbackend = 'tensorrt'"), "kvcache.backend", "CUDA"),
        (("[vision]", "[quantize]\ncalibration = 'recordd'"), "quantize.calibration", ".npz"),
        (("[vision]", "[quantize]\nsamples = 0"), "quantize.samples", ">= 1"),
        (("[vision]", "[quantize]\nscaling = 'per-block'"), "quantize.scaling", "'tensor' or 'rowwise'"),
        (("[vision]", "[quantize]\nkeep_high_precision = 'norm'"), "quantize.keep_high_precision", "list"),
        (("[vision]", "[gates.bf16]\ncosine = 1.5"), "gates.bf16.cosine", "(0, 1]"),
        (("[vision]", "[gates.actions.fp8]\nrel_err = -0.1"), "gates.actions.fp8.rel_err", "positive"),
        (('name = "m"', 'name = "a/b"'), "name", "folder"),
        (('name = "m"', ""), "name", "missing"),
        (('checkpoint = "ckpt"', ""), "model.checkpoint", "missing"),
    ],
)
def test_bad_values_are_refused_naming_field_and_value(tmp_path, edit, named, detail):
    text = MINIMAL + "[vision]\n" if edit[0] == "[vision]" else MINIMAL
    msg = error_of(tmp_path, text.replace(*edit, 1))
    assert f"{named}:" in msg and detail in msg and "recipe.toml" in msg


def test_missing_model_section(tmp_path):
    msg = error_of(tmp_path, 'name = "m"\n')
    assert "model" in msg and "missing" in msg


def test_invalid_toml_and_missing_file(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "name = \n")
    with pytest.raises(RecipeError, match="does not exist"):
        load_recipe(tmp_path / "nope.toml")


# ----------------------------------------------------------------------------- overrides


def test_overrides_replace_values():
    r = load_recipe(RECIPES / "pi05_libero.toml", {"denoise.steps": 3, "vision.precision": "fp8", "model.batch": 2})
    assert (r.denoise.steps, r.vision.precision, r.model.batch) == (3, "fp8", (2,))
    assert r.kvcache.precision == "fp8" and r.denoise.precision == "bf16"  # untouched


def test_override_creates_omitted_section(tmp_path):
    r = load_recipe(write(tmp_path, MINIMAL), {"denoise.steps": 4, "gates.actions.fp8.cosine": 0.95})
    assert r.denoise.steps == 4 and r.gates.actions.fp8 == Gate(0.95, 0.2)


@pytest.mark.parametrize(
    ("overrides", "named", "detail"),
    [
        ({"denoise.steps": 0}, "override denoise.steps", ">= 1"),
        ({"kvcache.precision": "fp16"}, "override kvcache.precision", "fp32, bf16, fp8"),
        ({"denoise.stepz": 3}, "override denoise.stepz", "did you mean 'denoise.steps'"),
        ({"name.x": 1}, "override name.x", "not a table"),
        ({"visoin.precision": "fp8"}, "override visoin", "did you mean 'vision'"),
        ({"model.cameras": ["base_0_rgb", "right_wrist_0_rgb"]}, "override model.cameras", "right_wrist_0_rgb also listed in model.masked_cameras"),
    ],
)
def test_bad_overrides_name_the_dotted_key(overrides, named, detail):
    with pytest.raises(RecipeError) as info:
        load_recipe(RECIPES / "pi05_libero.toml", overrides)
    assert named in str(info.value) and detail in str(info.value)


def test_camera_clash_names_file_field_when_not_overridden(tmp_path):
    msg = error_of(tmp_path, MINIMAL.replace("horizon = 50", "horizon = 50\nmasked_cameras = ['base_0_rgb']"))
    assert "recipe.toml: model.masked_cameras: base_0_rgb also listed in model.cameras" in msg


def test_parse_overrides_types_values():
    parsed = parse_overrides(["denoise.steps=3", "vision.precision=fp8", "kvcache.precision=\"bf16\"",
                              "gates.fp8.cosine=0.98", 'model.cameras=["base_0_rgb"]'])
    assert parsed == {"denoise.steps": 3, "vision.precision": "fp8", "kvcache.precision": "bf16",
                      "gates.fp8.cosine": 0.98, "model.cameras": ["base_0_rgb"]}
    with pytest.raises(RecipeError, match="section.field=value"):
        parse_overrides(["denoise.steps"])


# ----------------------------------------------------------------------------- dict, hash, paths


def test_to_dict_hash_and_round_trip(tmp_path):
    r = load_recipe(RECIPES / "pi05_libero.toml")
    d = r.to_dict()
    assert d["model"]["cameras"] == ["base_0_rgb", "left_wrist_0_rgb"] and "path" not in d
    canonical = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
    assert recipe_hash(r) == hashlib.sha256(canonical).hexdigest()
    assert recipe_from_dict(d) == r
    # Same content laid out differently (keys reordered, comments gone): same hash.
    reordered = {"gates": d["gates"], "quantize": d["quantize"], "denoise": d["denoise"], "kvcache": d["kvcache"],
                 "vision": d["vision"], "model": dict(reversed(list(d["model"].items()))), "name": d["name"]}
    assert recipe_hash(recipe_from_dict(reordered)) == recipe_hash(r)
    # Any change of content changes it.
    assert recipe_hash(load_recipe(RECIPES / "pi05_libero.toml", {"denoise.steps": 9})) != recipe_hash(r)


def test_recipe_from_dict_validates():
    d = load_recipe(RECIPES / "tiny.toml").to_dict()
    d["denoise"]["steps"] = -1
    with pytest.raises(RecipeError, match="manifest: denoise.steps: must be >= 1"):
        recipe_from_dict(d, source="manifest")


def test_checkpoint_resolved_against_cwd_and_checked_only_when_asked(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    r = load_recipe(RECIPES / "tiny.toml")  # parses although checkpoints/tiny does not exist here
    with pytest.raises(RecipeError) as info:
        r.checkpoint_path()
    assert "model.checkpoint" in str(info.value) and "checkpoints/tiny" in str(info.value)
    (tmp_path / "checkpoints" / "tiny").mkdir(parents=True)
    assert r.checkpoint_path() == tmp_path / "checkpoints" / "tiny"


def test_calibration_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_recipe(RECIPES / "tiny.toml").calibration_path() is None
    r = load_recipe(RECIPES / "tiny.toml", {"quantize.calibration": "obs.npz"})
    with pytest.raises(RecipeError, match="quantize.calibration"):
        r.calibration_path()
    (tmp_path / "obs.npz").write_bytes(b"x")
    assert r.calibration_path() == tmp_path / "obs.npz"
