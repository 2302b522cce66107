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


# ----------------------------------------------------------------------------- the Triton code itself


CHECKS = textwrap.dedent("""
    import json, sys, torch
    sys.path.insert(0, {tests!r})
    from test_kernels import (attention_case, attention_reference, prefix_attention_case, prefix_attention_reference,
                              skinny_case, rel_err, tiny_denoise, tiny_kvcache)
    from pi_build.engine import kernels
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
    # several key blocks a program (online softmax), padded rows, and batch 16's tiles (one split here)
    for tiles in [(32, 16, 3, 4, 2), (64, 32, 2, 8, 1), kernels.few_query_attention_tiles(16, 80)]:
        case = attention_case(10, 90, 4, 32, seed=7, device=device, b=2)
        got = kernels._launch_attention(*case, tiles=tiles)
        out[f"attention 2x10x90x4x32 tiles {{tiles}}"] = [list(got.shape), rel_err(got, attention_reference(*case))]
    for b, t, hq, d in [(1, 70, 8, 64), (2, 40, 4, 32), (1, 9, 2, 256)]:
        case = prefix_attention_case(b, t, hq, d, seed=t, device=device)
        got = kernels.prefix_attention(*case)
        out[f"prefix {{b}}x{{t}}x{{hq}}x{{d}}"] = [list(got.shape), rel_err(got, prefix_attention_reference(*case))]
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
        elif name.startswith("attention"):
            b, t, s, hq, d = (int(v) for v in name.split()[1].split("x"))
            assert shape == [b, t, hq * d], name
            assert err < 1e-2, (name, err)  # probabilities meet V in bf16, output rounded to bf16
        else:
            assert err < 1e-2, (name, err)


@pytest.mark.slow
def test_triton_kernels_in_the_interpreter():
    results = run_checks("cpu")
    assert len(results) == 18
    check_results(results)


@cuda
def test_triton_kernels_on_the_gpu():
    results = run_checks("cuda")
    assert len(results) == 14
    check_results(results)
