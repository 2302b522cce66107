"""FP8 (e4m3) post-training quantization of linear layers: calibrate, save the scales, swap the layers.

    float module ──calibrate(forward_loop)──► {layer: {input_amax, weight_amax}} ──save_scales──► scales.json
    float module ──apply_fp8(scales)──► the same module with Fp8Linear in place of those nn.Linear layers

Two schemes (``spec.Fp8Scaling``), both symmetric, ``scale = amax / 448`` (448 is float8_e4m3fn's
largest finite value), a tensor quantized as ``fp8(clamp(x / scale, -448, 448))`` with
round-to-nearest-even, and the GEMM computing ``(x_fp8 @ w_fp8^T) * input_scale * weight_scale + bias``:

- ``tensor``: one static input scale per layer, fixed at calibration time (no runtime amax
  reduction, so the engine graph has no data-dependent work), and one weight scale.
- ``rowwise``: each input row (token) takes its own scale from its own max |x| as the layer runs,
  and each weight row (output channel) its own; the scales multiply the accumulator as a
  [tokens, 1] x [1, channels] outer product (cuBLASLt/CUTLASS row-wise scaling). A token or a
  channel with large values no longer pushes every other one towards FP8's subnormals. It needs
  no input calibration; the calibration still names the layers that run.

What NVIDIA ModelOpt (nvidia-modelopt 0.47.0) does here, read from its source and checked by running it:

- ``mtq.FP8_DEFAULT_CFG`` uses the ``max`` calibration algorithm and enables ``*weight_quantizer``
  and ``*input_quantizer`` with ``num_bits=(4, 3)`` (e4m3) and ``axis=None``: per-tensor weights and
  per-tensor static inputs; output quantizers stay off. Weight amax is max|W| (taken from the weight
  itself, before the forward loop runs); input amax is max|x| over every call in the forward loop.
- Its preset also disables quantizers by name for HF-style LLMs (``*vision_model*``,
  ``*vision_tower*``, ``*multi_modal_projector*``, ``*proj_out.*``, ``*lm_head*``, ``*router*``, ...).
  Those names would silently exclude pi0's SigLIP and projector layers, so we keep the preset's
  algorithm and its two FP8 entries and replace the exclusions with ``keep_high_precision``.
- It swaps modules by exact type from its registry (``nn.Linear``, ``nn.Conv2d``, norms, ...), so
  ``nn.Linear`` subclasses are left alone. The swapped-in QuantLinear is still an ``nn.Linear`` and
  fake-quantizes in its ``forward``: a layer that never runs as a module in the forward loop (unused,
  or bypassed with ``F.linear(x, layer.weight)``) gets no input amax; ``calibrate`` warns with its
  name and leaves it out of the scales, so it stays in high precision. We enable quantizers only where
  the parent is an ``nn.Linear`` (the preset would also quantize SigLIP's patch Conv2d).
- It runs on CPU: without its CUDA extension the fake quant is plain torch in float32
  (``x * (448 / amax)``, clamp to +-448, cast to float8_e4m3fn and back), the same rounding as ours.
- It prints "Inserted N quantizers" to stdout, and importing it takes 5-15 s, so it is imported only
  inside ``calibrate``: ``Fp8Linear`` and ``apply_fp8`` need only torch (the GPU machine has no modelopt).

``Fp8Linear`` runs a real FP8 GEMM (``torch._scaled_mm``) on CUDA devices of compute capability
>= 8.9 (Ada, Hopper and newer) and an emulation of it elsewhere (see ``emulated_fp8_linear``).
Checked on an H100 (torch 2.11): the two agree to 1.2e-4 relative (Hopper's FP8 tensor cores
accumulate with less than float32 precision; the emulation is within 3e-8 of the exact product),
and a plain cast of an out-of-range value to float8_e4m3fn gives NaN on CUDA (448 on CPU), hence
the explicit clamp.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.io import read_json, write_json
from pi_build.spec import Fp8Scaling

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8_DTYPE).max  # 448.0
AMAX_FLOOR = 1e-12  # an all-zero row or tensor gets this amax (any scale quantizes zeros exactly)
AMAX_KEYS = ("input_amax", "weight_amax")
SCALES_FORMAT = "pi-build fp8-e4m3 per-tensor amax, scale = amax / 448"

Scales = dict[str, dict[str, float]]


# ----------------------------------------------------------------------------- calibration


def _import_modelopt():
    try:
        import modelopt.torch.quantization as mtq
    except ImportError as e:
        raise ImportError(
            f"FP8 calibration needs NVIDIA ModelOpt, which could not be imported ({e}). "
            "Install it with: pip install 'pi-build[quant]'"
        ) from e
    return mtq


def _fp8_config(mtq, keep_high_precision: list[str]) -> dict:
    """ModelOpt's FP8 preset, restricted to nn.Linear, with our exclusions instead of its LLM name list."""
    config = copy.deepcopy(mtq.FP8_DEFAULT_CFG)
    entries = {e["quantizer_name"]: e for e in config["quant_cfg"] if "parent_class" not in e}
    quant_cfg = [{"quantizer_name": "*", "enable": False}]
    for quantizer in ("*weight_quantizer", "*input_quantizer"):
        quant_cfg.append({**entries[quantizer], "parent_class": "nn.Linear"})
    # A layer's quantizers are named "<layer>.input_quantizer" / "<layer>.weight_quantizer", so
    # "<pattern>.<suffix>" matches exactly when the layer's name matches the pattern.
    for pattern in keep_high_precision:
        for suffix in ("input_quantizer", "weight_quantizer"):
            quant_cfg.append({"quantizer_name": f"{pattern}.{suffix}", "enable": False})
    config["quant_cfg"] = quant_cfg
    return config


def _fake_quantized_copy(
    module: nn.Module, forward_loop: Callable[[nn.Module], None], keep_high_precision: list[str]
) -> nn.Module:
    """A deep copy of ``module`` with ModelOpt's calibrated FP8 fake quantizers in its linear layers."""
    mtq = _import_modelopt()
    if isinstance(module, nn.Linear):
        raise TypeError("calibrate needs a module that contains linear layers, not a bare nn.Linear: wrap it")
    quantized = copy.deepcopy(module)
    with torch.no_grad():
        mtq.quantize(quantized, _fp8_config(mtq, keep_high_precision), forward_loop)
    return quantized


def _read_scales(quantized: nn.Module) -> Scales:
    """{layer: {input_amax, weight_amax}} for every linear layer whose FP8 quantizers are enabled."""
    scales, uncalibrated = {}, []
    for name, layer in quantized.named_modules():
        if not isinstance(layer, nn.Linear) or not hasattr(layer, "weight_quantizer"):
            continue
        quantizers = {"input_amax": layer.input_quantizer, "weight_amax": layer.weight_quantizer}
        if not all(q.is_enabled for q in quantizers.values()):
            continue
        amaxes = {}
        for key, q in quantizers.items():
            if q.num_bits != (4, 3) or q.axis is not None:
                raise RuntimeError(f"{name}: expected a per-tensor e4m3 quantizer, got num_bits={q.num_bits} axis={q.axis}")
            amaxes[key] = None if q.amax is None else float(q.amax)
        if amaxes["input_amax"] is None:
            uncalibrated.append(name)
            continue
        _check_amaxes(amaxes, f"layer {name!r}")
        scales[name] = amaxes
    if uncalibrated:
        # Harmless if they are truly unused; a layer used through F.linear(x, layer.weight) bypasses
        # ModelOpt's forward: either way it is left out of the scales, so it stays in high precision.
        warnings.warn(
            f"these linear layers never ran during calibration and stay in high precision: {uncalibrated} "
            "(unused, or called as F.linear(x, layer.weight) instead of layer(x))",
            stacklevel=3,
        )
    return scales


def calibrate(module: nn.Module, forward_loop: Callable[[nn.Module], None], *, keep_high_precision: list[str]) -> Scales:
    """FP8 post-training calibration of every nn.Linear in ``module`` with NVIDIA ModelOpt.

    ``forward_loop(m)`` runs calibration data through ``m`` (a calibrated deep copy: the caller's
    module is untouched). ``keep_high_precision`` holds fnmatch patterns over qualified layer names
    (e.g. ``"*action_out_proj"``, ``"layers.0.*"``); matching layers are not quantized. A pattern that
    matches nothing is allowed, so one list can serve every component. Returns
    {layer name: {"input_amax": float, "weight_amax": float}}; the FP8 scale is amax / 448.
    """
    return _read_scales(_fake_quantized_copy(module, forward_loop, keep_high_precision))


# ----------------------------------------------------------------------------- the scales file


def _check_amaxes(amaxes: object, where: str) -> None:
    """Raise ValueError naming ``where`` unless ``amaxes`` is {input_amax: x, weight_amax: y}, finite, > 0."""
    if not isinstance(amaxes, Mapping):
        raise ValueError(f"{where}: expected {{'input_amax': ..., 'weight_amax': ...}}, got {amaxes!r}")
    unknown = set(amaxes) - set(AMAX_KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}; expected {list(AMAX_KEYS)}")
    for key in AMAX_KEYS:
        if key not in amaxes:
            raise ValueError(f"{where}: missing {key!r}")
        value = amaxes[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{where}: {key} must be a number, got {value!r}")
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"{where}: {key} must be finite and > 0, got {value!r}")


def save_scales(scales: Scales, path: str | Path) -> Path:
    """Write the scales as JSON, atomically; returns the path."""
    path = Path(path)
    for name, amaxes in scales.items():
        _check_amaxes(amaxes, f"layer {name!r}")
    doc = {"format": SCALES_FORMAT, "layers": {n: {k: float(a[k]) for k in AMAX_KEYS} for n, a in scales.items()}}
    return write_json(path, doc)


def load_scales(path: str | Path) -> Scales:
    """Read a scales file written by ``save_scales``; errors name the file and the bad layer."""
    path = Path(path)
    doc = read_json(path)
    if doc.get("format") != SCALES_FORMAT or not isinstance(doc.get("layers"), dict):
        raise ValueError(f"{path}: not an FP8 scales file (expected {{'format': {SCALES_FORMAT!r}, 'layers': {{...}}}})")
    for name, amaxes in doc["layers"].items():
        _check_amaxes(amaxes, f"{path}: layer {name!r}")
    return {name: {k: float(a[k]) for k in AMAX_KEYS} for name, a in doc["layers"].items()}


# ----------------------------------------------------------------------------- the FP8 linear layer


def quantize_fp8(x: Tensor, scale: Tensor) -> Tensor:
    """x / scale, saturated to +-448 (a plain cast's overflow behaviour differs by backend), as float8_e4m3fn."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """Each row of x (a token of an input, an output channel of a weight) quantized with its own scale:
    x ~= x_fp8 * scale, scale [..., 1] float32 = max |row| / 448."""
    scale = x.detach().abs().amax(dim=-1, keepdim=True).float().clamp(min=AMAX_FLOOR) / FP8_MAX
    return quantize_fp8(x, scale), scale


def emulated_fp8_linear(x: Tensor, weight: Tensor, input_scale: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """What ``torch._scaled_mm`` computes, in plain float32 ops (any device).

    fp8 values widen exactly to float32, the products accumulate in float32, the scales multiply the
    accumulator, the bias is added and the result is rounded once to x's dtype. This equals
    F.linear(dequant(x), dequant(w)) + bias up to float32 rounding (exactly so for power-of-two scales),
    and is closer to the hardware than dequantizing into a bf16 input first.
    """
    x_fp8 = quantize_fp8(x, input_scale)
    out = F.linear(x_fp8.float(), weight.float()) * (input_scale * weight_scale)
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def scaled_mm_fp8_linear(x: Tensor, weight: Tensor, input_scale: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The real FP8 GEMM: ``torch._scaled_mm`` (cuBLASLt) on CUDA, compute capability >= 8.9.

    _scaled_mm takes 2-D operands, the first row-major and the second column-major (w.t() of a
    row-major [out, in] weight is), with K and N multiples of 16; tensor-wise scales are float32
    scalars. Its fused bias must be in the output dtype and is refused for float32 output, where it
    is added afterwards.
    """
    lead, k = x.shape[:-1], x.shape[-1]
    x_fp8 = quantize_fp8(x.reshape(-1, k), input_scale).contiguous()
    out_dtype = x.dtype
    fuse_bias = bias is not None and out_dtype in (torch.bfloat16, torch.float16)
    out = torch._scaled_mm(
        x_fp8,
        weight.t(),
        scale_a=input_scale,
        scale_b=weight_scale,
        bias=bias.to(out_dtype) if fuse_bias else None,
        out_dtype=out_dtype,
    )
    if bias is not None and not fuse_bias:
        out = out + bias.to(out_dtype)
    return out.reshape(*lead, weight.shape[0])


def emulated_rowwise_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """What ``torch._scaled_mm`` computes with row-wise scales, in plain float32 ops (any device):
    x quantized per row as the layer runs, weight_scale [out] the weight rows' scales."""
    x_fp8, input_scale = quantize_rows(x)
    out = F.linear(x_fp8.float(), weight.float()) * input_scale * weight_scale
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)


def scaled_mm_rowwise_fp8_linear(x: Tensor, weight: Tensor, weight_scale: Tensor, bias: Tensor | None) -> Tensor:
    """The real row-wise FP8 GEMM: ``torch._scaled_mm`` with scale_a [M, 1] and scale_b [1, N] (float32),
    which cuBLASLt / CUTLASS take on compute capability >= 8.9 for a bf16 output only; a float32
    input gets a bf16 product widened back."""
    lead, k = x.shape[:-1], x.shape[-1]
    x_fp8, input_scale = quantize_rows(x.reshape(-1, k))
    out = torch._scaled_mm(x_fp8.contiguous(), weight.t(), scale_a=input_scale, scale_b=weight_scale[None, :],
                           out_dtype=torch.bfloat16)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.to(x.dtype).reshape(*lead, weight.shape[0])


@functools.cache
def has_fp8_gemm(device: torch.device) -> bool:
    """True where ``torch._scaled_mm`` has an FP8 kernel: CUDA devices of compute capability >= 8.9."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


class Fp8Linear(nn.Module):
    """A linear layer with a float8_e4m3fn weight, in either scheme of ``Fp8Scaling``.

    Buffers: ``weight`` fp8 [out, in]; ``weight_scale`` float32, a scalar (tensor) or one per output
    channel [out] (rowwise); ``input_scale`` a float32 scalar (tensor) or None (rowwise: taken from
    each input row as the layer runs); ``bias`` in the original layer's dtype (or None). The output
    has the input's dtype. ``Fp8Linear(linear, input_amax, weight_amax)`` makes a tensor-scaled
    layer, ``Fp8Linear.rowwise(linear)`` a row-wise one.
    The path is chosen from the input's device only (real GEMM where ``has_fp8_gemm``, else
    ``emulated_fp8_linear``), never from tensor values, so torch.export / AOTInductor trace it as a
    plain graph. Cast the model's dtype before applying FP8: ``module.to(dtype)`` would also convert
    these fp8 buffers (forward then refuses to run).
    """

    def __init__(self, linear: nn.Linear, input_amax: float | None = None, weight_amax: float | None = None):
        """Tensor scaling from the two calibrated amaxes; row-wise scaling when both are left out."""
        super().__init__()
        out_features, in_features = linear.weight.shape
        if in_features % 16 or out_features % 16:
            # _scaled_mm's requirement; an emulated layer on the GPU would be slower than bf16.
            raise ValueError(f"FP8 GEMMs need in/out features that are multiples of 16, got {in_features} -> {out_features}")
        if (input_amax is None) != (weight_amax is None):
            raise ValueError("Fp8Linear takes both amaxes (tensor scaling) or neither (row-wise scaling)")
        self.in_features, self.out_features = in_features, out_features
        device = linear.weight.device
        with torch.no_grad():
            if input_amax is None:  # row-wise: per-channel weight scales, per-token input scales at run time
                weight, scale = quantize_rows(linear.weight)
                weight_scale, input_scale = scale[:, 0].contiguous(), None
            else:
                _check_amaxes({"input_amax": input_amax, "weight_amax": weight_amax}, "Fp8Linear")
                weight_scale = torch.tensor(weight_amax / FP8_MAX, dtype=torch.float32, device=device)
                weight = quantize_fp8(linear.weight, weight_scale)
                input_scale = torch.tensor(input_amax / FP8_MAX, dtype=torch.float32, device=device)
            self.register_buffer("weight", weight.contiguous())
            self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())
        self.register_buffer("weight_scale", weight_scale)
        self.register_buffer("input_scale", input_scale)

    @classmethod
    def rowwise(cls, linear: nn.Linear) -> Fp8Linear:
        """A row-wise layer: the weight quantized per output channel, inputs per token as they come."""
        return cls(linear)

    @property
    def scaling(self) -> Fp8Scaling:
        return Fp8Scaling.ROWWISE if self.input_scale is None else Fp8Scaling.TENSOR

    def forward(self, x: Tensor) -> Tensor:
        if self.weight.dtype != FP8_DTYPE or self.weight_scale.dtype != torch.float32:
            raise RuntimeError(
                f"Fp8Linear buffers were converted to {self.weight.dtype}/{self.weight_scale.dtype}: "
                "set the model's dtype before apply_fp8, not after"
            )
        real = has_fp8_gemm(x.device)
        if self.input_scale is None:
            linear = scaled_mm_rowwise_fp8_linear if real else emulated_rowwise_fp8_linear
            return linear(x, self.weight, self.weight_scale, self.bias)
        linear = scaled_mm_fp8_linear if real else emulated_fp8_linear
        return linear(x, self.weight, self.input_scale, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        head = f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        if self.input_scale is None:
            return f"{head}, scaling=rowwise"
        return f"{head}, input_amax={self.input_scale.item() * FP8_MAX:.4g}, weight_amax={self.weight_scale.item() * FP8_MAX:.4g}"


def apply_fp8(module: nn.Module, scales: Scales, scaling: Fp8Scaling = Fp8Scaling.TENSOR) -> nn.Module:
    """Replace each nn.Linear named in ``scales`` by an Fp8Linear, in place; returns ``module``.

    ``scaling`` picks the scheme: tensor layers take the calibrated amaxes, rowwise layers only the
    names (their scales come from the weights and, at run time, the inputs). In place because a
    copy would hold a second full-precision model in memory. Every layer is checked and converted
    before any is replaced, so on error the module is unchanged.
    """
    scaling = Fp8Scaling(scaling)
    layers = dict(module.named_modules())
    replacements: dict[str, Fp8Linear] = {}
    for name, amaxes in scales.items():
        if name not in layers or name == "":
            raise KeyError(f"FP8 scales name layer {name!r}, which is not a submodule of {type(module).__name__}")
        if not isinstance(layers[name], nn.Linear):
            raise TypeError(f"FP8 scales name layer {name!r}, which is a {type(layers[name]).__name__}, not an nn.Linear")
        _check_amaxes(amaxes, f"layer {name!r}")
        try:
            if scaling == Fp8Scaling.ROWWISE:
                replacements[name] = Fp8Linear.rowwise(layers[name])
            else:
                replacements[name] = Fp8Linear(layers[name], amaxes["input_amax"], amaxes["weight_amax"])
        except ValueError as e:
            raise ValueError(f"layer {name!r}: {e}") from e
    for name, fp8 in replacements.items():
        parent_name, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent_name), child, fp8)
    return module
