"""What a manifest.json holds (one typed definition of its keys), and the environment it records.

Every build of one component is a folder ``engines/<model-id>/<kind>/<version>/`` whose
manifest.json is written last; ``store.py`` writes and reads them. The keys (``Manifest``) are
filled in by ``store.write_artifact`` (the first block) and by the build stages (the rest); stages
may add keys of their own. ``fit.py`` reads them to decide which engines run together, and here.
"""

from __future__ import annotations

import importlib.util
import platform
import re
from importlib import metadata
from pathlib import Path
from typing import Any, TypedDict

from pi_build.io import sha256_json

# 2: tokenizer and norm stats travel with the engines; manifest_sha256; checkpoint by name only.
FORMAT_VERSION = 2


class TensorSpec(TypedDict):
    shape: list[int]
    dtype: str  # "float32", "bfloat16", "bool", "int64"


class FileEntry(TypedDict):
    sha256: str
    bytes: int


class Source(TypedDict, total=False):
    checkpoint: str  # the checkpoint folder's name, for people: a build machine's path means nothing on a robot
    weights_sha256: str  # what ties engines to weights: one sha256 over the weight files
    config: str  # the model config's name (pi_build.model.pi0.CONFIGS) or "custom"
    pi05: bool
    model_config: dict[str, Any]  # the exact model.pi0.Config, as config_to_dict writes it


class Manifest(TypedDict, total=False):
    # --- written by store.write_artifact
    format_version: int  # FORMAT_VERSION
    component: str  # vision | kvcache | denoise, or a stage output (store.OUTPUTS)
    model_id: str  # the recipe's name
    version: str  # "v3": the folder's name
    created: str  # UTC, ISO 8601
    files: dict[str, FileEntry]  # every file of the artifact
    manifest_sha256: str  # sha256 of this manifest without this key: an edited manifest is refused
    # --- written by the stages
    stage: str  # export | quantize | compile | capture
    backend: str | None  # inductor | tensorrt | eager (engines); onnx, modelopt (stage outputs)
    precision: str | None  # fp32 | bf16 | fp8
    steps: int  # denoise steps baked into the denoise engine
    batch: int
    horizon: int
    prompt_len: int
    cameras: list[str]
    inputs: dict[str, TensorSpec]  # names are the engine's (fit.LINKS)
    outputs: dict[str, TensorSpec]
    source: Source
    recipe: dict[str, Any]  # Recipe.to_dict() of the recipe it was built from
    recipe_sha256: str
    toolchain: dict[str, str | None]  # toolchain_versions() at build time
    device: dict[str, Any]  # device_info() of the build device
    build_seconds: float
    engine_runner: str  # aoti | torch.compile | eager | tensorrt (backends)
    autotune: bool  # compiled with Inductor's max-autotune (recipe <component>.autotune); loads with it too
    engine_files: list[str]
    aoti_problem: str | None
    gpu_kernels: dict[str, Any] | None  # what a GPU build switched to pi-build's kernels or library epilogues
    fp8_scales: dict[str, Any] | None  # the scales artifact an fp8 engine was made from
    assets: dict[str, str]  # what the runtime needs besides the engines: {"tokenizer": file, "norm_stats": file}
    vocab_size: int
    accuracy: dict[str, Any]  # accuracy.check_gate's report: cosine, rel_err, max_abs, gate, passed, seed
    onnx: dict[str, Any]  # export stage: cleaning and the onnxruntime check
    quantize: dict[str, Any]  # quantize stage: calibration settings
    capture: dict[str, Any]  # capture stage: what was captured
    engines: dict[str, str]  # capture stage: the engine versions it assembled
    latency_ms: dict[str, Any]


def manifest_hash(manifest: dict[str, Any]) -> str:
    """sha256 of a manifest's canonical JSON without its own manifest_sha256 key."""
    return sha256_json({k: v for k, v in manifest.items() if k != "manifest_sha256"})


# ----------------------------------------------------------------------------- environment

# Distribution names to look up for each toolchain entry, first found wins.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "modelopt": ("nvidia-modelopt",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"),
    "torch_tensorrt": ("torch-tensorrt",),
}


def toolchain_versions() -> dict[str, str | None]:
    """Versions of python and the build/run packages (None where absent), read from package
    metadata so that nothing heavy is imported."""
    versions: dict[str, str | None] = {"python": platform.python_version()}
    for key, distributions in _DISTRIBUTIONS.items():
        versions[key] = None
        for distribution in distributions:
            try:
                versions[key] = metadata.version(distribution)
                break
            except metadata.PackageNotFoundError:
                continue
    versions["torch"] = _torch_build_version() or versions["torch"]
    return versions


def _torch_build_version() -> str | None:
    """torch.__version__ without importing torch: the CUDA wheels' metadata says "2.11.0" where
    torch.__version__ says "2.11.0+cu130", and the CUDA build matters to a compiled engine."""
    spec = importlib.util.find_spec("torch")  # locates the package without running it
    if spec is None or not spec.submodule_search_locations:
        return None
    try:
        text = (Path(spec.submodule_search_locations[0]) / "version.py").read_text()
    except OSError:
        return None
    match = re.search(r"""^__version__\s*=\s*['"]([^'"]+)['"]""", text, re.MULTILINE)
    return match.group(1) if match else None


def device_info(device: Any) -> dict[str, Any]:
    """What an engine built on ``device`` ("auto", "cpu", "cuda", "cuda:1" or a torch.device) is tied to.

    CUDA: {"type": "cuda", "name", "compute_capability": "9.0", "cuda": runtime version};
    CPU: {"type": "cpu", "name": the CPU model, "machine": e.g. "x86_64"}.
    """
    kind = str(device)
    if kind == "auto":
        import torch

        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cpu":
        return {"type": "cpu", "name": _cpu_name(), "machine": platform.machine()}
    if kind.startswith("cuda"):
        import torch

        index = torch.device(kind).index
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return {
            "type": "cuda",
            "name": torch.cuda.get_device_name(index),
            "compute_capability": f"{major}.{minor}",
            "cuda": torch.version.cuda,
        }
    raise ValueError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:<index>")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
