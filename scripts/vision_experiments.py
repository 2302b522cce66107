"""Variants of the vision component on a GPU, each compiled with torch.compile (Inductor) as an
engine is and timed as a CUDA-graph replay; accuracy of each against the float32 component on the
same random weights and fresh random images (docs/PERFORMANCE.md, vision).

- engine: VisionComponent without use_gpu_epilogues (the engines before it);
- padded: the MLP's 4304 hidden units zero-padded to 4352 (exact: zero rows of fc1 and its bias
  give GELU(0) = 0, which zero columns of fc2 read);
- gelu epilogue: fc1 + bias + tanh-GELU in one cuBLASLt call (torch._addmm_activation), not a
  separate elementwise kernel (on the CPU that call is erf GELU: the dry run leaves it out);
- both: what use_gpu_epilogues does by default, and GPU builds of bf16 vision engines now run.

Only the SigLIP tower and the projector are built (random, seeded), not the 2.9B-parameter model.

    PYTHONPATH=src python3 scripts/vision_experiments.py            # on the GPU machine
    PYTHONPATH=src python3 scripts/vision_experiments.py --dry-run  # CPU, tiny config: checks the script
"""

from __future__ import annotations

import argparse
import statistics

import torch
from torch import nn

from pi_build.engine.accuracy import metrics, worst
from pi_build.engine.layers import Shapes
from pi_build.engine.vision import VisionComponent
from pi_build.model.pi0 import Siglip, get_config
from pi_build.runtime.timing import graph_replay_ms
from pi_build.spec import Precision


def tower(config: str, device: str, seed: int) -> nn.Module:
    """What VisionComponent reads of a model: .siglip and .projector, random and seeded."""
    cfg = get_config(config)
    torch.manual_seed(seed)
    holder = nn.Module()
    holder.siglip = Siglip(cfg.vision)
    holder.projector = nn.Linear(cfg.vision.width, cfg.llm.width)
    return holder.to(device).requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny config, eager: check the script")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    device, config = ("cpu", "pi05_tiny") if args.dry_run else ("cuda", "pi05")
    model = tower(config, device, args.seed)
    shapes = Shapes(batch=1, cameras=2)
    reference = VisionComponent(model, shapes, Precision.FP32).to(device)
    precision = Precision.FP32 if args.dry_run else Precision.BF16  # bf16 on the CPU is slow and not what engines run
    g = torch.Generator().manual_seed(args.seed + 1)
    images = [(torch.rand(1, 2, 3, 224, 224, generator=g) * 2 - 1).to(device) for _ in range(2)]
    with torch.no_grad():
        expected = [reference(x).float() for x in images]
    print(f"seed {args.seed}, {config} on {device}")
    print(f"{'variant':>14} {'ms':>8} {'cosine':>9} {'rel err':>9}")
    for name in ("engine", "padded", "gelu epilogue", "both"):
        component = VisionComponent(model, shapes, precision).to(device)
        if name != "engine":  # the engines before use_gpu_epilogues existed, then its parts
            component.use_gpu_epilogues(pad_to=128 if name in ("padded", "both") else 1,
                                        gelu_epilogue=name in ("gelu epilogue", "both") and not args.dry_run)
        run = component if args.dry_run else torch.compile(component)
        with torch.no_grad():
            draws = worst([metrics(run(x).float(), e) for x, e in zip(images, expected)])
            if args.dry_run:
                ms = float("nan")
            else:
                ms = statistics.median(graph_replay_ms(lambda: run(images[0]), iters=50, rounds=5))
        print(f"{name:>14} {ms:8.3f} {draws['cosine']:9.6f} {draws['rel_err']:9.2e}", flush=True)


if __name__ == "__main__":
    main()
