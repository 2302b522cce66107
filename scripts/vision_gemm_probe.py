"""The vision tower's GEMMs alone on a GPU: the library's time for each SigLIP product at 512 rows
(2 cameras x 256 patches), beside variants that might fill the chip better (docs/PERFORMANCE.md,
vision). Every variant is checked against a float64 product of the same random inputs.

- library: F.linear (cuBLAS addmm), as the Inductor engine calls it;
- padded K: fc2 with its 4304 hidden units padded with zeros to 4352 (exact);
- split-K S: the K axis cut in S slices as one batched product, the slices summed in float32.

Each timed graph runs the product over 8 weight copies (more bytes than the 60 MB L2), as the
27 layers of the engine do; figures are us per product, the median of 5 rounds.

    PYTHONPATH=src python3 scripts/vision_gemm_probe.py
"""

from __future__ import annotations

import statistics

import torch
import torch.nn.functional as F

from pi_build.runtime.timing import graph_replay_ms

ROWS, WIDTH, HIDDEN, COPIES = 512, 1152, 4304, 8
SHAPES = {"qkv": (WIDTH, 3 * WIDTH), "o": (WIDTH, WIDTH), "fc1": (WIDTH, HIDDEN), "fc2": (HIDDEN, WIDTH)}


def split_k(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor, slices: int) -> torch.Tensor:
    k = x.shape[1]
    xs = x.view(ROWS, slices, k // slices).transpose(0, 1)  # [S, M, K/S]
    ws = w.view(w.shape[0], slices, k // slices).permute(1, 2, 0)  # [S, K/S, N]
    return (torch.bmm(xs, ws).float().sum(0) + b.float()).to(x.dtype)


def main() -> None:
    g = torch.Generator(device="cuda").manual_seed(0)
    print(f"{'product':>8} {'variant':>12} {'us':>8} {'TFLOP/s':>8} {'rel err':>9}")
    for name, (k, n) in SHAPES.items():
        x = torch.randn(ROWS, k, device="cuda", generator=g).bfloat16()
        ws = [(torch.randn(n, k, device="cuda", generator=g) * k**-0.5).bfloat16() for _ in range(COPIES)]
        b = torch.randn(n, device="cuda", generator=g).bfloat16()
        ref = (x.double() @ ws[0].double().T + b.double()).float()
        variants = {"library": lambda w: F.linear(x, w, b)}
        if name == "fc2":
            pad = -(-k // 128) * 128 - k
            xp = F.pad(x, (0, pad))
            wps = {id(w): F.pad(w, (0, pad)) for w in ws}
            variants["padded K"] = lambda w: F.linear(xp, wps[id(w)], b)
        for s in (2, 4, 8):
            if k % (s * 16) == 0:
                variants[f"split-K {s}"] = lambda w, s=s: split_k(x, w, b, s)
        for label, fn in variants.items():
            out = fn(ws[0]).float()
            err = float((out - ref).norm() / ref.norm())
            ms = graph_replay_ms(lambda: [fn(w) for w in ws], iters=20, rounds=5)
            us = statistics.median(ms) * 1e3 / COPIES
            print(f"{name:>8} {label:>12} {us:8.1f} {2 * ROWS * k * n / us / 1e6:8.0f} {err:9.1e}", flush=True)


if __name__ == "__main__":
    main()
