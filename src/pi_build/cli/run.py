"""`pi-run`: run a policy: predict once, benchmark, evaluate in LIBERO, or serve it."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer
from rich.table import Table

from pi_build.cli.common import DebugOpt, EnginesOpt, RecipeOpt, SetOpt, console, handle_errors, parse_int_list, set_debug
from pi_build.errors import InputError

app = typer.Typer(help="Run pi0 / pi0.5 policies from checkpoints or built engines.", no_args_is_help=True)


@app.callback()
def main(debug: DebugOpt = False) -> None:
    set_debug(debug)


@app.command()
@handle_errors
def predict(
    checkpoint: Annotated[Path, typer.Option("--checkpoint", help="openpi or lerobot checkpoint folder")],
    inputs: Annotated[Path, typer.Option("--inputs", help=".npz: raw observation or model-level inputs")],
    steps: Annotated[int, typer.Option("--steps", min=1)] = 10,
    dtype: Annotated[str, typer.Option("--dtype", help="float32 or bfloat16")] = "float32",
    out: Annotated[Optional[Path], typer.Option("--out", help="write the actions here (.npy)")] = None,
    device: Annotated[str, typer.Option("--device")] = "cpu",
    seed: Annotated[int, typer.Option("--seed", help="noise seed when the inputs carry no noise")] = 0,
) -> None:
    """Sample one action chunk with the reference model.

    Model-level inputs (images, image_masks, tokens, token_masks[, state][, noise]) give the raw
    chunk [B, H, 32] in normalized space; a raw observation (observation/image,
    observation/wrist_image, observation/state, prompt) goes through the LIBERO observation
    pipeline and gives unnormalized actions [1, H, 7].
    """
    from pi_build.io import atomic_path
    from pi_build.runtime.predict import predict_actions

    if dtype not in ("float32", "bfloat16"):
        raise typer.BadParameter(f"--dtype must be float32 or bfloat16, got {dtype!r}")
    actions, info = predict_actions(checkpoint, inputs, steps=steps, dtype=dtype, device=device, seed=seed)
    if out is not None:
        with atomic_path(out) as tmp, open(tmp, "wb") as f:
            np.save(f, actions)
    np.set_printoptions(precision=4, suppress=True, linewidth=120)
    console.print(f"{info.config.name} ({info.layout} layout), {steps} steps, actions {list(actions.shape)}")
    print(actions[0][: min(5, actions.shape[1])])


# ----------------------------------------------------------------------------- engines for a recipe


def _recipe(recipe: Path | None, model_id: str | None, engines: Path, steps: int | None, device: str,
            set_: list[str] | None = None):
    """The recipe whose engines a command runs: --model-id takes the one recorded in that model's
    newest engines (deployment without the recipe file), else the recipe file (or the default one).
    --set, --steps and --device override the recipe's."""
    from pi_build.recipe import find_recipe, load_recipe, parse_overrides
    from pi_build.runtime.pipeline import recipe_of_model
    from pi_build.spec import Component

    loaded = recipe_of_model(engines, model_id) if model_id is not None else load_recipe(find_recipe(recipe))
    if set_:
        loaded = loaded.with_overrides(parse_overrides(set_))
    if device != "auto":
        loaded = loaded.with_overrides({"model.device": device})
    return loaded.with_component(Component.DENOISE, steps=steps) if steps is not None else loaded


def _pipelines(recipe, engines: Path):
    """The recipe's engines, one pipeline per shape it names; start-up prints what was chosen."""
    from pi_build.runtime.pipeline import cpu_threads_for_serving, load_pipelines

    pipelines = load_pipelines(engines, recipe)
    if pipelines[0].device.type == "cpu":
        cpu_threads_for_serving()
    for pipeline in pipelines:
        console.print(f"{recipe.name} on {pipeline.device}, batch {pipeline.batch}: {pipeline.describe()}", soft_wrap=True)
    return pipelines


ModelIdOpt = Annotated[Optional[str], typer.Option("--model-id", help="run the recipe recorded in this model's newest engines (no recipe file needed)")]
RunStepsOpt = Annotated[Optional[int], typer.Option("--steps", min=1, help="denoising steps (picks the denoise engine built for them)")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cuda or cpu (default: the recipe's)")]


# ----------------------------------------------------------------------------- bench


@app.command()
@handle_errors
def bench(
    recipe: RecipeOpt = None,
    engines: EnginesOpt = None,
    set_: SetOpt = None,
    steps: Annotated[Optional[str], typer.Option("--steps", help="comma-separated step counts (default: every step count built)")] = None,
    batch: Annotated[Optional[str], typer.Option("--batch", help="comma-separated batch sizes: adds throughput (default: the recipe's)")] = None,
    prompt_len: Annotated[Optional[int], typer.Option("--prompt-len", min=1, help="prompt tokens to time (default: a LIBERO instruction's)")] = None,
    iters: Annotated[int, typer.Option("--iters", min=1)] = 50,
    warmup: Annotated[int, typer.Option("--warmup", min=0)] = 10,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="write all figures as JSON")] = None,
    png: Annotated[Optional[Path], typer.Option("--png", help="write a stacked-bar chart")] = None,
    graphs: Annotated[bool, typer.Option("--graphs/--no-graphs", help="capture CUDA graphs (GPU)")] = True,
    reference: Annotated[bool, typer.Option("--reference/--no-reference", help="time the eager reference too (needs the checkpoint)")] = True,
) -> None:
    """Per-component latency of the engines at each step count, next to the eager reference and the roofline."""
    from pi_build import artifacts
    from pi_build.io import write_json
    from pi_build.runtime import bench as bench_mod

    step_counts = parse_int_list(steps, "--steps")
    batch_sizes = parse_int_list(batch, "--batch")
    loaded = _recipe(recipe, None, artifacts.engines_dir(engines), None, "auto", set_)
    results = bench_mod.run_bench(loaded, artifacts.engines_dir(engines), step_counts, iters=iters, warmup=warmup,
                                  graphs=graphs, reference=reference, batch_sizes=batch_sizes, prompt_tokens=prompt_len,
                                  log=console.print)
    bench_mod.print_tables(results, console)
    if json_out:
        console.print(f"figures: {write_json(json_out, results)}")
    if png:
        bench_mod.plot(results, png)
        console.print(f"chart: {png}")


# ----------------------------------------------------------------------------- libero and serve


@app.command()
@handle_errors
def libero(
    recipe: RecipeOpt = None,
    engines: EnginesOpt = None,
    set_: SetOpt = None,
    model_id: ModelIdOpt = None,
    suite: Annotated[str, typer.Option("--suite", help="libero_spatial, libero_object, libero_goal, libero_10 or libero_90")] = "libero_spatial",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated task ids (default: all)")] = None,
    trials: Annotated[int, typer.Option("--trials", min=1)] = 50,
    quick: Annotated[bool, typer.Option("--quick", help="3 tasks x 3 trials")] = False,
    steps: RunStepsOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="cap on episode length (smoke runs)")] = None,
    video: Annotated[Optional[Path], typer.Option("--video", help="write an MP4 per episode here")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="results JSON (default: runs/libero/<suite>-<time>.json)")] = None,
    assets: Annotated[Optional[Path], typer.Option("--assets", help="LIBERO assets folder (default: $PI_BUILD_LIBERO_ASSETS, else ../shared/libero/assets)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    device: DeviceOpt = "auto",
) -> None:
    """Closed-loop evaluation in the LIBERO simulator, with openpi's protocol."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from pi_build import artifacts
    from pi_build.envs import libero as env
    from pi_build.io import write_json
    from pi_build.runtime.policy import load_policy
    from pi_build.runtime.timing import latency_stats

    if suite not in env.SUITES:
        raise typer.BadParameter(f"{suite!r} is not a LIBERO suite; use one of {', '.join(env.SUITES)}", param_hint="--suite")
    task_ids = parse_int_list(tasks, "--tasks", minimum=0)
    if quick:
        task_ids, trials = (task_ids or [0, 1, 2])[:3], 3
    try:
        env.setup_libero(assets)
    except (ModuleNotFoundError, FileNotFoundError, RuntimeError) as e:
        raise InputError(str(e)) from None
    n_available = len(env.list_tasks(suite))
    if task_ids is not None and (bad := [t for t in task_ids if not 0 <= t < n_available]):
        raise typer.BadParameter(f"task {bad[0]} is out of range: {suite} has tasks 0-{n_available - 1}", param_hint="--tasks")
    folder = artifacts.engines_dir(engines)
    policy = load_policy(_pipelines(_recipe(recipe, model_id, folder, steps, device, set_), folder))
    out = out or Path("runs") / "libero" / f"{suite}-{datetime.now().strftime('%Y%m%d-%H%M%S')}.json"
    timings: list[dict] = []

    def timed_policy(obs: dict):
        reply = policy(obs)
        timings.append(reply["policy_timing"])
        return reply["actions"]

    n_tasks = len(task_ids) if task_ids is not None else n_available
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console) as bar:
        job = bar.add_task(f"{suite} episodes", total=n_tasks * trials)
        result = env.evaluate(suite, task_ids, trials, timed_policy, max_steps=max_steps, seed=seed, video_dir=video,
                              progress=lambda task, trial, r: bar.advance(job))
    table = Table(title=f"{suite}: success")
    for col in ("task", "description", "success", "episodes"):
        table.add_column(col)
    for task in result.tasks:
        table.add_row(str(task.task_id), task.description, f"{task.success_rate:.0%}", str(len(task.episodes)))
    table.add_row("all", "", f"{result.success_rate:.0%}", str(sum(len(t.episodes) for t in result.tasks)))
    console.print(table)
    latency = {k: latency_stats([t[k] for t in timings]) for k in timings[0]} if timings else {}
    lat = Table(title=f"policy latency during the run (ms, {policy.pipeline.device})")
    for col in ("stage", "mean", "std", "p50", "p95", "n"):
        lat.add_column(col, justify="right")
    for k, s in latency.items():
        lat.add_row(k, f"{s['mean']:.2f}", f"{s['std']:.2f}", f"{s['p50']:.2f}", f"{s['p95']:.2f}", str(s["count"]))
    console.print(lat)
    console.print(f"results: {write_json(out, {**result.to_dict(), 'latency_ms': latency})}")


@app.command()
@handle_errors
def serve(
    recipe: RecipeOpt = None,
    engines: EnginesOpt = None,
    set_: SetOpt = None,
    model_id: ModelIdOpt = None,
    steps: RunStepsOpt = None,
    host: Annotated[str, typer.Option("--host", help="0.0.0.0 to accept remote robots")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535)] = 8000,
    device: DeviceOpt = "auto",
    max_batch: Annotated[int, typer.Option("--max-batch", min=1, help="most requests of concurrent clients run as "
                                           "one batch (at most the engines' largest batch size)")] = 1,
    max_wait_ms: Annotated[float, typer.Option("--max-wait-ms", min=0, help="how long a batch may wait for more "
                                               "requests after its first one arrived")] = 0.0,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="PI_BUILD_API_KEY", show_default=False,
        help="clients must send this key (openpi-client: api_key=KEY); without one, every client that reaches "
             "the port is served")] = None,
) -> None:
    """A websocket policy server speaking openpi's protocol (openpi-client works unchanged)."""
    from pi_build import artifacts
    from pi_build.runtime import serve as server
    from pi_build.runtime.policy import load_policy

    if api_key is not None and not api_key.strip():
        raise typer.BadParameter("the key is empty: give one, or unset PI_BUILD_API_KEY", param_hint="--api-key")
    server.check_can_listen(host, port)  # before the engines load, which can take minutes
    folder = artifacts.engines_dir(engines)
    policy = load_policy(_pipelines(_recipe(recipe, model_id, folder, steps, device, set_), folder))
    p = policy.pipeline
    metadata = {"model_id": p.manifests["vision"]["model_id"], "horizon": p.horizon, "steps": p.steps,
                "cameras": list(p.cameras), "engines": p.versions(), "batch_sizes": list(policy.batch_sizes)}
    console.print(f"serving on ws://{host}:{port} (GET /healthz, /metrics), batches of up to "
                  f"{min(max_batch, policy.max_batch)}; Ctrl-C stops")
    server.serve(policy, host=host, port=port, metadata=metadata, max_batch=max_batch, max_wait_ms=max_wait_ms,
                 api_key=api_key)


if __name__ == "__main__":
    app()
