"""Shared fixtures: a tiny checkpoint and its engines, built once per test session through the CLI."""


import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pi_build.cli.build import app as build_app

runner = CliRunner()


def invoke(app, args):
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


RECIPE = """
name = "t"
[model]
checkpoint = "{checkpoint}"
config = "pi05_tiny"
cameras = ["base_0_rgb", "left_wrist_0_rgb"]
masked_cameras = ["right_wrist_0_rgb"]
prompt_len = 200
horizon = 10
device = "cpu"
[vision]
backend = "inductor"
precision = "fp32"
[kvcache]
backend = "eager"
precision = "fp8"
[denoise]
backend = "eager"
precision = "fp32"
steps = 2
[quantize]
calibration = "recorded"
samples = 4
"""



@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    ckpt = root / "ckpt"
    assert invoke(build_app, ["checkpoint", "--config", "pi05_tiny", "--horizon", "10", "--out", ckpt]).exit_code == 0
    other = root / "other_ckpt"  # same architecture, other weights
    assert invoke(build_app, ["checkpoint", "--config", "pi05_tiny", "--horizon", "10", "--seed", "1", "--out", other]).exit_code == 0
    recipe = root / "t.toml"
    recipe.write_text(RECIPE.format(checkpoint=ckpt))
    engines = root / "engines"
    result = invoke(build_app, ["all", "--recipe", recipe, "--engines", engines, "--skip", "export"])
    assert result.exit_code == 0, result.output
    return {"root": root, "ckpt": ckpt, "other": other, "recipe": recipe, "engines": engines, "build_output": result.output}




def eager_recipe(checkpoint, name: str, model_lines: str = "") -> str:
    """RECIPE under another model id with every engine fp32 and eager (they build in seconds), plus
    more [model] lines (batch sizes, prompt buckets...)."""
    text = RECIPE.format(checkpoint=checkpoint).replace('name = "t"', f'name = "{name}"')
    text = text.replace('backend = "inductor"', 'backend = "eager"').replace('precision = "fp8"', 'precision = "fp32"')
    return text.replace('device = "cpu"', f'device = "cpu"\n{model_lines}')


def built_engines(workspace, name: str, model_lines: str = "", capture: bool = True):
    """(recipe path, engines folder) of eager_recipe's engines, built once per test session."""
    recipe = workspace["root"] / f"{name}.toml"
    recipe.write_text(eager_recipe(workspace["ckpt"], name, model_lines))
    engines = workspace["root"] / f"engines_{name}"
    if not (engines / name).exists():
        result = invoke(build_app, ["all", "--recipe", recipe, "--engines", engines, "--skip", "export",
                                    *([] if capture else ["--skip", "capture"])])
        assert result.exit_code == 0, result.output
    return recipe, engines


@pytest.fixture(scope="session")
def openpi_client_python() -> Path:
    """Python of a venv with openpi-client==0.1.2 (pinned numpy<2), created once and then reused."""
    cache = Path(os.environ.get("PI_BUILD_CACHE", Path(__file__).resolve().parents[1] / ".cache"))
    venv = cache / "openpi-client-venv"
    python = venv / "bin" / "python"
    if python.exists():
        return python
    cache.mkdir(parents=True, exist_ok=True)
    # Built beside its final place and renamed at the end, so a half-made venv is never reused.
    # (Only the bin/ scripts of a venv hold absolute paths; bin/python works after the rename.)
    staging = Path(tempfile.mkdtemp(prefix="openpi-client-venv.", dir=cache))
    try:
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, timeout=120)
        install = subprocess.run(
            [str(staging / "bin" / "python"), "-m", "pip", "install", "--quiet", "--retries", "1", "--timeout", "30",
             "openpi-client==0.1.2", "typing_extensions"],
            capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        if install.returncode != 0:
            reason = f"cannot install openpi-client==0.1.2 (no PyPI?): {install.stderr.strip()[-500:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)  # CI has PyPI: there this is a real failure
            pytest.skip(reason)
        with contextlib.suppress(OSError):  # another test run may have finished first
            staging.rename(venv)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return python
