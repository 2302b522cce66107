"""The artifact store: where builds land, read back and verified.

Every build of one component is a folder of its own, never modified after it appears:

    engines/<model-id>/<kind>/<version>/      model-id: the recipe's name; kind: vision | kvcache |
                                              denoise, or another stage output (OUTPUTS: vision-onnx,
                                              kvcache-fp8-scales, pipeline, ...)
        <engine files>                        e.g. engine.pt2 (AOTInductor), or program.pt2 + inductor_cache.bin,
                                              engine.plan + engine.io.json (TensorRT), tokenizer.model, norm_stats.json
        manifest.json                         written last; a folder without one is not an artifact

Versions are v1, v2, ... (one more than the highest present). A build is assembled in a hidden
``.tmp-*`` folder beside the versions and renamed into place in one step, so a crash or an
exception leaves either a complete artifact or nothing that ``list_artifacts`` or ``newest``
would pick up. The manifest's keys are listed in ``manifest.Manifest``; it carries the sha256
of every file and of itself, so an edited file or manifest is refused.
"""

from __future__ import annotations

import copy
import errno
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pi_build.artifacts.manifest import FORMAT_VERSION, Manifest, manifest_hash
from pi_build.errors import ArtifactError
from pi_build.io import copy_and_hash, fsync_dir, sha256_file, write_json
from pi_build.spec import COMPONENTS

# Stage outputs that are not engines land beside them: ONNX exports, FP8 scales, the captured pipeline.
PIPELINE = "pipeline"


def onnx_kind(component: str) -> str:
    return f"{component}-onnx"


def scales_kind(component: str) -> str:
    return f"{component}-fp8-scales"


OUTPUTS = tuple(COMPONENTS) + tuple(k(c) for c in COMPONENTS for k in (onnx_kind, scales_kind)) + (PIPELINE,)
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
ENGINES_ENV = "PI_BUILD_ENGINES"
_VERSION = re.compile(r"v(\d+)")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*")  # model ids and file names: one plain path component


@dataclass(frozen=True)
class Artifact:
    path: Path
    manifest: Manifest

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
    fsync_dir(parent)
    return final


def _rename_to_next_version(tmp: Path, parent: Path, manifest: dict[str, Any]) -> Path:
    """Write the manifest for the next free version and rename ``tmp`` to it; if another writer
    takes that version first (the rename finds a non-empty folder), try the one after."""
    for _ in range(1000):
        manifest["version"] = f"v{_highest_version(parent) + 1}"
        manifest["manifest_sha256"] = manifest_hash(manifest)
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


# The two writers of the folder being assembled (names tests replace to simulate failures).
_copy_and_hash = copy_and_hash


_write_json = write_json


# ----------------------------------------------------------------------------- reading


def load_artifact(path: str | Path) -> Artifact:
    """Read an artifact's manifest and check the manifest itself (its format and its own sha256);
    the files are hashed by ``verify_artifact``."""
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
    version = manifest["format_version"]
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ArtifactError(f"{manifest_path}: format_version {version!r} is not one this pi-build reads "
                            f"(<= {FORMAT_VERSION}); update pi-build or rebuild")
    if version < FORMAT_VERSION:
        raise ArtifactError(f"{path} was built by an older pi-build (format_version {version}; this one reads "
                            f"{FORMAT_VERSION}): rebuild it with `pi-build {manifest['component'].split('-')[0]} --recipe <recipe>`")
    if manifest.get("manifest_sha256") != manifest_hash(manifest):
        raise ArtifactError(f"{manifest_path} was edited after the build (its manifest_sha256 does not match its "
                            "content): restore it or rebuild the artifact")
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
        elif (digest := sha256_file(path)) != entry["sha256"]:
            problems.append(f"{name}: sha256 {digest[:16]}... differs from the manifest's {entry['sha256'][:16]}... (modified)")
    if problems:
        raise ArtifactError(f"artifact {artifact.path} is damaged:\n  " + "\n  ".join(problems))


def latest_artifact(engines: Path, model_id: str, component: str) -> Path | None:
    """The highest complete version folder of one component, or None."""
    versions = _complete_versions(Path(engines) / model_id / component)
    return max(versions)[1] if versions else None


def artifacts_of(engines: Path, model_id: str, kind: str, problems: list[str] | None = None) -> list[Artifact]:
    """Every readable artifact of one kind, newest first; unreadable ones are skipped, their reason
    appended to ``problems`` when given."""
    found = []
    for _, path in sorted(_complete_versions(Path(engines) / model_id / kind), reverse=True):
        try:
            found.append(load_artifact(path))
        except ArtifactError as e:
            if problems is not None:
                problems.append(str(e))
    return found


def newest(engines: Path, model_id: str, kind: str, accept: Callable[[Artifact], bool] = lambda a: True) -> Artifact | None:
    """The newest readable artifact of one kind that ``accept`` takes, or None."""
    return next((a for a in artifacts_of(engines, model_id, kind) if accept(a)), None)


def list_artifacts(engines: Path, problems: list[str] | None = None) -> list[Artifact]:
    """Every readable artifact under ``engines``, by model id, kind and version number; the
    reasons for unreadable ones are appended to ``problems`` when given."""
    found = []
    for model_dir in sorted(_visible_dirs(Path(engines))):
        for kind_dir in sorted(_visible_dirs(model_dir)):
            found += reversed(artifacts_of(engines, model_dir.name, kind_dir.name, problems))
    return found


def parse_id(text: str) -> tuple[str, str, str]:
    """"model/kind/vN" (as ``pi-build list`` prints it) -> its three parts, or an ArtifactError."""
    parts = text.strip("/").split("/")
    if len(parts) != 3 or not _VERSION.fullmatch(parts[2]):
        raise ArtifactError(f"{text!r} is not an artifact id like tiny/vision/v1 (what `pi-build list` prints) nor a folder")
    return parts[0], parts[1], parts[2]


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
