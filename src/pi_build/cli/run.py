"""`pi-run`: run a policy: predict once, benchmark, evaluate in LIBERO, or serve it."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import numpy as np
import typer

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
    profile: Annotated[bool, typer.Option("--profile", help="list each component's kernels (CPU: operators) by kind: where the time goes")] = False,
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
                                  profile=profile, log=console.print)
    bench_mod.print_tables(results, console)
    if json_out:
        console.print(f"figures: {write_json(json_out, results)}")
    if png:
        bench_mod.plot(results, png)
        console.print(f"chart: {png}")


# ----------------------------------------------------------------------------- libero and serve


class PolicyLocation(str, Enum):
    worker = "worker"
    server = "server"


def _server_metadata(policy) -> dict:
    """What a policy server tells each client on connect: which engines answer, and how."""
    p = policy.pipeline
    return {"model_id": p.manifests["vision"]["model_id"], "horizon": p.horizon, "steps": p.steps,
            "cameras": list(p.cameras), "engines": {q.shape_name: q.versions() for q in policy.pipelines.values()},
            "batch_sizes": list(policy.batch_sizes)}


def _policy_plan(where: PolicyLocation | None, server_url: str | None, recipe, engines: Path):
    """Where `pi-run libero` runs the policy, and who that policy is: in each worker (CPU), or behind
    one policy server (--server-url, else one started here). Left to choose, a GPU means a server here."""
    import functools

    from pi_build.evaluation import InWorkerPolicy, LocalServer, ServerPolicy
    from pi_build.evaluation.policies import server_metadata
    from pi_build.runtime.pipeline import describe, resolve_device, selected_engines
    from pi_build.runtime.policy import policy_for_recipe

    if server_url is not None:
        if where == PolicyLocation.worker:
            raise InputError("--server-url names a policy server, but --policy worker runs the policy in the workers; drop one of them")
        metadata = server_metadata(server_url)
        return ServerPolicy(server_url), {"server": server_url, "model_id": metadata.get("model_id"), "engines": metadata.get("engines")}
    device = resolve_device(recipe.model.device)
    folder = engines.resolve()  # workers may start in another folder
    selected = selected_engines(folder, recipe, device)  # found, not loaded
    identity = {"model_id": recipe.name, "engines": {shape: {str(c): m["version"] for c, m in manifests.items()}
                                                     for shape, manifests in selected.items()}}
    for shape, manifests in selected.items():
        console.print(f"{recipe.name} on {device}, {shape}: {describe(manifests)}", soft_wrap=True)
    where = where or (PolicyLocation.worker if device.type == "cpu" else PolicyLocation.server)
    load = functools.partial(policy_for_recipe, folder, recipe, str(device))
    if where == PolicyLocation.server:
        return LocalServer(load=load, metadata=_server_metadata), identity
    if device.type != "cpu":
        raise InputError(f"in-worker policies run on the CPU (each worker loads its own copy); "
                         f"use --policy server to run the engines on {device}")
    return InWorkerPolicy(load, name=f"{recipe.name} from {folder}, {recipe.denoise.steps} steps"), identity


def _video_settings(video: Path | None, videos: int | None, trials: int, out: Path) -> tuple[Path | None, int]:
    """(folder, how many trials of each task to film): --video alone films every episode;
    --videos N films trials 0 .. N-1 of each task, into --video or a folder beside --out."""
    if videos is None:
        return video, trials if video is not None else 0
    return video or out.with_name(f"{out.stem}-videos"), videos


@app.command()
@handle_errors
def libero(
    recipe: RecipeOpt = None,
    engines: EnginesOpt = None,
    set_: SetOpt = None,
    model_id: ModelIdOpt = None,
    suite: Annotated[str, typer.Option("--suite", help="a suite, several comma-separated, or `paper` (spatial, object, goal, 10)")] = "libero_spatial",
    tasks: Annotated[Optional[str], typer.Option("--tasks", help="comma-separated task ids (default: all)")] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="trials per task, over the fixed initial states")] = 50,
    quick: Annotated[bool, typer.Option("--quick", help="3 tasks x 3 trials")] = False,
    steps: RunStepsOpt = None,
    max_steps: Annotated[Optional[int], typer.Option("--max-steps", min=1, help="cap on episode length (smoke runs)")] = None,
    video: Annotated[Optional[Path], typer.Option("--video", help="folder for MP4s (alone: one per episode)")] = None,
    videos: Annotated[Optional[int], typer.Option("--videos", min=0, help="film trials 0..N-1 of each task")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="report JSON (default: libero-results/SUITE.json); episodes in OUT.episodes.jsonl beside it")] = None,
    assets: Annotated[Optional[Path], typer.Option("--assets", help="LIBERO assets folder (default: $PI_BUILD_LIBERO_ASSETS, else ../shared/libero/assets)")] = None,
    seed: Annotated[int, typer.Option("--seed")] = 7,
    device: DeviceOpt = "auto",
    workers: Annotated[int, typer.Option("--workers", min=1, help="episodes run in parallel (Ray workers)")] = 1,
    address: Annotated[Optional[str], typer.Option("--address", help="join this Ray cluster (HOST:PORT, ray://HOST:PORT, auto) instead of a local one")] = None,
    policy: Annotated[Optional[PolicyLocation], typer.Option("--policy", help="run the policy in each worker, or behind one server (default: worker on CPU, server on GPU)")] = None,
    server_url: Annotated[Optional[str], typer.Option("--server-url", help="call this policy server (ws://HOST:PORT of `pi-run serve`) instead of starting one")] = None,
) -> None:
    """Closed-loop evaluation in the LIBERO simulator with openpi's protocol, episodes run in parallel on Ray.

    Each finished episode is appended to OUT.episodes.jsonl at once; the same command run again
    skips the episodes already there.
    """
    from pi_build import artifacts, io
    from pi_build.envs import libero as env
    from pi_build.evaluation import ResultsFile, build_report, episodes_path, plan_episodes, print_report, run_evaluation
    from pi_build.evaluation.cluster import check_reachable
    from pi_build.evaluation.progress import episode_progress
    from pi_build.evaluation.protocol import parse_suites, parse_task_ids

    suites, task_ids = parse_suites(suite), parse_task_ids(tasks)
    if address is not None:  # seconds, before the slower steps below
        check_reachable(address)
    loaded = None if server_url else _recipe(recipe, model_id, artifacts.engines_dir(engines), steps, device, set_)
    policy_plan, identity = _policy_plan(policy, server_url, loaded, artifacts.engines_dir(engines))
    try:
        assets = env.setup_libero(assets)
    except (ModuleNotFoundError, FileNotFoundError, RuntimeError) as e:  # LIBERO missing, its assets, a GL library
        raise InputError(str(e)) from None
    plan = plan_episodes(suites, task_ids, trials, seed=seed, max_steps_cap=max_steps, quick=quick)
    out = out or Path("libero-results") / f"{suite.replace(',', '+')}.json"
    results = ResultsFile(episodes_path(out))
    video_dir, video_trials = _video_settings(video, videos, trials, out)
    with episode_progress(console, len(plan), f"{'+'.join(suites)} episodes") as on_episode:
        run = run_evaluation(plan, results, policy_plan, workers=workers, address=address, video_dir=video_dir,
                             video_trials=video_trials, assets=assets, on_episode=on_episode, identity=identity)
    report = build_report(run, results_file=results.path, seed=seed)
    io.write_json(out, report)
    print_report(report, console)
    console.print(f"results: {out} (episodes: {results.path})")


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
    from pi_build.runtime.policy import policy_for_recipe

    if api_key is not None and not api_key.strip():
        raise typer.BadParameter("the key is empty: give one, or unset PI_BUILD_API_KEY", param_hint="--api-key")
    server.check_can_listen(host, port)  # before the engines load, which can take minutes
    folder = artifacts.engines_dir(engines)
    loaded = _recipe(recipe, model_id, folder, steps, device, set_)
    policy = policy_for_recipe(folder, loaded)
    for pipeline in policy.pipelines.values():
        console.print(f"{loaded.name} on {pipeline.device}, batch {pipeline.batch}: {pipeline.describe()}", soft_wrap=True)
    metadata = _server_metadata(policy)
    console.print(f"serving on ws://{host}:{port} (GET /healthz, /metrics), batches of up to "
                  f"{min(max_batch, policy.max_batch)}; Ctrl-C stops")
    server.serve(policy, host=host, port=port, metadata=metadata, max_batch=max_batch, max_wait_ms=max_wait_ms,
                 api_key=api_key)


if __name__ == "__main__":
    app()
