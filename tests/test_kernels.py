"""kernels.py: the denoise step's Triton kernels against float64 references.

The Triton code itself runs through Triton's interpreter on the CPU (TRITON_INTERPRET=1 must be set
before triton is imported, so those checks run in a fresh process: ``interpreted_checks`` below);
on a CUDA machine the same checks run on the GPU. The CPU fallbacks of the custom ops, the switch
in the denoise component and the engine's runner choice are tested in process.
"""

import dataclasses
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pi_build.engine import kernels
from pi_build.engine import build_component
from pi_build.engine.layers import Shapes, rope_tables
from pi_build.model.pi0 import build_model, get_config

pytest.importorskip("triton")
SRC = str(Path(__file__).resolve().parents[1] / "src")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def attention_case(t: int, s: int, hq: int, d: int, seed: int, device: str = "cpu", b: int = 1):
    """Random q/k/v and a mask like the denoise step's: prefix keys with padding, a causal suffix,
    and a stretch of keys that no query attends to (a split with nothing to read)."""
    g = torch.Generator().manual_seed(seed)
    q, kc, vc = torch.randn(b, t, hq, d, generator=g), torch.randn(b, s, d, generator=g), torch.randn(b, s, d, generator=g)
    kn, vn = torch.randn(b, t, d, generator=g), torch.randn(b, t, d, generator=g)
    mask = torch.rand(b, t, s + t, generator=g) > 0.3
    mask[..., s // 3: s // 3 + 70] = False
    mask[..., s:] = torch.tril(torch.ones(t, t, dtype=torch.bool))
    return tuple(x.to(device) for x in (q.bfloat16(), kc.bfloat16(), vc.bfloat16(), kn.bfloat16(), vn.bfloat16(), mask))


def attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, k_new: torch.Tensor,
                        v_new: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Plain float64 attention over the keys [cache; new], the tests' truth: [B, T, HQ*D]."""
    b, t, hq, d = q.shape
    keys = torch.cat([k_cache, k_new], dim=1).double()
    values = torch.cat([v_cache, v_new], dim=1).double()
    logits = torch.einsum("bthd,bsd->bths", q.double(), keys) / math.sqrt(d)
    logits = logits.masked_fill(~mask[:, :, None, :], float("-inf"))
    return torch.einsum("bths,bsd->bthd", logits.softmax(-1), values).reshape(b, t, hq * d)


def prefix_attention_case(b: int, t: int, hq: int, d: int, seed: int, device: str = "cpu"):
    """Random inputs shaped like the prefix pass's: q a strided view of a wider q/k/v tensor (as the
    GEMM writes it), RoPE tables of real positions, one KV head, and a key mask with a masked
    camera's block of keys in one batch row and prompt padding at the end of every row."""
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(b, t, (hq + 2) * d, generator=g).bfloat16()
    q = qkv[..., : hq * d].unflatten(-1, (hq, d))
    key_mask = torch.ones(b, t, dtype=torch.bool)
    key_mask[0, t // 4: t // 2] = False
    padding = torch.randint(1, t // 4 + 1, (b, 1), generator=g)  # prompt padding: the last 1 to t/4 keys
    key_mask[torch.arange(t) >= t - padding] = False
    cos, sin = rope_tables(torch.cumsum(key_mask.long(), 1) - 1, d, torch.bfloat16)
    k, v = torch.randn(b, t, d, generator=g).bfloat16(), torch.randn(b, t, d, generator=g).bfloat16()
    return tuple(x.to(device) for x in (q, k, v, cos[:, 0], sin[:, 0], key_mask))


def prefix_attention_reference(q, k, v, cos, sin, key_mask) -> torch.Tensor:
    """The model's RoPE and attention in float64, the tests' truth: [B, T, HQ*D]."""
    b, t, hq, d = q.shape
    half = d // 2
    x, c, s = q.double().transpose(1, 2), cos.double()[:, None], sin.double()[:, None]
    roped = x * c + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * s
    logits = roped @ k.double()[:, None].transpose(-1, -2) / math.sqrt(d)
    probs = logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
    return (probs @ v.double()[:, None]).transpose(1, 2).reshape(b, t, hq * d)


def skinny_case(m: int, n: int, k: int, seed: int, device: str = "cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).bfloat16().to(device)
    w = (torch.randn(n, k, generator=g) * k**-0.5).bfloat16().to(device)
    return x, w


# ----------------------------------------------------------------------------- pure functions


def fp8_gate_up_case(m: int, mlp: int, k: int, seed: int, device: str = "cpu"):
    """The prefix MLP's first half: an FP8 input and gate|up weight (per-tensor scales, as calibrated),
    the weight's rows in pair order for the op, and the float64 truth of gelu_tanh(gate) * up."""
    from pi_build.engine.fp8 import FP8_MAX, quantize_fp8

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, k, generator=g) * 2
    w = torch.randn(2 * mlp, k, generator=g) * k**-0.5
    in_scale, w_scale = h.abs().max() / FP8_MAX, w.abs().max() / FP8_MAX
    x, w8 = quantize_fp8(h, in_scale), quantize_fp8(w, w_scale)
    acc = (x.double() @ w8.double().T) * (in_scale.double() * w_scale.double())
    gate, up = acc[:, :mlp], acc[:, mlp:]
    truth = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
    out_scale = truth.abs().max().float() / FP8_MAX
    pairs = w8[kernels.pair_permutation(2 * mlp, mlp)].contiguous()
    args = (x, pairs, (in_scale * w_scale).float(), out_scale)
    return tuple(t.to(device) for t in args), truth


def tiny_fp8_kvcache(config: str, fused_mlp: bool):
    """A tiny prefix with every linear in tensor-scaled FP8, calibrated on one draw of its example
    inputs (fp8.calibrate, as a build does), its MLPs as ``kernels.Fp8GeluMlp`` where asked."""
    from pi_build.engine.fp8 import apply_fp8, calibrate

    model = build_model(get_config(config), dtype=torch.float32, device="cpu", seed=0)
    module = build_component(model, "kvcache", Shapes(cameras=2, prompt_len=16), "fp8")
    inputs = module.example_inputs(torch.Generator().manual_seed(1))
    apply_fp8(module, calibrate(module, lambda m: m(*inputs), keep_high_precision=[]))
    if fused_mlp:
        layers = len(module.layers) - 1  # the last layer computes its K/V only: no MLP
        assert module.use_triton_mlp() == {"mlp": "triton", "fused_mlps": layers}
    return module


def test_skinny_split_fills_the_chip_and_bounds_the_partials():
    # the pi0.5 expert at 10 rows: K slices of 256, partials under an eighth of the weight bytes
    for n, k in [(2560, 1024), (1024, 2048), (8192, 1024), (1024, 4096)]:
        split = kernels.skinny_split(10, n, k)
        assert split == k // 256
        assert split * 10 * n * 4 <= n * k * 2 / 8
    assert kernels.skinny_split(51, 8192, 1024) == 1  # pi0's 51 rows: partials would outweigh the weights
    assert kernels.skinny_split(1, 64, 32) == 1
    assert kernels.skinny_supported(51, 1024, 4096) and not kernels.skinny_supported(65, 1024, 4096)
    assert not kernels.skinny_supported(10, 1000, 4096)


# ----------------------------------------------------------------------------- CPU fallbacks of the custom ops


def test_cpu_ops_match_float64():
    x, w = skinny_case(10, 128, 512, seed=0)
    parts = kernels.skinny_mm_partials(x, w)
    assert parts.shape == (kernels.skinny_split(10, 128, 512), 10, 128)
    assert rel_err(parts.sum(0), x.double() @ w.double().T) < 1e-6
    case = attention_case(10, 150, 4, 64, seed=1)
    out = kernels.few_query_attention(*case)
    assert out.shape == (1, 10, 4 * 64) and out.dtype == torch.bfloat16
    assert rel_err(out, attention_reference(*case)) < 1e-2
    case = prefix_attention_case(2, 40, 4, 64, seed=2)
    out = kernels.prefix_attention(*case)
    assert out.shape == (2, 40, 4 * 64) and out.dtype == torch.bfloat16
    assert rel_err(out, prefix_attention_reference(*case)) < 1e-2


def test_fp8_gelu_gate_up_cpu_op_matches_float64():
    (x, pairs, scale, out_scale), truth = fp8_gate_up_case(40, 48, 64, seed=1)
    got = kernels.fp8_gelu_gate_up(x, pairs, scale, out_scale)
    assert got.dtype == torch.float8_e4m3fn and got.shape == (40, 48)
    err = rel_err(got.float() * out_scale, truth)
    assert 0 < err < 0.04, err  # the output's own FP8 rounding (3 mantissa bits: ~2-3% relative)


def test_fp8_mlp_kernel_in_the_prefix_matches_the_library_path():
    """The whole tiny FP8 prefix with its MLPs as Fp8GeluMlp (the op's torch path on the CPU) against
    the same FP8 layers run as separate GEMMs and elementwise ops."""
    plain, fast = tiny_fp8_kvcache("pi05_tiny", False), tiny_fp8_kvcache("pi05_tiny", True)
    assert all(not hasattr(block, "gate_up") for block in fast.layers)  # the fused modules hold the weights
    h = torch.randn(40, plain.cfg.llm.width, generator=torch.Generator().manual_seed(7)).bfloat16()
    with torch.no_grad():
        for mine, library in zip(fast.layers[:-1], plain.layers[:-1]):
            # the same FP8 GEMMs; only the library path's bf16 rounding of gate and up differs
            assert 0 < rel_err(mine.mlp(h), library.mlp(h)) < 3e-2
        inputs = plain.example_inputs(torch.Generator().manual_seed(6))
        got, want = fast(*inputs), plain(*inputs)
    for a, b in zip(got[:2], want[:2]):  # K and V of every layer (here the MLP's part of the residual
        assert rel_err(a, b) < 1e-2     # stream is below bf16's resolution, so they match or nearly)
    assert torch.equal(got[2], want[2])


def test_fp8_mlp_kernel_exports_as_one_graph_node():
    """torch.export keeps the op whole (its fake implementation gives the shape), one per fused MLP."""
    from pi_build.backends.inductor import export_program

    module = tiny_fp8_kvcache("pi05_tiny", True)
    program = export_program(module, module.example_inputs(torch.Generator().manual_seed(0)))
    calls = [n for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("pi_build.fp8_gelu_gate_up")]
    assert len(calls) == len(module.layers) - 1


def test_fp8_mlp_kernel_takes_only_tensor_scaled_fp8_layers():
    model = build_model(get_config("pi05_tiny"), dtype=torch.float32, device="cpu", seed=0)
    bf16 = build_component(model, "kvcache", Shapes(cameras=2, prompt_len=16), "bf16")
    assert bf16.use_triton_mlp() == {"mlp": "library", "fused_mlps": 0}
    fp8 = tiny_fp8_kvcache("pi05_tiny", False)
    from pi_build.engine.fp8 import Fp8Linear

    block = fp8.layers[0]
    rowwise = Fp8Linear.rowwise(torch.nn.Linear(64, 256, bias=False))
    assert not kernels.Fp8GeluMlp.fits(rowwise, block.down) and kernels.Fp8GeluMlp.fits(block.gate_up, block.down)
    with pytest.raises(TypeError, match="tensor-scaled"):
        kernels.Fp8GeluMlp(rowwise, block.down)
    with pytest.raises(ValueError, match="tensor-scaled"):
        rowwise.forward_quantized(torch.zeros(2, 64, dtype=torch.float8_e4m3fn), torch.bfloat16)


def test_ops_refuse_what_they_cannot_compute():
    x, w = skinny_case(10, 64, 64, seed=0)
    with pytest.raises(TypeError, match="bf16"):
        kernels.skinny_mm_partials(x.float(), w)
    with pytest.raises(ValueError, match="contiguous last dimension"):
        kernels.skinny_mm_partials(x, w.t().contiguous().t())
    with pytest.raises(TypeError, match="bf16 nn.Linear"):
        kernels.SkinnyLinear(torch.nn.Linear(64, 64))  # float32
    q, k, v, cos, sin, key_mask = prefix_attention_case(1, 8, 2, 48, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        kernels.prefix_attention(q, k, v, cos, sin, key_mask)
    (x8, pairs, scale, out_scale), _ = fp8_gate_up_case(8, 48, 64, seed=0)
    with pytest.raises(TypeError, match="float8_e4m3fn"):
        kernels.fp8_gelu_gate_up(x8.float(), pairs, scale, out_scale)
    with pytest.raises(ValueError, match="multiples of 32"):
        kernels.fp8_gelu_gate_up(x8[:, :48].contiguous(), pairs[:, :48].contiguous(), scale, out_scale)


def test_a_gpu_engine_without_triton_says_what_is_missing(monkeypatch):
    monkeypatch.setattr(kernels, "triton", None)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        kernels._use_triton("few_query_attention", torch.device("cuda"))
    assert not kernels.triton_available(torch.device("cuda"))


def test_skinny_linear_keeps_the_bias_and_leading_dims():
    layer = torch.nn.Linear(128, 64).bfloat16()
    x = torch.randn(2, 5, 128).bfloat16()
    out = kernels.SkinnyLinear(layer)(x)
    assert out.shape == (2, 5, 64) and out.dtype == torch.bfloat16
    assert rel_err(out, layer(x)) < 1e-2


def tiny_denoise(config: str, triton_kernels: bool):
    cfg = get_config(config)
    model = build_model(cfg, dtype=torch.float32, device="cpu", seed=0)
    module = build_component(model, "denoise", Shapes(cameras=2, prompt_len=16, horizon=cfg.action_horizon, steps=3), "bf16")
    switched = module.use_triton_kernels() if triton_kernels else None
    return module, switched


def tiny_kvcache(config: str, triton_attention: bool):
    model = build_model(get_config(config), dtype=torch.float32, device="cpu", seed=0)
    module = build_component(model, "kvcache", Shapes(cameras=2, prompt_len=16), "bf16")
    if triton_attention:
        assert module.use_triton_attention() == {"attention": "triton"}
    return module


def test_kvcache_keeps_library_attention_where_the_kernel_does_not_fit():
    cfg = get_config("pi05_tiny")
    model = build_model(cfg, dtype=torch.float32, device="cpu", seed=0)
    module = build_component(model, "kvcache", Shapes(cameras=2, prompt_len=16), "fp32")
    assert module.use_triton_attention() == {"attention": "library"} and not module.triton_attention  # float32
    odd = cfg.replace(llm=dataclasses.replace(cfg.llm, head_dim=24))
    module = build_component(build_model(odd, dtype=torch.float32, device="cpu", seed=0), "kvcache", Shapes(cameras=2, prompt_len=16), "bf16")
    assert module.use_triton_attention() == {"attention": "library"}  # a head dimension of 24


def test_kvcache_with_the_kernel_matches_sdpa():
    plain, fast = tiny_kvcache("pi05_tiny", False), tiny_kvcache("pi05_tiny", True)
    inputs = plain.example_inputs(torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want = fast(*inputs), plain(*inputs)
    for a, b in zip(got[:2], want[:2]):  # K and V of every layer (the torch fallback of the op on the CPU)
        assert rel_err(a, b) < 2e-2
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("config", ["pi05_tiny", "pi0_tiny"])
def test_denoise_with_kernels_matches_the_library_path(config):
    plain, _ = tiny_denoise(config, False)
    fast, switched = tiny_denoise(config, True)
    assert switched == {"skinny_linears": 8, "of_linears": 8, "attention": "triton"}
    inputs = plain.example_inputs(torch.Generator().manual_seed(3))
    inputs = tuple(t.bfloat16() if t.is_floating_point() and t.dim() == 5 else t for t in inputs)
    with torch.no_grad():
        a, b = plain(*inputs), fast(*inputs)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), 0) > 0.9999
    assert rel_err(b, a) < 1e-2


def test_float32_denoise_keeps_library_attention():
    cfg = get_config("pi05_tiny")
    model = build_model(cfg, dtype=torch.float32, device="cpu", seed=0)
    module = build_component(model, "denoise", Shapes(cameras=2, prompt_len=16, horizon=10, steps=3), "fp32")
    assert module.use_triton_kernels() == {"skinny_linears": 0, "of_linears": 8, "attention": "library"}


@pytest.mark.slow
def test_engine_with_kernels_is_not_an_aoti_package(tmp_path, monkeypatch):
    """Even where AOTInductor works, an engine calling the Python custom ops loads through torch.compile."""
    from pi_build import backends
    from pi_build.backends import inductor

    module, _ = tiny_denoise("pi05_tiny", True)
    inputs = module.example_inputs(torch.Generator().manual_seed(0))
    inputs = tuple(t.bfloat16() if t.is_floating_point() and t.dim() == 5 else t for t in inputs)
    monkeypatch.setattr(inductor, "aoti_works", lambda device: (True, ""))
    info = backends.compile_engine(module, inputs, "inductor", tmp_path)
    assert info["runner"] == "torch.compile"
    assert "pi_build.skinny_mm_partials" in info["aoti_problem"] and "pi_build.few_query_attention" in info["aoti_problem"]
    engine = backends.load_engine(tmp_path, info["runner"], torch.device("cpu"))
    with torch.no_grad():
        assert rel_err(engine(*inputs)[0], module(*inputs)) < 1e-2  # bf16: Inductor fuses and rounds differently


@pytest.mark.slow
def test_fp8_mlp_engine_compiles_and_loads(tmp_path, monkeypatch):
    """An FP8 prefix whose MLPs run the kernel goes through the engine path as a GPU build would:
    export, Inductor (torch.compile, since the op is Python), load, the same K/V as the module."""
    from pi_build import backends
    from pi_build.backends import inductor

    module = tiny_fp8_kvcache("pi05_tiny", True)
    inputs = module.example_inputs(torch.Generator().manual_seed(0))
    monkeypatch.setattr(inductor, "aoti_works", lambda device: (True, ""))
    info = backends.compile_engine(module, inputs, "inductor", tmp_path)
    assert info["runner"] == "torch.compile" and "pi_build.fp8_gelu_gate_up" in info["aoti_problem"]
    engine = backends.load_engine(tmp_path, info["runner"], torch.device("cpu"))
    with torch.no_grad():
        got, want = engine(*inputs), module(*inputs)
    for a, b in zip(got[:2], want[:2]):
        assert rel_err(a, b) < 1e-2  # bf16: Inductor fuses and rounds the norms differently


# ----------------------------------------------------------------------------- the Triton code itself


CHECKS = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_kernels import (attention_case, attention_reference, fp8_gate_up_case, prefix_attention_case,
                              prefix_attention_reference, skinny_case, rel_err, tiny_denoise, tiny_fp8_kvcache, tiny_kvcache)
    from pi_build.engine import kernels
    from pi_build.engine.fp8 import quantize_fp8
    device = {device!r}
    out = {{}}
    for m, n, k in [(1, 64, 64), (10, 256, 1024), (51, 128, 512), (16, 96, 160)]:
        x, w = skinny_case(m, n, k, seed=m, device=device)
        parts = kernels.skinny_mm_partials(x, w)
        out[f"skinny {{m}}x{{n}}x{{k}}"] = [list(parts.shape), rel_err(parts.sum(0), x.double() @ w.double().T)]
    for b, t, s, hq, d in [(1, 10, 150, 4, 64), (1, 3, 40, 2, 16), (1, 51, 100, 8, 32), (2, 10, 90, 4, 32)]:
        case = attention_case(t, s, hq, d, seed=t, device=device, b=b)
        got = kernels.few_query_attention(*case)
        out[f"attention {{b}}x{{t}}x{{s}}x{{hq}}x{{d}}"] = [list(got.shape), rel_err(got, attention_reference(*case))]
    for b, t, hq, d in [(1, 70, 8, 64), (2, 40, 4, 32), (1, 9, 2, 256)]:
        case = prefix_attention_case(b, t, hq, d, seed=t, device=device)
        got = kernels.prefix_attention(*case)
        out[f"prefix {{b}}x{{t}}x{{hq}}x{{d}}"] = [list(got.shape), rel_err(got, prefix_attention_reference(*case))]
    for m, mlp, k in [(40, 48, 64), (130, 96, 128), (7, 64, 256)]:
        (x, w, scale, out_scale), truth = fp8_gate_up_case(m, mlp, k, seed=m, device=device)
        got = kernels.fp8_gelu_gate_up(x, w, scale, out_scale)
        acc = (x.float() @ w.float().T) * scale  # the op's torch arithmetic, from the same FP8 operands
        torch_path = quantize_fp8(torch.nn.functional.gelu(acc[:, 0::2], approximate="tanh") * acc[:, 1::2], out_scale)
        out[f"fp8 gate_up {{m}}x{{mlp}}x{{k}}"] = [list(got.shape), rel_err(got.float().cpu() * out_scale.cpu(), truth)]
        out[f"fp8 gate_up codes {{m}}x{{mlp}}x{{k}}"] = [list(got.shape), (got.float() != torch_path.float()).float().mean().item()]
    if device == "cpu":  # the whole denoise step with the kernels against the library path
        for config in ("pi05_tiny", "pi0_tiny"):
            plain, _ = tiny_denoise(config, False)
            fast, _ = tiny_denoise(config, True)
            inputs = plain.example_inputs(torch.Generator().manual_seed(3))
            inputs = tuple(t.bfloat16() if t.is_floating_point() and t.dim() == 5 else t for t in inputs)
            with torch.no_grad():
                out[f"denoise {{config}}"] = [[], rel_err(fast(*inputs), plain(*inputs))]
            plain, fast = tiny_kvcache(config, False), tiny_kvcache(config, True)
            inputs = plain.example_inputs(torch.Generator().manual_seed(4))
            with torch.no_grad():
                out[f"kvcache {{config}}"] = [[], max(rel_err(a, b) for a, b in zip(fast(*inputs)[:2], plain(*inputs)[:2]))]
            plain, fast = tiny_fp8_kvcache(config, False), tiny_fp8_kvcache(config, True)
            h = torch.randn(40, plain.cfg.llm.width, generator=torch.Generator().manual_seed(8)).bfloat16()
            with torch.no_grad():
                out[f"fp8 mlp {{config}}"] = [[], rel_err(fast.layers[0].mlp(h), plain.layers[0].mlp(h))]
    print(json.dumps(out))
""")


def run_checks(device: str) -> dict:
    pythonpath = os.pathsep.join(p for p in (SRC, os.environ.get("PYTHONPATH")) if p)  # keep the caller's (carried wheels)
    env = {**os.environ, "PYTHONPATH": pythonpath, "TRITON_INTERPRET": "1" if device == "cpu" else "0"}
    code = CHECKS.format(tests=str(Path(__file__).parent), device=device)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_results(results: dict) -> None:
    for name, (shape, err) in results.items():
        if name.startswith("skinny"):
            m, n, k = (int(v) for v in name.split()[1].split("x"))
            assert shape == [kernels.skinny_split(m, n, k), m, n], name
            assert err < 1e-5, (name, err)  # float32 sums of exact bf16 products
        elif name.startswith("prefix"):
            b, t, hq, d = (int(v) for v in name.split()[1].split("x"))
            assert shape == [b, t, hq * d], name
            assert err < 1e-2, (name, err)  # RoPE'd q and the probabilities in bf16, output rounded to bf16
        elif name.startswith("fp8 gate_up codes"):
            m, mlp, _ = (int(v) for v in name.split()[3].split("x"))
            assert shape == [m, mlp], name
            assert err < 0.01, (name, err)  # share of FP8 outputs other than the torch path's (interpreter: none)
        elif name.startswith("fp8 gate_up"):
            m, mlp, _ = (int(v) for v in name.split()[2].split("x"))
            assert shape == [m, mlp], name
            assert err < 0.04, (name, err)  # the output's own FP8 rounding
        elif name.startswith("fp8 mlp"):
            assert 0 < err < 3e-2, (name, err)  # the library path rounds gate and up to bf16 first
        elif name.startswith("attention"):
            b, t, s, hq, d = (int(v) for v in name.split()[1].split("x"))
            assert shape == [b, t, hq * d], name
            assert err < 1e-2, (name, err)  # probabilities meet V in bf16, output rounded to bf16
        else:
            assert err < 1e-2, (name, err)


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter():
    results = run_checks("cpu")
    assert len(results) == 23
    check_results(results)


@cuda
def test_triton_kernels_on_the_gpu():
    results = run_checks("cuda")
    assert len(results) == 17
    check_results(results)
