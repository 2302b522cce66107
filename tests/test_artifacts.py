"""The artifact store: atomic versioned writes, verification, and refusing components that do not fit."""

from __future__ import annotations

import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from pi_build import artifacts
from pi_build.artifacts import store
from pi_build.artifacts import (
    Artifact,
    ArtifactError,
    check_compatible,
    device_info,
    engines_dir,
    latest_artifact,
    list_artifacts,
    load_artifact,
    toolchain_versions,
    verify_artifact,
    write_artifact,
)


def make_files(tmp_path: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """Source files of fresh random bytes."""
    src = tmp_path / "build"
    src.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, size in sizes.items():
        files[name] = src / name
        files[name].write_bytes(os.urandom(size))
    return files


@pytest.fixture
def engines(tmp_path: Path) -> Path:
    return tmp_path / "engines"


def visible(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


# ----------------------------------------------------------------------------- writing and reading


def test_write_records_hashes_and_metadata(tmp_path, engines):
    files = make_files(tmp_path, {"vision.pt2": 3000, "vision.onnx": 17})
    manifest = {"backend": "inductor", "precision": "bf16", "source": {"weights_sha256": "ab" * 32}}
    before = copy.deepcopy(manifest)
    path = write_artifact(engines, "tiny", "vision", files, manifest)

    assert path == engines / "tiny" / "vision" / "v1"
    assert visible(path) == ["manifest.json", "vision.onnx", "vision.pt2"]
    assert manifest == before  # the caller's dict is untouched
    written = json.loads((path / "manifest.json").read_text())
    for name, source in files.items():
        data = source.read_bytes()
        assert (path / name).read_bytes() == data
        assert written["files"][name] == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
        assert source.exists()  # copied, not moved
    assert (written["component"], written["model_id"], written["version"]) == ("vision", "tiny", "v1")
    assert written["format_version"] == artifacts.FORMAT_VERSION
    assert written["backend"] == "inductor" and written["source"] == before["source"]
    created = datetime.fromisoformat(written["created"])
    assert created.tzinfo is not None and created.utcoffset().total_seconds() == 0
    assert abs((datetime.now(timezone.utc) - created).total_seconds()) < 3600

    artifact = load_artifact(path)
    assert (artifact.component, artifact.model_id, artifact.version) == ("vision", "tiny", "v1")
    assert artifact.manifest == written and artifact.file("vision.pt2") == path / "vision.pt2"
    verify_artifact(artifact)  # intact: no error
    with pytest.raises(ArtifactError, match="no file 'x.pt2'"):
        artifact.file("x.pt2")


def test_versions_count_up_numerically(tmp_path, engines):
    files = make_files(tmp_path, {"e.bin": 8})
    paths = [write_artifact(engines, "m", "denoise", files, {}) for _ in range(10)]
    assert [p.name for p in paths] == [f"v{i}" for i in range(1, 11)]
    assert latest_artifact(engines, "m", "denoise") == engines / "m" / "denoise" / "v10"  # not v9 (text order)
    # A deleted top version's number is taken again; a gap below the top is not filled.
    shutil.rmtree(paths[9])
    shutil.rmtree(paths[4])
    assert write_artifact(engines, "m", "denoise", files, {}).name == "v10"
    assert write_artifact(engines, "m", "denoise", files, {}).name == "v11"
    assert latest_artifact(engines, "m", "kvcache") is None
    assert latest_artifact(engines, "other", "denoise") is None


def test_stage_outputs_other_than_engines(tmp_path, engines):
    # Intermediate outputs (an ONNX export, FP8 scales) and file-less records are artifacts too.
    scales = write_artifact(engines, "m", "kvcache-fp8-scales", make_files(tmp_path, {"scales.json": 40}), {})
    record = write_artifact(engines, "m", "pipeline", {}, {"latency_ms": 12.5})
    assert load_artifact(record).manifest["files"] == {} and visible(record) == ["manifest.json"]
    verify_artifact(load_artifact(record))
    assert latest_artifact(engines, "m", "kvcache-fp8-scales") == scales
    assert [str(a) for a in list_artifacts(engines)] == ["m/kvcache-fp8-scales/v1", "m/pipeline/v1"]


def test_list_artifacts_sorted_and_ignoring_leftovers(tmp_path, engines):
    files = make_files(tmp_path, {"e.bin": 8})
    for model, component in [("b", "vision"), ("a", "kvcache"), ("a", "vision"), ("a", "kvcache")]:
        write_artifact(engines, model, component, files, {})
    # Leftovers a killed build or a person might leave: none of them is an artifact.
    leftover = engines / "a" / "vision" / ".tmp-abc123"
    leftover.mkdir()
    (leftover / "manifest.json").write_text(json.dumps({"version": "v9"}))
    (engines / "a" / "vision" / "v7").mkdir()  # no manifest
    (engines / "a" / "vision" / "notes").mkdir()
    (engines / ".tmp-x").mkdir()
    listed = [str(a) for a in list_artifacts(engines)]
    assert listed == ["a/kvcache/v1", "a/kvcache/v2", "a/vision/v1", "b/vision/v1"]
    assert latest_artifact(engines, "a", "vision") == engines / "a" / "vision" / "v1"
    # The next build still gets a number no folder has used.
    assert write_artifact(engines, "a", "vision", files, {}).name == "v8"
    assert list_artifacts(tmp_path / "nothing-here") == []


def test_tampered_file_is_refused_naming_it(tmp_path, engines):
    files = make_files(tmp_path, {"kv.pt2": 4096, "kv.onnx": 64})
    artifact = load_artifact(write_artifact(engines, "m", "kvcache", files, {}))
    target = artifact.path / "kv.pt2"
    data = bytearray(target.read_bytes())
    data[100] ^= 0xFF  # same size, one byte changed
    target.write_bytes(bytes(data))
    with pytest.raises(ArtifactError) as info:
        verify_artifact(artifact)
    assert "kv.pt2" in str(info.value) and "sha256" in str(info.value) and "kv.onnx" not in str(info.value)

    target.write_bytes(bytes(data[:-1]))
    with pytest.raises(ArtifactError, match=r"kv.pt2: 4095 bytes, the manifest says 4096"):
        verify_artifact(artifact)


def test_missing_file_is_refused_naming_it(tmp_path, engines):
    files = make_files(tmp_path, {"kv.pt2": 100, "kv.onnx": 64})
    artifact = load_artifact(write_artifact(engines, "m", "kvcache", files, {}))
    (artifact.path / "kv.onnx").unlink()
    with pytest.raises(ArtifactError, match="kv.onnx: missing"):
        verify_artifact(artifact)


def test_load_refuses_incomplete_or_unreadable_manifests(tmp_path, engines):
    path = write_artifact(engines, "m", "vision", make_files(tmp_path, {"e.bin": 8}), {})
    manifest = path / "manifest.json"
    good = json.loads(manifest.read_text())
    manifest.write_text("{not json")
    with pytest.raises(ArtifactError, match="not valid JSON"):
        load_artifact(path)
    manifest.write_text(json.dumps({**good, "format_version": artifacts.FORMAT_VERSION + 1}))
    with pytest.raises(ArtifactError, match="format_version"):
        load_artifact(path)
    manifest.write_text(json.dumps({k: v for k, v in good.items() if k != "files"}))
    with pytest.raises(ArtifactError, match="no 'files'"):
        load_artifact(path)
    manifest.unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        load_artifact(path)


def test_edited_manifest_is_refused_naming_it(tmp_path, engines):
    """The manifest's own sha256 covers it: an edit (here, a looser gate) is caught at load, not only at run time."""
    path = write_artifact(engines, "m", "vision", make_files(tmp_path, {"e.bin": 8}), {"accuracy": {"cosine": 0.9}})
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_text())
    assert data["manifest_sha256"] == artifacts.manifest.manifest_hash(data)
    data["accuracy"]["cosine"] = 0.99999
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match="edited after the build"):
        load_artifact(path)


def test_older_format_is_refused_with_the_rebuild_command(tmp_path, engines):
    path = write_artifact(engines, "m", "kvcache", make_files(tmp_path, {"e.bin": 8}), {})
    manifest = path / "manifest.json"
    data = json.loads(manifest.read_text())
    data["format_version"] = 1
    manifest.write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"older pi-build .*`pi-build kvcache --recipe"):
        load_artifact(path)
    problems: list[str] = []
    assert list_artifacts(engines, problems) == [] and "older pi-build" in problems[0]


def test_artifact_ids_as_list_prints_them():
    assert artifacts.parse_id("tiny/vision/v12") == ("tiny", "vision", "v12")
    for bad in ("tiny/vision", "tiny/vision/12", "a/b/c/v1"):
        with pytest.raises(ArtifactError, match="not an artifact id"):
            artifacts.parse_id(bad)


def test_bad_arguments_are_refused_before_writing(tmp_path, engines):
    files = make_files(tmp_path, {"e.bin": 8})
    with pytest.raises(ArtifactError, match="unknown component 'prefix'"):
        write_artifact(engines, "m", "prefix", files, {})
    with pytest.raises(ArtifactError, match="model id '../m'"):
        write_artifact(engines, "../m", "vision", files, {})
    with pytest.raises(ArtifactError, match="'sub/e.bin'"):
        write_artifact(engines, "m", "vision", {"sub/e.bin": files["e.bin"]}, {})
    with pytest.raises(ArtifactError, match="manifest.json"):
        write_artifact(engines, "m", "vision", {"manifest.json": files["e.bin"]}, {})
    with pytest.raises(ArtifactError, match="'missing.bin'.*not a file"):
        write_artifact(engines, "m", "vision", {"missing.bin": tmp_path / "nope"}, {})
    with pytest.raises(ArtifactError, match="component 'kvcache'"):
        write_artifact(engines, "m", "vision", files, {"component": "kvcache"})
    with pytest.raises(TypeError):  # not JSON: refused before anything is copied
        write_artifact(engines, "m", "vision", files, {"when": datetime.now()})
    assert not engines.exists()  # every check came before anything was created


# ----------------------------------------------------------------------------- interrupted writes


def test_failing_copy_leaves_nothing(tmp_path, engines, monkeypatch):
    files = make_files(tmp_path, {"a.bin": 1000, "b.bin": 1000, "c.bin": 10})
    real_copy, calls = store._copy_and_hash, []

    def copy_then_fail(source, dest):
        calls.append(source.name)
        if len(calls) == 2:
            dest.write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        return real_copy(source, dest)

    monkeypatch.setattr(store, "_copy_and_hash", copy_then_fail)
    with pytest.raises(OSError, match="No space"):
        write_artifact(engines, "m", "vision", files, {})
    assert calls == ["a.bin", "b.bin"]
    assert visible(engines / "m" / "vision") == []  # neither a version nor the temp folder
    assert latest_artifact(engines, "m", "vision") is None and list_artifacts(engines) == []


def test_failing_manifest_write_leaves_nothing(tmp_path, engines, monkeypatch):
    files = make_files(tmp_path, {"a.bin": 1000})
    first = write_artifact(engines, "m", "vision", files, {})

    def write_half_then_fail(path, data):
        path.write_text(json.dumps(data)[:20])
        raise KeyboardInterrupt  # even an interrupt cleans up

    monkeypatch.setattr(store, "_write_json", write_half_then_fail)
    with pytest.raises(KeyboardInterrupt):
        write_artifact(engines, "m", "vision", files, {})
    assert visible(engines / "m" / "vision") == ["v1"]
    assert latest_artifact(engines, "m", "vision") == first


def test_killed_write_leftover_is_ignored(tmp_path, engines):
    # A build killed before its rename leaves a complete-looking .tmp-* folder behind.
    files = make_files(tmp_path, {"a.bin": 10})
    done = write_artifact(engines, "m", "denoise", files, {})
    leftover = engines / "m" / "denoise" / ".tmp-killed"
    leftover.mkdir()
    (leftover / "a.bin").write_bytes(b"x")
    (leftover / "manifest.json").write_text((done / "manifest.json").read_text().replace('"v1"', '"v2"'))
    assert latest_artifact(engines, "m", "denoise") == done
    assert [a.path for a in list_artifacts(engines)] == [done]


def test_race_for_a_version_takes_the_next(tmp_path, engines, monkeypatch):
    files = make_files(tmp_path, {"a.bin": 10})
    other = make_files(tmp_path / "other", {"z.bin": 5})
    real_rename, raced = os.rename, []

    def rename_after_another_writer(src, dst):
        if not raced:  # another process finishes its v1 just before our rename
            raced.append(dst)
            monkeypatch.setattr(store.os, "rename", real_rename)
            write_artifact(engines, "m", "vision", other, {"by": "other"})
            monkeypatch.setattr(store.os, "rename", rename_after_another_writer)
        return real_rename(src, dst)

    monkeypatch.setattr(store.os, "rename", rename_after_another_writer)
    ours = write_artifact(engines, "m", "vision", files, {"by": "us"})
    assert raced == [engines / "m" / "vision" / "v1"]
    assert ours.name == "v2" and load_artifact(ours).manifest["version"] == "v2"
    assert load_artifact(ours).manifest["by"] == "us" and (ours / "a.bin").exists()
    theirs = load_artifact(engines / "m" / "vision" / "v1")
    assert theirs.manifest["by"] == "other" and theirs.manifest["version"] == "v1"
    assert visible(engines / "m" / "vision") == ["v1", "v2"]


# ----------------------------------------------------------------------------- engines folder


def test_engines_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("PI_BUILD_ENGINES", raising=False)
    assert engines_dir(None) == Path("engines")
    monkeypatch.setenv("PI_BUILD_ENGINES", str(tmp_path / "from-env"))
    assert engines_dir(None) == tmp_path / "from-env"
    assert engines_dir(tmp_path / "flag") == tmp_path / "flag"  # the flag beats the variable


# ----------------------------------------------------------------------------- compatibility

# The tiny pi0.5 at the LIBERO shapes: 2 cameras x 256 tokens + 200 prompt tokens = 712 prefix
# slots; Gemma width 64, 2 layers, 1 KV head of 16; action dim 32, horizon 10.
B, C, L, H = 1, 2, 200, 10
S = C * 256 + L
KV = {"shape": [2, B, 1, S, 16], "dtype": "float32"}
CPU = {"type": "cpu", "name": "Some CPU", "machine": "x86_64"}
H100 = {"type": "cuda", "name": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "cuda": "13.0"}
TOOLCHAIN = {"python": "3.11.7", "torch": "2.13.0", "tensorrt": "10.13.0"}


def t(*shape: int, dtype: str = "float32") -> dict:
    return {"shape": list(shape), "dtype": dtype}


def pipeline(device: dict = H100) -> dict[str, Artifact]:
    model = {"batch": B, "horizon": H, "prompt_len": L, "cameras": ["base_0_rgb", "left_wrist_0_rgb"]}
    io = {
        "vision": ({"images": t(B, C, 3, 224, 224)}, {"image_tokens": t(B, C * 256, 64)}),
        "kvcache": (
            {"image_tokens": t(B, C * 256, 64), "image_masks": t(B, C, dtype="bool"), "tokens": t(B, L, dtype="int64"),
             "token_masks": t(B, L, dtype="bool")},
            {"k": KV, "v": KV, "prefix_mask": t(B, S, dtype="bool")},
        ),
        "denoise": (
            {"noise": t(B, H, 32), "k": KV, "v": KV, "prefix_mask": t(B, S, dtype="bool"), "state": t(B, 32)},
            {"actions": t(B, H, 32)},
        ),
    }
    result = {}
    for component, (inputs, outputs) in io.items():
        manifest = {
            "component": component, "model_id": "tiny", "version": "v1", "backend": "inductor", "files": {},
            "inputs": inputs, "outputs": outputs, "source": {"weights_sha256": "ab" * 32}, **copy.deepcopy(model),
            "recipe": {"model": dict(model)}, "toolchain": dict(TOOLCHAIN), "device": dict(device),
        }
        result[component] = Artifact(Path("engines/tiny") / component / "v1", copy.deepcopy(manifest))
    return result


def refused(arts: dict[str, Artifact], device: dict | None = H100, toolchain: dict = TOOLCHAIN) -> str:
    with pytest.raises(ArtifactError) as info:
        check_compatible(arts, device=device, toolchain=toolchain)
    return str(info.value)


def test_matching_components_pass():
    check_compatible(pipeline(), device=H100, toolchain=TOOLCHAIN)
    check_compatible(pipeline(CPU), device=CPU, toolchain={**TOOLCHAIN, "tensorrt": None})
    check_compatible({"vision": pipeline()["vision"]}, device=H100, toolchain=TOOLCHAIN)


def test_different_weights_refused():
    arts = pipeline()
    arts["kvcache"].manifest["source"]["weights_sha256"] = "cd" * 32
    msg = refused(arts)
    assert "different weights" in msg and "tiny/kvcache/v1 from cdcdcd" in msg
    del arts["kvcache"].manifest["source"]["weights_sha256"]
    assert "source.weights_sha256" in refused(arts)


def test_image_token_count_mismatch_refused():
    arts = pipeline()
    arts["vision"].manifest["outputs"]["image_tokens"] = t(B, 3 * 256, 64)  # built for 3 cameras
    msg = refused(arts)
    assert "'image_tokens'" in msg and "[1, 768, 64]" in msg and "[1, 512, 64]" in msg and "dim 1: 768 vs 512" in msg


def test_cache_length_mismatch_refused():
    arts = pipeline()
    short = {"shape": [2, B, 1, C * 256 + 48, 16], "dtype": "float32"}  # denoise built for a 48-token prompt
    arts["denoise"].manifest["inputs"].update(k=short, v=short)
    msg = refused(arts)
    assert "'k'" in msg and "dim 3: 712 vs 560" in msg


def test_cache_dtype_and_missing_interface_refused():
    arts = pipeline()
    arts["denoise"].manifest["inputs"]["v"] = {**KV, "dtype": "bfloat16"}
    assert "'v' as float32" in refused(arts) and "bfloat16" in refused(arts)
    arts = pipeline()
    del arts["kvcache"].manifest["outputs"]["prefix_mask"]
    assert "outputs.prefix_mask" in refused(arts)


@pytest.mark.parametrize(("name", "value"), [("horizon", 50), ("batch", 2), ("prompt_len", 48), ("cameras", ["base_0_rgb"])])
def test_shared_shape_mismatch_refused_naming_it(name, value):
    arts = pipeline()
    arts["denoise"].manifest[name] = value  # the shape the engine was built for
    msg = refused(arts)
    assert f"disagree on {name}" in msg and f"tiny/denoise/v1 has {value}" in msg


def test_vision_is_shared_by_every_prompt_bucket():
    arts = pipeline()
    arts["vision"].manifest["prompt_len"] = 32  # vision never sees the prompt
    check_compatible(arts, device=H100, toolchain=TOOLCHAIN)
    arts["kvcache"].manifest["prompt_len"] = 32  # but kvcache and denoise must agree
    assert "disagree on prompt_len" in refused(arts)


def test_other_gpu_architecture_refused():
    arts = pipeline()
    ada = {**H100, "name": "NVIDIA GeForce RTX 4090", "compute_capability": "8.9"}
    msg = refused(arts, device=ada)
    assert "compute capability 9.0" in msg and "8.9" in msg
    assert "built for cuda, but this device is cpu" in refused(arts, device=CPU)
    check_compatible(arts, device=None, toolchain=TOOLCHAIN)  # device checks skipped
    for a in arts.values():
        a.manifest["backend"] = "eager"  # weights for plain PyTorch run anywhere
    check_compatible(arts, device=ada, toolchain={"torch": "2.11.0"})


def test_other_toolchain_refused():
    arts = pipeline()
    msg = refused(arts, toolchain={**TOOLCHAIN, "torch": "2.11.0+cu130"})
    assert "torch 2.13.0" in msg and "2.11.0+cu130" in msg
    arts["denoise"].manifest["backend"] = "tensorrt"
    # A TensorRT engine is tied to TensorRT's version, not torch's.
    msg = refused({"denoise": arts["denoise"]}, toolchain={**TOOLCHAIN, "tensorrt": "10.9.0"})
    assert "tensorrt 10.13.0" in msg and "10.9.0" in msg
    check_compatible({"denoise": arts["denoise"]}, device=H100, toolchain={**TOOLCHAIN, "torch": "2.11.0"})
    assert "none installed" in refused({"denoise": arts["denoise"]}, toolchain={**TOOLCHAIN, "tensorrt": None})


def test_wrong_component_key_refused():
    arts = pipeline()
    assert "is a 'vision' artifact, given as 'kvcache'" in refused({"kvcache": arts["vision"]})
    arts["vision"].manifest["backend"] = "onnxruntime"
    assert "unknown backend 'onnxruntime'" in refused(arts)


def test_compatible_written_artifacts_round_trip(tmp_path, engines):
    # The same checks on manifests that went through write/load.
    files = make_files(tmp_path, {"e.bin": 16})
    loaded = {}
    for component, artifact in pipeline(CPU).items():
        manifest = {k: v for k, v in artifact.manifest.items() if k not in ("version", "files")}
        loaded[component] = load_artifact(write_artifact(engines, "tiny", component, files, manifest))
    check_compatible(loaded, device=CPU, toolchain=TOOLCHAIN)
    loaded["kvcache"].manifest["outputs"]["k"]["shape"][3] = 713
    assert "dim 3: 713 vs 712" in refused(loaded, device=CPU)


# ----------------------------------------------------------------------------- environment


def test_toolchain_versions_match_installed_packages_without_importing_them():
    import onnx
    import torch

    versions = toolchain_versions()
    assert set(versions) == {"python", "torch", "onnx", "onnxruntime", "modelopt", "tensorrt", "torch_tensorrt"}
    assert versions["torch"] == torch.__version__ and versions["onnx"] == onnx.__version__
    assert versions["python"] == ".".join(map(str, sys.version_info[:3]))
    code = "import sys, pi_build.artifacts as a; a.toolchain_versions(); print(sorted({'torch', 'onnx', 'tensorrt'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_device_info_cpu():
    info = device_info("cpu")
    assert info["type"] == "cpu" and info["machine"] == os.uname().machine
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists() and "model name" in cpuinfo.read_text():
        expected = next(line for line in cpuinfo.read_text().splitlines() if line.startswith("model name"))
        assert info["name"] == expected.split(":", 1)[1].strip()
    assert info["name"]
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        device_info("tpu")


def test_device_info_cuda():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    info = device_info("cuda")
    major, minor = torch.cuda.get_device_capability()
    assert info == {"type": "cuda", "name": torch.cuda.get_device_name(), "compute_capability": f"{major}.{minor}",
                    "cuda": torch.version.cuda}
    assert device_info("auto") == info
