"""Shared fixtures: a tiny checkpoint and its engines, built once per test session through the CLI."""


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


