"""Speed experiments on one denoise step of full-size pi0.5 (random weights), on a GPU.

Builds the denoise component straight from a random model (no checkpoint), compiles variants
with torch.compile, captures a 10-step loop per variant in a CUDA graph and times its replays;
prints the torch profiler's top kernels for the first variant. Results feed docs/PERFORMANCE.md.

    PYTHONPATH=src python3 scripts/denoise_experiments.py [--variants default,autotune]
"""

from __future__ import annotations

import argparse
import time

import torch

from pi_build.components import Shapes, build_component, denoise_loop
from pi_build.model import build_model, get_config


def graph_time(fn, args, steps: int, iters: int = 50) -> float:
    idx = torch.arange(steps, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            denoise_loop(fn, *args, steps=idx)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        denoise_loop(fn, *args, steps=idx)
    for _ in range(5):
        g.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        g.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / iters / steps


def fp8_from_hooks(module: torch.nn.Module, inputs: tuple, keep: tuple[str, ...]) -> torch.nn.Module:
    """FP8 linears with max-calibrated static scales from one forward (a quick stand-in for ModelOpt)."""
    from fnmatch import fnmatch

    from pi_build.fp8 import apply_fp8

    amax: dict[str, float] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and not any(fnmatch(name, p) for p in keep):
            def hook(m, args, out, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())
            hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for step in range(module.steps):
            module(inputs[0], torch.tensor(step, device=inputs[0].device), *inputs[2:])
    for h in hooks:
        h.remove()
    scales = {n: {"input_amax": a, "weight_amax": module.get_submodule(n).weight.detach().abs().max().item()} for n, a in amax.items()}
    return apply_fp8(module, scales)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="default,autotune")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    t0 = time.time()
    cfg = get_config("pi05").replace(action_horizon=10)
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    print(f"model ready in {time.time() - t0:.0f} s")
    shapes = Shapes(batch=1, cameras=2, prompt_len=200, horizon=10, steps=args.steps, kv_dtype=torch.bfloat16)
    module = build_component(model, "denoise", shapes, "bf16")
    x, step, k, v, mask, state = (t.cuda() for t in module.example_inputs(torch.Generator().manual_seed(0)))
    loop_args = (x, k, v, mask, state)
    results = {}
    for name in args.variants.split(","):
        torch.compiler.reset()
        if name == "fp8":
            module = fp8_from_hooks(module, (x, step, k, v, mask, state), ("action_in", "action_out"))
        options = {"default": {}, "autotune": {"max_autotune": True},
                   "autotune_cd": {"max_autotune": True, "coordinate_descent_tuning": True}, "fp8": {}}[name]
        t1 = time.time()
        compiled = torch.compile(module, options=options)
        with torch.no_grad():
            ms = graph_time(compiled, loop_args, args.steps)
        results[name] = ms
        print(f"{name}: {ms:.3f} ms per step (compile + capture {time.time() - t1:.0f} s)", flush=True)
        if name == args.variants.split(",")[0]:
            with torch.no_grad(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                compiled(x, step, k, v, mask, state)
                torch.cuda.synchronize()
            events = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
            total = sum(e.self_device_time_total for e in events)
            print(f"one step, no graph: {sum(e.count for e in events)} kernels, {total / 1e3:.3f} ms of kernel time")
            for e in sorted(events, key=lambda e: -e.self_device_time_total)[:14]:
                print(f"  {e.self_device_time_total / 1e3:7.3f} ms  x{e.count:<4} {e.key[:90]}")
    print({k: round(v, 4) for k, v in results.items()})


if __name__ == "__main__":
    main()
