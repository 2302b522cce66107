"""The prefix pass's FP8 MLP on a GPU: what the engines run (cuBLASLt's FP8 gate|up writing bf16,
Inductor's GELU x up + FP8 quantization kernel, cuBLASLt's FP8 down) against pi-build's
``kernels.Fp8GeluMlp`` (one Triton GEMM for gate|up with GELU x up and the quantization in its
epilogue, then the same down), with a sweep of the Triton kernel's tiles.

Shapes: Gemma 2B (width 2048, 16384 hidden units) at pi0.5's 32-token bucket (544 prefix rows),
pi0's 48-token prompt (560), the full 200-token prompt (712) and 16 robots on the 32-token bucket
(8704, where Inductor's GELU x up + quantize kernel took 4.2 ms of the prefix's 33.3); random weights quantized with
per-tensor scales as a calibration gives them, inputs from a recorded seed. Each variant is timed as
a CUDA-graph replay over 4 weight copies (more bytes than the 60 MB L2, as 17 layers are) and
compared with the float64 MLP of the same FP8 weights. Writes JSON.

    PYTHONPATH=src python3 scripts/prefix_mlp_bench.py --out /tmp/pib      # on the GPU machine
    PYTHONPATH=src python3 scripts/prefix_mlp_bench.py --dry-run           # CPU, small: checks the script
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from pi_build.engine import kernels
from pi_build.engine.accuracy import metrics
from pi_build.engine.fp8 import Fp8Linear, quantize_fp8
from pi_build.engine.layers import GemmaBlock
from pi_build.io import write_json
from pi_build.model.pi0 import GEMMA_2B
from pi_build.runtime.timing import graph_replay_ms, kernel_profile, kernel_profile_text

COPIES = 4


class Layer(torch.nn.Module):
    """The two MLP linears of one Gemma layer, as GemmaBlock.mlp reads them."""

    def __init__(self, width: int, mlp: int, seed: int, device: str):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.gate_up = torch.nn.Linear(width, 2 * mlp, bias=False)
        self.down = torch.nn.Linear(mlp, width, bias=False)
        with torch.no_grad():
            self.gate_up.weight.copy_(torch.randn(2 * mlp, width, generator=g) * width**-0.5)
            self.down.weight.copy_(torch.randn(width, mlp, generator=g) * mlp**-0.5)
        self.to(device=device, dtype=torch.bfloat16)
        self.fused_mlp = None

    mlp = GemmaBlock.mlp  # the engine's own code: library ops, or the fused module once it is set


def fp8_layer(width: int, mlp: int, seed: int, device: str, h: torch.Tensor) -> Layer:
    """A Layer with both linears in tensor-scaled FP8, the input amaxes taken from ``h``, as calibration does."""
    layer = Layer(width, mlp, seed, device)
    with torch.no_grad():
        gate, up = layer.gate_up(h).float().chunk(2, dim=-1)
        hidden = torch.nn.functional.gelu(gate, approximate="tanh") * up
    layer.gate_up = Fp8Linear(layer.gate_up, h.abs().max().item(), layer.gate_up.weight.abs().max().item())
    layer.down = Fp8Linear(layer.down, hidden.abs().max().item(), layer.down.weight.abs().max().item())
    return layer


def reference(layer: Layer, h: torch.Tensor) -> torch.Tensor:
    """The MLP in float64 from the FP8 weights (dequantized), on the unquantized input."""
    g, d = layer.gate_up, layer.down
    acc = h.double() @ (g.weight.double() * g.weight_scale.double()).T
    gate, up = acc.chunk(2, dim=-1)
    hidden = 0.5 * gate * (1 + torch.tanh(math.sqrt(2 / math.pi) * (gate + 0.044715 * gate**3))) * up
    return hidden @ (d.weight.double() * d.weight_scale.double()).T


def sweep_tiles(dry_run: bool) -> list[tuple[int, int, int, int, int, int]]:
    """(rows, gate|up columns, K step, warps, stages, row blocks per group) to try."""
    if dry_run:
        return [(32, 32, 32, 4, 2, 4)]
    return [(128, 128, 128, 8, 4, 8), (128, 128, 128, 8, 3, 8), (128, 256, 128, 8, 3, 8), (128, 128, 64, 4, 4, 8),
            (128, 64, 128, 4, 4, 8), (64, 128, 128, 4, 4, 8), (64, 256, 128, 8, 3, 8), (64, 128, 256, 4, 3, 8),
            (128, 256, 64, 8, 4, 8), (128, 128, 128, 8, 4, 4), (256, 128, 64, 8, 3, 4)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, small shapes, no timing: check the script")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget-s", type=float, default=240, help="stop the tile sweep after this long")
    parser.add_argument("--out", type=Path, default=None, help="folder for prefix_mlp.json")
    args = parser.parse_args()
    device = "cpu" if args.dry_run else "cuda"
    width, mlp = (64, 128) if args.dry_run else (GEMMA_2B.width, GEMMA_2B.mlp_dim)
    rows_list = [40] if args.dry_run else [544, 560, 712, 8704]
    started = time.time()
    results = {"seed": args.seed, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
               "torch": torch.__version__, "width": width, "mlp": mlp, "shapes": {}}
    for rows in rows_list:
        g = torch.Generator().manual_seed(args.seed + rows)
        h = (torch.randn(rows, width, generator=g) * 2).bfloat16().to(device)
        layers = [fp8_layer(width, mlp, args.seed + i, device, h) for i in range(1 if args.dry_run else COPIES)]
        fused = [fp8_layer(width, mlp, args.seed + i, device, h) for i in range(len(layers))]
        for layer in fused:
            layer.fused_mlp = kernels.Fp8GeluMlp(layer.gate_up, layer.down)
        truth = reference(layers[0], h)
        run_library = (lambda x: [layer.mlp(x) for layer in layers]) if args.dry_run else torch.compile(lambda x: [layer.mlp(x) for layer in layers])
        run_fused = (lambda x: [layer.mlp(x) for layer in fused]) if args.dry_run else torch.compile(lambda x: [layer.mlp(x) for layer in fused])
        label = f"{rows} rows"
        row: dict = {}
        with torch.no_grad():
            for name, fn in {"library (cuBLASLt + Inductor)": run_library, "triton (Fp8GeluMlp)": run_fused}.items():
                got = metrics(fn(h)[0], truth)
                row[name] = {"cosine": got["cosine"], "rel_err": got["rel_err"]}
                if not args.dry_run:
                    row[name]["us_per_layer"] = min(graph_replay_ms(lambda: fn(h), iters=50, rounds=3)) * 1e3 / len(layers)
                    profile = kernel_profile(lambda: fn(h), top=6)
                    print(kernel_profile_text(f"{label}, {name}", profile))
                    row[name]["kernels"] = profile
            sweep = {}
            x = quantize_fp8(h, fused[0].fused_mlp.input_scale)
            mlp0 = fused[0].fused_mlp
            codes = kernels.fp8_gelu_gate_up(x, mlp0.weight, mlp0.scale, mlp0.down.input_scale)
            for tiles in sweep_tiles(args.dry_run):
                if time.time() - started > args.budget_s:
                    break
                key = "x".join(map(str, tiles))
                try:
                    fn = lambda: [kernels._launch_fp8_gelu_gate_up(x, m.fused_mlp.weight, m.fused_mlp.scale,  # noqa: E731
                                                                   m.fused_mlp.down.input_scale, tiles) for m in fused]
                    same = (fn()[0].float() == codes.float()).float().mean().item()
                    sweep[key] = {"same_codes": same}
                    if not args.dry_run:
                        sweep[key]["us_per_layer"] = min(graph_replay_ms(fn, iters=50, rounds=3)) * 1e3 / len(fused)
                except Exception as e:  # a tile that does not fit (shared memory, registers): recorded, skipped
                    sweep[key] = {"error": str(e).splitlines()[0][:200]}
            row["gate|up kernel alone, sweep (rows x columns x K x warps x stages x group)"] = sweep
        results["shapes"][label] = row
        print(f"{label}: " + ", ".join(f"{n} {r.get('us_per_layer', float('nan')):.1f} us cos {r['cosine']:.6f} rel {r['rel_err']:.2e}"
                                       for n, r in row.items() if "cosine" in r))
        for key, r in sorted(sweep.items(), key=lambda kv: kv[1].get("us_per_layer", 1e9)):
            print(f"    {key:>22}  " + (f"{r.get('us_per_layer', float('nan')):.1f} us, same codes {r['same_codes']:.4f}"
                                        if "same_codes" in r else r["error"]))
    if args.out:
        write_json(args.out / "prefix_mlp.json", results)


if __name__ == "__main__":
    main()
