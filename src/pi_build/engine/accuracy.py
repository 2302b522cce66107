"""How close an engine's outputs are to the reference model's: relative error and cosine similarity.

Everything is compared in float64. K/V slots of padding tokens are "don't care" (no query ever
reads them, and the reference and the engines may leave different values there), so the kvcache
comparison looks at valid slots only.
"""

from __future__ import annotations

import torch
from torch import Tensor


def metrics(out: Tensor, ref: Tensor) -> dict[str, float]:
    """rel_err = ||out - ref|| / ||ref||, cosine, max_abs; NaN anywhere fails every gate."""
    a, b = out.detach().double().flatten().cpu(), ref.detach().double().flatten().cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: engine {tuple(out.shape)} vs reference {tuple(ref.shape)}")
    diff = a - b
    ref_norm = b.norm().item()
    return {
        "rel_err": diff.norm().item() / ref_norm if ref_norm > 0 else float(diff.norm().item()),
        "cosine": torch.nn.functional.cosine_similarity(a, b, dim=0).item(),
        "max_abs": diff.abs().max().item() if diff.numel() else 0.0,
    }


def component_metrics(name: str, outputs: tuple[Tensor, ...], reference: tuple[Tensor, ...]) -> dict[str, float]:
    """One summary per component: the worst over its float outputs (kvcache: valid slots of K and V)."""
    if name == "kvcache":
        k, v, mask = outputs
        rk, rv, rmask = reference
        if not torch.equal(mask.cpu(), rmask.cpu()):
            raise ValueError("kvcache prefix_mask differs from the reference")
        valid = mask[None, :, None, :, None].expand_as(k)
        pairs = [(k[valid], rk[valid]), (v[valid], rv[valid])]
    else:
        pairs = [(o, r) for o, r in zip(outputs, reference) if o.is_floating_point()]
    results = [metrics(o, r) for o, r in pairs]
    return {
        "rel_err": max(r["rel_err"] for r in results),
        "cosine": min(r["cosine"] for r in results),
        "max_abs": max(r["max_abs"] for r in results),
    }


def worst(draws: list[dict[str, float]]) -> dict[str, float]:
    """The element-wise worst of several checks' metrics; NaN counts as the worst of all."""
    nan = float("nan")

    def pick(values: list[float], bad_is_high: bool) -> float:
        if any(v != v for v in values):
            return nan
        return max(values) if bad_is_high else min(values)

    return {"rel_err": pick([d["rel_err"] for d in draws], True), "cosine": pick([d["cosine"] for d in draws], False),
            "max_abs": pick([d["max_abs"] for d in draws], True)}
