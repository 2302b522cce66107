"""FP8 schemes for the prefix (kvcache) engine of full-size pi0.5 / pi0, on random weights (issue 11).

For each variant: the K/V of the valid tokens against the float32 reference, the end-to-end
actions (the float32 reference's denoise loop over that K/V, the same noise) against the float32
reference's actions, and on a GPU the engine's time (torch.compile, CUDA-graph replay) and its
kernel list. Variants:

- bf16: no FP8 (what FP8 costs in accuracy is measured against this too)
- tensor: static per-tensor scales, max-calibrated (ModelOpt's algorithm; what the recipes build)
- rowwise: per-token input scales taken as the layer runs, per-channel weight scales
- tensor/rowwise with one kind of linear (qkv, o, gate_up, down) kept in bf16: which layers the
  error comes from

Inputs: random images through the reference's SigLIP, a 21-token prompt in the engine's bucket,
random state; calibration on 8 draws (seed 100+), evaluation on 2 fresh draws (seeds 1, 2), the
worse kept.

    PYTHONPATH=src python3 scripts/prefix_fp8_experiments.py --config pi05 [--kinds] [--keep-sets qkv+o] [--time [--profile]]
"""

from __future__ import annotations

import argparse
import time

import torch

from pi_build.engine import accuracy, build_component, calibration_inputs, denoise
from pi_build.engine.fp8 import apply_fp8, calibrate
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import KVCache, build_model, euler_loop, get_config
from pi_build.spec import Fp8Scaling, Precision

KINDS = ("qkv", "o", "gate_up", "down")


def model_inputs(cfg, seed: int, prompt_len: int, device: str) -> tuple[torch.Tensor, ...]:
    """images [1, 2, 3, 224, 224] (the config's size) in [-1, 1], both cameras on, 21 valid prompt tokens, state."""
    gen = torch.Generator().manual_seed(seed)
    images = torch.rand(1, 2, 3, cfg.vision.image_size, cfg.vision.image_size, generator=gen) * 2 - 1
    masks = torch.ones(1, 2, dtype=torch.bool)
    tokens = torch.randint(1, cfg.vocab_size, (1, prompt_len), generator=gen)
    token_masks = torch.arange(prompt_len)[None] < 21
    state = torch.randn(1, cfg.action_dim, generator=gen)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=gen)
    return tuple(t.to(device) for t in (images, masks, tokens, token_masks, state, noise))


@torch.no_grad()
def reference_actions(model, k, v, mask, state, noise, steps: int) -> torch.Tensor:
    """The float32 reference's Euler loop over a given prefix K/V."""
    k, v = k.float(), v.float()

    def step(x, i):
        return denoise.reference(model, (x, torch.tensor(i), k, v, mask, state), steps)[0]

    return euler_loop(step, noise.float(), steps)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="pi05", help="pi05 or pi0 (pi05_tiny / pi0_tiny try the script on a CPU)")
    parser.add_argument("--kinds", action="store_true", help="also each kind of linear kept in bf16")
    parser.add_argument("--keep-sets", default="", help="comma list of kinds joined by +, each kept in bf16 together (tensor scaling), e.g. qkv+o")
    parser.add_argument("--no-rowwise", action="store_true", help="skip the rowwise variant")
    parser.add_argument("--time", action="store_true", help="time each engine (GPU: torch.compile, CUDA-graph replay)")
    parser.add_argument("--profile", action="store_true", help="with --time: kernel lists of the tensor and rowwise engines")
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    horizon, prompt_len = (10, 32) if get_config(args.config).pi05 else (50, 48)
    cfg = get_config(args.config).replace(action_horizon=horizon)
    t0 = time.time()
    model = build_model(cfg, dtype=torch.float32, device=device, seed=0)
    shapes = Shapes(batch=1, cameras=2, prompt_len=prompt_len, horizon=horizon, steps=args.steps,
                    image_token_dtype=torch.bfloat16, kv_dtype=torch.bfloat16)
    print(f"{args.config}: model ready in {time.time() - t0:.0f} s on {device}", flush=True)

    def component_inputs(seed: int) -> tuple[tuple[torch.Tensor, ...], tuple[torch.Tensor, ...]]:
        images, masks, tokens, token_masks, state, noise = model_inputs(cfg, seed, prompt_len, device)
        (inputs,) = calibration_inputs(model, "kvcache", images, masks, tokens, token_masks, state, args.steps, horizon)
        return inputs, (state, noise)

    calib = [component_inputs(100 + i)[0] for i in range(8)]
    evals = []
    with torch.no_grad():
        for seed in (1, 2):
            inputs, (state, noise) = component_inputs(seed)
            cache: KVCache = model.kvcache(*inputs)
            actions = reference_actions(model, cache.k, cache.v, cache.prefix_mask, state, noise, args.steps)
            evals.append((tuple(t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs),
                          (cache.k, cache.v, cache.prefix_mask), state, noise, actions))

    base = build_component(model, "kvcache", shapes, Precision.FP8)  # FP8's compute dtype, linears still bf16

    def forward_loop(m):
        for batch in calib:
            m(*(t.to(torch.bfloat16) if t.is_floating_point() else t for t in batch))

    scales = calibrate(base, forward_loop, keep_high_precision=[])
    variants: list[tuple[str, Fp8Scaling | None, tuple[str, ...]]] = [("bf16", None, ()), ("tensor", Fp8Scaling.TENSOR, ()),
                                                                      ("rowwise", Fp8Scaling.ROWWISE, ())]
    if args.no_rowwise:
        variants = [v for v in variants if v[1] != Fp8Scaling.ROWWISE]
    variants += [(f"tensor with {group} in bf16", Fp8Scaling.TENSOR, tuple(group.split("+"))) for group in args.keep_sets.split(",") if group]
    if args.kinds:
        variants += [(f"{s} with {kind} in bf16", s, (kind,)) for s in (Fp8Scaling.TENSOR, Fp8Scaling.ROWWISE) for kind in KINDS]
    print(f"calibrated {len(scales)} linears on {len(calib)} draws", flush=True)
    for name, scaling, keep in variants:
        module = build_component(model, "kvcache", shapes, Precision.FP8)
        if scaling is not None:
            chosen = {n: a for n, a in scales.items() if n.rsplit(".", 1)[-1] not in keep}
            module = apply_fp8(module, chosen, scaling)
        kv, acts = [], []
        with torch.no_grad():
            for inputs, ref, state, noise, ref_actions in evals:
                out = module(*inputs)
                kv.append(accuracy.component_metrics("kvcache", out, ref))
                actions = reference_actions(model, out[0], out[1], out[2], state, noise, args.steps)
                acts.append(accuracy.metrics(actions, ref_actions))
        kv_m, act_m = accuracy.worst(kv), accuracy.worst(acts)
        line = (f"{args.config} {name:28s} K/V cosine {kv_m['cosine']:.5f} rel err {kv_m['rel_err']:.4f} | "
                f"actions ({args.steps} steps) cosine {act_m['cosine']:.6f} rel err {act_m['rel_err']:.4f}")
        if args.time and device == "cuda" and not keep:
            from pi_build.runtime.timing import graph_replay_ms, kernel_profile, kernel_profile_text

            torch.compiler.reset()
            compiled = torch.compile(module)
            inputs = evals[0][0]
            with torch.no_grad():
                ms = graph_replay_ms(lambda: compiled(*inputs), iters=50, warmup=10)[0]
            line += f" | {ms:.3f} ms"
            if args.profile and scaling is not None:
                print(line, flush=True)
                line = kernel_profile_text(f"{args.config} {name}", kernel_profile(lambda: compiled(*inputs)))
        print(line, flush=True)
        del module


if __name__ == "__main__":
    main()
