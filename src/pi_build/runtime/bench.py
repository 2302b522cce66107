"""`pi-run bench`: per-component latency of the engines a recipe asks for, beside the eager
reference and the roofline floor measured in the same run.

For each step count the engines that fit the recipe with that many denoise steps are loaded
(and captured into CUDA graphs on a GPU) and timed after warm-up (``timing.measure``: CUDA events
on a GPU, perf counters on the CPU); the eager reference model on the same weights is timed the
same way; the floor comes from ``roofline.py`` with the GEMM rate and bandwidth measured on the
spot (GPU only: on a CPU it is left out).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch

from pi_build import artifacts
from pi_build.engine.layers import Shapes
from pi_build.errors import InputError
from pi_build.io import atomic_path
from pi_build.model.pi0 import ModelInputs, PiModel, config_from_dict
from pi_build.recipe import Recipe
from pi_build.runtime import roofline, timing
from pi_build.runtime.pipeline import Pipeline, load_pipeline, resolve_device
from pi_build.spec import CAMERAS, Component

ROWS = ("vision", "kvcache", "denoise", "denoise_per_step", "end_to_end")


def built_step_counts(engines: Path, recipe: Recipe) -> list[int]:
    """The denoise step counts of the engines that fit the recipe (its first shape) but for their steps."""
    device, toolchain = artifacts.device_info(resolve_device(recipe.model.device)), artifacts.toolchain_versions()
    shape = {"batch": min(recipe.model.batch), "prompt_len": recipe.model.prompt_len, "device": device, "toolchain": toolchain}
    counts = set()
    for art in artifacts.artifacts_of(engines, recipe.name, Component.DENOISE):
        steps = art.manifest.get("steps")
        if isinstance(steps, int) and steps >= 1:
            at_steps = recipe.with_component(Component.DENOISE, steps=steps)
            if not artifacts.mismatches(art, at_steps, Component.DENOISE, **shape):
                counts.add(steps)
    return sorted(counts)


def libero_prompt_tokens(engines: Path, recipe: Recipe, device: torch.device) -> int:
    """How many tokens a LIBERO instruction takes with the engines' own tokenizer (the first recorded
    observation's, in the prompt format of openpi's LIBERO policies): the prompt length a bench times
    by default. Reads the tokenizer the kvcache engine carries, without loading any engine."""
    from pi_build.model.tokenizer import PromptTokenizer
    from pi_build.runtime.pipeline import select_for_shapes
    from pi_build.runtime.policy import TOKENIZER_FILE
    from pi_build.transforms.libero import load_recorded_observations

    [(_, selected)] = select_for_shapes(engines, recipe, device, [(min(recipe.model.batch), recipe.model.prompt_len)])
    tokenizer = PromptTokenizer(selected[Component.KVCACHE].file(TOKENIZER_FILE), max_len=recipe.model.prompt_len, truncate=False)
    return len(tokenizer.token_ids(load_recorded_observations()[0]["prompt"]))


def _reference_stages(model: PiModel, inputs: ModelInputs, noise: torch.Tensor, steps: int) -> list[timing.Stage]:
    """The eager reference model as the same three timed stages."""
    box: dict[str, Any] = {}

    def vision() -> None:
        box["tokens"] = model.vision(inputs.images, inputs.image_masks)

    def kvcache() -> None:
        box["cache"] = model.kvcache(box["tokens"], inputs.image_masks, inputs.tokens, inputs.token_masks)

    def denoise() -> None:
        box["actions"] = model.denoise(noise, box["cache"], inputs.state, steps)

    return [("vision", vision), ("kvcache", kvcache), ("denoise", denoise)]


def _reference_inputs(pipeline: Pipeline, seed: int, prompt_tokens: int) -> tuple[ModelInputs, torch.Tensor]:
    """The engines' example inputs laid out for the reference: all three cameras, unused ones masked,
    and the prompt padded to the full length the reference model was configured for."""
    images, image_masks, tokens, token_masks, noise, state = pipeline.example_inputs(seed, prompt_tokens)
    # the reference as openpi runs it: the prompt padded to the recipe's full length, whatever the bucket
    pad = pipeline.manifests[Component.KVCACHE]["recipe"]["model"]["prompt_len"] - tokens.shape[1]
    tokens, token_masks = torch.nn.functional.pad(tokens, (0, pad)), torch.nn.functional.pad(token_masks, (0, pad))
    b = images.shape[0]
    full = torch.full((b, 3, *images.shape[2:]), -1.0, device=images.device)
    full_masks = torch.zeros(b, 3, dtype=torch.bool, device=images.device)
    for i, cam in enumerate(pipeline.cameras):
        full[:, CAMERAS.index(cam)] = images[:, i]
        full_masks[:, CAMERAS.index(cam)] = image_masks[:, i]
    return ModelInputs(full, full_masks, tokens, token_masks, state), noise


def _with_per_step(stats: dict[str, dict], steps: int) -> dict[str, dict]:
    stats["denoise_per_step"] = {k: (v / steps if k != "count" else v) for k, v in stats["denoise"].items()}
    return stats


def _load_reference(recipe: Recipe, device: torch.device, horizon: int) -> PiModel:
    from pi_build.model.checkpoints import load_checkpoint

    path = Path(recipe.model.checkpoint).expanduser()
    if not path.exists():
        raise InputError(f"timing the eager reference needs the checkpoint, and model.checkpoint {recipe.model.checkpoint!r} "
                         f"does not exist here: pass --no-reference, or run where the checkpoint is")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model, _ = load_checkpoint(path, dtype=dtype, device=device)
    model.cfg = model.cfg.replace(action_horizon=horizon)
    return model


def run_bench(recipe: Recipe, engines: Path, step_counts: list[int] | None, *, iters: int, warmup: int,
              graphs: bool, reference: bool, batch_sizes: list[int] | None = None, prompt_tokens: int | None = None,
              profile: bool = False, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Every figure of a bench run: per step count and batch size, the engines' latency stats (and
    throughput), the reference's and the floors, at one prompt length (default: a LIBERO instruction's)
    run on the smallest prompt bucket that holds it; with ``profile``, each component's kernels too."""
    device = resolve_device(recipe.model.device)
    step_counts = step_counts or built_step_counts(engines, recipe)
    if not step_counts:
        raise InputError(f"no denoise engine of {recipe.name!r} under {engines} fits the recipe at any step count: "
                         f"build one with `pi-build denoise --recipe {recipe.path or '<recipe>'}`")
    batch_sizes = batch_sizes or list(recipe.model.batch)
    if prompt_tokens is not None and prompt_tokens > recipe.model.prompt_len:
        raise InputError(f"--prompt-len {prompt_tokens} is longer than the recipe's model.prompt_len {recipe.model.prompt_len}, "
                         f"its largest bucket: pass at most {recipe.model.prompt_len}")
    log(f"measuring GEMM rate and bandwidth on {artifacts.device_info(device).get('name')}")
    ceilings = roofline.measure_ceilings(device)
    results: dict[str, Any] = {"recipe": recipe.name, "device": artifacts.device_info(device), "ceilings": ceilings,
                               "toolchain": artifacts.toolchain_versions(), "runs": []}
    ref_model = None
    for steps in step_counts:
        at_steps = recipe.with_component(Component.DENOISE, steps=steps)
        for batch in batch_sizes:
            if prompt_tokens is None:
                prompt_tokens = libero_prompt_tokens(engines, at_steps, device)
            bucket = next(length for length in recipe.model.prompt_lengths if length >= prompt_tokens)
            pipeline = load_pipeline(engines, at_steps, device, batch=batch, prompt_len=bucket)
            capture = pipeline.capture() if graphs else {"captured": False, "reason": "--no-graphs"}
            log(f"{steps} steps, batch {batch}, a {prompt_tokens}-token prompt on the {bucket}-token bucket: "
                f"{pipeline.describe()}; CUDA graphs: {capture.get('captured')}")
            stats = _with_per_step(pipeline.measure_latency(iters=iters, warmup=warmup, prompt_tokens=prompt_tokens), steps)
            entry: dict[str, Any] = {"steps": steps, "batch": batch, "prompt_tokens": prompt_tokens, "bucket": bucket,
                                     "engines": stats, "capture": capture, "versions": pipeline.versions(),
                                     "throughput_per_s": batch / stats["end_to_end"]["p50"] * 1e3}
            if reference:
                if ref_model is None:
                    log(f"loading the eager reference from {recipe.model.checkpoint}")
                    ref_model = _load_reference(recipe, device, pipeline.horizon)
                inputs, noise = _reference_inputs(pipeline, seed=1, prompt_tokens=prompt_tokens)
                ref = timing.measure(_reference_stages(ref_model, inputs, noise, steps), device, iters=max(5, iters // 5), warmup=3)
                entry["reference"] = _with_per_step(ref, steps)
            entry["roofline_ms"] = _floors(pipeline, steps, ceilings) if ceilings else None
            if profile:
                entry["profile"] = pipeline.profile(prompt_tokens=prompt_tokens)
            results["runs"].append(entry)
    return results


def _floors(pipeline: Pipeline, steps: int, ceilings: dict) -> dict[str, float]:
    cfg = config_from_dict(pipeline.manifests[Component.VISION]["source"]["model_config"])
    shapes = Shapes(batch=pipeline.batch, cameras=len(pipeline.cameras), prompt_len=pipeline.prompt_len,
                    horizon=pipeline.horizon, steps=steps)
    floors = {}
    for c in Component:
        precision = pipeline.manifests[c]["precision"]
        flops, bytes_ = roofline.component_cost(cfg, c, shapes, precision)
        floors[str(c)] = roofline.floor_ms(flops, bytes_, ceilings, precision)
    floors["denoise_per_step"] = floors["denoise"] / steps
    floors["end_to_end"] = floors["vision"] + floors["kvcache"] + floors["denoise"]
    return floors


def print_tables(results: dict[str, Any], console) -> None:
    from rich.table import Table

    c = results["ceilings"]
    if c:
        console.print(f"device: {results['device'].get('name')}; measured GEMM {c['gemm_bf16_flops'] / 1e12:.0f} TFLOP/s"
                      + (f", FP8 {c['gemm_fp8_flops'] / 1e12:.0f} TFLOP/s" if "gemm_fp8_flops" in c else "")
                      + f", copy {c['bandwidth_bytes'] / 1e12:.2f} TB/s")
    else:
        console.print(f"device: {results['device'].get('name')}; no roofline floor on a CPU (it is measured on GPUs only)")
    for entry in results["runs"]:
        title = (f"{results['recipe']}: {entry['steps']} denoising steps, batch {entry['batch']}, a {entry['prompt_tokens']}-token "
                 f"prompt on the {entry['bucket']}-token bucket (ms; graphs: {entry['capture'].get('captured')})")
        table = Table(title=title)
        columns = ["component", "mean", "std", "p50", "p95", "p99", "n", "reference p50", "speed-up"]
        columns += ["floor", "p50 / floor"] if entry["roofline_ms"] else []
        for col in columns:
            table.add_column(col, justify="right")
        for row in ROWS:
            e = entry["engines"][row]
            r = entry.get("reference", {}).get(row)
            cells = [row, f"{e['mean']:.3f}", f"{e['std']:.3f}", f"{e['p50']:.3f}", f"{e['p95']:.3f}", f"{e['p99']:.3f}",
                     str(e["count"]), f"{r['p50']:.2f}" if r else "-", f"{r['p50'] / e['p50']:.1f}x" if r else "-"]
            if entry["roofline_ms"]:
                floor = entry["roofline_ms"][row]
                cells += [f"{floor:.3f}", f"{e['p50'] / floor:.1f}x"]
            table.add_row(*cells)
        console.print(table)
        console.print(f"throughput: {entry['throughput_per_s']:.1f} action chunks/s "
                      f"(per request p50 {entry['engines']['end_to_end']['p50']:.3f} ms, p99 {entry['engines']['end_to_end']['p99']:.3f} ms)")
        if "profile" in entry:
            console.print(profile_table(entry["profile"], entry["engines"], results["device"].get("type") == "cpu"))


def profile_table(profile: dict[str, dict], latency: dict[str, dict], cpu: bool):
    """Where each component's time goes: its p50 split into kinds of kernel (``timing.kernel_kind``,
    with the top kernel of each) and the rest, the time between kernels (launches, ramps, bubbles;
    on a CPU also the compiled code that the profiler does not see as operators).

    The kinds come from one call without graphs, so the rest can be negative: in the captured graph
    programmatic dependent launch starts each kernel while the one before it finishes, and their
    summed times exceed the p50. The table names that row for what it is rather than printing a
    negative gap."""
    from rich.table import Table

    unit = "operators" if cpu else "kernels"
    table = Table(title=f"where the time goes: each component's p50 above, split into the {unit} of one call "
                        f"without graphs (torch.profiler) and the rest")
    for col in ("component", "kind", "ms", unit, "share of p50", f"top {unit[:-1]} of the kind"):
        table.add_column(col, justify="left" if col in ("component", "kind", f"top {unit[:-1]} of the kind") else "right")
    for component, p in profile.items():
        p50 = latency[component]["p50"]
        for kind, (ms, count) in p["kinds"].items():
            top = next((name for _, _, name in p["top"] if timing.kernel_kind(name) == kind), "")
            table.add_row(component, kind, f"{ms:.3f}", str(count), f"{ms / p50:.0%}", top[:70])
        overlap = p["kernel_ms"] - p["busy_ms"]
        if overlap > 1e-3:  # kernels that ran at once in the profiled call were counted in full in their kinds
            table.add_row(component, "kernels running at once (counted twice above)", f"{-overlap:.3f}", "", f"{-overlap / p50:.0%}", "")
        rest = p50 - p["busy_ms"]
        if cpu:
            label = "outside the listed operators (compiled code, dispatch)"
        elif rest >= 0:
            label = "between kernels (launches, ramps, gaps)"
        else:
            label = "overlap in the CUDA graph (PDL starts kernels early; the kinds were timed without it)"
        table.add_row(component, label, f"{rest:.3f}", "", f"{rest / p50:.0%}", "")
        table.add_row(component, "[b]p50[/b]", f"[b]{p50:.3f}[/b]", str(p["kernels"]), "100%", "", end_section=True)
    return table


def plot(results: dict[str, Any], path: Path) -> None:
    """Stacked bars (vision, kvcache, denoise) per run: engines left, eager reference right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("engines", "reference") if any(k in e for e in results["runs"])]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        runs = [e for e in results["runs"] if kind in e]
        labels = [f"{e['steps']} steps, b{e['batch']}" for e in runs]
        bottom = [0.0] * len(labels)
        for comp in ("vision", "kvcache", "denoise"):
            values = [e[kind][comp]["p50"] for e in runs]
            ax.bar(labels, values, bottom=bottom, label=comp)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, total in enumerate(bottom):
            ax.annotate(f"{total:.1f} ms", (i, total), ha="center", va="bottom")
        ax.set_title(kind)
        ax.set_ylabel("p50 latency (ms)")
        ax.legend()
    fig.suptitle(f"{results['recipe']} on {results['device'].get('name')}")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
