"""The prefix pass's attention on a GPU: what the engines ran until now (Inductor's RoPE of the
queries, then SDPA over the one KV head broadcast as views under a key mask: cuDNN) against
pi-build's Triton kernel (``kernels.prefix_attention``: RoPE as the queries load, flash attention
with the query heads folded into rows that share the KV head), with a sweep of its tiles.

Shapes: pi0.5's 32-token bucket (544 tokens), pi0's 48-token prompt (560), pi0.5's full 200-token
prompt (712), and the 32-token bucket at batch 16; 8 query heads of 256, a 21-token prompt (the
rest of the prompt is padding the mask drops). Each variant is timed as a CUDA-graph replay and
compared with float64 attention on the same random inputs (seed recorded). Writes JSON.

    PYTHONPATH=src python3 scripts/prefix_attention_bench.py --out /tmp/pib      # on the GPU machine
    PYTHONPATH=src python3 scripts/prefix_attention_bench.py --dry-run           # CPU, small: checks the script
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from pi_build.engine import kernels
from pi_build.engine.accuracy import metrics
from pi_build.engine.layers import apply_rope, mqa_attention, rope_tables
from pi_build.io import write_json
from pi_build.runtime.timing import graph_replay_ms, kernel_profile, kernel_profile_text

PROMPT = 21  # tokens of a LIBERO instruction
IMAGE_TOKENS = 512  # two cameras


def case(batch: int, prompt_len: int, heads: int, head_dim: int, seed: int, device: str) -> tuple[torch.Tensor, ...]:
    """q as a view of the q/k/v GEMM's output, RoPE tables of the real positions, roped k, v, key mask."""
    g = torch.Generator().manual_seed(seed)
    tokens = IMAGE_TOKENS + prompt_len
    qkv = torch.randn(batch, tokens, (heads + 2) * head_dim, generator=g).bfloat16().to(device)
    key_mask = (torch.arange(tokens) < IMAGE_TOKENS + min(PROMPT, prompt_len)).expand(batch, tokens).contiguous().to(device)
    cos, sin = rope_tables(torch.cumsum(key_mask.long(), 1) - 1, head_dim, torch.bfloat16)
    k = torch.randn(batch, tokens, head_dim, generator=g).bfloat16().to(device)
    q = qkv[..., : heads * head_dim].unflatten(-1, (heads, head_dim))
    v = qkv[..., (heads + 1) * head_dim:]  # a strided view, as the engine passes it
    return q, k, v, cos[:, 0], sin[:, 0], key_mask


def reference(q, k, v, cos, sin, key_mask) -> torch.Tensor:
    b, t, hq, d = q.shape
    roped = apply_rope(q.double().transpose(1, 2), cos.double()[:, None], sin.double()[:, None])
    logits = roped @ k.double()[:, None].transpose(-1, -2) / math.sqrt(d)
    probs = logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1)
    return (probs @ v.double()[:, None]).transpose(1, 2).reshape(b, t, hq * d)


def library(q, k, v, cos, sin, key_mask) -> torch.Tensor:
    """What the kvcache component ran before the kernel, for Inductor to compile."""
    return mqa_attention(apply_rope(q.transpose(1, 2), cos[:, None], sin[:, None]), k[:, None], v[:, None], key_mask)


def sweep_tiles(quick: bool) -> list[tuple[int, int, int, int]]:
    if quick:  # the best three of the first sweep (H200, batch 1: docs/bench/prefix_attention_sweep.json)
        return [(64, 32, 4, 3), (64, 32, 4, 2), (64, 64, 8, 3)]
    return [(m, n, w, s) for m in (32, 64, 128) for n in (32, 64) for w in (4, 8) for s in (1, 2, 3) if not (m == 128 and w == 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, no timing: check the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=240, help="stop the tile sweep after this long")
    parser.add_argument("--sweep", action=argparse.BooleanOptionalAction, default=True,
                        help="every tile at batch 1 (else the best three of the first H200 sweep)")
    parser.add_argument("--out", type=Path, default=None, help="folder for prefix_attention.json")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    heads, head_dim = (2, 32) if args.dry_run else (8, 256)
    shapes = [(1, 32), (1, 48), (1, 200), (16, 32)] if not args.dry_run else [(1, 32), (2, 48)]
    started = time.time()
    results = {"seed": args.seed, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "shapes": {}}
    compiled = library if args.dry_run else torch.compile(library, fullgraph=True)
    for batch, prompt_len in shapes:
        inputs = case(batch, prompt_len, heads, head_dim, args.seed + prompt_len, device)
        label = f"batch {batch}, {IMAGE_TOKENS + prompt_len} tokens"
        truth = reference(*inputs)
        row: dict = {}
        with torch.no_grad():
            variants = {"library (RoPE + SDPA)": lambda: compiled(*inputs), "triton": lambda: kernels.prefix_attention(*inputs)}
            for name, fn in variants.items():
                got = metrics(fn(), truth)
                row[name] = {"cosine": got["cosine"], "rel_err": got["rel_err"]}
                if not args.dry_run:
                    row[name]["ms"] = min(graph_replay_ms(fn, iters=100, rounds=3))
            if not args.dry_run:
                profile = kernel_profile(variants["library (RoPE + SDPA)"], top=6)
                print(kernel_profile_text(f"{label}, library", profile))
                row["library kernels"] = profile
                sweep = {}
                for tiles in sweep_tiles(batch > 1 or not args.sweep):
                    if time.time() - started > args.budget_s:
                        break
                    try:
                        fn = lambda: kernels._launch_prefix_attention(*inputs, tiles=tiles)  # noqa: E731
                        err = metrics(fn(), truth)["rel_err"]
                        sweep["x".join(map(str, tiles))] = {"ms": min(graph_replay_ms(fn, iters=100, rounds=3)), "rel_err": err}
                    except Exception as e:  # a tile that does not fit (shared memory, registers): recorded, skipped
                        sweep["x".join(map(str, tiles))] = {"error": str(e).splitlines()[0][:200]}
                row["triton sweep (BLOCK_M x BLOCK_N x warps x stages)"] = sweep
        results["shapes"][label] = row
        print(f"{label}: " + ", ".join(f"{n} {r.get('ms', float('nan')):.4f} ms cos {r['cosine']:.6f} rel {r['rel_err']:.2e}"
                                       for n, r in row.items() if "cosine" in r))
        for tiles, r in sorted(row.get("triton sweep (BLOCK_M x BLOCK_N x warps x stages)", {}).items(),
                               key=lambda kv: kv[1].get("ms", 1e9)):
            print(f"    {tiles:>14}  " + (f"{r['ms']:.4f} ms  rel {r['rel_err']:.2e}" if "ms" in r else r["error"]))
    if args.out:
        write_json(args.out / "prefix_attention.json", results)


if __name__ == "__main__":
    main()
