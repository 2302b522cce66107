"""The prefix pass's FP8 GEMMs alone on a GPU, at several token counts: does cuBLAS pick a faster
tile for some row counts than for others? (docs/PERFORMANCE.md: pi0's gate_up took 57.8 us a layer
at 560 rows, pi0.5's 66.6 us at 544.) Each product is `torch._scaled_mm` with per-tensor scales, as
the kvcache engine calls it, checked against a float64 product of the same dequantized inputs.

Each timed graph runs the product over 4 weight copies (more bytes than the 60 MB L2), as the 18
layers of the engine do; figures are us per product, the median of 5 rounds.

    PYTHONPATH=src python3 scripts/prefix_gemm_probe.py [--rows 544,560,576,608,640]
"""

from __future__ import annotations

import argparse
import statistics

import torch

from pi_build.model.pi0 import GEMMA_2B
from pi_build.runtime.timing import graph_replay_ms

COPIES = 4
FP8 = torch.float8_e4m3fn


def shapes() -> dict[str, tuple[int, int]]:
    """(K, N) of each prefix linear of Gemma 2B: q/k/v fused (8 query heads, one KV head), o, gate|up, down."""
    g = GEMMA_2B
    qkv = (g.num_heads + 2 * g.num_kv_heads) * g.head_dim
    return {"qkv": (g.width, qkv), "o": (g.num_heads * g.head_dim, g.width), "gate_up": (g.width, 2 * g.mlp_dim),
            "down": (g.mlp_dim, g.width)}


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = t.abs().amax().float() / torch.finfo(FP8).max
    return (t / scale).to(FP8), scale


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="544,560,576,608,640", help="token counts to time (comma-separated)")
    rows_list = [int(r) for r in parser.parse_args().rows.split(",")]
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; seed 0")
    print(f"{'product':>8} {'rows':>5} {'us':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for name, (k, n) in shapes().items():
        weights = [quantize(torch.randn(n, k, device="cuda", generator=g) * k**-0.5) for _ in range(COPIES)]
        for rows in rows_list:
            x, sx = quantize(torch.randn(rows, k, device="cuda", generator=g))
            product = lambda w, s: torch._scaled_mm(x, w.t(), scale_a=sx, scale_b=s, out_dtype=torch.bfloat16)
            w0, s0 = weights[0]
            ref = (x.double() * sx.double()) @ (w0.double() * s0.double()).T
            err = float((product(w0, s0).double() - ref).norm() / ref.norm())
            ms = graph_replay_ms(lambda: [product(w, s) for w, s in weights], iters=20, rounds=5)
            us = statistics.median(ms) * 1e3 / COPIES
            print(f"{name:>8} {rows:5d} {us:8.1f} {2 * rows * k * n / us / 1e6:8.0f} {err:9.1e}", flush=True)


if __name__ == "__main__":
    main()
