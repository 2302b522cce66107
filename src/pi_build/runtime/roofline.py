"""The floor under each component's latency: FLOPs over the GEMM rate, bytes over memory bandwidth.

Counts are analytic, from the model config and the engine shapes: every weight is read once
(in the component's precision: 4, 2 or 1 byte), activations and K/V are written/read once, and
FLOPs are 2 per multiply-add of every linear layer and attention product. The floor of a
component is the larger of its two times; no implementation can run much faster.
"""

from __future__ import annotations

import torch

from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import Config
from pi_build.spec import Component, Precision



def _gemma_layer_params(width: int, mlp: int, heads: int, kv_heads: int, head_dim: int) -> int:
    return width * (heads + 2 * kv_heads) * head_dim + heads * head_dim * width + 3 * width * mlp


def component_cost(cfg: Config, name: Component, shapes: Shapes, precision: Precision) -> tuple[float, float]:
    """(FLOPs, bytes) of one call of component ``name``."""
    precision = Precision(precision)
    wb = precision.weight_bytes
    act = 4 if precision == Precision.FP32 else 2
    b = shapes.batch
    if name == Component.VISION:
        v = cfg.vision
        n = v.num_patches
        images = b * shapes.cameras
        layer_params = 4 * v.width * v.width + 2 * v.width * v.mlp_dim
        params = v.depth * layer_params + v.width * cfg.llm.width
        flops = images * (2 * n * params + v.depth * 4 * n * n * v.width + 2 * n * 3 * v.patch_size**2 * v.width)
        bytes_ = params * wb + images * (3 * v.image_size**2 * 4 + n * cfg.llm.width * act)
        return flops, bytes_
    g = cfg.llm if name == Component.KVCACHE else cfg.expert
    layer_params = _gemma_layer_params(g.width, g.mlp_dim, g.num_heads, g.num_kv_heads, g.head_dim)
    prefix = shapes.cameras * cfg.image_tokens + shapes.prompt_len
    kv_bytes = cfg.llm.depth * b * 2 * prefix * cfg.llm.num_kv_heads * cfg.llm.head_dim * act
    if name == Component.KVCACHE:
        flops = b * (2 * prefix * g.depth * layer_params + g.depth * 4 * prefix * prefix * g.num_heads * g.head_dim)
        return flops, g.depth * layer_params * wb + kv_bytes + b * prefix * g.width * act
    suffix = shapes.horizon + (0 if cfg.pi05 else 1)
    per_step_flops = b * (2 * suffix * g.depth * layer_params + g.depth * 4 * suffix * (prefix + suffix) * g.num_heads * g.head_dim)
    per_step_bytes = g.depth * layer_params * wb + kv_bytes  # weights and the cache, read every step
    return per_step_flops * shapes.steps, per_step_bytes * shapes.steps


def measure_ceilings(device: torch.device, size: int = 8192) -> dict[str, float]:
    """bf16 GEMM rate (FLOP/s), FP8 GEMM rate where supported, and copy bandwidth (bytes/s), measured
    now on a GPU. On the CPU: {} -- a floor from a CPU's measured rates says nothing useful about the
    engines (they are not built to the CPU's limits), so benchmarks leave it out there."""
    if device.type != "cuda":
        return {}
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    bmat = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    gemm = _time_cuda(lambda: a @ bmat)
    out = {"gemm_bf16_flops": 2 * size**3 / gemm}
    if torch.cuda.get_device_capability(device) >= (8, 9):
        a8 = a.to(torch.float8_e4m3fn)
        b8 = bmat.to(torch.float8_e4m3fn).t().contiguous().t()
        one = torch.ones((), device=device)
        t = _time_cuda(lambda: torch._scaled_mm(a8, b8, scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        out["gemm_fp8_flops"] = 2 * size**3 / t
    src = torch.empty(2 * 1024**3, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy = _time_cuda(lambda: dst.copy_(src))
    out["bandwidth_bytes"] = 2 * src.numel() / copy  # read + write
    return out


def _time_cuda(fn, iters: int = 20) -> float:
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / iters


def floor_ms(flops: float, bytes_: float, ceilings: dict[str, float], precision: str) -> float:
    """max(FLOPs / rate, bytes / bandwidth) in ms, with the rate of the component's precision."""
    rate = (ceilings.get("gemm_fp8_flops") if precision == Precision.FP8 else None) or ceilings["gemm_bf16_flops"]
    return max(flops / rate, bytes_ / ceilings["bandwidth_bytes"]) * 1e3
