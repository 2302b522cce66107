"""The one latency timer: run a chain of stages many times, time each, summarize.

On a GPU each stage is bracketed by CUDA events (device time, no host sync inside the chain);
on the CPU by perf counters. The engines (CUDA-graph replays or eager calls) and the eager
reference model are timed through the same function, so their numbers compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import numpy as np
import torch

Stage = tuple[str, Callable[[], object]]


def summarize(samples: Sequence[float]) -> dict[str, float | int]:
    """The one summary of samples (latencies in ms, episode lengths): count, mean, std, p50, p90,
    p95, p99 and max; just the count when there are none."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        return {"count": 0}
    p50, p90, p95, p99 = np.percentile(values, [50, 90, 95, 99])
    return {"count": int(values.size), "mean": float(values.mean()), "std": float(values.std()), "p50": float(p50),
            "p90": float(p90), "p95": float(p95), "p99": float(p99), "max": float(values.max())}


def _time_once(stages: Sequence[Stage], device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        events = [torch.cuda.Event(enable_timing=True) for _ in range(len(stages) + 1)]
        events[0].record()
        for event, (_, run) in zip(events[1:], stages):
            run()
            event.record()
        events[-1].synchronize()
        return {name: events[i].elapsed_time(events[i + 1]) for i, (name, _) in enumerate(stages)}
    times = {}
    for name, run in stages:
        t0 = time.perf_counter()
        run()
        times[name] = (time.perf_counter() - t0) * 1e3
    return times


@torch.no_grad()
def measure(stages: Sequence[Stage], device: torch.device, *, iters: int, warmup: int,
            end_to_end: Callable[[], object] | None = None) -> dict[str, dict[str, float]]:
    """Latency stats (ms) of each stage run in order, and of ``end_to_end``: the whole chain as one
    call (a CUDA graph of it) when given, else the sum of the stages of the same iteration."""
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    runs = []
    for i in range(warmup + iters):
        times = _time_once(stages, device)
        times["end_to_end"] = _time_once([("all", end_to_end)], device)["all"] if end_to_end else sum(times.values())
        if i >= warmup:
            runs.append(times)
    return {name: summarize([r[name] for r in runs]) for name in runs[0]}


@torch.no_grad()
def graph_replay_ms(fn: Callable[[], object], *, iters: int = 50, rounds: int = 1, warmup: int = 3) -> list[float]:
    """ms per replay of a CUDA graph of ``fn()``, one figure per round of ``iters`` replays (for the
    experiment scripts). Warmed up on a side stream first: lazy initialization and workspace
    allocation stay out of the graph."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    for _ in range(warmup):
        graph.replay()
    per_round = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        end.synchronize()
        per_round.append(start.elapsed_time(end) / iters)
    return per_round


# What a kernel (GPU) or operator (CPU) name says it does, first match wins: the kinds of a
# component's time in `pi-run bench --profile`.
KERNEL_KINDS = (  # Inductor's kernels first: their names list every op they fused ("..._attention_add_cat...")
    ("fused elementwise and norms (Inductor)", ("triton_poi", "triton_red", "triton_per")),
    ("attention", ("attn", "attention", "sdpa", "flash", "fmha")),
    ("pi-build Triton GEMMs", ("_norm_gemm", "_residual_gemm", "_skinny_mm", "_persistent_layers")),
    ("library GEMMs", ("gemm", "nvjet", "cutlass", "xmma", "cublas", "aten::mm", "aten::addmm", "aten::bmm",
                       "aten::_scaled_mm", "aten::_addmm_activation", "aten::linear", "aten::matmul", "convolution")),
    ("memory (copies, memsets)", ("memset", "memcpy", "aten::copy_", "aten::cat", "aten::stack", "aten::fill_", "aten::zero_")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    for kind, needles in KERNEL_KINDS:
        if any(needle in lowered for needle in needles):
            return kind
    return "other"


def busy_ms(intervals: Sequence[tuple[float, float]]) -> float:
    """The time covered by at least one of the (start, end) intervals (us), in ms: kernels that run at
    once (programmatic dependent launch starts a kernel before its predecessor ends) count once."""
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total / 1e3


def kernel_profile(fn: Callable[[], object], top: int = 20, device: torch.device | None = None) -> dict:
    """The kernels of one call of ``fn`` (no graph, so each launch is seen), from torch.profiler:
    {"kernels": launches, "kernel_ms": their summed time, "busy_ms": the time at least one ran (less than
    kernel_ms where kernels overlap), "kinds": {kind: [ms, launches]} (``kernel_kind``), "top": [[ms,
    launches, name], ...] for the ``top`` kernels by time}. On a CPU device the "kernels" are the
    operators' self times, which do not overlap. What the experiment scripts and `pi-run bench
    --profile` print to say where a component's time goes."""
    cpu = device is not None and device.type == "cpu"
    activity = torch.profiler.ProfilerActivity.CPU if cpu else torch.profiler.ProfilerActivity.CUDA
    with torch.no_grad(), torch.profiler.profile(activities=[activity]) as prof:
        fn()
        if not cpu:
            torch.cuda.synchronize()
    wanted = torch.autograd.DeviceType.CPU if cpu else torch.autograd.DeviceType.CUDA
    events = [e for e in prof.key_averages() if e.device_type == wanted]
    self_us = (lambda e: e.self_cpu_time_total) if cpu else (lambda e: e.self_device_time_total)
    events = [e for e in events if self_us(e) > 0]
    kinds: dict[str, list] = {}
    for e in events:
        entry = kinds.setdefault(kernel_kind(e.key), [0.0, 0])
        entry[0] += self_us(e) / 1e3
        entry[1] += e.count
    ranked = sorted(events, key=lambda e: -self_us(e))[:top]
    kernel_ms = sum(self_us(e) for e in events) / 1e3
    launches = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.device_type == wanted]
    return {"kernels": sum(e.count for e in events), "kernel_ms": kernel_ms,
            "busy_ms": kernel_ms if cpu else busy_ms(launches),
            "kinds": {k: [round(ms, 4), n] for k, (ms, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])},
            "top": [[round(self_us(e) / 1e3, 4), e.count, e.key[:150]] for e in ranked]}


def kernel_profile_text(label: str, profile: dict) -> str:
    lines = [f"{label}: no graph, {profile['kernels']} kernels, {profile['kernel_ms']:.3f} ms of kernel time"]
    lines += [f"  {ms:7.3f} ms  x{count:<4} {name}" for ms, count, name in profile["top"]]
    return "\n".join(lines)
