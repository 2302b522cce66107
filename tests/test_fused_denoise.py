"""fused_denoise.py: each fused kernel against a float64 reference, the whole step against the library path.

The Triton code runs through Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set before
triton is imported, so those checks run in one fresh process: ``interpreted`` below); on a CUDA
machine the same checks run on the GPU. The torch path of the custom op, the module switch and the
refusals are tested in process. Every case draws its inputs from the seed written next to it.
"""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pi_build.engine import fused_denoise as fd
from pi_build.engine.fp8 import quantize_rows
from pi_build.engine import build_component
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import build_model, get_config

SRC = str(Path(__file__).resolve().parents[1] / "src")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), 0).item()


# ----------------------------------------------------------------------------- cases and float64 references


def table_case(g: torch.Generator, steps: int, layers: int, width: int) -> torch.Tensor:
    """A norm table [steps, layers, 3, width]: mult ~ 1 +- 0.3, shift ~ +-0.2, gate ~ N(0, 1)."""
    t = torch.randn(steps, layers, 3, width, generator=g)
    return torch.stack([1 + 0.3 * t[:, :, 0], 0.2 * t[:, :, 1], t[:, :, 2]], dim=2).contiguous()


def weight_case(g: torch.Generator, n: int, k: int, fp8: bool):
    """A weight [n, k] as the kernel reads it (bf16, or FP8 + row scales) and its float64 value."""
    w = torch.randn(n, k, generator=g) * k**-0.5
    if fp8:
        q, scale = quantize_rows(w)
        scale = scale[..., 0]
        return q, scale, q.double() * scale.double()[:, None]
    return w.bfloat16(), None, w.bfloat16().double()


def sumsq_parts(x: torch.Tensor, parts: int) -> torch.Tensor:
    """[parts, M] sums of squares over column chunks of x (what the residual kernels leave)."""
    return torch.stack([c.square().sum(-1) for c in x.chunk(parts, dim=1)]).contiguous()


def rope_reference(y: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, groups_rotated: int) -> torch.Tensor:
    """Rotate-half RoPE on each group (head) of y [M, G*2*half] whose index < groups_rotated."""
    m, half = cos.shape
    y = y.reshape(m, -1, 2 * half)
    lo, hi = y[..., :half], y[..., half:]
    c, s = cos.double()[:, None], sin.double()[:, None]
    out = torch.cat([lo * c - hi * s, hi * c + lo * s], dim=-1)
    keep = torch.arange(y.shape[1]) >= groups_rotated
    out[:, keep] = y[:, keep]
    return out.reshape(m, -1)


def norm_gemm_case(m: int, k: int, heads: int, head_dim: int, mlp: int, gelu: bool, fp8: bool, seed: int):
    """Inputs of one qkv (gelu=False) or gate|up (gelu=True) launch and the float64 truth."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2 + 0.5
    table = table_case(g, steps=3, layers=2, width=k)
    step, layer = torch.tensor(2), 1
    n = 2 * mlp if gelu else (heads + 2) * head_dim
    w, scale, w64 = weight_case(g, n, k, fp8)
    half = mlp if gelu else head_dim // 2
    order = fd.pair_permutation(n, half)
    angles = torch.rand(m, head_dim // 2, generator=g) * 30
    cos, sin = angles.cos(), angles.sin()
    # truth: the bf16 GEMM operand as the contract defines it, then float64
    mult, shift = table[2, 1, 0].double(), table[2, 1, 1].double()
    h = (x.double() * torch.rsqrt(x.double().square().mean(-1, keepdim=True) + fd.EPS) * mult + shift).bfloat16().double()
    y = h @ w64.T
    if gelu:
        truth = torch.nn.functional.gelu(y[:, :mlp], approximate="tanh") * y[:, mlp:]
    else:
        truth = rope_reference(y, cos, sin, heads + 1)
    inputs = dict(x=x, sumsq=sumsq_parts(x, 3), table=table, step=step, layer=layer, weight=w[order].contiguous(),
                  wscale=None if scale is None else scale[order].contiguous(), cos=cos, sin=sin, half=half,
                  rot_groups=0 if gelu else heads + 1, gelu=gelu)
    return inputs, truth


def residual_gemm_case(m: int, n: int, k: int, fp8: bool, in_place: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(m, k, generator=g).bfloat16()
    w, scale, w64 = weight_case(g, n, k, fp8)
    table = table_case(g, steps=3, layers=2, width=n)
    x_in = torch.randn(m, n, generator=g)
    truth = x_in.double() + (a.double() @ w64.T) * table[1, 0, 2].double()
    inputs = dict(a=a, weight=w, wscale=scale, table=table, step=torch.tensor(1), layer=0, x_in=x_in, in_place=in_place)
    return inputs, truth


def attention_case(b: int, t: int, s: int, heads: int, d: int, pi0_flags: bool, seed: int):
    """qkv rows [b*t, (heads+2)*d], a 2-layer cache (layer 1 used, strided views), a prefix mask with
    padding and a stretch no query sees (a split with nothing to read), pi0 or pi0.5 AR flags."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b * t, (heads + 2) * d, generator=g).bfloat16()
    k_all = torch.randn(2, b, 1, s, d, generator=g).bfloat16()
    v_all = torch.randn(2, b, 1, s, d, generator=g).bfloat16()
    prefix_mask = torch.rand(b, s, generator=g) > 0.2
    prefix_mask[:, s // 4: s // 4 + 70] = False
    flags = torch.tensor(([1, 1] if pi0_flags else [1]) + [0] * (t - (2 if pi0_flags else 1)))
    cum = torch.cumsum(flags, 0).to(torch.int32)
    rows = qkv.double().reshape(b, t, heads + 2, d)
    keys = torch.cat([k_all[1, :, 0].double(), rows[:, :, heads]], dim=1)
    values = torch.cat([v_all[1, :, 0].double(), rows[:, :, heads + 1]], dim=1)
    logits = torch.einsum("bthd,bsd->bths", rows[:, :, :heads], keys) / d**0.5
    logits = logits.masked_fill(~fd.suffix_mask(prefix_mask, cum)[:, :, None, :], float("-inf"))
    truth = torch.einsum("bths,bsd->bthd", logits.softmax(-1), values).reshape(b * t, heads * d)
    inputs = dict(qkv=qkv, k_cache=k_all[1, :, 0], v_cache=v_all[1, :, 0], prefix_mask=prefix_mask, suffix_cum=cum, heads=heads)
    return inputs, truth


# ----------------------------------------------------------------------------- running one launch


def workspace(rows: int, cols: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Split-K partials (poisoned) and zeroed counters, sized generously."""
    return torch.full((rows * cols * 64,), float("nan"), device=device), torch.zeros(1024, dtype=torch.int32, device=device)


def block_rows(m: int) -> int:
    return fd.plan_tiling(m, fd.ExpertDims(depth=1, width=64, heads=2, head_dim=32, mlp=64)).block_m


def run_norm_gemm(inputs: dict, tile: "fd.GemmTile", device: str) -> torch.Tensor:
    i = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    m = i["x"].shape[0]
    out_cols = i["weight"].shape[0] // 2 if i["gelu"] else i["weight"].shape[0]
    out = torch.full((m, out_cols), float("nan"), dtype=torch.bfloat16, device=device)  # poisoned: every element must be written
    parts, counters = workspace(m, i["weight"].shape[0], device)
    fd.launch_norm_gemm(i["x"], i["sumsq"], i["table"], i["step"], i["layer"], i["weight"], i["wscale"], i["cos"], i["sin"],
                        out, parts, counters, tile, block_rows(m), 4, i["half"], i["rot_groups"], i["gelu"])
    return out


def run_residual_gemm(inputs: dict, tile: "fd.GemmTile", device: str, warps: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    i = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    m, n = i["x_in"].shape
    x_in = i["x_in"].clone()
    x_out = x_in if i["in_place"] else torch.full_like(x_in, float("nan"))
    sumsq = torch.full((n // tile.rows, m), float("nan"), device=device)
    parts, counters = workspace(m, n, device)
    fd.launch_residual_gemm(i["a"], i["weight"], i["wscale"], i["table"], i["step"], i["layer"], x_in, x_out, sumsq,
                            parts, counters, tile, block_rows(m), warps)
    return x_out, sumsq


def run_attention(inputs: dict, tiling: "fd.Tiling", device: str) -> torch.Tensor:
    i = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    b, s, d = i["k_cache"].shape
    m = i["qkv"].shape[0]
    splits, row_blocks, _ = fd.attention_grid(b, m // b, i["heads"], s + m // b, tiling)
    slots = b * row_blocks * splits * tiling.attn_rows
    acc = torch.full((slots, d), float("nan"), device=device)
    row_max, row_sum = torch.full((slots,), float("nan"), device=device), torch.full((slots,), float("nan"), device=device)
    out = torch.full((m, i["heads"] * d), float("nan"), dtype=torch.bfloat16, device=device)
    fd.launch_attention(i["qkv"], i["k_cache"], i["v_cache"], i["prefix_mask"], i["suffix_cum"], i["heads"], out,
                        acc, row_max, row_sum, torch.zeros(b * row_blocks, dtype=torch.int32, device=device), tiling)
    return out


def tiny_step(config: str, precision: str = "bf16", batch: int = 1):
    """The library's bf16 and fp32 denoise components of a tiny model, the fused step, inputs (seed 3)."""
    cfg = get_config(config)
    model = build_model(cfg, dtype=torch.float32, device="cpu", seed=0)
    shapes = Shapes(batch=batch, cameras=1, prompt_len=16, horizon=cfg.action_horizon if batch == 1 else 10, steps=3)
    library = build_component(model, "denoise", shapes, "bf16")
    reference = build_component(model, "denoise", shapes, "fp32")
    fused, info = fd.use_fused_denoise(library, precision)
    inputs = library.example_inputs(torch.Generator().manual_seed(3))
    inputs = tuple(t.bfloat16() if t.is_floating_point() and t.dim() == 5 else t for t in inputs)
    return library, reference, fused, info, inputs


def step_metrics(config: str, precision: str, batch: int = 1, device: str = "cpu") -> dict:
    """The fused step (five kernels a layer) against the library and the float32 reference, and the
    persistent schedule against it: [bitwise equal, rel err] (same work items, same arithmetic, same
    split order, so the outputs must be identical)."""
    library, reference, fused, _, inputs = (m.to(device) if isinstance(m, torch.nn.Module) else m for m in tiny_step(config, precision, batch))
    inputs = tuple(t.to(device) for t in inputs)
    with torch.no_grad():
        got = fused(*inputs)
        lib = library(*inputs)
        ref = reference(*(t.float() if t.is_floating_point() else t for t in inputs))
        fused.persistent = True
        one_grid = fused(*inputs)
    got, lib, ref, one_grid = (t.cpu() for t in (got, lib, ref, one_grid))
    return {"vs_library": [cosine(got, lib), rel_err(got, lib)], "vs_fp32": [cosine(got, ref), rel_err(got, ref)],
            "library_vs_fp32": [cosine(lib, ref), rel_err(lib, ref)], "finite": bool(torch.isfinite(got).all()),
            "persistent": [bool(torch.equal(one_grid, got)), rel_err(one_grid, got)]}


# The kernels' cases: (name, kind, kwargs, tiling (+ warps)). Odd row counts; splits of 1, 3, 4 and 6;
# key splits of 5 and 7, two batches; FP8 weights; residual in place and out of place; more rows
# than one 64-row block (2 and 3 blocks, the last one partial).
KERNEL_CASES = [
    ("qkv m10 split3", "norm", dict(m=10, k=96, heads=3, head_dim=32, mlp=0, gelu=False, fp8=False, seed=11), (32, 32)),
    ("qkv m3 split1", "norm", dict(m=3, k=64, heads=3, head_dim=32, mlp=0, gelu=False, fp8=False, seed=12), (16, 64)),
    ("qkv m51 fp8 split3", "norm", dict(m=51, k=96, heads=2, head_dim=32, mlp=0, gelu=False, fp8=True, seed=13), (32, 32)),
    ("gate_up m10 split3", "norm", dict(m=10, k=96, heads=0, head_dim=32, mlp=48, gelu=True, fp8=False, seed=14), (32, 32)),
    ("gate_up m51 fp8", "norm", dict(m=51, k=64, heads=0, head_dim=32, mlp=48, gelu=True, fp8=True, seed=15), (32, 64)),
    ("residual m10 split6", "residual", dict(m=10, n=64, k=96, fp8=False, in_place=False, seed=16), (32, 16, 1)),
    ("residual m51 in place", "residual", dict(m=51, n=64, k=64, fp8=False, in_place=True, seed=17), (32, 64)),
    ("residual m7 fp8 split4", "residual", dict(m=7, n=32, k=64, fp8=True, in_place=True, seed=18), (16, 16)),
    ("qkv m150 3 row blocks split3", "norm", dict(m=150, k=96, heads=2, head_dim=32, mlp=0, gelu=False, fp8=False, seed=21), (32, 32)),
    ("gate_up m100 fp8 2 row blocks", "norm", dict(m=100, k=64, heads=0, head_dim=32, mlp=48, gelu=True, fp8=True, seed=22), (32, 64)),
    ("residual m130 3 row blocks split4", "residual", dict(m=130, n=64, k=64, fp8=False, in_place=True, seed=23), (32, 16)),
    ("residual m70 2 row blocks", "residual", dict(m=70, n=32, k=64, fp8=False, in_place=False, seed=24), (16, 64)),
    ("attention b1 pi0.5", "attention", dict(b=1, t=10, s=150, heads=4, d=32, pi0_flags=False, seed=19), (32, 16, 1)),
    ("attention b1 all rows in one block", "attention", dict(b=1, t=10, s=150, heads=4, d=32, pi0_flags=False, seed=25), (32, 64, 8)),
    ("attention b2 pi0", "attention", dict(b=2, t=11, s=90, heads=2, d=16, pi0_flags=True, seed=20), (16, 16, 8)),
    # own keys loaded into the cached K/V tile (attn_lean_kv): a block with both, blocks of each alone
    ("attention b1 pi0.5 lean K/V", "attention", dict(b=1, t=10, s=150, heads=4, d=32, pi0_flags=False, seed=26), (32, 16, 8, True)),
    ("attention b2 pi0 lean K/V", "attention", dict(b=2, t=11, s=90, heads=2, d=16, pi0_flags=True, seed=27), (16, 16, 8, True)),
    # several key blocks a program (attn_blocks, online softmax): 160 keys in 32-key blocks, 3 a
    # program (2 splits, the last block past the keys), all 5 in one program (nothing to merge);
    # 101 keys in 16-key blocks, 2 a program, with lean K/V
    ("attention b1 pi0.5 3 key blocks", "attention", dict(b=1, t=10, s=150, heads=4, d=32, pi0_flags=False, seed=28), (32, 16, 8, False, 3)),
    ("attention b1 pi0.5 one split", "attention", dict(b=1, t=10, s=150, heads=4, d=32, pi0_flags=False, seed=29), (32, 16, 8, False, 5)),
    ("attention b2 pi0 2 key blocks lean K/V", "attention", dict(b=2, t=11, s=90, heads=2, d=16, pi0_flags=True, seed=30), (16, 16, 8, True, 2)),
]


def kernel_results(device: str) -> dict:
    """Each kernel case: [relative error vs float64, all outputs written (no NaN poison left)]."""
    out = {}
    for name, kind, kwargs, (a, b, *warps) in KERNEL_CASES:
        if kind == "norm":
            inputs, truth = norm_gemm_case(**kwargs)
            got = run_norm_gemm(inputs, fd.GemmTile(a, b), device).cpu()
            out[name] = [rel_err(got, truth), bool(torch.isfinite(got).all())]
        elif kind == "residual":
            inputs, truth = residual_gemm_case(**kwargs)
            x, sumsq = (t.cpu() for t in run_residual_gemm(inputs, fd.GemmTile(a, b), device, *warps))
            parts = truth.reshape(truth.shape[0], -1, a).square().sum(-1).T
            out[name] = [max(rel_err(x, truth), rel_err(sumsq, parts)), bool(torch.isfinite(x).all() and torch.isfinite(sumsq).all())]
        else:
            inputs, truth = attention_case(**kwargs)
            warps, lean, blocks = (*warps, *(8, False, 1)[len(warps):])  # attention warps, lean K/V, key blocks
            tiling = fd.Tiling(16, *[fd.GemmTile(16, 16)] * 4, attn_keys=a, attn_rows=b, attn_warps=warps,
                               attn_lean_kv=lean, attn_blocks=blocks)
            got = run_attention(inputs, tiling, device).cpu()
            out[name] = [rel_err(got, truth), bool(torch.isfinite(got).all())]
    return out


CHECKS = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_fused_denoise import INTERPRETED_STEPS, kernel_results, step_metrics
    out = {{"kernels": kernel_results({device!r})}}
    # the whole tiny steps (on the CPU through the interpreter)
    out["steps"] = {{f"{{c}} {{p}} {{b}}": step_metrics(c, p, b, {device!r}) for c, p, b in INTERPRETED_STEPS}}
    print(json.dumps(out))
""")


def run_checks(device: str) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")])), "TRITON_INTERPRET": "1" if device == "cpu" else "0"}
    proc = subprocess.run([sys.executable, "-c", CHECKS.format(tests=str(Path(__file__).parent), device=device)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def interpreted():
    pytest.importorskip("triton")
    return run_checks("cpu")


def check_kernels(results: dict) -> None:
    assert set(results) == {name for name, *_ in KERNEL_CASES}
    for name, (err, written) in results.items():
        assert written, f"{name}: outputs left unwritten (NaN poison) or not finite"
        # the reference rounds the GEMM operands to bf16 as the contract does; what is left is the
        # output's own bf16 rounding, 1.6e-3 to 1.9e-3 in these cases
        assert err < 4e-3, (name, err)


# ----------------------------------------------------------------------------- the Triton code (interpreter)


def test_kernels_in_the_interpreter(interpreted):
    check_kernels(interpreted["kernels"])


# each model, each precision (~7 s each), and a batch of 8 robots: 80 rows, two row blocks
INTERPRETED_STEPS = [("pi05_tiny", "bf16", 1), ("pi0_tiny", "fp8", 1), ("pi05_tiny", "bf16", 8)]


def check_step(m: dict, precision: str) -> None:
    assert m["finite"]
    cos_lib, err_lib = m["vs_library"]
    cos_ref, err_ref = m["vs_fp32"]
    if precision == "bf16":  # the float32 residual keeps the fused step nearer the reference than the library
        assert cos_lib > 0.9999 and err_lib < 1e-2, m
        assert err_ref < 1e-2 and err_ref <= 1.5 * m["library_vs_fp32"][1], m
    else:  # FP8 weights: e4m3 has 3 mantissa bits
        assert cos_ref > 0.999 and err_ref < 5e-2, m


@pytest.mark.parametrize("config, precision, batch", INTERPRETED_STEPS)
def test_whole_step_in_the_interpreter(interpreted, config, precision, batch):
    m = interpreted["steps"][f"{config} {precision} {batch}"]
    print(config, precision, batch, m)
    check_step(m, precision)


@pytest.mark.parametrize("config, precision, batch", INTERPRETED_STEPS)
def test_persistent_schedule_matches_the_five_kernels(interpreted, config, precision, batch):
    """The interpreter runs the persistent kernel one phase per launch (its programs run one after
    another, so a grid barrier would wait forever); each program still takes several work items."""
    equal, err = interpreted["steps"][f"{config} {precision} {batch}"]["persistent"]
    assert equal, (config, precision, batch, err)


@cuda
def test_kernels_on_the_gpu():
    """On a GPU the persistent schedule runs as one grid with its barriers."""
    results = run_checks("cuda")
    check_kernels(results["kernels"])
    assert all(m["persistent"][0] for m in results["steps"].values()), results["steps"]


# ----------------------------------------------------------------------------- the torch path, in process


def test_torch_path_of_each_stage_matches_float64():
    """The CPU op's stages are the kernels' arithmetic (same cases, no interpreter)."""
    for name, kind, kwargs, _ in KERNEL_CASES:
        if kind == "norm":
            inputs, truth = norm_gemm_case(**kwargs)
            i = inputs
            acc = fd._weight_product(fd._norm_rows(i["x"], i["sumsq"].sum(0), i["table"][2, 1]), i["weight"], i["wscale"])
            got = fd._gelu_pairs(acc, i["half"]) if i["gelu"] else fd._rope_pairs(acc, i["cos"], i["sin"], i["rot_groups"])
        elif kind == "attention":
            inputs, truth = attention_case(**kwargs)
            got = fd._attention_torch(**inputs)
        else:
            continue
        assert rel_err(got, truth) < 1e-2, name


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
@pytest.mark.parametrize("config", ["pi05_tiny", "pi0_tiny"])
def test_torch_path_step_matches_library_and_reference(config, precision):
    m = step_metrics(config, precision)
    print(config, precision, m)
    check_step(m, precision)
    if precision == "bf16":
        assert m["vs_fp32"][1] < m["library_vs_fp32"][1], m  # float32 residual: nearer the reference


def test_the_step_index_selects_the_tables():
    _, _, fused, _, inputs = tiny_step("pi05_tiny")
    x, step, *rest = inputs
    with torch.no_grad():
        a, b = fused(x, torch.tensor(0), *rest), fused(x, torch.tensor(2), *rest)
    assert rel_err(a, b) > 1e-3


def test_pair_permutation_puts_partners_side_by_side():
    order = fd.pair_permutation(2 * 3 * 8, 4)  # 6 heads of 8 rows: partners c and c + 4
    assert sorted(order.tolist()) == list(range(48))
    assert (order[1::2] - order[0::2] == 4).all()
    assert order[:8].tolist() == [0, 4, 1, 5, 2, 6, 3, 7] and order[8:10].tolist() == [8, 12]
    gate_up = fd.pair_permutation(2 * 6, 6)  # gate row c with up row 6 + c
    assert gate_up.tolist() == [0, 6, 1, 7, 2, 8, 3, 9, 4, 10, 5, 11]


def test_full_size_tiling():
    """128-row x 256-K tiles at 8 warps: pi0.5 (10 rows) in one 16-row MMA block, pi0 (51 rows) in one of
    64, pi0.5 at batch 16 (160 rows) in row blocks of 64."""
    dims = fd.ExpertDims(depth=18, width=1024, heads=8, head_dim=256, mlp=4096)
    for rows, block_m, tile_rows, warps in ((10, 16, 128, 8), (51, 64, 128, 8), (160, 64, 128, 8)):
        t = fd.plan_tiling(rows, dims)
        assert (t.block_m, t.gemm_warps) == (block_m, warps)
        assert all((g.rows, g.k_slice) == (tile_rows, 256) for g in (t.qkv, t.o, t.gate_up, t.down))
    assert fd.attention_grid(1, 10, 8, 722, t) == (12, 5, 1)
    assert fd.attention_grid(1, 10, 8, 554, fd.Tiling(**{**t.__dict__, "attn_blocks": 3})) == (3, 5, 1)  # 9 blocks of 64 keys


def test_fp8_rows_keep_their_scale():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(5)) * torch.logspace(-3, 1, 64)[:, None]
    q, scale = quantize_rows(w)
    scale = scale[..., 0]
    assert q.dtype == torch.float8_e4m3fn and scale.shape == (64,)
    back = q.float() * scale[:, None]
    assert ((back - w).norm(dim=1) / w.norm(dim=1)).max() < 0.04  # every row, small or large


def test_export_keeps_the_op_as_one_node():
    _, _, fused, _, inputs = tiny_step("pi05_tiny")
    program = torch.export.export(fused, inputs)
    targets = [str(n.target) for n in program.graph.nodes if n.op == "call_function"]
    assert targets.count("pi_build.fused_expert_layers.default") == 1, targets
    with torch.no_grad():
        assert rel_err(program.module()(*inputs), fused(*inputs)) < 1e-6


# ----------------------------------------------------------------------------- refusals


def test_refuses_what_it_cannot_compute():
    cfg = get_config("pi0_tiny")
    model = build_model(cfg, dtype=torch.float32, device="cpu", seed=0)
    big = build_component(model, "denoise", Shapes(batch=6, cameras=2, prompt_len=16, horizon=50, steps=3), "bf16")
    with pytest.raises(ValueError, match="at most 256 suffix rows"):
        fd.use_fused_denoise(big)  # 6 x 51 rows
    fp32 = build_component(model, "denoise", Shapes(cameras=2, prompt_len=16, horizon=50, steps=3), "fp32")
    with pytest.raises(TypeError, match="bf16 denoise component"):
        fd.use_fused_denoise(fp32)
    with pytest.raises(ValueError, match="precision"):
        fd.use_fused_denoise(big, "int8")
    gqa = cfg.replace(expert=dataclasses.replace(cfg.expert, num_kv_heads=2))
    with pytest.raises(ValueError, match="one KV head"):
        fd.use_fused_denoise(build_component(build_model(gqa, seed=0), "denoise", Shapes(cameras=2, prompt_len=16, horizon=50, steps=3), "bf16"))
    with pytest.raises(ValueError, match="no power-of-two block"):
        fd.plan_tiling(10, fd.ExpertDims(depth=1, width=40, heads=2, head_dim=16, mlp=64))


def test_op_refuses_bad_inputs():
    _, _, fused, _, inputs = tiny_step("pi05_tiny")
    x, step, k, v, mask, state = inputs
    with pytest.raises(TypeError, match="bf16 K/V cache"):
        fd.check_layer_inputs(torch.zeros(10, 32), k.float(), fused.w_qkv, 2)
    with pytest.raises(TypeError, match="float32"):
        fd.check_layer_inputs(torch.zeros(10, 32).bfloat16(), k, fused.w_qkv, 2)
    with pytest.raises(ValueError, match="one KV head"):
        fd.check_layer_inputs(torch.zeros(10, 32), k.expand(-1, -1, 2, -1, -1), fused.w_qkv, 2)


def test_a_gpu_engine_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(fd, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        fd._uses_triton(torch.device("cuda"))
