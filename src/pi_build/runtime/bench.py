"""`pi-run bench`: per-component latency of built engines, the eager reference, and the roofline.

For each step count the newest engines built for it are loaded (and captured into CUDA graphs
on a GPU), timed after warm-up with CUDA events (GPU) or perf counters (CPU), and shown beside
the eager reference model on the same weights, timed the same way in the same run, and beside the
floor from ``roofline.py`` with the GEMM rate and bandwidth measured on the spot.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

import torch

from pi_build import artifacts
from pi_build.runtime import roofline
from pi_build.engine.components import COMPONENTS, Shapes
from pi_build.model.pi0 import ModelInputs, PiModel, config_from_dict
from pi_build.recipe import CAMERAS
from pi_build.runtime.pipeline import Pipeline, latency_stats, load_pipeline, measure_latency

ROWS = ("vision", "kvcache", "denoise", "denoise_per_step", "end_to_end")


def _time_reference(model: PiModel, inputs: ModelInputs, noise: torch.Tensor, steps: int, iters: int, warmup: int) -> dict[str, dict]:
    """The eager reference model, per component, timed like the engines."""
    cuda = noise.is_cuda
    box: dict[str, Any] = {}

    def vision():
        box["tokens"] = model.vision(inputs.images, inputs.image_masks)

    def kvcache():
        box["cache"] = model.kvcache(box["tokens"], inputs.image_masks, inputs.tokens, inputs.token_masks)

    def denoise():
        box["actions"] = model.denoise(noise, box["cache"], inputs.state, steps)

    parts = [("vision", vision), ("kvcache", kvcache), ("denoise", denoise)]
    runs = []
    with torch.no_grad():
        for i in range(warmup + iters):
            times = {}
            for name, fn in parts:
                if cuda:
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    fn()
                    end.record()
                    end.synchronize()
                    times[name] = start.elapsed_time(end)
                else:
                    t0 = time.perf_counter()
                    fn()
                    times[name] = (time.perf_counter() - t0) * 1e3
            times["end_to_end"] = sum(times[n] for n, _ in parts)
            if i >= warmup:
                runs.append(times)
    return {name: latency_stats([r[name] for r in runs]) for name in runs[0]}


def _reference_inputs(pipeline: Pipeline, seed: int) -> tuple[ModelInputs, torch.Tensor]:
    """The engines' example inputs laid out for the reference: all three cameras, unused ones masked."""
    images, image_masks, tokens, token_masks, noise, state = pipeline.example_inputs(seed)
    cams = CAMERAS
    b = images.shape[0]
    full = torch.full((b, 3, *images.shape[2:]), -1.0, device=images.device)
    full_masks = torch.zeros(b, 3, dtype=torch.bool, device=images.device)
    for i, cam in enumerate(pipeline.cameras):
        full[:, cams.index(cam)] = images[:, i]
        full_masks[:, cams.index(cam)] = image_masks[:, i]
    return ModelInputs(full, full_masks, tokens, token_masks, state), noise


def _with_per_step(stats: dict[str, dict], steps: int) -> dict[str, dict]:
    d = stats["denoise"]
    stats["denoise_per_step"] = {k: (v / steps if k != "count" else v) for k, v in d.items()}
    return stats


def run_bench(recipe_path: Path, engines: Path | None, step_counts: list[int], *, iters: int, warmup: int,
              graphs: bool, reference: bool, log: Callable[[str], None] = print) -> dict[str, Any]:
    from pi_build.model.checkpoints import load_checkpoint
    from pi_build.recipe import load_recipe

    recipe = load_recipe(recipe_path)
    folder = artifacts.engines_dir(engines)
    from pi_build.build.stages import resolve_device

    device = resolve_device(recipe.model.device)
    log(f"measuring GEMM rate and bandwidth on {artifacts.device_info(device).get('name')}")
    ceilings = roofline.measure_ceilings(device)
    results: dict[str, Any] = {"recipe": recipe.name, "device": artifacts.device_info(device), "ceilings": ceilings,
                               "toolchain": artifacts.toolchain_versions(), "steps": {}}
    ref_model = None
    for steps in step_counts:
        pipeline = load_pipeline(folder, recipe.name, device, steps=steps)
        capture = pipeline.capture() if graphs else {"captured": False, "reason": "--no-graphs"}
        versions = {c: pipeline.manifests[c]["version"] for c in COMPONENTS}
        log(f"{steps} steps: engines {versions}; CUDA graphs: {capture.get('captured')}")
        engine_stats = _with_per_step(measure_latency(pipeline, iters=iters, warmup=warmup), steps)
        entry: dict[str, Any] = {"engines": engine_stats, "capture": capture, "versions": versions}
        if reference:
            if ref_model is None:
                source = pipeline.manifests["vision"]["source"]["checkpoint"]
                dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                log(f"loading the eager reference ({dtype}) from {source}")
                ref_model, _ = load_checkpoint(Path(source), dtype=dtype, device=device)
                ref_model.cfg = ref_model.cfg.replace(action_horizon=pipeline.horizon)
            inputs, noise = _reference_inputs(pipeline, seed=1)
            entry["reference"] = _with_per_step(_time_reference(ref_model, inputs, noise, steps, max(5, iters // 5), 3), steps)
        entry["roofline_ms"] = _floors(pipeline, steps, ceilings)
        results["steps"][str(steps)] = entry
    return results


def _floors(pipeline: Pipeline, steps: int, ceilings: dict) -> dict[str, float]:
    cfg = config_from_dict(pipeline.manifests["vision"]["source"]["model_config"])
    shapes = Shapes(batch=pipeline.batch, cameras=len(pipeline.cameras), prompt_len=pipeline.manifests["kvcache"]["prompt_len"],
                    horizon=pipeline.horizon, steps=steps)
    floors = {}
    for c in COMPONENTS:
        precision = pipeline.manifests[c]["precision"]
        flops, bytes_ = roofline.component_cost(cfg, c, shapes, precision)
        floors[c] = roofline.floor_ms(flops, bytes_, ceilings, precision)
    floors["denoise_per_step"] = floors["denoise"] / steps
    floors["end_to_end"] = floors["vision"] + floors["kvcache"] + floors["denoise"]
    return floors


def print_tables(results: dict[str, Any], console) -> None:
    from rich.table import Table

    c = results["ceilings"]
    rate = c.get("gemm_bf16_flops") or c.get("gemm_fp32_flops")
    console.print(f"device: {results['device'].get('name')}; measured GEMM {rate / 1e12:.0f} TFLOP/s"
                  + (f", FP8 {c['gemm_fp8_flops'] / 1e12:.0f} TFLOP/s" if "gemm_fp8_flops" in c else "")
                  + f", copy {c['bandwidth_bytes'] / 1e12:.2f} TB/s")
    for steps, entry in results["steps"].items():
        table = Table(title=f"{results['recipe']}: {steps} denoising steps (ms; graphs: {entry['capture'].get('captured')})")
        for col in ("component", "mean", "std", "p50", "p95", "n", "reference p50", "speed-up", "floor", "p50 / floor"):
            table.add_column(col, justify="right")
        for row in ROWS:
            e = entry["engines"][row]
            r = entry.get("reference", {}).get(row)
            floor = entry["roofline_ms"][row]
            table.add_row(row, f"{e['mean']:.3f}", f"{e['std']:.3f}", f"{e['p50']:.3f}", f"{e['p95']:.3f}", str(e["count"]),
                          f"{r['p50']:.2f}" if r else "-", f"{r['p50'] / e['p50']:.1f}x" if r else "-",
                          f"{floor:.3f}", f"{e['p50'] / floor:.1f}x")
        console.print(table)


def plot(results: dict[str, Any], path: Path) -> None:
    """Stacked bars (vision, kvcache, denoise) per step count: engines left, eager reference right."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [k for k in ("engines", "reference") if any(k in e for e in results["steps"].values())]
    fig, axes = plt.subplots(1, len(kinds), figsize=(5 * len(kinds), 4), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        labels = [f"{steps} steps" for steps, e in results["steps"].items() if kind in e]
        bottom = [0.0] * len(labels)
        for comp in COMPONENTS:
            values = [e[kind][comp]["p50"] for e in results["steps"].values() if kind in e]
            ax.bar(labels, values, bottom=bottom, label=comp)
            bottom = [b + v for b, v in zip(bottom, values)]
        for i, total in enumerate(bottom):
            ax.annotate(f"{total:.1f} ms", (i, total), ha="center", va="bottom")
        ax.set_title(kind)
        ax.set_ylabel("p50 latency (ms)")
        ax.legend()
    fig.suptitle(f"{results['recipe']} on {results['device'].get('name')}")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    tmp.replace(path)
    plt.close(fig)
