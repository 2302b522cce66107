"""The artifact store (``store``), what a manifest holds (``manifest``), and which engines fit
together, here, and a recipe (``fit``). The names below are the store's public interface."""

from pi_build.artifacts.fit import LINKS, check_compatible, mismatches, select_engines
from pi_build.artifacts.manifest import FORMAT_VERSION, Manifest, device_info, toolchain_versions
from pi_build.artifacts.store import (
    MANIFEST,
    OUTPUTS,
    PIPELINE,
    Artifact,
    artifacts_of,
    engines_dir,
    latest_artifact,
    list_artifacts,
    load_artifact,
    newest,
    onnx_kind,
    parse_id,
    scales_kind,
    verify_artifact,
    write_artifact,
)
from pi_build.errors import ArtifactError

__all__ = [
    "FORMAT_VERSION", "LINKS", "MANIFEST", "OUTPUTS", "PIPELINE", "Artifact", "ArtifactError", "Manifest",
    "artifacts_of", "check_compatible", "device_info", "engines_dir", "latest_artifact", "list_artifacts",
    "load_artifact", "mismatches", "newest", "onnx_kind", "parse_id", "scales_kind", "select_engines",
    "toolchain_versions", "verify_artifact", "write_artifact",
]
