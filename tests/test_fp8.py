"""FP8 (e4m3) post-training quantization: ModelOpt calibration, the scales file, Fp8Linear and apply_fp8."""

from __future__ import annotations

import copy
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pi_build.engine import fp8
from pi_build.engine.fp8 import FP8_MAX, Fp8Linear, apply_fp8, calibrate, load_scales, save_scales

CUDA_FP8 = torch.cuda.is_available() and fp8.has_fp8_gemm(torch.device("cuda"))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


class Toy(nn.Module):
    """Nested linears, one under a name ModelOpt's preset excludes (vision_model), a Conv2d, a skipped head."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 4, stride=4)
        self.vision_model = nn.Module()
        self.vision_model.fc = nn.Linear(16, 64)
        self.blocks = nn.ModuleList(nn.Linear(64, 64, bias=i == 0) for i in range(2))
        self.head = nn.Linear(64, 32)

    def forward(self, image: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        x = x + self.conv(image).flatten(2).transpose(1, 2)  # [B, 4, 16]
        h = F.gelu(self.vision_model.fc(x))
        for block in self.blocks:
            h = h + F.gelu(block(h))
        return self.head(h)


def toy_batches(seed: int, n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(2, 3, 8, 8, generator=gen), torch.randn(2, 4, 16, generator=gen) * (1 + i)) for i in range(n)]


def loop_over(batches):
    def forward_loop(m: nn.Module) -> None:
        for batch in batches:
            m(*batch)

    return forward_loop


@pytest.fixture(scope="module")
def toy():
    torch.manual_seed(0)
    return Toy().eval().requires_grad_(False)


@pytest.fixture(scope="module")
def toy_scales(toy):
    return calibrate(toy, loop_over(toy_batches(1)), keep_high_precision=["head"])


# ----------------------------------------------------------------------------- calibration


def test_calibrate_reads_max_abs_of_weights_and_inputs(toy, toy_scales):
    # Every linear but the excluded head, "vision_model" included (ModelOpt's preset would skip it).
    assert set(toy_scales) == {"vision_model.fc", "blocks.0", "blocks.1"}
    for name, amaxes in toy_scales.items():
        weight = toy.get_submodule(name).weight
        assert amaxes["weight_amax"] == pytest.approx(weight.abs().max().item(), rel=1e-7), name
        assert math.isfinite(amaxes["input_amax"]) and amaxes["input_amax"] > 0, name
    # blocks.0's input is computed through fake-quantized vision_model.fc, so only its magnitude is checked;
    # vision_model.fc sees x + conv(image) with the conv left in float (only linears are quantized).
    seen = [x + toy.conv(image).flatten(2).transpose(1, 2) for image, x in toy_batches(1)]
    expected = max(t.abs().max().item() for t in seen)
    assert toy_scales["vision_model.fc"]["input_amax"] == pytest.approx(expected, rel=1e-6)


def test_calibrate_leaves_the_module_untouched(toy, toy_scales):
    assert all(type(m) in (Toy, nn.Module, nn.ModuleList, nn.Linear, nn.Conv2d) for m in toy.modules())
    assert not any("quantizer" in key for key in toy.state_dict())


def test_keep_high_precision_wildcards():
    torch.manual_seed(1)
    model = Toy().eval()
    scales = calibrate(model, loop_over(toy_batches(2, n=1)), keep_high_precision=["blocks.*", "no_such_layer"])
    assert set(scales) == {"vision_model.fc", "head"}


def test_calibration_matches_modelopt_fake_quant(toy, toy_scales):
    """Our FP8 layers compute what ModelOpt's calibrated fake-quant model computes."""
    fake_quant = fp8._fake_quantized_copy(toy, loop_over(toy_batches(1)), ["head"])
    ours = apply_fp8(copy.deepcopy(toy), toy_scales)
    for image, x in toy_batches(7, n=2):
        expected = fake_quant(image, x)
        torch.testing.assert_close(ours(image, x), expected, rtol=1e-5, atol=1e-6)


def test_fp8_close_to_float_but_quantized(toy, toy_scales):
    quantized = apply_fp8(copy.deepcopy(toy), toy_scales)
    assert isinstance(quantized.blocks[0], Fp8Linear) and type(quantized.head) is nn.Linear
    image, x = toy_batches(3, n=1)[0]  # fresh inputs, not the calibration ones
    out, ref = quantized(image, x), toy(image, x)
    assert cosine(out, ref) > 0.99
    assert rel_err(out, ref) > 1e-4


def test_layers_never_called_are_left_out_with_a_warning():
    class Bypass(nn.Module):
        def __init__(self):
            super().__init__()
            self.used = nn.Linear(16, 16)
            self.bypassed = nn.Linear(16, 16)

        def forward(self, x):
            return F.linear(self.used(x), self.bypassed.weight, self.bypassed.bias)

    with pytest.warns(UserWarning, match=r"\['bypassed'\]"):
        scales = calibrate(Bypass(), lambda m: m(torch.randn(3, 16)), keep_high_precision=[])
    assert set(scales) == {"used"}  # left in high precision


def test_missing_modelopt_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "modelopt.torch.quantization", None)  # makes the import fail
    with pytest.raises(ImportError, match=r"pip install 'pi-build\[quant\]'"):
        calibrate(Toy(), lambda m: None, keep_high_precision=[])


# ----------------------------------------------------------------------------- the scales file


def test_scales_round_trip(tmp_path, toy_scales):
    path = tmp_path / "sub" / "scales.json"
    save_scales(toy_scales, path)
    assert load_scales(path) == toy_scales  # exact: JSON keeps every float digit
    assert [p.name for p in path.parent.iterdir()] == ["scales.json"]  # no temp file left behind


@pytest.mark.parametrize(
    "amaxes, problem",
    [
        ({"weight_amax": 1.0}, "missing 'input_amax'"),
        ({"input_amax": float("nan"), "weight_amax": 1.0}, "finite"),
        ({"input_amax": 2.0, "weight_amax": float("inf")}, "finite"),
        ({"input_amax": 0.0, "weight_amax": 1.0}, "> 0"),
        ({"input_amax": 2.0, "weight_amax": -1.0}, "> 0"),
        ({"input_amax": "2.0", "weight_amax": 1.0}, "number"),
        ({"input_amax": 2.0, "weight_amax": 1.0, "scale": 3.0}, "unknown keys"),
    ],
)
def test_bad_scales_file_names_file_and_layer(tmp_path, amaxes, problem):
    path = tmp_path / "scales.json"
    layers = {"layers.0.qkv": {"input_amax": 1.0, "weight_amax": 0.5}, "layers.1.down": amaxes}
    path.write_text(json.dumps({"format": fp8.SCALES_FORMAT, "layers": layers}))  # json writes NaN/Infinity
    with pytest.raises(ValueError) as info:
        load_scales(path)
    message = str(info.value)
    assert str(path) in message and "'layers.1.down'" in message and problem in message
    with pytest.raises(ValueError, match="layers.1.down"):
        save_scales(layers, tmp_path / "out.json")


def test_not_a_scales_file(tmp_path):
    path = tmp_path / "scales.json"
    path.write_text(json.dumps({"layers.0.qkv": {"input_amax": 1.0, "weight_amax": 0.5}}))
    with pytest.raises(ValueError, match="not an FP8 scales file"):
        load_scales(path)


# ----------------------------------------------------------------------------- Fp8Linear


def test_quantize_fp8_rounds_to_nearest_even_and_saturates():
    scale = torch.tensor(0.5)
    x = torch.tensor([0.5, 0.53125, 0.59375, 0.00075, 224.0, 300.0, -1e6, float("inf")])
    # x / 0.5 = 1, 1.0625 (tie -> 1), 1.1875 (tie -> 1.25), 0.0015 (-> 2^-9, the smallest subnormal),
    # 448, 600 -> 448, -2e6 -> -448, inf -> 448.
    expected = torch.tensor([1.0, 1.0, 1.25, 2.0**-9, 448.0, 448.0, -448.0, 448.0])
    assert torch.equal(fp8.quantize_fp8(x, scale).float(), expected)


def random_linear(in_features: int, out_features: int, bias: bool, seed: int) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(in_features, out_features, bias=bias).requires_grad_(False)


@pytest.mark.parametrize("bias", [True, False])
def test_emulation_equals_dequantize_reference(bias):
    """F.linear on dequantized fp8 tensors, written out by hand; power-of-two scales make it exact."""
    linear = random_linear(64, 32, bias, seed=2)
    input_amax, weight_amax = FP8_MAX * 2.0**-6, FP8_MAX * 2.0**-9  # scales 2^-6 and 2^-9
    layer = Fp8Linear(linear, input_amax, weight_amax)
    x = torch.randn(3, 5, 64) * 2.0  # some values beyond input_amax = 7: they saturate

    def dequantized(t, amax):
        scale = amax / 448.0
        return torch.clamp(t / scale, -448.0, 448.0).to(torch.float8_e4m3fn).float() * scale

    expected = F.linear(dequantized(x, input_amax), dequantized(linear.weight, weight_amax), linear.bias)
    assert torch.equal(layer(x), expected)
    # Any other scales: equal up to float32 rounding (the scales multiply before vs after the sum).
    layer = Fp8Linear(linear, 3.7, 0.21)
    expected = F.linear(dequantized(x, 3.7), dequantized(linear.weight, 0.21), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-6, atol=1e-6)


def test_bf16_input_gives_bf16_output_close_to_float32():
    linear = random_linear(64, 48, True, seed=3).to(torch.bfloat16)
    layer = Fp8Linear(linear, 4.0, linear.weight.abs().max().item())
    x = torch.randn(7, 64)
    out = layer(x.bfloat16())
    assert out.dtype == torch.bfloat16
    # The fp8 math is done in float32 and rounded once, so bf16 is the float32 result rounded.
    assert torch.equal(out, layer(x.bfloat16().float()).bfloat16())


def test_saturation_at_448():
    linear = nn.Linear(16, 16, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.eye(16))
    layer = Fp8Linear(linear, input_amax=448.0, weight_amax=448.0)  # both scales 1: y = fp8(x)
    x = torch.tensor([[1000.0, -1000.0, 448.0, 3.0, -2.5, 1e9, 0.25, 5.0, 6.0, 7.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0]])
    y = layer(x)
    assert y[0, :7].tolist() == [448.0, -448.0, 448.0, 3.0, -2.5, 448.0, 0.25]
    assert torch.equal(y, x.clamp(-448, 448))  # all of these are e4m3 values
    layer = Fp8Linear(linear, input_amax=2.0, weight_amax=448.0)  # inputs clip at +-2
    assert torch.equal(layer(x), x.clamp(-2.0, 2.0))


def test_fp8_linear_stores_fp8_weight_and_scales():
    linear = random_linear(32, 16, True, seed=4)
    layer = Fp8Linear(linear, 2.0, 0.3)
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.shape == (16, 32)
    assert layer.weight_scale.dtype == torch.float32 and layer.weight_scale.item() == pytest.approx(0.3 / 448)
    assert layer.input_scale.item() == pytest.approx(2.0 / 448)
    assert set(layer.state_dict()) == {"weight", "bias", "weight_scale", "input_scale"}
    with pytest.raises(RuntimeError, match="before apply_fp8"):
        layer.to(torch.bfloat16)(torch.randn(2, 32))
    with pytest.raises(ValueError, match="both amaxes"):
        Fp8Linear(linear, 2.0)  # one amax: neither scheme


def test_export_fp8_module():
    linear = random_linear(32, 64, True, seed=5)
    model = nn.Sequential(Fp8Linear(linear, 3.0, linear.weight.abs().max().item()), nn.GELU(),
                          Fp8Linear(random_linear(64, 16, False, seed=6), 2.0, 0.2))
    x = torch.randn(4, 3, 32)
    batch = torch.export.Dim("batch", min=1, max=64)
    exported = torch.export.export(model, (x,), dynamic_shapes=({0: batch},))
    dtypes = {node.meta["val"].dtype for node in exported.graph.nodes if isinstance(node.meta.get("val"), torch.Tensor)}
    assert torch.float8_e4m3fn in dtypes  # the fp8 casts are in the graph, not folded away
    x2 = torch.randn(9, 3, 32)
    assert torch.equal(exported.module()(x2), model(x2))


# ----------------------------------------------------------------------------- apply_fp8


def test_apply_fp8_refuses_bad_layers_and_leaves_module_unchanged(toy, toy_scales):
    model = copy.deepcopy(toy)
    good = dict(toy_scales)
    for bad, error, match in [
        ({"blocks.7": good["blocks.0"]}, KeyError, "blocks.7"),
        ({"conv": good["blocks.0"]}, TypeError, "'conv', which is a Conv2d"),
        ({"vision_model": good["blocks.0"]}, TypeError, "'vision_model'"),
        ({"blocks.1": {"input_amax": 1.0}}, ValueError, "'blocks.1': missing 'weight_amax'"),
    ]:
        with pytest.raises(error, match=match):
            apply_fp8(model, {**good, **bad})
        assert not any(isinstance(m, Fp8Linear) for m in model.modules())
    odd = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 10))
    with pytest.raises(ValueError, match="layer '1'.*multiples of 16"):
        apply_fp8(odd, {"0": good["blocks.0"], "1": good["blocks.0"]})
    assert type(odd[0]) is nn.Linear


# ----------------------------------------------------------------------------- the real components


def linears_called(module: nn.Module, inputs: tuple) -> set[str]:
    """Names of the nn.Linear layers that run in module(*inputs) (kvcache's last o/gate_up/down do not)."""
    called = set()
    hooks = [m.register_forward_hook(lambda m, args, out, name=n: called.add(name))
             for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        module(*inputs)
    for hook in hooks:
        hook.remove()
    return called


@pytest.mark.filterwarnings("ignore:these linear layers never ran")
@pytest.mark.parametrize("config", ["pi05_tiny", "pi0_tiny"])
def test_fp8_components_of_the_tiny_model(config):
    from pi_build.engine import build_components
    from pi_build.engine.layers import Shapes
    from pi_build.model.pi0 import build_model, get_config

    model = build_model(get_config(config).replace(action_horizon=10), seed=0)
    components = build_components(model, Shapes(batch=1, cameras=1, prompt_len=16, horizon=10, steps=2))
    keep = ["action_in", "action_out"]
    for name, component in components.items():
        calibration = [component.example_inputs(torch.Generator().manual_seed(i)) for i in range(2)]
        scales = calibrate(component, loop_over(calibration), keep_high_precision=keep)
        assert set(scales) == linears_called(component, calibration[0]) - set(keep), name
        inputs = component.example_inputs(torch.Generator().manual_seed(100))
        with torch.no_grad():
            reference = component(*inputs)
            quantized = apply_fp8(copy.deepcopy(component), scales)(*inputs)
        if not isinstance(reference, tuple):
            quantized, reference = (quantized,), (reference,)
        for out, ref in zip(quantized, reference):
            if ref.is_floating_point():  # kvcache's prefix_mask is bool
                assert cosine(out, ref) > 0.99, name
                assert rel_err(out, ref) > 1e-4, name


# ----------------------------------------------------------------------------- row-wise scaling


def test_rowwise_equals_per_row_dequantize_reference():
    """Each input row and each weight row with its own scale: F.linear of the dequantized operands."""
    linear = random_linear(64, 32, True, seed=8)
    layer = Fp8Linear.rowwise(linear)
    assert layer.scaling == fp8.Fp8Scaling.ROWWISE and layer.input_scale is None
    assert layer.weight_scale.shape == (32,) and layer.weight.dtype == torch.float8_e4m3fn
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(3, 5, 64, generator=gen) * torch.logspace(-3, 3, 5)[None, :, None]  # rows of very different sizes

    def dequantized_rows(t):
        scale = t.abs().amax(-1, keepdim=True) / 448.0
        return torch.clamp(t / scale, -448.0, 448.0).to(torch.float8_e4m3fn).float() * scale

    expected = F.linear(dequantized_rows(x), dequantized_rows(linear.weight), linear.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert rel_err(layer(x), linear(x)) < 0.05


def test_rowwise_keeps_small_tokens_where_a_tensor_scale_loses_them():
    """One token 1000x larger than the others: its scale no longer flushes the others to FP8's subnormals."""
    linear = random_linear(64, 64, False, seed=10)
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(8, 64, generator=gen) * 1e-2
    x[3] *= 1e5
    tensor = Fp8Linear(linear, x.abs().max().item(), linear.weight.abs().max().item())
    rowwise = Fp8Linear.rowwise(linear)
    small = [i for i in range(8) if i != 3]
    exact = linear(x)[small]
    assert rel_err(rowwise(x)[small], exact) < 0.05
    assert rel_err(tensor(x)[small], exact) > 0.2


def test_apply_fp8_rowwise_takes_names_not_amaxes(toy, toy_scales):
    module = apply_fp8(copy.deepcopy(toy), toy_scales, fp8.Fp8Scaling.ROWWISE)
    layers = {n: m for n, m in module.named_modules() if isinstance(m, Fp8Linear)}
    assert set(layers) == set(toy_scales)
    assert all(m.scaling == fp8.Fp8Scaling.ROWWISE for m in layers.values())
    batch = toy_batches(5)[0]
    assert cosine(module(*batch), toy(*batch)) > 0.999
    with pytest.raises(ValueError):
        apply_fp8(copy.deepcopy(toy), toy_scales, "per-block")


def test_export_rowwise_module():
    model = nn.Sequential(Fp8Linear.rowwise(random_linear(32, 64, True, seed=12)), nn.GELU())
    x = torch.randn(4, 3, 32)
    exported = torch.export.export(model, (x,))
    torch.testing.assert_close(exported.module()(x), model(x))


# ----------------------------------------------------------------------------- CUDA (the real FP8 GEMM)


@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
def test_scaled_mm_matches_emulation_on_cuda(dtype, bias):
    linear = random_linear(256, 512, bias, seed=7).to("cuda", dtype)
    layer = Fp8Linear(linear, 3.0, linear.weight.abs().max().item())
    x = torch.randn(2, 37, 256, device="cuda", dtype=dtype)  # rows not a multiple of 16
    out = layer(x)
    args = (layer.weight, layer.input_scale, layer.weight_scale, layer.bias)
    emulated = fp8.emulated_fp8_linear(x, *args)
    assert out.dtype == dtype and out.shape == (2, 37, 512)
    # Same fp8 operands and scales. Hopper's FP8 tensor cores accumulate with less than float32
    # precision (measured on an H100: 1.2e-4 relative to the exact product, the emulation 3e-8),
    # and bf16/fp16 outputs add one rounding.
    tolerance = {torch.float32: 1e-3, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert rel_err(out, emulated) < tolerance
    atol = tolerance * emulated.abs().max().item()
    torch.testing.assert_close(out.float(), emulated.float(), rtol=0, atol=atol)


@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_saturation_and_export_on_cuda():
    linear = nn.Linear(16, 16, bias=False).requires_grad_(False)
    linear.weight.copy_(torch.eye(16))
    layer = Fp8Linear(linear.cuda(), input_amax=448.0, weight_amax=448.0)
    x = torch.tensor([[1000.0, -1000.0, 448.0, 3.0, -2.5, 1e9, 0.25] + [1.0] * 9], device="cuda")
    assert torch.equal(layer(x), x.clamp(-448, 448))
    exported = torch.export.export(layer, (x,))
    assert "_scaled_mm" in str(exported.graph)
    assert torch.equal(exported.module()(x), layer(x))


@pytest.mark.skipif(not CUDA_FP8, reason="needs a CUDA GPU with FP8 tensor cores (compute capability >= 8.9)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rowwise_scaled_mm_matches_emulation_on_cuda(dtype):
    linear = random_linear(256, 512, False, seed=13).to("cuda", dtype)
    layer = Fp8Linear.rowwise(linear)
    x = torch.randn(2, 37, 256, device="cuda", dtype=dtype) * torch.logspace(-2, 2, 37, device="cuda")[None, :, None].to(dtype)
    out = layer(x)
    emulated = fp8.emulated_rowwise_fp8_linear(x, layer.weight, layer.weight_scale, None)
    assert out.dtype == dtype and out.shape == (2, 37, 512)
    assert rel_err(out, emulated) < 1e-2  # the product is rounded to bf16 either way on the GPU
    exported = torch.export.export(layer, (x,))
    assert "_scaled_mm" in str(exported.graph)
