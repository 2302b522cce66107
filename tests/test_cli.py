"""Both command-line tools answer a user's mistakes in one line, with exit code 1 (or typer's 2 for a
bad option value), and never with a traceback unless --debug asks for it."""

from pathlib import Path

import pytest
from typer.testing import CliRunner

from pi_build.cli.build import app as build_app
from pi_build.cli.run import app as run_app
from pi_build.errors import RecipeError

runner = CliRunner()


def error_lines(result) -> list[str]:
    return [line for line in result.output.splitlines() if line.startswith("error:")]


def check_user_error(result, code: int, *needles: str) -> None:
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and result.exception is None or isinstance(result.exception, SystemExit)
    text = " ".join(result.output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())  # typer's error box, unwrapped
    for needle in needles:
        assert needle in text, result.output


@pytest.fixture
def bare_folder(tmp_path, monkeypatch):
    """A working folder with no pi-build.toml and no PI_BUILD_RECIPE."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("PI_BUILD_RECIPE", raising=False)
    return tmp_path


@pytest.mark.parametrize("app", [build_app, run_app], ids=["pi-build", "pi-run"])
def test_missing_and_misspelled_recipes(app, bare_folder):
    command = ["vision"] if app is build_app else ["bench"]
    result = runner.invoke(app, [*command, "--recipe", "recipes/nope.toml"])
    check_user_error(result, 1, "recipe file recipes/nope.toml does not exist")
    assert len(error_lines(result)) == 1
    result = runner.invoke(app, command)
    check_user_error(result, 1, "no recipe given: pass --recipe FILE, set PI_BUILD_RECIPE, or name one in ./pi-build.toml")
    bad = bare_folder / "bad.toml"
    bad.write_text('name = "x"\n[model]\ncheckpoint = "c"\ncameras = ["base_0_rgb"]\nprompt_len = 8\nhorizon = 4\n[denoise]\nstepz = 3\n')
    result = runner.invoke(app, [*command, "--recipe", str(bad)])
    check_user_error(result, 1, "denoise.stepz: unknown field; did you mean 'denoise.steps'?")


def test_debug_shows_the_traceback(bare_folder):
    result = runner.invoke(run_app, ["--debug", "bench", "--recipe", "recipes/nope.toml"])
    assert isinstance(result.exception, RecipeError)


def test_default_recipe_from_the_folder_and_the_environment(bare_folder, monkeypatch):
    (bare_folder / "pi-build.toml").write_text('recipe = "recipes/mine.toml"\n')
    check_user_error(runner.invoke(run_app, ["bench"]), 1, "recipe file recipes/mine.toml does not exist")
    monkeypatch.setenv("PI_BUILD_RECIPE", "elsewhere.toml")  # the variable beats the file
    check_user_error(runner.invoke(run_app, ["bench"]), 1, "recipe file elsewhere.toml does not exist")
    (bare_folder / "pi-build.toml").write_text("something = 1\n")
    monkeypatch.delenv("PI_BUILD_RECIPE")
    check_user_error(runner.invoke(run_app, ["bench"]), 1, 'names no recipe: add a line recipe = "recipes/<name>.toml"')


@pytest.mark.parametrize(("args", "needle"), [
    (["bench", "--iters", "0"], "Invalid value for '--iters'"),
    (["bench", "--steps", "abc"], "'abc' is not a comma-separated list of whole numbers"),
    (["bench", "--steps", "0"], "every value must be >= 1"),
    (["bench", "--batch", "4,x"], "not a comma-separated list"),
    (["serve", "--port", "-1"], "Invalid value for '--port'"),
    (["serve", "--steps", "0"], "Invalid value for '--steps'"),
    (["libero", "--steps", "0"], "Invalid value for '--steps'"),
    (["libero", "--trials", "0"], "Invalid value for '--trials'"),
])
def test_bad_numbers_are_refused_before_any_work(args, needle, bare_folder):
    result = runner.invoke(run_app, args)
    check_user_error(result, 2, needle)


def test_libero_suite_and_task_ids(bare_folder, workspace):
    pytest.importorskip("libero", reason="LIBERO is not installed")
    engines = ["--recipe", str(workspace["recipe"]), "--engines", str(workspace["engines"])]
    check_user_error(runner.invoke(run_app, ["libero", *engines, "--suite", "libero_bogus"]), 1, "libero_bogus")
    result = runner.invoke(run_app, ["libero", *engines, "--tasks", "99"])
    check_user_error(result, 1, "99")
    assert len(error_lines(result)) == 1


def test_pi_build_inspect_and_checkpoint_errors(bare_folder):
    check_user_error(runner.invoke(build_app, ["inspect", "tiny/vision"]), 1, "not an artifact id like tiny/vision/v1")
    (bare_folder / "taken").mkdir()
    check_user_error(runner.invoke(build_app, ["checkpoint", "--out", "taken"]), 1, "taken exists: pass --overwrite")
    check_user_error(runner.invoke(build_app, ["checkpoint", "--out", "x", "--config", "pi9"]), 2, "'pi9' is not one of")


def test_fp8_and_steps_have_help():
    for command in ("vision", "kvcache", "denoise"):
        text = " ".join(runner.invoke(build_app, [command, "--help"]).output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
        assert "--fp8" in text and "calibrate on the data the recipe's quantize section names" in text
    text = " ".join(runner.invoke(build_app, ["denoise", "--help"]).output.translate(str.maketrans("", "", "│╭╮╰╯─")).split())
    assert "Euler steps baked into the denoise engine" in text
    assert Path(__file__).resolve().parents[1].joinpath("pi-build.toml").read_text().count("recipes/tiny.toml") == 1
