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


def kernel_profile(fn: Callable[[], object], top: int = 20) -> dict:
    """The CUDA kernels of one call of ``fn`` (no graph, so each launch is seen), from torch.profiler:
    {"kernels": launches, "kernel_ms": their summed time, "top": [[ms, launches, name], ...] for the
    ``top`` kernels by time}. What the experiment scripts print to say where a component's time goes."""
    with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    ranked = sorted(events, key=lambda e: -e.self_device_time_total)[:top]
    return {"kernels": sum(e.count for e in events), "kernel_ms": sum(e.self_device_time_total for e in events) / 1e3,
            "top": [[round(e.self_device_time_total / 1e3, 4), e.count, e.key[:150]] for e in ranked]}


def kernel_profile_text(label: str, profile: dict) -> str:
    lines = [f"{label}: no graph, {profile['kernels']} kernels, {profile['kernel_ms']:.3f} ms of kernel time"]
    lines += [f"  {ms:7.3f} ms  x{count:<4} {name}" for ms, count, name in profile["top"]]
    return "\n".join(lines)
