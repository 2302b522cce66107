"""Speed experiments on one denoise step of full-size pi0.5 (random weights), on a GPU.

Three parts, each optional:
- ``--gemms``: the expert's weight GEMMs (18 layers x qkv, o, gate|up, down) at ``--gemm-rows``
  rows, cuBLAS against kernels.py's skinny kernel (up to 64 rows), bf16 and FP8, each as one CUDA
  graph of all 72; with ``--sweep``, the skinny kernel's block sizes too.
- ``--attention``: one layer's few-query attention at ``--batch``, the library path against the
  Triton kernel with its chosen tiles; with ``--sweep``, 108 tilings of the kernel.
- ``--variants``: the whole step compiled with torch.compile, a 10-step loop captured in a CUDA
  graph and timed; the torch profiler's top kernels for the first and the last variant.
Results feed docs/PERFORMANCE.md.

    PYTHONPATH=src python3 scripts/denoise_experiments.py --gemms --attention --variants library,triton,fp8,triton-fp8
    PYTHONPATH=src python3 scripts/denoise_experiments.py --attention --batch 16 --sweep
"""

from __future__ import annotations

import argparse
import time

import torch

from pi_build.engine import build_component
from pi_build.engine.denoise import denoise_loop
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import build_model, get_config
from pi_build.runtime.timing import graph_replay_ms, kernel_profile, kernel_profile_text


def fp8_from_hooks(module: torch.nn.Module, batches: list[tuple], keep: tuple[str, ...]) -> torch.nn.Module:
    """FP8 linears with max-calibrated static scales from one forward (a quick stand-in for ModelOpt)."""
    from fnmatch import fnmatch

    from pi_build.engine.fp8 import apply_fp8

    amax: dict[str, float] = {}
    hooks = []
    for name, layer in module.named_modules():
        if isinstance(layer, torch.nn.Linear) and not any(fnmatch(name, p) for p in keep):
            def hook(m, args, out, name=name):
                amax[name] = max(amax.get(name, 0.0), args[0].detach().abs().max().item())
            hooks.append(layer.register_forward_hook(hook))
    with torch.no_grad():
        for batch in batches:
            module(*batch)
    for h in hooks:
        h.remove()
    scales = {n: {"input_amax": a, "weight_amax": module.get_submodule(n).weight.detach().abs().max().item()} for n, a in amax.items()}
    return apply_fp8(module, scales)


def timed_graph(fn, iters: int = 50) -> float:
    """ms per replay of a CUDA graph of fn() (runtime.timing's graph timer)."""
    return graph_replay_ms(fn, iters=iters, warmup=5)[0]


def graph_time(fn, args, steps: int) -> float:
    """ms per step of a CUDA graph of the whole ``steps``-step denoise loop over the step engine ``fn``."""
    idx = torch.arange(steps, device="cuda")
    return timed_graph(lambda: denoise_loop(fn, *args, steps=idx)) / steps


EXPERT_SHAPES = {"qkv": (2560, 1024), "o": (1024, 2048), "gate_up": (8192, 1024), "down": (1024, 4096)}


def gemm_experiments(rows: list[int], sweep: bool) -> None:
    from pi_build.engine import kernels
    from pi_build.engine.fp8 import quantize_fp8, scaled_mm_fp8_linear

    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for _ in range(18)] for name, (n, k) in EXPERT_SHAPES.items()}
    scale = torch.tensor(0.02 * 4 / 448, device="cuda")
    fp8 = {name: [quantize_fp8(w, scale) for w in ws] for name, ws in weights.items()}
    total_bytes = sum(w.numel() for ws in weights.values() for w in ws) * 2
    print(f"expert GEMM weights: {total_bytes / 1e9:.3f} GB bf16")
    for m in rows:
        xs = {name: torch.randn(m, k, device="cuda", dtype=torch.bfloat16) for name, (n, k) in EXPERT_SHAPES.items()}
        def run(kind):
            def fn():
                for name in EXPERT_SHAPES:
                    for i in range(18):
                        if kind == "cublas":
                            torch.nn.functional.linear(xs[name], weights[name][i])
                        elif kind == "skinny":
                            kernels._launch_skinny(xs[name], weights[name][i])
                        else:
                            scaled_mm_fp8_linear(xs[name], fp8[name][i], scale, scale, None)
            return fn
        kinds = (("cublas", total_bytes), ("skinny", total_bytes), ("scaled_mm", total_bytes / 2))
        for kind, nbytes in kinds if m <= 64 else (kinds[0], kinds[2]):  # the skinny kernel takes up to 64 rows
            ms = timed_graph(run(kind))
            print(f"M={m:<3} {kind:11s} {ms:.3f} ms for 72 GEMMs  ({nbytes / ms / 1e9:.2f} TB/s of weights)", flush=True)
        if sweep and m == 10:
            best = {}
            for kind in ("skinny",):
                for bn in (32, 64, 128):
                    for bk in (64, 128, 256):
                        for warps in (4, 8):
                            for stages in (3,):
                                kernels.SKINNY_BLOCK_N, kernels.SKINNY_BLOCK_K, kernels.SKINNY_WARPS, kernels.SKINNY_STAGES = bn, bk, warps, stages
                                try:
                                    ms = timed_graph(run(kind), iters=20)
                                except Exception as e:  # a config the compiler refuses
                                    print(f"  {kind} {bn}/{bk}/{warps}/{stages}: {type(e).__name__}")
                                    continue
                                best.setdefault(kind, []).append((ms, bn, bk, warps, stages))
                for ms, bn, bk, warps, stages in sorted(best[kind])[:5]:
                    print(f"  sweep {kind}: {ms:.3f} ms  BLOCK_N={bn} BLOCK_K={bk} warps={warps} stages={stages}")
            kernels.SKINNY_BLOCK_N, kernels.SKINNY_BLOCK_K, kernels.SKINNY_WARPS, kernels.SKINNY_STAGES = 64, 128, 4, 3


def attention_experiments(batch: int, prompt_len: int, sweep: bool) -> None:
    """One layer's few-query attention at pi0.5's shapes (10 queries, and pi0's 51 at batch 1), the
    library path against the Triton kernel; 18 layers' distinct caches in one graph, as a step reads
    them (at batch 16 one layer's K/V alone would stay in L2). With ``sweep``, the kernel's tilings."""
    import itertools

    from pi_build.engine import kernels
    from pi_build.engine.layers import folded_query_attention

    keys = 2 * 256 + prompt_len  # two cameras' image tokens and the prompt bucket
    g = torch.Generator(device="cuda").manual_seed(0)
    for t in (10, 51) if batch == 1 else (10,):
        def rand(*shape):
            return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)
        q = rand(batch, t, 8, 256)
        layers = [(rand(batch, keys, 256), rand(batch, keys, 256)) for _ in range(18)]
        kn, vn = rand(batch, t, 256), rand(batch, t, 256)
        mask = torch.rand(batch, t, keys + t, device="cuda", generator=g) > 0.2
        kc, vc = layers[0]
        k_all, v_all = torch.cat([kc, kn], 1).double(), torch.cat([vc, vn], 1).double()
        logits = torch.einsum("bthd,bsd->bths", q.double(), k_all) * 256**-0.5
        ref = torch.einsum("bths,bsd->bthd", logits.masked_fill(~mask[:, :, None, :], float("-inf")).softmax(-1), v_all)
        ref = ref.reshape(batch, t, -1)

        def rel(out):
            return ((out.double() - ref).norm() / ref.norm()).item()

        def library(kc, vc):
            return folded_query_attention(q.transpose(1, 2), torch.cat([kc, kn], 1)[:, None], torch.cat([vc, vn], 1)[:, None], mask)
        lib = torch.compile(library)
        ms_lib = timed_graph(lambda: [lib(kc, vc) for kc, vc in layers]) / 18
        label = f"attention B={batch} T={t} S={keys}"
        print(f"{label}: library {ms_lib * 1e3:.1f} us per layer", flush=True)
        tilings = [kernels.few_query_attention_tiles(batch, t * 8)]
        if sweep:
            # 128-key blocks ran out of shared memory at D = 256 (H200); key blocks in a loop pipeline
            # their loads over the stages
            tilings += [c for c in itertools.product((16, 32), (16, 32, 64), (1, 2, 3, 5, 9), (4, 8), (2, 3))
                        if c != tilings[0] and not (c[2] == 1 and c[4] == 3)]
        found = []
        for tiles in tilings:
            try:
                err = rel(kernels._launch_attention(q, kc, vc, kn, vn, mask, tiles=tiles))
                ms = timed_graph(lambda: [kernels._launch_attention(q, kc, vc, kn, vn, mask, tiles=tiles) for kc, vc in layers], iters=30) / 18
            except Exception as e:  # a tiling the compiler refuses (registers, shared memory)
                print(f"  tiles {tiles}: {type(e).__name__}", flush=True)
                continue
            found.append((ms, tiles, err))
            if tiles == tilings[0]:
                print(f"{label}: triton {ms * 1e3:.1f} us per layer with the chosen tiles {tiles} (rel err vs float64 {err:.1e})", flush=True)
        for ms, tiles, err in sorted(found)[:8] if sweep else ():
            print(f"  sweep {label}: {ms * 1e3:.1f} us  tiles (rows, keys, key blocks, warps, stages) = {tiles}  rel err {err:.1e}", flush=True)


def prefix_experiments() -> None:
    """vision (bf16, fp8) and kvcache (bf16, fp8) of full-size pi0.5: CUDA-graph time and top kernels."""
    cfg = get_config("pi05").replace(action_horizon=10)
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    shapes = Shapes(batch=1, cameras=2, prompt_len=200, horizon=10, steps=10, image_token_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    for component in ("vision", "kvcache"):
        for precision in ("bf16", "fp8"):
            torch.compiler.reset()
            module = build_component(model, component, shapes, "bf16")
            inputs = tuple(t.cuda() for t in module.example_inputs(torch.Generator().manual_seed(0)))
            if component == "kvcache":  # a LIBERO-like prompt: 20 valid tokens of 200
                inputs = inputs[:3] + ((torch.arange(200, device="cuda") < 20)[None],)
            if precision == "fp8":
                module = fp8_from_hooks(module, [inputs], ())
            compiled = torch.compile(module)
            with torch.no_grad():
                ms = timed_graph(lambda: compiled(*inputs))
            print(f"{component} {precision}: {ms:.3f} ms", flush=True)
            profile(compiled, inputs, f"{component} {precision}")
    del model


def prefix_attention_experiments() -> None:
    """One prefix layer's attention (712 tokens, 8 query heads, one KV head, head dim 256), per SDPA form."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from pi_build.engine.components import mqa_attention

    n, valid = 712, 532
    q = torch.randn(1, 8, n, 256, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(1, 1, n, 256, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    keep = (torch.arange(n, device="cuda") < valid)[None]
    mask = keep[:, None, :].expand(1, n, n)
    ref = mqa_attention(q, k, v, mask)
    forms = {
        "folded heads, bool mask (current)": lambda: mqa_attention(q, k, v, mask),
        "8 heads, expanded KV, bool key mask": lambda: F.scaled_dot_product_attention(q, k.expand(1, 8, n, 256), v.expand(1, 8, n, 256), attn_mask=keep[:, None, None, :]),
        "8 heads, enable_gqa, bool key mask": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=keep[:, None, None, :], enable_gqa=True),
        "flash, valid tokens only (no mask)": lambda: F.scaled_dot_product_attention(q[:, :, :valid], k[:, :, :valid].expand(1, 8, valid, 256), v[:, :, :valid].expand(1, 8, valid, 256)),
    }
    for name, fn in forms.items():
        for backend in (None, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
            try:
                with sdpa_kernel(backend) if backend else torch.no_grad():
                    out = fn()
                    ms = timed_graph(fn)
            except Exception as e:
                print(f"  {name} [{backend}]: {type(e).__name__}")
                continue
            out = out.reshape(1, 8, -1, 256).transpose(1, 2).reshape(1, -1, 2048) if out.dim() == 4 else out
            err = ((out[:, :valid].float() - ref[:, :valid].float()).norm() / ref[:, :valid].float().norm()).item()
            print(f"prefix attention, {name} [{backend}]: {ms * 1e3:.1f} us (rel diff {err:.1e})", flush=True)


def profile(compiled, inputs, label: str) -> None:
    print(kernel_profile_text(f"{label}, one step", kernel_profile(lambda: compiled(*inputs), top=30)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--variants", default="", help="comma list of: library, triton, fp8, triton-fp8, autotune, triton-autotune")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--config", default="pi05")
    parser.add_argument("--batch", type=int, default=1, help="robots per step (--variants, --attention)")
    parser.add_argument("--prompt-len", type=int, default=0, help="prompt tokens (--variants: default 200 for pi0.5, 48 for pi0; --attention: 48)")
    parser.add_argument("--gemms", action="store_true")
    parser.add_argument("--gemm-rows", default="10,51", help="comma list of row counts for --gemms (pi0.5 at batch 16: 160)")
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--attention", action="store_true")
    parser.add_argument("--prefix", action="store_true", help="profile the vision and kvcache components too")
    parser.add_argument("--prefix-attention", action="store_true")
    args = parser.parse_args()
    if args.prefix_attention:
        prefix_attention_experiments()
    if args.prefix:
        prefix_experiments()
    if args.gemms:
        gemm_experiments([int(m) for m in args.gemm_rows.split(",")], args.sweep)
    if args.attention:
        attention_experiments(args.batch, args.prompt_len or 48, args.sweep)
    variants = [v for v in args.variants.split(",") if v]
    if not variants:
        return
    t0 = time.time()
    horizon = 10 if args.config == "pi05" else 50
    cfg = get_config(args.config).replace(action_horizon=horizon)
    model = build_model(cfg, dtype=torch.bfloat16, device="cuda", seed=0)
    print(f"model ready in {time.time() - t0:.0f} s")
    prompt_len = args.prompt_len or (200 if args.config == "pi05" else 48)
    shapes = Shapes(batch=args.batch, cameras=2, prompt_len=prompt_len, horizon=horizon, steps=args.steps, kv_dtype=torch.bfloat16)
    base = build_component(model, "denoise", shapes, "bf16")
    x, step, k, v, mask, state = (t.cuda() for t in base.example_inputs(torch.Generator().manual_seed(0)))
    loop_args = (x, k, v, mask, state)
    results, outputs = {}, {}
    for name in variants:
        torch.compiler.reset()
        module = build_component(model, "denoise", shapes, "bf16")
        if name.endswith("fp8"):
            batches = [(x, torch.tensor(i, device="cuda"), k, v, mask, state) for i in range(args.steps)]
            module = fp8_from_hooks(module, batches, ("action_in", "action_out"))
        if name.startswith("triton"):
            print(f"{name}: {module.use_triton_kernels()}")
        options = {"max_autotune": True} if name.endswith("autotune") else {}
        t1 = time.time()
        compiled = torch.compile(module, options=options)
        with torch.no_grad():
            ms = graph_time(compiled, loop_args, args.steps)
            outputs[name] = denoise_loop(compiled, *loop_args, steps=args.steps).float()
        results[name] = ms
        ref = outputs[variants[0]]
        cos = torch.nn.functional.cosine_similarity(outputs[name].flatten(), ref.flatten(), 0).item()
        print(f"{name}: {ms:.3f} ms per step (compile + capture {time.time() - t1:.0f} s); actions cosine vs {variants[0]} {cos:.6f}", flush=True)
        if name in (variants[0], variants[-1]):
            profile(compiled, (x, step, k, v, mask, state), name)
    print({k: round(v, 4) for k, v in results.items()})


if __name__ == "__main__":
    main()
