"""`pi-build`: build engines from a checkpoint and a recipe, stage by stage."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from pi_build import artifacts
from pi_build.engine.components import COMPONENTS

app = typer.Typer(help="Build fast, versioned engines for pi0 / pi0.5 policies.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 150)

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="recipe TOML (recipes/*.toml)")]
EnginesOpt = Annotated[Optional[Path], typer.Option("--engines", help="engines folder [env PI_BUILD_ENGINES, default engines/]")]
SetOpt = Annotated[Optional[list[str]], typer.Option("--set", help="override a recipe field: --set denoise.steps=3")]
ComponentArg = Annotated[Optional[list[str]], typer.Argument(help="components (default: all three)")]


def _context(recipe_path: Path, engines: Path | None, overrides: dict):
    from pi_build.build.stages import open_context
    from pi_build.recipe import load_recipe

    recipe = load_recipe(recipe_path, overrides)
    folder = artifacts.engines_dir(engines)
    console.print(f"[bold]{recipe.name}[/]: loading reference from {recipe.model.checkpoint}")
    return open_context(recipe, folder, log=console.print)


def _overrides(items: list[str] | None, **flags) -> dict:
    from pi_build.recipe import parse_overrides

    out = parse_overrides(items or [])
    out.update({k: v for k, v in flags.items() if v is not None})
    return out


def _components(names: list[str] | None) -> list[str]:
    names = names or list(COMPONENTS)
    for n in names:
        if n not in COMPONENTS:
            raise typer.BadParameter(f"unknown component {n!r}; use {', '.join(COMPONENTS)}")
    return names


def _run(recipe: Path, engines: Path | None, overrides: dict, plan: list[tuple[str, list[str]]], capture: bool) -> None:
    """Run (component, stages) in order with a progress display, then print the summary table."""
    from pi_build.build.stages import run_stages, stage_capture

    landed: list[Path] = []
    t0 = time.perf_counter()
    try:
        ctx = _context(recipe, engines, overrides)
        with console.status("building") as status:
            for component, stages in plan:
                for stage in stages:
                    status.update(f"{component}: {stage}")
                    console.print(f"[cyan]{component}[/] {stage} ...")
                    landed += run_stages(ctx, component, [stage])
            if capture:
                status.update("pipeline: capture + end-to-end check")
                console.print("[cyan]pipeline[/] capture + end-to-end check ...")
                landed.append(stage_capture(ctx))
    except _expected_errors() as exc:
        console.print(f"[red]build failed:[/] {exc}")
        raise typer.Exit(1) from exc
    _summary([artifacts.load_artifact(p) for p in landed], f"built in {time.perf_counter() - t0:.1f} s")


def _expected_errors() -> tuple[type[Exception], ...]:
    """Errors whose message says what is wrong (bad recipe, checkpoint, artifact, missing backend,
    failed gate): printed as one line instead of a traceback."""
    from pi_build.build.stages import BuildError
    from pi_build.model.checkpoints import CheckpointError
    from pi_build.backends.onnx import OnnxExportError, OnnxMismatchError
    from pi_build.recipe import RecipeError
    from pi_build.backends.tensorrt import BackendUnavailable

    return (BuildError, CheckpointError, RecipeError, artifacts.ArtifactError, BackendUnavailable,
            OnnxExportError, OnnxMismatchError, FileNotFoundError)


def _summary(arts: list[artifacts.Artifact], title: str) -> None:
    table = Table(title=title)
    for col in ("artifact", "stage", "backend", "precision", "MB", "cosine", "rel err", "gate", "seconds"):
        table.add_column(col)
    for a in arts:
        m = a.manifest
        acc = m.get("accuracy") or {}
        size = sum(f["bytes"] for f in m.get("files", {}).values()) / 1e6
        table.add_row(
            str(a.path.relative_to(a.path.parents[2])), m.get("stage", ""), str(m.get("backend") or ""), str(m.get("precision") or ""),
            f"{size:.1f}", f"{acc['cosine']:.6f}" if "cosine" in acc else "", f"{acc['rel_err']:.2e}" if "rel_err" in acc else "",
            ("pass" if acc.get("passed") else "FAIL") if acc else "", f"{m.get('build_seconds', 0):.1f}",
        )
    console.print(table)


@app.command()
def export(recipe: RecipeOpt, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Export ONNX per component, verified in onnxruntime."""
    _run(recipe, engines, _overrides(set_), [(c, ["export"]) for c in _components(components)], capture=False)


@app.command()
def quantize(recipe: RecipeOpt, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None,
             fp8: Annotated[bool, typer.Option("--fp8", help="make the components FP8 (e4m3) first")] = False) -> None:
    """Calibrate FP8 scales for the components whose precision is fp8."""
    names = _components(components)
    overrides = _overrides(set_, **({f"{c}.precision": "fp8" for c in names} if fp8 else {}))
    _run(recipe, engines, overrides, [(c, ["quantize"]) for c in names], capture=False)


@app.command(name="compile")
def compile_(recipe: RecipeOpt, components: ComponentArg = None, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Compile engines (backend and precision from the recipe) and gate them against the reference."""
    _run(recipe, engines, _overrides(set_), [(c, ["compile"]) for c in _components(components)], capture=False)


@app.command()
def capture(recipe: RecipeOpt, engines: EnginesOpt = None, set_: SetOpt = None) -> None:
    """Assemble the newest engines, capture CUDA graphs, check actions end to end, record latency."""
    _run(recipe, engines, _overrides(set_), [], capture=True)


def _shortcut(component: str, recipe: Path, engines: Path | None, overrides: dict) -> None:
    _run(recipe, engines, overrides, [(component, ["quantize", "compile"])], capture=False)


@app.command()
def vision(recipe: RecipeOpt, engines: EnginesOpt = None, set_: SetOpt = None,
           fp8: Annotated[bool, typer.Option("--fp8")] = False) -> None:
    """Build the vision engine (quantize if fp8, compile)."""
    _shortcut("vision", recipe, engines, _overrides(set_, **({"vision.precision": "fp8"} if fp8 else {})))


@app.command()
def kvcache(recipe: RecipeOpt, engines: EnginesOpt = None, set_: SetOpt = None,
            fp8: Annotated[bool, typer.Option("--fp8")] = False) -> None:
    """Build the prefix / KV-cache engine (quantize if fp8, compile)."""
    _shortcut("kvcache", recipe, engines, _overrides(set_, **({"kvcache.precision": "fp8"} if fp8 else {})))


@app.command()
def denoise(recipe: RecipeOpt, engines: EnginesOpt = None, set_: SetOpt = None,
            steps: Annotated[Optional[int], typer.Option("--steps")] = None,
            fp8: Annotated[bool, typer.Option("--fp8")] = False) -> None:
    """Build the denoise engine for a fixed number of Euler steps."""
    flags = {"denoise.steps": steps, **({"denoise.precision": "fp8"} if fp8 else {})}
    _shortcut("denoise", recipe, engines, _overrides(set_, **flags))


@app.command(name="all")
def all_(recipe: RecipeOpt, engines: EnginesOpt = None, set_: SetOpt = None,
         skip: Annotated[Optional[list[str]], typer.Option("--skip", help="stage to skip (export, capture)")] = None) -> None:
    """Every stage for every component, then capture and the end-to-end check."""
    skip = set(skip or [])
    stages = [s for s in ("export", "quantize", "compile") if s not in skip]
    _run(recipe, engines, _overrides(set_), [(c, stages) for c in COMPONENTS], capture="capture" not in skip)


@app.command(name="list")
def list_(engines: EnginesOpt = None) -> None:
    """The artifacts under the engines folder."""
    folder = artifacts.engines_dir(engines)
    arts = artifacts.list_artifacts(folder)
    if not arts:
        console.print(f"no artifacts under {folder}")
        return
    _summary(arts, f"artifacts under {folder}")


@app.command()
def inspect(path: Path) -> None:
    """Verify one artifact (file hashes) and print its manifest."""
    try:
        art = artifacts.load_artifact(path)
        artifacts.verify_artifact(art)
    except artifacts.ArtifactError as exc:
        console.print(f"[red]refused:[/] {exc}")
        raise typer.Exit(1) from exc
    console.print_json(json.dumps(art.manifest))
    console.print("[green]hashes ok[/]")


@app.command()
def checkpoint(
    out: Annotated[Path, typer.Option("--out", help="folder to create")],
    config: Annotated[str, typer.Option("--config", help="pi0, pi05, pi0_tiny, pi05_tiny")] = "pi05_tiny",
    layout: Annotated[str, typer.Option("--layout", help="openpi or lerobot")] = "openpi",
    horizon: Annotated[Optional[int], typer.Option("--horizon")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 0,
    dtype: Annotated[str, typer.Option("--dtype", help="stored dtype: float32 or bfloat16")] = "float32",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing folder")] = False,
) -> None:
    """Create a random-weight checkpoint (with a tiny tokenizer and norm stats): demo, tests, speed work."""
    import tempfile

    import torch

    from pi_build.model.checkpoints import make_random_checkpoint
    from pi_build.transforms.libero import random_libero_norm_stats
    from pi_build.model.tokenizer import train_tiny_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = train_tiny_tokenizer(Path(tmp) / "tokenizer.model")
        path = make_random_checkpoint(config, out, seed=seed, layout=layout, horizon=horizon,
                                      dtype=torch.bfloat16 if dtype == "bfloat16" else torch.float32,
                                      norm_stats=random_libero_norm_stats(seed), tokenizer_model=tokenizer, overwrite=overwrite)
    console.print(f"wrote {config} ({layout} layout) to {path}")


if __name__ == "__main__":
    app()
