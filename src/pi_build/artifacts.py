"""The artifact store: where builds land, and whether a set of them may run together.

Every build of one component is a folder of its own, never modified after it appears:

    engines/<model-id>/<component>/<version>/      model-id: the recipe's name; component: vision | kvcache |
                                                   denoise, or another stage output (OUTPUTS: vision-onnx, pipeline, ...)
        <engine files>                             e.g. engine.pt2 (AOTInductor), or program.pt2 + inductor_cache.bin,
                                                   engine.plan + engine.io.json (TensorRT), vision.onnx, scales.json
        manifest.json                              written last; a folder without one is not an artifact

Versions are v1, v2, ... (one more than the highest present). A build is assembled in a hidden
``.tmp-*`` folder beside the versions and renamed into place in one step, so a crash or an
exception leaves either a complete artifact or nothing that ``list_artifacts`` or
``latest_artifact`` would pick up.

manifest.json keys (the first five rows are filled in by ``write_artifact``):

| key | value |
|---|---|
| format_version | int, this file's layout (FORMAT_VERSION) |
| version | "v3": the folder's name |
| created | UTC time, ISO 8601 |
| files | {name: {"sha256": hex, "bytes": int}} for every engine file in the folder |
| component, model_id | as in the path |
| stage | export / quantize / compile / capture: the stage that produced it |
| onnx, quantize, capture | what the export, quantize and capture stages did: checks, settings, timings |
| engine_runner | how the runtime loads the engine: aoti, torch.compile, eager or tensorrt (backends.py) |
| engine_files | the files (in files) that make up the engine |
| backend | inductor / tensorrt / eager (engines); onnx, modelopt (stage outputs); null (pipeline) |
| precision | fp32 / bf16 / fp8 |
| steps | the recipe's denoise.steps (baked into the denoise engine) |
| batch | batch size built for |
| inputs, outputs | {tensor name: {"shape": [ints], "dtype": "float32"}}; names are the engine's (see LINKS) |
| source | {"checkpoint": path, "weights_sha256": hex of the weights, "config": config name, "pi05": bool, "model_config": the exact model.Config as a dict} |
| recipe, recipe_sha256 | ``Recipe.to_dict()`` and ``recipe_hash()`` of the recipe it was built from |
| toolchain | ``toolchain_versions()`` at build time |
| device | ``device_info()`` of the device it was built on |
| build_seconds | float |
| accuracy | {"cosine", "rel_err", "max_abs", "gate": {"cosine", "rel_err"}, "passed": bool, "seed"} against the reference model |

Stages may add keys of their own; ``check_compatible`` reads backend, inputs, outputs,
source.weights_sha256, recipe.model, toolchain and device.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
import importlib.util
from importlib import metadata
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
COMPONENTS = ("vision", "kvcache", "denoise")
# Stage outputs that are not engines land beside them: ONNX exports, FP8 scales, the captured pipeline.
OUTPUTS = COMPONENTS + tuple(f"{c}-{kind}" for c in COMPONENTS for kind in ("onnx", "fp8-scales")) + ("pipeline",)
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
ENGINES_ENV = "PI_BUILD_ENGINES"
_VERSION = re.compile(r"v(\d+)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # model ids and file names: one plain path component

# Tensors passed from one component to the next: the upstream output feeds the downstream input
# of the same name, so their shapes and dtypes must be equal.
LINKS = (
    ("vision", "kvcache", ("image_tokens",)),
    ("kvcache", "denoise", ("k", "v", "prefix_mask")),
)
# Recipe fields (manifest["recipe"]["model"]) that all components of one pipeline must share.
SHARED_MODEL_FIELDS = ("batch", "horizon", "prompt_len", "cameras")
# The packages an engine of each backend is tied to: another version may not load it, or may
# load it and compute something else. Eager artifacts are weights for plain PyTorch code.
TOOLCHAIN_BY_BACKEND = {"inductor": ("torch",), "tensorrt": ("tensorrt",), "eager": ()}
# Distribution names to look up for each toolchain entry, first found wins.
_DISTRIBUTIONS = {
    "torch": ("torch",),
    "onnx": ("onnx",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "modelopt": ("nvidia-modelopt",),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu13-bindings", "tensorrt-cu12-bindings"),
    "torch_tensorrt": ("torch-tensorrt",),
}


class ArtifactError(Exception):
    """An artifact that is missing, damaged, or does not fit with the others; the message says which and why."""


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: dict[str, Any]

    @property
    def component(self) -> str:
        return self.manifest["component"]

    @property
    def model_id(self) -> str:
        return self.manifest["model_id"]

    @property
    def version(self) -> str:
        return self.manifest["version"]

    def file(self, name: str) -> Path:
        """Path of one of the artifact's files, by its manifest name."""
        if name not in self.manifest["files"]:
            raise ArtifactError(f"{self.path}: no file {name!r}; it has {', '.join(self.manifest['files']) or 'none'}")
        return self.path / name

    def __str__(self) -> str:
        return f"{self.model_id}/{self.component}/{self.version}"


def engines_dir(cli_value: Path | None) -> Path:
    """The engines folder: the --engines flag, else $PI_BUILD_ENGINES, else ./engines."""
    if cli_value is not None:
        return Path(cli_value)
    if os.environ.get(ENGINES_ENV):
        return Path(os.environ[ENGINES_ENV])
    return Path("engines")


# ----------------------------------------------------------------------------- writing


def write_artifact(engines: Path, model_id: str, component: str, files: dict[str, Path], manifest: dict[str, Any]) -> Path:
    """Copy ``files`` (name in the artifact -> source path) into a new version folder with ``manifest``.

    Returns the new folder. The caller's files and manifest dict are left unchanged; the manifest
    written gets component, model_id, format_version, version, created and files (hashes) set here.
    """
    if component not in OUTPUTS:
        raise ArtifactError(f"unknown component {component!r}; known: {', '.join(OUTPUTS)}")
    if not _NAME.fullmatch(model_id):
        raise ArtifactError(f"model id {model_id!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    for name, source in files.items():
        if not _NAME.fullmatch(name) or name == MANIFEST:
            raise ArtifactError(f"artifact file name {name!r} must be a plain file name other than {MANIFEST}")
        if not Path(source).is_file():
            raise ArtifactError(f"artifact file {name!r}: source {source} is not a file")
    for key, value in (("component", component), ("model_id", model_id)):
        if manifest.get(key, value) != value:
            raise ArtifactError(f"manifest says {key} {manifest[key]!r} but the artifact is written as {value!r}")
    manifest = copy.deepcopy(manifest)
    json.dumps(manifest)  # fail now, before copying gigabytes, if the manifest cannot be written

    parent = Path(engines) / model_id / component
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the artifact it becomes is for everyone to read
        hashes = {name: _copy_and_hash(Path(source), tmp / name) for name, source in files.items()}
        manifest.update(
            component=component,
            model_id=model_id,
            format_version=FORMAT_VERSION,
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
            files=hashes,
        )
        final = _rename_to_next_version(tmp, parent, manifest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _fsync_dir(parent)
    return final


def _rename_to_next_version(tmp: Path, parent: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest for the next free version and rename ``tmp`` to it; if another writer
    takes that version first (the rename finds a non-empty folder), try the one after."""
    for _ in range(1000):
        manifest["version"] = f"v{_highest_version(parent) + 1}"
        _write_json(tmp / MANIFEST, manifest)
        final = parent / manifest["version"]
        try:
            os.rename(tmp, final)
            return final
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
    raise ArtifactError(f"{parent}: no free version found after 1000 tries")


def _highest_version(parent: Path) -> int:
    numbers = [int(m.group(1)) for p in parent.iterdir() if (m := _VERSION.fullmatch(p.name))]
    return max(numbers, default=0)


def _copy_and_hash(source: Path, dest: Path) -> dict[str, Any]:
    """Copy one file, hashing the bytes as they pass; flushed to disk before the folder is renamed."""
    digest, size = hashlib.sha256(), 0
    with open(source, "rb") as src, open(dest, "wb") as dst:
        while chunk := src.read(1 << 23):
            digest.update(chunk)
            dst.write(chunk)
            size += len(chunk)
        dst.flush()
        os.fsync(dst.fileno())
    return {"sha256": digest.hexdigest(), "bytes": size}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (POSIX); a no-op where folders cannot be opened."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def file_sha256(path: Path) -> str:
    """sha256 hex digest of a file, read in 8 MiB chunks (weights are gigabytes)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 23):
            digest.update(chunk)
    return digest.hexdigest()


# ----------------------------------------------------------------------------- reading


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact's manifest (without hashing its files: see ``verify_artifact``)."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}, so not a complete artifact")
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({e})") from None
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object")
    for key in ("format_version", "component", "model_id", "version", "files"):
        if key not in manifest:
            raise ArtifactError(f"{manifest_path}: no {key!r}")
    if not isinstance(manifest["format_version"], int) or manifest["format_version"] > FORMAT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: format_version {manifest['format_version']!r} is not one this pi-build reads "
            f"(<= {FORMAT_VERSION}); update pi-build or rebuild"
        )
    files = manifest["files"]
    if not isinstance(files, dict) or not all(
        isinstance(e, dict) and isinstance(e.get("sha256"), str) and isinstance(e.get("bytes"), int) for e in files.values()
    ):
        raise ArtifactError(f'{manifest_path}: "files" must map names to {{"sha256": str, "bytes": int}}')
    return Artifact(path, manifest)


def verify_artifact(artifact: Artifact) -> None:
    """Check that every file the manifest lists is present with its recorded size and sha256."""
    problems = []
    for name, entry in artifact.manifest["files"].items():
        path = artifact.path / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif (size := path.stat().st_size) != entry["bytes"]:
            problems.append(f"{name}: {size} bytes, the manifest says {entry['bytes']}")
        elif (digest := file_sha256(path)) != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... (modified)")
    if problems:
        raise ArtifactError(f"artifact {artifact.path} is damaged:\n  " + "\n  ".join(problems))


def latest_artifact(engines: Path, model_id: str, component: str) -> Path | None:
    """The highest complete version folder of one component, or None."""
    versions = _complete_versions(Path(engines) / model_id / component)
    return max(versions)[1] if versions else None


def list_artifacts(engines: Path) -> list[Artifact]:
    """Every complete artifact under ``engines``, by model id, component and version number."""
    found = []
    for model_dir in _visible_dirs(Path(engines)):
        for component_dir in _visible_dirs(model_dir):
            found += [(model_dir.name, component_dir.name, n, p) for n, p in _complete_versions(component_dir)]
    return [load_artifact(path) for *_, path in sorted(found)]


def _visible_dirs(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return [p for p in path.iterdir() if p.is_dir() and not p.name.startswith(".")]


def _complete_versions(component_dir: Path) -> list[tuple[int, Path]]:
    """(number, path) of the vN folders holding a manifest; hidden .tmp-* folders never match vN."""
    return [
        (int(m.group(1)), p)
        for p in _visible_dirs(component_dir)
        if (m := _VERSION.fullmatch(p.name)) and (p / MANIFEST).is_file()
    ]


# ----------------------------------------------------------------------------- compatibility


def check_compatible(artifacts: dict[str, Artifact], *, device: dict[str, Any] | None, toolchain: dict[str, Any]) -> None:
    """Refuse (ArtifactError) a set of components that must not run together, or not here.

    ``artifacts`` maps component names to artifacts (any subset of the three). ``device`` is
    ``device_info()`` of the device they will run on, or None to skip the device checks;
    ``toolchain`` is ``toolchain_versions()`` of this environment.
    """
    for key, artifact in artifacts.items():
        if key not in COMPONENTS:
            raise ArtifactError(f"unknown component {key!r}; known: {', '.join(COMPONENTS)}")
        if artifact.manifest.get("component") != key:
            raise ArtifactError(f"{artifact.path} is a {artifact.manifest.get('component')!r} artifact, given as {key!r}")
    _check_same_weights(artifacts)
    _check_shared_fields(artifacts)
    _check_links(artifacts)
    for artifact in artifacts.values():
        _check_device(artifact, device)
        _check_toolchain(artifact, toolchain)


def _field(artifact: Artifact, *keys: str) -> Any:
    value: Any = artifact.manifest
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(f"{artifact} ({artifact.path}): the manifest has no {'.'.join(keys[: i + 1])}")
        value = value[key]
    return value


def _check_same_weights(artifacts: dict[str, Artifact]) -> None:
    weights = {str(a): _field(a, "source", "weights_sha256") for a in artifacts.values()}
    if len(set(weights.values())) > 1:
        listed = ", ".join(f"{name} from {sha[:12]}" for name, sha in weights.items())
        raise ArtifactError(f"components built from different weights (source.weights_sha256): {listed}")


def _check_shared_fields(artifacts: dict[str, Artifact]) -> None:
    for name in SHARED_MODEL_FIELDS:
        values = {str(a): _field(a, "recipe", "model", name) for a in artifacts.values()}
        if len({json.dumps(v) for v in values.values()}) > 1:
            listed = ", ".join(f"{a} has {v}" for a, v in values.items())
            raise ArtifactError(f"components disagree on model.{name}: {listed}")


def _check_links(artifacts: dict[str, Artifact]) -> None:
    for upstream, downstream, names in LINKS:
        if upstream not in artifacts or downstream not in artifacts:
            continue
        up, down = artifacts[upstream], artifacts[downstream]
        for name in names:
            out_shape, in_shape = _field(up, "outputs", name, "shape"), _field(down, "inputs", name, "shape")
            if out_shape != in_shape:
                dims = [f"dim {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(out_shape, in_shape)) if a != b]
                detail = "; ".join(dims) or f"rank {len(out_shape)} vs {len(in_shape)}"
                raise ArtifactError(f"{up} outputs {name!r} of shape {out_shape} but {down} takes {name!r} of shape {in_shape} ({detail})")
            out_dtype, in_dtype = _field(up, "outputs", name, "dtype"), _field(down, "inputs", name, "dtype")
            if out_dtype != in_dtype:
                raise ArtifactError(f"{up} outputs {name!r} as {out_dtype} but {down} takes it as {in_dtype}")


def _check_device(artifact: Artifact, device: dict[str, Any] | None) -> None:
    backend = _field(artifact, "backend")
    if backend not in TOOLCHAIN_BY_BACKEND:
        raise ArtifactError(f"{artifact}: unknown backend {backend!r}; known: {', '.join(TOOLCHAIN_BY_BACKEND)}")
    if device is None or backend == "eager":  # eager weights run on any device
        return
    built_type = _field(artifact, "device", "type")
    if built_type != device["type"]:
        raise ArtifactError(f"{artifact}: a {backend} engine built for {built_type}, but this device is {device['type']}")
    if built_type == "cuda" and (built_cc := _field(artifact, "device", "compute_capability")) != device["compute_capability"]:
        raise ArtifactError(
            f"{artifact}: a {backend} engine built for compute capability {built_cc} "
            f"({artifact.manifest['device'].get('name')}), but this GPU is {device['compute_capability']} "
            f"({device.get('name')}); rebuild it here"
        )


def _check_toolchain(artifact: Artifact, toolchain: dict[str, Any]) -> None:
    for package in TOOLCHAIN_BY_BACKEND[_field(artifact, "backend")]:
        built, here = _field(artifact, "toolchain", package), toolchain.get(package)
        if built != here:
            raise ArtifactError(
                f"{artifact}: built with {package} {built}, but this environment has {here or 'none installed'}; rebuild it"
            )


# ----------------------------------------------------------------------------- environment


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
