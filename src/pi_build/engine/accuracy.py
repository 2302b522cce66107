"""How close outputs are to the reference, and whether that is close enough: the one place for
accuracy metrics and gates (engines against the reference model, ONNX graphs against PyTorch,
assembled actions against the reference's).

Everything is compared in float64. Metrics: rel_err = ||out - ref|| / ||ref||, cosine similarity,
max_abs. NaN anywhere makes a metric NaN, and NaN passes no gate. K/V slots of padding tokens
are "don't care" (no query ever reads them, and the reference and the engines may leave
different values there), so the kvcache comparison looks at valid slots only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from pi_build.errors import GateError
from pi_build.spec import Component, Gate

Metrics = dict[str, float]


def _float64(x: Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, Tensor):
        return x.detach().to("cpu", torch.float64).numpy().ravel()
    return np.asarray(x, dtype=np.float64).ravel()


def _is_float(x: Tensor | np.ndarray) -> bool:
    return x.is_floating_point() if isinstance(x, Tensor) else np.asarray(x).dtype.kind in "fc"


def metrics(out: Tensor | np.ndarray, ref: Tensor | np.ndarray) -> Metrics:
    """rel_err, cosine and max_abs of ``out`` against ``ref`` (tensors or arrays of one shape), in float64.

    Boolean and integer outputs (masks) are compared exactly: {"mismatches": differing elements}.
    """
    if tuple(out.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: {list(out.shape)} vs reference {list(ref.shape)}")
    if not _is_float(ref):
        as_numpy = [x.cpu().numpy() if isinstance(x, Tensor) else np.asarray(x) for x in (out, ref)]
        return {"mismatches": int(np.count_nonzero(as_numpy[0] != as_numpy[1]))}
    a, b = _float64(out), _float64(ref)
    diff_norm, ref_norm, out_norm = np.linalg.norm(a - b), np.linalg.norm(b), np.linalg.norm(a)
    if ref_norm > 0:
        rel_err = diff_norm / ref_norm
    else:  # an all-zero reference: exact or infinitely wrong
        rel_err = 0.0 if diff_norm == 0 else float("inf")
    if out_norm * ref_norm > 0:
        cosine = float(a @ b / (out_norm * ref_norm))
    else:
        cosine = 1.0 if diff_norm == 0 else 0.0
    max_abs = float(np.abs(a - b).max(initial=0.0))
    if np.isnan(a).any() or np.isnan(b).any():
        rel_err = cosine = max_abs = float("nan")
    return {"rel_err": float(rel_err), "cosine": cosine, "max_abs": max_abs}


def component_metrics(name: Component | str, outputs: tuple[Tensor, ...], reference: tuple[Tensor, ...]) -> Metrics:
    """One summary per component: the worst over its float outputs (kvcache: valid slots of K and V)."""
    if Component(name) == Component.KVCACHE:
        k, v, mask = outputs
        rk, rv, rmask = reference
        if not torch.equal(mask.cpu(), rmask.cpu()):
            raise ValueError("kvcache prefix_mask differs from the reference")
        valid = mask[None, :, None, :, None].expand_as(k)
        pairs = [(k[valid], rk[valid]), (v[valid], rv[valid])]
    else:
        pairs = [(o, r) for o, r in zip(outputs, reference) if o.is_floating_point()]
    return worst([metrics(o, r) for o, r in pairs])


def worst(draws: list[Metrics]) -> Metrics:
    """The element-wise worst of several checks' metrics; NaN counts as the worst of all."""
    if all("mismatches" in d for d in draws):
        return {"mismatches": max(d["mismatches"] for d in draws)}

    def pick(values: list[float], bad_is_high: bool) -> float:
        if any(v != v for v in values):
            return float("nan")
        return max(values) if bad_is_high else min(values)

    return {"rel_err": pick([d["rel_err"] for d in draws], True), "cosine": pick([d["cosine"] for d in draws], False),
            "max_abs": pick([d["max_abs"] for d in draws], True)}


def check_gate(what: str, result: Metrics, gate: Gate, error: type[Exception] = GateError) -> dict[str, Any]:
    """The report a manifest records ({metrics, gate, passed}); raises ``error`` naming ``what`` when
    the metrics miss the gate. Exact comparisons ({"mismatches": n}) pass with n == 0 only."""
    if "mismatches" in result:
        if result["mismatches"]:
            raise error(f"{what}: {result['mismatches']} elements differ from the reference")
        return {**result, "passed": True}
    passed = gate.passes(result["cosine"], result["rel_err"])
    if not passed:
        raise error(
            f"{what}: accuracy gate failed: cosine {result['cosine']:.6f} (needs >= {gate.cosine}), "
            f"rel_err {result['rel_err']:.3e} (needs <= {gate.rel_err}); nothing was written"
        )
    return {**result, "gate": {"cosine": gate.cosine, "rel_err": gate.rel_err}, "passed": passed}
