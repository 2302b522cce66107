"""`pi-build`: build engines from a checkpoint and a recipe, stage by stage."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from pi_build import artifacts
from pi_build.cli.common import DebugOpt, EnginesOpt, RecipeOpt, SetOpt, console, handle_errors, set_debug
from pi_build.errors import ArtifactError
from pi_build.spec import Component, Precision, Stage

app = typer.Typer(help="Build fast, versioned engines for pi0 / pi0.5 policies.", no_args_is_help=True)

ComponentArg = Annotated[Optional[list[Component]], typer.Argument(help="components (default: all three)")]
FP8_HELP = "make this component FP8 (e4m3): calibrate on the data the recipe's quantize section names, then compile FP8 GEMMs"
Fp8Opt = Annotated[bool, typer.Option("--fp8", help=FP8_HELP)]
StepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="Euler steps baked into the denoise engine (overrides denoise.steps)")]


@app.callback()
def main(debug: DebugOpt = False) -> None:
    set_debug(debug)


def _recipe(recipe: Path | None, set_: list[str] | None, precision: dict[Component, Precision] | None = None,
            steps: int | None = None):
    """The recipe a command builds: the file (or the default one), --set overrides, then --fp8 / --steps."""
    from pi_build.recipe import find_recipe, load_recipe, parse_overrides

    loaded = load_recipe(find_recipe(recipe), parse_overrides(set_ or []))
    for component, value in (precision or {}).items():
        loaded = loaded.with_component(component, precision=value)
    if steps is not None:
        loaded = loaded.with_component(Component.DENOISE, steps=steps)
    return loaded


def _run(recipe, engines: Path | None, plan: list[tuple[Component, list[Stage]]], capture: bool) -> None:
    """Run (component, stages) in order with a progress display, then print the summary table."""
    from pi_build.build.reference import load_reference
    from pi_build.build.stages import build_component_stages, stage_capture

    folder = artifacts.engines_dir(engines)
    landed: list[Path] = []
    t0 = time.perf_counter()
    console.print(f"[bold]{recipe.name}[/] ({recipe.path}): loading the reference from {recipe.model.checkpoint}")
    reference = load_reference(recipe)
    with console.status("building") as status:
        for component, stages in plan:
            for stage in stages:
                status.update(f"{component}: {stage}")
                console.print(f"[cyan]{component}[/] {stage} ...")
                landed += build_component_stages(reference, recipe, component, [stage], folder, log=console.print)
        if capture:
            status.update("pipeline: capture + end-to-end check")
            console.print("[cyan]pipeline[/] capture + end-to-end check ...")
            landed.append(stage_capture(reference, recipe, folder))
    _summary([artifacts.load_artifact(p) for p in landed], f"built in {time.perf_counter() - t0:.1f} s")


def _summary(arts: list[artifacts.Artifact], title: str) -> None:
    table = Table(title=title)
    for col in ("artifact", "stage", "backend", "precision", "steps", "MB", "cosine", "rel err", "gate", "seconds"):
        table.add_column(col)
    for a in arts:
        m = a.manifest
        acc = m.get("accuracy") or {}
        size = sum(f["bytes"] for f in m.get("files", {}).values()) / 1e6
        steps = str(m.get("steps", "")) if a.component in (Component.DENOISE, artifacts.scales_kind(Component.DENOISE)) else ""
        table.add_row(
            str(a), m.get("stage", ""), str(m.get("backend") or ""), str(m.get("precision") or ""), steps,
            f"{size:.1f}", f"{acc['cosine']:.6f}" if "cosine" in acc else "", f"{acc['rel_err']:.2e}" if "rel_err" in acc else "",
            ("pass" if acc.get("passed") else "FAIL") if acc else "", f"{m.get('build_seconds', 0):.1f}",
        )
    console.print(table)


def _components(names: list[Component] | None) -> list[Component]:
    return list(names) if names else list(Component)


@app.command()
@handle_errors
def export(recipe: RecipeOpt = None, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Export ONNX per component, verified in onnxruntime."""
    _run(_recipe(recipe, set_), engines, [(c, [Stage.EXPORT]) for c in _components(components)], capture=False)


@app.command()
@handle_errors
def quantize(recipe: RecipeOpt = None, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None,
             fp8: Fp8Opt = False) -> None:
    """Calibrate FP8 scales for the components whose precision is fp8."""
    names = _components(components)
    loaded = _recipe(recipe, set_, {c: Precision.FP8 for c in names} if fp8 else None)
    _run(loaded, engines, [(c, [Stage.QUANTIZE]) for c in names], capture=False)


@app.command(name="compile")
@handle_errors
def compile_(recipe: RecipeOpt = None, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Compile engines (backend and precision from the recipe) and gate them against the reference."""
    _run(_recipe(recipe, set_), engines, [(c, [Stage.COMPILE]) for c in _components(components)], capture=False)


@app.command()
@handle_errors
def capture(recipe: RecipeOpt = None, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Load the engines the recipe asks for, capture CUDA graphs, check actions end to end, record latency."""
    _run(_recipe(recipe, set_), engines, [], capture=True)


def _shortcut(component: Component, recipe, engines: Path | None) -> None:
    _run(recipe, engines, [(component, [Stage.QUANTIZE, Stage.COMPILE])], capture=False)


@app.command()
@handle_errors
def vision(recipe: RecipeOpt = None, engines: EnginesOpt = None, set_: SetOpt = None, fp8: Fp8Opt = False) -> None:
    """Build the vision engine (quantize if fp8, compile)."""
    _shortcut(Component.VISION, _recipe(recipe, set_, {Component.VISION: Precision.FP8} if fp8 else None), engines)


@app.command()
@handle_errors
def kvcache(recipe: RecipeOpt = None, engines: EnginesOpt = None, set_: SetOpt = None, fp8: Fp8Opt = False) -> None:
    """Build the prefix / KV-cache engine (quantize if fp8, compile)."""
    _shortcut(Component.KVCACHE, _recipe(recipe, set_, {Component.KVCACHE: Precision.FP8} if fp8 else None), engines)


@app.command()
@handle_errors
def denoise(recipe: RecipeOpt = None, engines: EnginesOpt = None, set_: SetOpt = None, steps: StepsOpt = None,
            fp8: Fp8Opt = False) -> None:
    """Build the denoise engine for a fixed number of Euler steps."""
    loaded = _recipe(recipe, set_, {Component.DENOISE: Precision.FP8} if fp8 else None, steps)
    _shortcut(Component.DENOISE, loaded, engines)


@app.command(name="all")
@handle_errors
def all_(recipe: RecipeOpt = None, engines: EnginesOpt = None, set_: SetOpt = None,
         skip: Annotated[Optional[list[Stage]], typer.Option("--skip", help="a stage to skip (export, capture)")] = None) -> None:
    """Every stage for every component, then capture and the end-to-end check."""
    skipped = set(skip or [])
    stages = [s for s in (Stage.EXPORT, Stage.QUANTIZE, Stage.COMPILE) if s not in skipped]
    _run(_recipe(recipe, set_), engines, [(c, stages) for c in Component], capture=Stage.CAPTURE not in skipped)


@app.command(name="list")
@handle_errors
def list_(engines: EnginesOpt = None) -> None:
    """The artifacts under the engines folder (ids as `inspect` takes them), with steps and precision."""
    folder = artifacts.engines_dir(engines)
    problems: list[str] = []
    arts = artifacts.list_artifacts(folder, problems)
    if arts:
        _summary(arts, f"artifacts under {folder}")
    elif not problems:
        console.print(f"no artifacts under {folder}")
    for problem in problems:
        console.print(f"[yellow]refused:[/] {problem}", soft_wrap=True)


@app.command()
@handle_errors
def inspect(artifact: Annotated[str, typer.Argument(help="an id as `pi-build list` prints it (tiny/vision/v1), or a folder")],
            engines: EnginesOpt = None) -> None:
    """Verify one artifact (its manifest and file hashes) and print its manifest."""
    import json

    path = Path(artifact)
    if not path.is_dir():
        model_id, kind, version = artifacts.parse_id(artifact)
        path = artifacts.engines_dir(engines) / model_id / kind / version
        if not path.is_dir():
            raise ArtifactError(f"no artifact {artifact} under {artifacts.engines_dir(engines)}: `pi-build list` shows the ones there")
    art = artifacts.load_artifact(path)
    artifacts.verify_artifact(art)
    console.print_json(json.dumps(art.manifest))
    console.print(f"[green]{art}: manifest and file hashes ok[/]")


@app.command()
@handle_errors
def checkpoint(
    out: Annotated[Path, typer.Option("--out", help="folder to create")],
    config: Annotated[str, typer.Option("--config", help="pi0, pi05, pi0_tiny, pi05_tiny")] = "pi05_tiny",
    layout: Annotated[str, typer.Option("--layout", help="openpi or lerobot")] = "openpi",
    horizon: Annotated[Optional[int], typer.Option("--horizon", min=1)] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="stored dtype: float32 or bfloat16")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing folder")] = False,
) -> None:
    """Create a random-weight checkpoint (with a tiny tokenizer and norm stats): demo, tests, speed work."""
    import tempfile

    import torch

    from pi_build.errors import InputError
    from pi_build.model.checkpoints import make_random_checkpoint
    from pi_build.model.norm_stats import random_libero_norm_stats
    from pi_build.model.pi0 import CONFIGS
    from pi_build.model.tokenizer import train_tiny_tokenizer

    if config not in CONFIGS:
        raise typer.BadParameter(f"{config!r} is not one of {', '.join(CONFIGS)}", param_hint="--config")
    if layout not in ("openpi", "lerobot") or dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter("--layout takes openpi or lerobot; --dtype takes float32 or bfloat16")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists: pass --overwrite to replace it, or choose another --out")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(Path(tmp) / "tokenizer.model")
        path = make_random_checkpoint(config, out, seed=seed, layout=layout, horizon=horizon,
                                      dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                                      norm_stats=random_libero_norm_stats(seed), tokenizer_model=tokenizer, overwrite=overwrite)
    console.print(f"wrote {config} ({layout} layout) to {path}")


if __name__ == "__main__":
    app()
