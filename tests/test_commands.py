"""The four commands pi-build is known for, typed as a user types them after the README's set-up:
the installed console scripts, in a subprocess, in a folder whose pi-build.toml names the recipe."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's console scripts: pi-build, pi-run


def typed(command: str, folder: Path, timeout: int = 1800) -> str:
    """Run ``command`` as typed in ``folder`` (no --recipe anywhere); returns its output, failing on a non-zero exit."""
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "COLUMNS": "200"}
    env.pop("PI_BUILD_RECIPE", None)
    env.pop("PI_BUILD_ENGINES", None)
    proc = subprocess.run(command.split(), cwd=folder, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


@pytest.mark.slow
def test_the_design_commands_run_as_typed(tmp_path):
    pytest.importorskip("libero", reason="LIBERO is not installed: run `bash scripts/install_libero.sh`")
    folder = tmp_path / "project"
    shutil.copytree(REPO / "recipes", folder / "recipes")
    shutil.copy(REPO / "pi-build.toml", folder / "pi-build.toml")
    typed("pi-build checkpoint --config pi05_tiny --horizon 10 --out checkpoints/tiny", folder)  # what `make demo` makes

    assert "tiny/vision/v1" in typed("pi-build vision", folder)
    out = typed("pi-build kvcache --fp8", folder)
    assert "tiny/kvcache-fp8-scales/v1" in out and "tiny/kvcache/v1" in out and "fp8" in out
    out = typed("pi-build denoise --steps 3", folder)
    assert "tiny/denoise/v1" in out
    manifest = json.loads((folder / "engines/tiny/denoise/v1/manifest.json").read_text())
    assert manifest["steps"] == 3 and manifest["precision"] == "fp32"

    out = typed("pi-run libero --quick", folder)
    assert "vision v1 (fp32, inductor); kvcache v1 (fp8, inductor); denoise v1 (fp32, inductor, 3 steps)" in out
    written = out.split("results: ")[-1].split()[0]
    results = json.loads((folder / written).read_text())
    assert written == "libero-results/libero_spatial.json" and results["episodes"] == 9  # 3 tasks x 3 trials
    assert [t["task_id"] for t in results["tasks"]] == [0, 1, 2]
    episodes = (folder / "libero-results/libero_spatial.episodes.jsonl").read_text().splitlines()
    assert len(episodes) == 9 and all(json.loads(line)["engines"] for line in episodes)
