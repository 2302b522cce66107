"""The fused denoise step on a GPU: accuracy against the float32 reference step, CUDA-graph timings.

For full-size pi0.5 (10 suffix tokens over 712 cached keys) and pi0 (51 over 560), random weights:
- accuracy of each path's step against the float32 reference model (``components.reference_outputs``:
  model.denoise_step in float32) at the first and last step index, fresh inputs per draw; the
  10-step actions against the reference's Euler loop; a bitwise repeat of the fused step (a race
  would show there);
- ms per step of a 10-step loop captured in one CUDA graph: library path, kernels.py's Triton path,
  the fused step (bf16 and FP8), each compiled with torch.compile as an engine is; the fused steps
  again with programmatic dependent launch off (the same compiled module, recaptured);
- the weight-read floor from a measured device copy rate;
- for the fused step: each kernel kind alone (18 launches in a graph), a tiling sweep (--sweep),
  and the profiler's kernel list of one step.

    PYTHONPATH=src python3 scripts/fused_denoise_bench.py --runs "pi05:fused,fused-fp8,triton,library pi0:fused,fused-fp8,triton,library" --out $OUT

Only the expert and the small projections are initialised (random, seeded): the vision tower and
the prefix LLM are never read by a denoise step, and initialising their 2.9B parameters on the CPU
costs a minute of device time.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

import torch

from pi_build.engine import fused_denoise as fd
from pi_build.engine import build_component, reference_outputs
from pi_build.engine.denoise import denoise_loop
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import KVCache, build_model, get_config
from pi_build.runtime.timing import graph_replay_ms, kernel_profile

T0 = time.time()
DEVICE = "cuda"  # --dry-run: "cpu" with the tiny configs, wall-clock timing, to check this script


def log(msg: str) -> None:
    print(f"[{time.time() - T0:6.1f}s] {msg}", flush=True)


# ----------------------------------------------------------------------------- models and inputs


@torch.no_grad()
def expert_model(config: str, seed: int, batch: int = 1, prompt_len: int = 0):
    """bf16 model (openpi's dtype policy) with random weights where a denoise step reads them."""
    horizon = 10 if config.startswith("pi05") else 50
    cfg = get_config(config).replace(action_horizon=horizon)
    model = build_model(cfg, dtype=torch.bfloat16, device=DEVICE, seed=None)  # uninitialised: fast
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    for name, p in model.named_parameters():
        if name.startswith("paligemma_with_expert.paligemma."):
            p.zero_()  # vision tower and prefix LLM: never read by a denoise step
            continue
        std = p[0].numel() ** -0.5 if p.ndim >= 2 else 0.02  # as model.init_random_weights
        p.copy_(torch.randn(p.shape, generator=g, device=DEVICE) * std)
    prompt_len = prompt_len or (200 if config.startswith("pi05") else 48)
    shapes = Shapes(batch=batch, cameras=2, prompt_len=prompt_len, horizon=horizon, steps=10, kv_dtype=torch.bfloat16)
    return model, shapes


def draw_inputs(component, seed: int, step: int) -> tuple:
    """Fresh step inputs: noise, step index, K/V cache ~ N(0, 1) in bf16, a prompt mask, state."""
    x, _, k, v, mask, state = component.example_inputs(torch.Generator().manual_seed(seed))
    return tuple(t.to(DEVICE) for t in (x, torch.tensor(step), k, v, mask, state))


def metrics(got: torch.Tensor, ref: torch.Tensor) -> dict:
    got, ref = got.double().flatten(), ref.double().flatten()
    return {"cosine": torch.nn.functional.cosine_similarity(got, ref, 0).item(), "rel_err": ((got - ref).norm() / ref.norm()).item()}


# ----------------------------------------------------------------------------- the paths


def make_path(name: str, model, shapes: Shapes):
    """(module, info) for one path, not yet compiled."""
    component = build_component(model, "denoise", shapes, "bf16")
    if name == "library":
        return component, {}
    if name == "triton":
        return component, component.use_triton_kernels()
    precision = "fp8" if name.endswith("-fp8") else "bf16"
    fused, info = fd.use_fused_denoise(component, precision, persistent=name.startswith("persistent"))
    del component
    return fused, info


def timed_loop(step_fn, loop_args: tuple, steps: int, rounds: int = 5, iters: int = 20) -> tuple[float, float]:
    """(median, spread) in ms per step of a CUDA graph of the whole ``steps``-step loop; rounds of
    ``iters`` replays each."""
    idx = torch.arange(steps, device=DEVICE)
    fn = lambda: denoise_loop(step_fn, *loop_args, steps=idx)  # noqa: E731
    if DEVICE == "cpu":
        times = [wall_ms(fn) / steps for _ in range(rounds)]
        return statistics.median(times), max(times) - min(times)
    times = [ms / steps for ms in graph_replay_ms(fn, iters=iters, rounds=rounds, warmup=2)]
    return statistics.median(times), max(times) - min(times)


def wall_ms(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def graph_ms(fn, iters: int = 30) -> float:
    """ms per replay of a CUDA graph of fn()."""
    if DEVICE == "cpu":
        return wall_ms(fn)
    return graph_replay_ms(fn, iters=iters, warmup=1)[0]


@torch.no_grad()
def accuracy(compiled, ref_model, component, steps: int) -> dict:
    """Worst of two draws (step 0 and the last step) against the float32 reference; 10-step actions."""
    worst = None
    for seed, step in ((1, 0), (2, steps - 1)):
        inputs = draw_inputs(component, seed, step)
        m = metrics(compiled(*inputs), reference_outputs(ref_model, "denoise", inputs, steps)[0])
        worst = m if worst is None or m["rel_err"] > worst["rel_err"] else worst
    x, _, k, v, mask, state = draw_inputs(component, 3, 0)
    actions = denoise_loop(compiled, x, k, v, mask, state, steps)
    ref_actions = ref_model.denoise(x.float(), KVCache(k.float(), v.float(), mask), state, steps)
    return {"step": worst, "actions_10_steps": metrics(actions, ref_actions)}


@torch.no_grad()
def profile(compiled, inputs) -> dict:
    """Kernels of one step (no graph) from the profiler: count, total time, the top ones."""
    if DEVICE == "cpu":
        return {"kernels": 0, "kernel_ms": 0.0, "top": []}
    compiled(*inputs)
    torch.cuda.synchronize()
    return kernel_profile(lambda: compiled(*inputs), top=12)


# ----------------------------------------------------------------------------- fused-step details


def op_args(fused: fd.FusedDenoiseStep, inputs: tuple) -> tuple:
    """The arguments the fused module passes to fused_expert_layers for these inputs."""
    captured = {}
    real = fd.fused_expert_layers

    def spy(*args):
        captured["args"] = args
        return real(*args)
    fd.fused_expert_layers = spy
    try:
        with torch.no_grad():
            fused(*inputs)
    finally:
        fd.fused_expert_layers = real
    return captured["args"]


@torch.no_grad()
def kernel_breakdown(fused: fd.FusedDenoiseStep, inputs: tuple) -> dict:
    """us per launch of each kernel kind: the 18 launches of that kind alone in one graph (with the
    counters memset), and the whole chain; their sum against the chain shows the overlap."""
    args = op_args(fused, inputs)
    tiling = fd.TILING_OVERRIDE or fused.tiling
    _, counters, launches = fd.layer_launches(*args[:-1], tiling=tiling)  # the op's last argument: persistent
    depth = fused.dims.depth

    def run(kinds):
        counters.zero_()
        for kind, _, launch in launches:
            if kind in kinds:
                launch()
    out = {kind: graph_ms(lambda k=kind: run((k,))) * 1e3 / depth for kind in fd.KERNEL_KINDS}
    out["memset_only_us"] = graph_ms(lambda: run(())) * 1e3
    out["whole_chain_us"] = graph_ms(lambda: run(fd.KERNEL_KINDS)) * 1e3
    return {k: round(v, 2) for k, v in out.items()}


FUSED_PATHS = ("fused", "fused-fp8", "persistent", "persistent-fp8")


def sweep_candidates(rows: int, fp8: bool, persistent: bool = False) -> list[tuple[str, dict]]:
    """Tilings to try besides the default (each compiled offline for sm_90: docs/FUSED-DENOISE.md).
    The first H200 run also tried 64x128 w4, 128x128 w4 and 64x512 w8 at 10 rows and 128x128 w8 at
    51 rows: all slower or equal (docs/FUSED-DENOISE.md)."""
    if persistent:  # one grid of 8 warps: other work-item sizes; L2 prefetch; fewer keys per item
        return [("persistent with L2 prefetch", dict(prefetch_l2=True)), ("persistent lean K/V", dict(attn_lean_kv=True)),
                ("persistent 128x512", dict(k_slice=512)), ("persistent 64x256", dict(tile_rows=64)),
                ("persistent attention 32 keys", dict(attn_keys=32)),
                ("persistent 128x512, attention 32 keys", dict(k_slice=512, attn_keys=32))]
    if rows <= 16:  # default 128x256, 8 warps (was 64x256, 4 warps, until the second H200 sweep)
        out = [("gemm 64x256 w4", dict(tile_rows=64, warps=4))]
    elif rows > fd.ROW_BLOCK:  # several row blocks: fewer K splits write fewer float32 partials
        out = [("gemm 64x256 w8", dict(tile_rows=64, warps=8)), ("gemm 64x512 w8", dict(tile_rows=64, k_slice=512, warps=8))]
    else:  # default 128x256, 8 warps, one row block of 64
        out = [("gemm 64x256 w8", dict(tile_rows=64, warps=8))]
        if rows > 32:  # pi0's 51 rows: ncu counted 255 registers and spills in the o/down programs at 64-row
            # blocks (docs/PERFORMANCE.md); two blocks of 32 in turn hold half the accumulator and activations
            out += [("gemm rows in blocks of 32", dict(block_m=32)),
                    ("gemm rows in blocks of 32, attention 32 rows", dict(block_m=32, attn_rows=32))]
    if fp8:
        return out
    # Attention is ~30% of the 10-row step: fewer programs that each take more of the 80 folded
    # query rows read each K/V tile fewer times (5 times at 16 rows) but hold more registers.
    # Several key blocks a program (online softmax): fewer splits for the last program to merge (9 at
    # pi0.5's 554 keys in 64-key blocks), more serial work each; all slower at 10 rows (seventh
    # session). At pi0's 51 rows (408 folded rows: 26 row blocks x 10 splits = 260 programs, two
    # waves on 132 multiprocessors) 32 or 64 rows, or 2 key blocks, make it one wave.
    return out + [("attention lean K/V", dict(attn_lean_kv=True)), ("attention 32 keys", dict(attn_keys=32)),
                  ("attention 32 rows", dict(attn_rows=32)), ("attention 64 rows", dict(attn_rows=64)),
                  ("attention 64 rows x 32 keys", dict(attn_rows=64, attn_keys=32)),
                  ("attention 32 rows, 2 key blocks", dict(attn_rows=32, attn_blocks=2)),
                  ("attention 2 key blocks a program", dict(attn_blocks=2)), ("attention 3 key blocks a program", dict(attn_blocks=3)),
                  ("attention 5 key blocks a program", dict(attn_blocks=5)),
                  ("attention 3 key blocks, lean K/V", dict(attn_blocks=3, attn_lean_kv=True))]


TILING_FIELDS = {field.name for field in dataclasses.fields(fd.Tiling)}


@torch.no_grad()
def sweep(compiled, fused: fd.FusedDenoiseStep, loop_args: tuple, steps: int, budget_s: float) -> list:
    rows = fused.spec.batch * fused.suffix_len
    results = []
    for label, opts in sweep_candidates(rows, fused.precision == "fp8", fused.persistent):
        if time.time() - T0 > budget_s:
            log(f"  sweep {label}: skipped (time budget)")
            continue
        # options named like a Tiling field are set on plan_tiling's result; the rest are its arguments
        fields = {key: opts.pop(key) for key in list(opts) if key in TILING_FIELDS}
        fields["persistent"] = fused.persistent
        tiling = fd.plan_tiling(rows, fused.dims, **opts)
        fd.TILING_OVERRIDE = fd.Tiling(**{**tiling.__dict__, **fields})
        try:
            ms, spread = timed_loop(compiled, loop_args, steps, rounds=3, iters=10)
            results.append([label, round(ms, 4), round(spread, 4)])
        except Exception as e:  # a tiling the compiler refuses: say so, keep going
            results.append([label, f"{type(e).__name__}: {str(e)[:100]}"])
        finally:
            fd.TILING_OVERRIDE = None
        log(f"  sweep {label}: {results[-1][1:]}")
    return results


def copy_rates_tbs() -> dict:
    """Device copy rates, bytes read + written per second over 2 GB buffers (graphs of 10 copies):
    the copy engine's memcpy node (``copy_``) and an elementwise kernel (``mul(a, 1, out=b)``)."""
    if DEVICE == "cpu":
        return {"memcpy": 0.05, "kernel": 0.05}
    a = torch.randn(2**29, device="cuda")
    b = torch.empty_like(a)
    rates = {}
    for name, fn in (("memcpy", lambda: b.copy_(a)), ("kernel", lambda: torch.mul(a, 1.0, out=b))):
        for _ in range(5):
            fn()
        ms = graph_ms(lambda: [fn() for _ in range(10)], iters=5) / 10
        rates[name] = 2 * a.numel() * 4 / (ms * 1e-3) / 1e12
    return rates


def floor_ms(model, shapes: Shapes, rate: float, weight_bytes_per_value: float) -> float:
    """Weight-read floor of one step: every expert weight once, plus the K/V cache once."""
    layers = model.expert.layers
    values = sum(p.numel() for l in layers for n, p in l.named_parameters() if "proj" in n)
    cfg = model.cfg
    kv = 2 * cfg.expert.depth * (shapes.cameras * cfg.image_tokens + shapes.prompt_len) * cfg.expert.head_dim * 2
    return (values * weight_bytes_per_value + kv) / (rate * 1e12) * 1e3


# ----------------------------------------------------------------------------- main


MODELS: dict = {}  # config -> (bf16 model, shapes, float32 reference model), built once


def run_config(config: str, paths: list[str], args, rate: float, result: dict) -> dict:
    if config not in MODELS:
        model, shapes = expert_model(config, seed=0, batch=args.batch, prompt_len=args.prompt_len)
        MODELS[config] = (model, shapes, copy.deepcopy(model).float())
        log(f"{config}: models ready")
    model, shapes, ref_model = MODELS[config]
    result.setdefault("floor_bf16_ms", floor_ms(model, shapes, rate, 2))
    result.setdefault("floor_fp8_ms", floor_ms(model, shapes, rate, 1))
    result.setdefault("paths", {})
    probe = build_component(model, "denoise", shapes, "bf16")
    x, _, k, v, mask, state = draw_inputs(probe, 0, 0)
    loop_args = (x, k, v, mask, state)
    del probe
    for name in paths:
        if time.time() - T0 > args.budget_s:
            log(f"{config} {name}: skipped (time budget)")
            continue
        torch.compiler.reset()
        t1 = time.time()
        module, info = make_path(name, model, shapes)
        compiled = module if args.no_compile else torch.compile(module)
        entry = {"info": info}
        if args.ncu:  # one step inside the profiler range that `ncu --profile-from-start off` reads; nothing timed
            with torch.no_grad():
                inputs = draw_inputs(module, 7, 0)
                compiled(*inputs)  # compiles and warms up outside the range
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.profiler.start()
                    compiled(*inputs)
                    torch.cuda.synchronize()
                    torch.cuda.profiler.stop()
            log(f"{config} {name}: one step run inside the profiler range")
            result["paths"][name] = {"info": info, "ncu": True}
            continue
        try:
            with torch.no_grad():
                entry["accuracy"] = accuracy(compiled, ref_model, module, shapes.steps)
                entry["ms_per_step"], entry["spread_ms"] = timed_loop(compiled, loop_args, shapes.steps)
                if name.startswith(("fused", "persistent")):
                    a = compiled(*draw_inputs(module, 4, 3))
                    b = compiled(*draw_inputs(module, 4, 3))
                    entry["bitwise_repeat"] = bool(torch.equal(a, b))
                if name.startswith("fused"):
                    fd.USE_PDL = False  # read at each launch: recapturing the same compiled module is enough
                    entry["ms_per_step_no_pdl"], _ = timed_loop(compiled, loop_args, shapes.steps)
                    fd.USE_PDL = True
                    log(f"{config} {name} without PDL: {entry['ms_per_step_no_pdl']:.4f} ms/step")
            entry["build_s"] = round(time.time() - t1, 1)
            log(f"{config} {name}: {entry['ms_per_step']:.4f} ms/step (spread {entry['spread_ms']:.4f}), "
                f"step {entry['accuracy']['step']}, actions {entry['accuracy']['actions_10_steps']}, {entry['build_s']} s")
            if name in FUSED_PATHS or (args.profile_all and name in ("library", "triton")):
                entry["profile"] = profile(compiled, draw_inputs(module, 5, 0))
                log(f"  profile: {entry['profile']['kernels']} kernels, {entry['profile']['kernel_ms']:.3f} ms")
                for row in entry["profile"]["top"]:
                    log(f"    {row}")
            if name in ("fused", "fused-fp8"):
                entry["kernels_us"] = kernel_breakdown(module, draw_inputs(module, 6, 1))
                log(f"  per kernel kind (us per launch, alone): {entry['kernels_us']}")
            if name in args.sweep.split(","):
                entry["sweep"] = sweep(compiled, module, loop_args, shapes.steps, args.budget_s)
        except Exception as e:  # keep the other paths' numbers
            import traceback
            traceback.print_exc()
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
            log(f"{config} {name}: FAILED {entry['error']}")
        fd.USE_PDL = True
        result["paths"][name] = entry
        del module, compiled
    return result


def table(results: dict, rate: float) -> str:
    lines = [f"copy rate {rate:.2f} TB/s (read + write); floors: weights + K/V once at that rate",
             "| config | path | ms/step | no PDL | vs floor | step cosine | step rel err | 10-step actions rel err |",
             "|---|---|---|---|---|---|---|---|"]
    for config, r in results.items():
        for name, e in r["paths"].items():
            if "ms_per_step" not in e:
                lines.append(f"| {config} | {name} | {e.get('error', 'not run')[:60]} | | | | | |")
                continue
            floor = r["floor_fp8_ms"] if "fp8" in name else r["floor_bf16_ms"]
            s, a = e["accuracy"]["step"], e["accuracy"]["actions_10_steps"]
            no_pdl = f"{e['ms_per_step_no_pdl']:.4f}" if "ms_per_step_no_pdl" in e else ""
            lines.append(f"| {config} | {name} | {e['ms_per_step']:.4f} | {no_pdl} | {e['ms_per_step'] / floor:.2f}x | {s['cosine']:.6f} | "
                         f"{s['rel_err']:.2e} | {a['rel_err']:.2e} |")
        lines.append(f"| {config} | floor bf16 / fp8 | {r['floor_bf16_ms']:.4f} / {r['floor_fp8_ms']:.4f} | | | | | |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="pi05:fused,fused-fp8,triton,library pi0:fused,fused-fp8,triton,library",
                        help="space-separated config:paths, run in this order; paths from fused, fused-fp8, persistent, persistent-fp8, triton, library")
    parser.add_argument("--sweep", default="", help="fused paths (fused, fused-fp8, persistent, persistent-fp8) whose tilings to sweep")
    parser.add_argument("--profile-all", action="store_true", help="profile the library and Triton paths too")
    parser.add_argument("--batch", type=int, default=1, help="robots per step (rows = batch x suffix tokens)")
    parser.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (default 200 for pi0.5, 48 for pi0)")
    parser.add_argument("--budget-s", type=float, default=420, help="skip the remaining paths after this many seconds")
    parser.add_argument("--out", default=None, help="folder for bench.json")
    parser.add_argument("--no-compile", action="store_true", help="eager modules (dry runs)")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny configs: check the script, time nothing real")
    parser.add_argument("--ncu", action="store_true", help="only run one step of each path inside a CUDA profiler range, "
                        "for `ncu --profile-from-start off` (gpu_round.sh's ncu phase); times nothing")
    args = parser.parse_args()
    global DEVICE
    runs = [(r.split(":")[0], r.split(":")[1].split(",")) for r in args.runs.split()]
    if args.dry_run:
        DEVICE = "cpu"
        runs = [(config + "_tiny", paths) for config, paths in runs]
    torch.backends.cuda.matmul.allow_tf32 = False
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (dry run)"
    log(f"{name}, torch {torch.__version__}, triton {getattr(fd.triton, '__version__', None)}")
    rates = copy_rates_tbs()
    rate = max(rates.values())
    log(f"copy rates {rates} TB/s; floors use {rate:.2f}")
    results = {}
    for config, paths in runs:
        run_config(config, paths, args, rate, results.setdefault(config, {}))
        if args.out:
            Path(args.out, "bench.json").write_text(json.dumps({"copy_rates_tbs": rates, "results": results}, indent=1))
    if not args.ncu:
        print(table(results, rate))


if __name__ == "__main__":
    main()
