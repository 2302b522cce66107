"""The build toolchain end to end on the tiny model: CLI, artifacts, gates, refusals, runtime, bench."""

import json
import shutil

import pytest
import torch

from pi_build import artifacts, backends
from pi_build.cli.build import app as build_app
from pi_build.cli.run import app as run_app
from pi_build.model.checkpoints import load_checkpoint
from pi_build.model.pi0 import ModelInputs
from pi_build.runtime.pipeline import load_pipeline, load_policy

from conftest import RECIPE, invoke, runner

def test_build_lands_every_stage_with_manifests(workspace):
    engines = workspace["engines"]
    for component in ("vision", "kvcache", "denoise", "kvcache-fp8-scales", "pipeline"):
        path = artifacts.latest_artifact(engines, "t", component)
        assert path is not None, component
        art = artifacts.load_artifact(path)
        artifacts.verify_artifact(art)
    vision = artifacts.load_artifact(engines / "t" / "vision" / "v1").manifest
    assert vision["backend"] == "inductor" and vision["engine_runner"] == "aoti" and vision["engine_files"] == ["engine.pt2"]
    assert vision["inputs"]["images"]["shape"] == [1, 2, 3, 224, 224]
    assert vision["accuracy"]["passed"] and vision["accuracy"]["rel_err"] < 1e-4
    assert vision["source"]["weights_sha256"] == load_checkpoint(workspace["ckpt"])[1].weight_sha256["model.safetensors"]
    assert vision["toolchain"]["torch"] and vision["device"]["type"] == "cpu"
    kv = artifacts.load_artifact(engines / "t" / "kvcache" / "v1").manifest
    assert kv["precision"] == "fp8" and kv["fp8_scales"]["version"] == "v1"
    assert kv["outputs"]["k"]["shape"] == [2, 1, 1, 712, 16]  # layers, batch, kv heads, 2*256 + 200, head dim
    pipeline = artifacts.load_artifact(engines / "t" / "pipeline" / "v1").manifest
    assert pipeline["capture"]["captured"] is False and "no CUDA" in pipeline["capture"]["reason"]
    assert pipeline["accuracy"]["passed"] and pipeline["accuracy"]["observations"] == "recorded"
    out = invoke(build_app, ["list", "--engines", engines]).output
    assert "t/vision/v1" in out and "t/pipeline/v1" in out


def test_fp8_is_within_its_gate_and_really_quantized(workspace):
    """The FP8 kvcache engine differs measurably from float32 and stays inside the fp8 gate."""
    from pi_build.build.stages import open_context
    from pi_build.engine.components import build_component
    from pi_build.engine.accuracy import component_metrics
    from pi_build.recipe import load_recipe

    ctx = open_context(load_recipe(workspace["recipe"]), workspace["engines"], log=lambda s: None)
    pipeline = load_pipeline(workspace["engines"], "t", "cpu")
    fp32 = build_component(ctx.model, "kvcache", ctx.shapes, "fp32")
    g = torch.Generator().manual_seed(99)
    inputs = fp32.example_inputs(g)
    m = component_metrics("kvcache", pipeline.engines["kvcache"](*inputs), fp32(*inputs))
    gate = ctx.recipe.component_gate("kvcache")
    assert 1e-4 < m["rel_err"] <= gate.rel_err and m["cosine"] >= gate.cosine


def test_pipeline_matches_reference_actions(workspace):
    model, _ = load_checkpoint(workspace["ckpt"])
    model.cfg = model.cfg.replace(action_horizon=10)
    pipeline = load_pipeline(workspace["engines"], "t", "cpu")
    images, image_masks, tokens, token_masks, noise, state = pipeline.example_inputs(seed=5)
    actions = pipeline.run(images, image_masks, tokens, token_masks, noise, state)
    ref = model.sample(ModelInputs(images, image_masks, tokens, token_masks, state), noise, steps=2)
    rel = ((actions - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1  # fp8 prefix: close, not bit-equal
    with pytest.raises(ValueError, match="tokens has shape"):
        pipeline.run(images, image_masks, tokens[:, :10], token_masks[:, :10], noise, state)


def test_policy_from_engines_gives_libero_actions(workspace):
    from pi_build.envs.libero import load_recorded_observations

    policy = load_policy(workspace["engines"], "t", "cpu")
    reply = policy(load_recorded_observations()[0])
    assert reply["actions"].shape == (10, 7) and set(reply["policy_timing"]) >= {"infer_ms"}


def test_refuses_tampered_engine(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    engine = engines / "t" / "denoise" / "v1" / "program.pt2"
    engine.write_bytes(engine.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(artifacts.ArtifactError, match="program.pt2"):
        load_pipeline(engines, "t", "cpu")
    assert invoke(build_app, ["inspect", engines / "t" / "denoise" / "v1"]).exit_code == 1


def test_refuses_engines_from_other_weights_and_shapes(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    recipe = tmp_path / "other.toml"
    recipe.write_text(RECIPE.format(checkpoint=workspace["other"]))
    assert invoke(build_app, ["denoise", "--recipe", recipe, "--engines", engines]).exit_code == 0
    with pytest.raises(artifacts.ArtifactError, match="weights"):
        load_pipeline(engines, "t", "cpu")
    # same weights, another horizon: the cache shapes fit but the recipe shapes do not
    shutil.rmtree(engines / "t" / "denoise" / "v2")
    assert invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines, "--set", "model.prompt_len=100"]).exit_code == 0
    with pytest.raises(artifacts.ArtifactError, match="prompt_len|prefix_mask|shape"):
        load_pipeline(engines, "t", "cpu")


def test_failed_gate_lands_nothing(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    result = invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines, "--set", "gates.fp32.rel_err=1e-12"])
    assert result.exit_code == 1 and "accuracy gate failed" in result.output
    assert sorted(p.name for p in (engines / "t" / "denoise").iterdir()) == ["v1"]


def test_interrupted_build_leaves_no_artifact(workspace, tmp_path, monkeypatch):
    engines = tmp_path / "engines"

    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(backends, "load_engine", boom)  # Ctrl-C after the engine file was written
    result = runner.invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines])
    assert result.exit_code != 0
    assert artifacts.latest_artifact(engines, "t", "denoise") is None
    leftovers = list((engines / "t" / "denoise").glob("*")) if (engines / "t" / "denoise").exists() else []
    assert leftovers == []


def test_recipe_errors_are_clear(workspace, tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text(RECIPE.format(checkpoint=workspace["ckpt"]).replace("steps = 2", "stepz = 2"))
    result = runner.invoke(build_app, ["compile", "--recipe", bad, "--engines", tmp_path])
    assert result.exit_code == 1 and "build failed" in result.output and "stepz" in result.output
    assert "did you mean 'denoise.steps'" in " ".join(result.output.split())


def test_bench_cpu_table_and_json(workspace, tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    result = invoke(run_app, ["bench", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--steps", "2",
                              "--iters", "3", "--warmup", "1", "--json", out, "--png", png])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    entry = data["steps"]["2"]
    for row in ("vision", "kvcache", "denoise", "denoise_per_step", "end_to_end"):
        stats = entry["engines"][row]
        assert stats["count"] == 3 and stats["p50"] > 0 and stats["p95"] >= stats["p50"] * 0.999
        assert entry["roofline_ms"][row] > 0
    assert entry["reference"]["end_to_end"]["p50"] > 0
    assert png.stat().st_size > 1000 and "speed-up" in result.output
    missing = runner.invoke(run_app, ["bench", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--steps", "7"])
    assert missing.exit_code != 0 and "7 steps" in str(missing.exception)


def test_libero_cli_runs_a_short_real_episode(workspace, tmp_path):
    pytest.importorskip("libero", reason="LIBERO is not installed: run `bash scripts/install_libero.sh`")
    out, video = tmp_path / "libero.json", tmp_path / "videos"
    result = invoke(run_app, ["libero", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--suite", "libero_spatial",
                              "--tasks", "0", "--trials", "1", "--max-steps", "10", "--out", out, "--video", video])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (episode,) = data["tasks"][0]["episodes"]
    assert episode["steps"] == 10 and episode["policy_calls"] == 2  # replan every 5 actions
    assert data["latency_ms"]["infer_ms"]["count"] == 2 and data["success_rate"] in (0.0, 1.0)
    assert len(list(video.glob("*.mp4"))) == 1
    assert "success" in result.output and "infer_ms" in result.output


def test_export_stage_lands_verified_onnx(workspace, tmp_path):
    engines = tmp_path / "engines"
    result = invoke(build_app, ["export", "--recipe", workspace["recipe"], "--engines", engines, "vision", "denoise"])
    assert result.exit_code == 0, result.output
    for component in ("vision", "denoise"):
        art = artifacts.load_artifact(artifacts.latest_artifact(engines, "t", f"{component}-onnx"))
        artifacts.verify_artifact(art)
        assert f"{component}.onnx" in art.manifest["files"]
        check = art.manifest["onnx"]["onnxruntime_check"]
        assert check["checks"] == 2
        out_name = "image_tokens" if component == "vision" else "x_next"
        assert check["outputs"][out_name]["rel_err"] < 1e-4 and check["outputs"][out_name]["cosine"] > 0.9999


def test_quantize_calibrates_on_a_users_observation_file(workspace, tmp_path):
    import numpy as np

    from pi_build.engine import fp8
    from pi_build.envs.libero import load_recorded_observations

    obs = load_recorded_observations()[:3]
    calib = tmp_path / "calib.npz"
    np.savez(calib, base=np.stack([o["observation/image"] for o in obs]), wrist=np.stack([o["observation/wrist_image"] for o in obs]),
             state=np.stack([o["observation/state"] for o in obs]), prompt=np.array([o["prompt"] for o in obs]))
    engines = tmp_path / "engines"
    result = invoke(build_app, ["quantize", "--recipe", workspace["recipe"], "--engines", engines, "kvcache",
                                "--set", f"quantize.calibration={calib}", "--set", "quantize.samples=2"])
    assert result.exit_code == 0, result.output
    art = artifacts.load_artifact(artifacts.latest_artifact(engines, "t", "kvcache-fp8-scales"))
    assert art.manifest["quantize"]["calibration"] == str(calib) and art.manifest["quantize"]["samples"] == 2
    scales = fp8.load_scales(art.path / "scales.json")
    assert scales and all(s["input_amax"] > 0 for s in scales.values())
    bad = tmp_path / "bad.npz"
    np.savez(bad, base=np.zeros((1, 224, 224, 3), np.uint8))
    result = runner.invoke(build_app, ["quantize", "--recipe", workspace["recipe"], "--engines", engines, "kvcache",
                                       "--set", f"quantize.calibration={bad}"])
    assert result.exit_code != 0 and "missing arrays" in str(result.exception)


def test_pi0_builds_and_matches_its_reference(tmp_path):
    """pi0 (state token, action-time MLP, 48-token prompt, delta actions) through every stage."""
    ckpt = tmp_path / "pi0"
    assert invoke(build_app, ["checkpoint", "--config", "pi0_tiny", "--horizon", "10", "--out", ckpt]).exit_code == 0
    recipe = tmp_path / "pi0.toml"
    recipe.write_text(RECIPE.format(checkpoint=ckpt).replace('name = "t"', 'name = "p"').replace("pi05_tiny", "pi0_tiny")
                      .replace("prompt_len = 200", "prompt_len = 48").replace('backend = "inductor"', 'backend = "eager"'))
    engines = tmp_path / "engines"
    result = invoke(build_app, ["all", "--recipe", recipe, "--engines", engines, "--skip", "export"])
    assert result.exit_code == 0, result.output
    pipeline_manifest = artifacts.load_artifact(artifacts.latest_artifact(engines, "p", "pipeline")).manifest
    assert pipeline_manifest["accuracy"]["passed"] and pipeline_manifest["source"]["pi05"] is False
    policy = load_policy(engines, "p", "cpu")
    from pi_build.envs.libero import load_recorded_observations

    obs = load_recorded_observations()[1]
    actions = policy(obs)["actions"]
    assert actions.shape == (10, 7)
