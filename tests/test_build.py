"""The build toolchain end to end on the tiny model: CLI, artifacts, gates, refusals, runtime, bench."""

import json
import shutil

import numpy as np
import pytest
import torch

from pi_build import artifacts, backends
from pi_build.backends import inductor
from pi_build.cli.build import app as build_app
from pi_build.cli.run import app as run_app
from pi_build.model.checkpoints import load_checkpoint
from pi_build.model.pi0 import ModelInputs
from pi_build.recipe import load_recipe
from pi_build.runtime.pipeline import load_pipeline
from pi_build.runtime.policy import load_policy
from pi_build.transforms.libero import load_recorded_observations

from conftest import RECIPE, invoke, runner


def pipeline_of(workspace, engines=None, **overrides):
    """The engines the workspace's recipe asks for, on the CPU."""
    return load_pipeline(engines or workspace["engines"], load_recipe(workspace["recipe"], overrides), "cpu")


def test_build_lands_every_stage_with_manifests(workspace):
    engines = workspace["engines"]
    for component in ("vision", "kvcache", "denoise", "kvcache-fp8-scales", "pipeline"):
        path = artifacts.latest_artifact(engines, "t", component)
        assert path is not None, component
        art = artifacts.load_artifact(path)
        artifacts.verify_artifact(art)
    vision = artifacts.load_artifact(engines / "t" / "vision" / "v1").manifest
    # AOTInductor where this machine loads its packages (probed once), else torch.compile with the kernel cache
    aoti = inductor.aoti_works(torch.device("cpu"))[0]
    assert vision["backend"] == "inductor" and vision["engine_runner"] == ("aoti" if aoti else "torch.compile")
    assert vision["engine_files"] == (["engine.pt2"] if aoti else ["program.pt2", "inductor_cache.bin"])
    assert vision["inputs"]["images"]["shape"] == [1, 2, 3, 224, 224]
    assert vision["accuracy"]["passed"] and vision["accuracy"]["rel_err"] < 1e-4
    assert vision["source"]["weights_sha256"] == load_checkpoint(workspace["ckpt"])[1].weight_sha256["model.safetensors"]
    assert vision["toolchain"]["torch"] and vision["device"]["type"] == "cpu"
    kv = artifacts.load_artifact(engines / "t" / "kvcache" / "v1").manifest
    assert kv["precision"] == "fp8" and kv["fp8_scales"]["version"] == "v1"  # handed over in memory, recorded
    assert vision["source"]["checkpoint"] == "ckpt"  # the folder's name: a build machine's path means nothing elsewhere
    assert kv["outputs"]["k"]["shape"] == [2, 1, 1, 712, 16]  # layers, batch, kv heads, 2*256 + 200, head dim
    pipeline = artifacts.load_artifact(engines / "t" / "pipeline" / "v1").manifest
    (shape,) = pipeline["shapes"].values()  # one batch size, one prompt length
    assert shape["capture"]["captured"] is False and "no CUDA" in shape["capture"]["reason"]
    assert shape["engines"] == {"vision": "v1", "kvcache": "v1", "denoise": "v1"}
    assert shape["accuracy"]["passed"] and shape["accuracy"]["observations"] == "generated + recorded"
    assert pipeline["accuracy"]["cosine"] == shape["accuracy"]["cosine"]
    out = invoke(build_app, ["list", "--engines", engines]).output
    assert "t/vision/v1" in out and "t/pipeline/v1" in out


def test_fp8_is_within_its_gate_and_really_quantized(workspace):
    """The FP8 kvcache engine differs measurably from float32 and stays inside the fp8 gate."""
    from pi_build.build.reference import load_reference
    from pi_build.engine import build_component
    from pi_build.engine.accuracy import component_metrics

    recipe = load_recipe(workspace["recipe"])
    reference = load_reference(recipe)
    pipeline = pipeline_of(workspace)
    fp32 = build_component(reference.model, "kvcache", reference.shapes(recipe), "fp32")
    g = torch.Generator().manual_seed(99)
    inputs = fp32.example_inputs(g)
    m = component_metrics("kvcache", pipeline.engines["kvcache"](*inputs), fp32(*inputs))
    gate = recipe.component_gate("kvcache")
    assert 1e-4 < m["rel_err"] <= gate.rel_err and m["cosine"] >= gate.cosine


def test_gpu_builds_switch_the_prefix_attention_to_the_kernel(workspace, monkeypatch):
    """Where pi-build's Triton kernels run, the kvcache module computes attention with the kernel and
    the manifest says so; PI_BUILD_PREFIX_ATTENTION=library keeps SDPA (A/B runs)."""
    from pi_build.build.reference import load_reference
    from pi_build.build.stages import component_module
    from pi_build.engine import kernels

    recipe = load_recipe(workspace["recipe"], {"kvcache.precision": "bf16", "kvcache.backend": "inductor"})
    reference = load_reference(recipe)
    shapes = reference.shapes(recipe)
    module, switched = component_module(reference, recipe, "kvcache", None, shapes)
    assert switched is None and not module.triton_attention  # a CPU build: no Triton kernels
    monkeypatch.setattr(kernels, "triton_available", lambda device: True)
    module, switched = component_module(reference, recipe, "kvcache", None, shapes)
    assert switched == {"attention": "triton"} and module.triton_attention
    monkeypatch.setenv("PI_BUILD_PREFIX_ATTENTION", "library")
    module, switched = component_module(reference, recipe, "kvcache", None, shapes)
    assert switched is None and not module.triton_attention


def test_pipeline_matches_reference_actions(workspace):
    model, _ = load_checkpoint(workspace["ckpt"])
    model.cfg = model.cfg.replace(action_horizon=10)
    pipeline = pipeline_of(workspace)
    images, image_masks, tokens, token_masks, noise, state = pipeline.example_inputs(seed=5)
    actions = pipeline.run(images, image_masks, tokens, token_masks, noise, state)
    ref = model.sample(ModelInputs(images, image_masks, tokens, token_masks, state), noise, steps=2)
    rel = ((actions - ref).norm() / ref.norm()).item()
    assert 0 < rel < 0.1  # fp8 prefix: close, not bit-equal
    with pytest.raises(ValueError, match="tokens has shape"):
        pipeline.run(images, image_masks, tokens[:, :10], token_masks[:, :10], noise, state)


def test_policy_from_engines_gives_libero_actions(workspace):
    policy = load_policy(pipeline_of(workspace))
    reply = policy(load_recorded_observations()[0])
    assert reply["actions"].shape == (10, 7) and set(reply["policy_timing"]) >= {"infer_ms"}


def test_refuses_tampered_engine(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    engine = engines / "t" / "denoise" / "v1" / "program.pt2"
    engine.write_bytes(engine.read_bytes()[:-10] + b"0123456789")
    with pytest.raises(artifacts.ArtifactError, match="program.pt2"):
        pipeline_of(workspace, engines)
    assert invoke(build_app, ["inspect", engines / "t" / "denoise" / "v1"]).exit_code == 1
    result = invoke(run_app, ["serve", "--recipe", workspace["recipe"], "--engines", engines])
    assert result.exit_code == 1 and "program.pt2" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) <= 3  # the engines line, then the one-line refusal


def test_runtime_takes_only_the_engines_its_recipe_asks_for(workspace, tmp_path):
    """Newer engines of other weights or shapes land beside; the recipe's own are still the ones loaded."""
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    other = tmp_path / "other.toml"  # same model id, another checkpoint (other weights)
    other.write_text(RECIPE.format(checkpoint=workspace["other"]))
    assert invoke(build_app, ["denoise", "--recipe", other, "--engines", engines]).exit_code == 0  # denoise v2
    assert invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines,
                              "--set", "model.prompt_len=100"]).exit_code == 0  # denoise v3: other shapes
    assert pipeline_of(workspace, engines).versions() == {"vision": "v1", "kvcache": "v1", "denoise": "v1"}
    with pytest.raises(artifacts.ArtifactError, match=r"no vision engine .* weights from checkpoint 'ckpt' .*'other_ckpt'.*`pi-build vision --recipe "):
        load_pipeline(engines, load_recipe(other), "cpu")
    # A mixed set is refused outright.
    arts = {c: artifacts.load_artifact(engines / "t" / c / "v1") for c in ("vision", "kvcache")}
    arts["denoise"] = artifacts.load_artifact(engines / "t" / "denoise" / "v2")
    with pytest.raises(artifacts.ArtifactError, match="different weights"):
        artifacts.check_compatible(arts, device=None, toolchain=artifacts.toolchain_versions())


def test_steps_and_precision_pick_their_engines(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    assert invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines, "--steps", "5"]).exit_code == 0
    assert invoke(build_app, ["vision", "--recipe", workspace["recipe"], "--engines", engines, "--fp8"]).exit_code == 0
    # a kvcache engine built after a bf16 vision engine takes bf16 image tokens: newer, but not for an fp32 vision
    assert invoke(build_app, ["kvcache", "--recipe", workspace["recipe"], "--engines", engines,
                              "--set", "vision.precision=bf16"]).exit_code == 0
    assert artifacts.load_artifact(engines / "t/kvcache/v2").manifest["inputs"]["image_tokens"]["dtype"] == "bfloat16"
    pipeline = pipeline_of(workspace, engines)  # the recipe says 2 steps and an fp32 vision engine
    assert pipeline.steps == 2 and pipeline.versions() == {"vision": "v1", "kvcache": "v1", "denoise": "v1"}
    assert "vision v1 (fp32, inductor)" in pipeline.describe() and "denoise v1 (fp32, eager, 2 steps)" in pipeline.describe()
    five = pipeline_of(workspace, engines, **{"denoise.steps": 5})
    assert five.steps == 5 and five.versions()["denoise"] == "v2"
    fp8 = pipeline_of(workspace, engines, **{"vision.precision": "fp8"})
    assert fp8.versions()["vision"] == "v2" and fp8.manifests["vision"]["precision"] == "fp8"
    with pytest.raises(artifacts.ArtifactError) as info:
        pipeline_of(workspace, engines, **{"denoise.steps": 7})
    message = str(info.value)
    assert "no denoise engine (fp32, eager, 7 steps)" in message and "built for 5 steps (asked: 7)" in message
    assert f"`pi-build denoise --recipe {workspace['recipe']} --steps 7`" in message
    # the same through pi-run: one line, no traceback, exit code 1
    result = invoke(run_app, ["serve", "--recipe", workspace["recipe"], "--engines", engines, "--steps", "7"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert f"pi-build denoise --recipe {workspace['recipe']} --steps 7" in " ".join(result.output.split())


def test_rowwise_fp8_is_recorded_matched_and_within_its_gate(workspace, tmp_path):
    """quantize.scaling = rowwise builds a kvcache of row-wise Fp8Linears; the engine records its
    scheme, and a recipe asking for the other scheme does not take it."""
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    rowwise = {"quantize.scaling": "rowwise"}
    with pytest.raises(artifacts.ArtifactError, match="other \\[quantize\\] settings"):
        pipeline_of(workspace, engines, **rowwise)  # the tensor-scaled engine is not what it asks for
    result = invoke(build_app, ["kvcache", "--recipe", workspace["recipe"], "--engines", engines, "--set", "quantize.scaling=rowwise"])
    assert result.exit_code == 0, result.output
    kv = artifacts.load_artifact(engines / "t" / "kvcache" / "v2").manifest
    assert kv["recipe"]["quantize"]["scaling"] == "rowwise"  # the manifest's one record of the scheme
    assert kv["accuracy"]["passed"] and kv["accuracy"]["cosine"] > 0.99
    scales = artifacts.load_artifact(artifacts.latest_artifact(engines, "t", "kvcache-fp8-scales")).manifest
    assert scales["quantize"]["scaling"] == "rowwise"
    assert artifacts.load_artifact(engines / "t" / "kvcache" / "v1").manifest["recipe"]["quantize"]["scaling"] == "tensor"
    assert pipeline_of(workspace, engines, **rowwise).versions()["kvcache"] == "v2"
    assert pipeline_of(workspace, engines).versions()["kvcache"] == "v1"  # the recipe's own (tensor) engine


def test_autotuned_engines_are_asked_for_and_the_hint_carries_the_overrides(workspace, tmp_path):
    """<component>.autotune is part of what an engine is: recorded, matched, and named in the fix-it command."""
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    with pytest.raises(artifacts.ArtifactError) as info:
        pipeline_of(workspace, engines, **{"vision.autotune": True, "model.batch": [1, 2]})
    message = " ".join(str(info.value).split())
    assert "autotune false (the recipe asks for true)" in message
    assert f"`pi-build vision --recipe {workspace['recipe']} --set 'model.batch=[1, 2]' --set vision.autotune=true`" in message
    assert invoke(build_app, ["vision", "--recipe", workspace["recipe"], "--engines", engines,
                              "--set", "vision.autotune=true"]).exit_code == 0
    assert artifacts.load_artifact(engines / "t/vision/v2").manifest["autotune"] is True
    assert pipeline_of(workspace, engines, **{"vision.autotune": True}).versions()["vision"] == "v2"
    assert pipeline_of(workspace, engines).versions()["vision"] == "v1"  # the recipe's own: not autotuned


def test_engines_run_without_the_checkpoint(workspace, tmp_path):
    """Build on one machine, deploy the engines folder alone: tokenizer and norm stats travel with it."""
    engines = tmp_path / "robot" / "engines"
    shutil.copytree(workspace["engines"], engines)
    recipe = tmp_path / "robot" / "t.toml"
    recipe.write_text(RECIPE.format(checkpoint=tmp_path / "moved" / "ckpt"))  # the checkpoint is not on the robot
    pipeline = load_pipeline(engines, load_recipe(recipe), "cpu")
    for component, asset in (("kvcache", "tokenizer.model"), ("denoise", "norm_stats.json")):
        assert asset in pipeline.manifests[component]["files"]
    obs = load_recorded_observations()[0]
    moved = load_policy(pipeline)(obs)["actions"]
    original = load_policy(pipeline_of(workspace))(obs)["actions"]
    np.testing.assert_array_equal(moved, original)  # same engines, same noise seed: the same actions
    # --model-id runs the recipe recorded in the engines: no recipe file either
    from pi_build.runtime.pipeline import recipe_of_model

    assert recipe_of_model(engines, "t").to_dict() == load_recipe(workspace["recipe"]).to_dict()


def test_inspect_takes_the_ids_list_prints(workspace):
    listed = invoke(build_app, ["list", "--engines", workspace["engines"]]).output
    assert "t/denoise/v1" in listed and "steps" in listed and "precision" in listed
    result = invoke(build_app, ["inspect", "t/denoise/v1", "--engines", workspace["engines"]])
    assert result.exit_code == 0 and "manifest and file hashes ok" in result.output
    result = invoke(build_app, ["inspect", "t/denoise/v9", "--engines", workspace["engines"]])
    assert result.exit_code == 1 and "no artifact t/denoise/v9" in result.output


def test_failed_gate_lands_nothing(workspace, tmp_path):
    engines = tmp_path / "engines"
    shutil.copytree(workspace["engines"], engines)
    result = invoke(build_app, ["denoise", "--recipe", workspace["recipe"], "--engines", engines, "--set", "gates.fp32.rel_err=1e-12"])
    assert result.exit_code == 1 and "accuracy gate failed" in result.output and "seed" in result.output
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
    assert result.exit_code == 1 and result.output.startswith("error:") and "stepz" in result.output
    assert "did you mean 'denoise.steps'" in " ".join(result.output.split())


def test_bench_cpu_table_and_json(workspace, tmp_path):
    out = tmp_path / "bench.json"
    png = tmp_path / "bench.png"
    result = invoke(run_app, ["bench", "--recipe", workspace["recipe"], "--engines", workspace["engines"],
                              "--iters", "3", "--warmup", "1", "--json", out, "--png", png])
    assert result.exit_code == 0, result.output
    data = json.loads(out.read_text())
    (entry,) = data["runs"]
    assert (entry["steps"], entry["batch"]) == (2, 1)  # no --steps: the step counts built for the recipe
    # no --prompt-len: a LIBERO instruction's token count, on the (only) 200-token bucket
    assert 5 < entry["prompt_tokens"] < 200 and entry["bucket"] == 200
    assert entry["throughput_per_s"] == pytest.approx(1e3 / entry["engines"]["end_to_end"]["p50"])
    engines, reference = entry["engines"], entry["reference"]
    for stats in (engines, reference):
        assert all(stats[row]["count"] == (3 if stats is engines else 5) for row in ("vision", "kvcache", "denoise"))
        # per iteration, end to end is the three stages' sum on the CPU (no whole-pipeline graph)
        assert stats["end_to_end"]["mean"] == pytest.approx(sum(stats[c]["mean"] for c in ("vision", "kvcache", "denoise")))
        assert stats["denoise_per_step"]["p50"] == pytest.approx(stats["denoise"]["p50"] / 2)
    assert entry["roofline_ms"] is None and data["ceilings"] == {}  # no floor on a CPU, and none printed
    assert "no roofline floor on a CPU" in result.output and "floor" not in result.output.split("no roofline floor")[1]
    speedup = reference["end_to_end"]["p50"] / engines["end_to_end"]["p50"]
    assert f"{speedup:.1f}x" in result.output
    assert png.stat().st_size > 1000
    assert "profile" not in entry and "where the time goes" not in result.output
    missing = invoke(run_app, ["bench", "--recipe", workspace["recipe"], "--engines", workspace["engines"], "--steps", "7"])
    assert missing.exit_code == 1 and "7 steps" in missing.output and "Traceback" not in missing.output


def test_bench_profile_says_where_the_time_goes(workspace, tmp_path):
    out = tmp_path / "bench.json"
    result = invoke(run_app, ["bench", "--recipe", workspace["recipe"], "--engines", workspace["engines"],
                              "--iters", "2", "--warmup", "0", "--no-reference", "--profile", "--json", out])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(out.read_text())["runs"]
    profile = entry["profile"]
    assert list(profile) == ["vision", "kvcache", "denoise"]
    for component, p in profile.items():
        assert p["kernel_ms"] > 0 and p["kernels"] > 0, component
        assert sum(ms for ms, _ in p["kinds"].values()) == pytest.approx(p["kernel_ms"], rel=1e-3)
        assert sum(n for _, n in p["kinds"].values()) == p["kernels"]
        assert p["busy_ms"] == p["kernel_ms"]  # operators' self times on a CPU: no overlap
        assert p["top"] == sorted(p["top"], key=lambda row: -row[0])
    # the tiny model's linears are library GEMMs on the CPU: the vision tower has some in every call
    assert profile["vision"]["kinds"]["library GEMMs"][1] > 0
    assert "where the time goes" in result.output and "library GEMMs" in result.output


def test_busy_time_counts_overlapping_kernels_once():
    from pi_build.runtime.timing import busy_ms

    assert busy_ms([]) == 0.0
    assert busy_ms([(0, 10), (20, 30)]) == pytest.approx(0.020)  # a gap between them
    assert busy_ms([(0, 10), (5, 30), (6, 8)]) == pytest.approx(0.030)  # overlaps (PDL) and a nested one
    assert busy_ms([(5, 30), (0, 10)]) == pytest.approx(0.030)  # in any order


def test_profile_table_names_graph_overlap_instead_of_a_negative_gap():
    """The kinds come from a graph-free call; when the captured graph overlaps kernels (PDL) the p50 is
    below their sum, and that difference is reported as overlap, not as time between kernels."""
    from rich.console import Console

    from pi_build.runtime.bench import profile_table

    profile = {"vision": {"kernels": 3, "kernel_ms": 1.6, "busy_ms": 1.6, "kinds": {"library GEMMs": [1.6, 3]}, "top": []},
               "denoise": {"kernels": 5, "kernel_ms": 0.7, "busy_ms": 0.65, "kinds": {"attention": [0.7, 5]}, "top": []}}
    latency = {"vision": {"p50": 1.75}, "denoise": {"p50": 0.55}}
    console = Console(width=250, record=True)
    console.print(profile_table(profile, latency, cpu=False))
    rows = {line.split("│")[2].strip(): line.split("│")[3].strip()
            for line in console.export_text().splitlines() if line.count("│") > 4}
    assert rows["between kernels (launches, ramps, gaps)"] == "0.150"  # vision: 1.75 - 1.6
    assert rows["kernels running at once (counted twice above)"] == "-0.050"  # denoise: 0.7 - 0.65
    assert rows["overlap in the CUDA graph (PDL starts kernels early; the kinds were timed without it)"] == "-0.100"
    assert sum(1 for label in rows if label.startswith("between kernels")) == 1  # none for the overlapped one


def test_kernel_kinds_name_what_a_kernel_does():
    from pi_build.runtime.timing import kernel_kind

    assert kernel_kind("nvjet_sm90_tst_128x256_64x4_2x1_v_bz_coopA_NNT") == "library GEMMs"
    assert kernel_kind("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16") == "attention"
    assert kernel_kind("_prefix_attn") == "attention"
    assert kernel_kind("_norm_gemm_kernel") == "pi-build Triton GEMMs"
    assert kernel_kind("triton_red_fused__scaled_mm__to_copy_add_clamp_div_mean") == "fused elementwise and norms (Inductor)"
    assert kernel_kind("triton_poi_fused__scaled_dot_product_cudnn_attention_add_cat_expand_mul") == "fused elementwise and norms (Inductor)"
    assert kernel_kind("Memset (Device)") == "memory (copies, memsets)"
    assert kernel_kind("void at::native::vectorized_elementwise_kernel") == "other"


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
    from pi_build.transforms.libero import load_recorded_observations

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
    assert result.exit_code == 1 and "missing arrays" in result.output


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
    policy = load_policy(load_pipeline(engines, load_recipe(recipe), "cpu"))

    obs = load_recorded_observations()[1]
    actions = policy(obs)["actions"]
    assert actions.shape == (10, 7)
