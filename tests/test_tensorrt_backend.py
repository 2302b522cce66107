"""TensorRT backend: clear errors without TensorRT, the ONNX we hand it, and (where installed) real engines."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402

from pi_build.backends import tensorrt as trtb  # noqa: E402
from pi_build.errors import BackendUnavailable  # noqa: E402
from pi_build.engine import build_components
from pi_build.engine.layers import Shapes  # noqa: E402
from pi_build.model.pi0 import build_model  # noqa: E402
from pi_build.backends.onnx import describe_onnx  # noqa: E402
from pi_build.engine.accuracy import metrics as compare_arrays  # noqa: E402

TRT_OK, TRT_WHY = trtb.tensorrt_available()
needs_tensorrt = pytest.mark.skipif(not TRT_OK, reason=TRT_WHY)


@pytest.fixture
def no_tensorrt(monkeypatch):
    """Make `import tensorrt` fail, whatever this machine has."""
    monkeypatch.setitem(sys.modules, "tensorrt", None)


def save(graph, path: Path, opset: int = 19, extra_domains: tuple[str, ...] = ()) -> Path:
    opsets = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in extra_domains]
    onnx.save(helper.make_model(graph, opset_imports=opsets), str(path))
    return path


def fp32_matmul_graph(path: Path) -> Path:
    w = helper.make_tensor("w", TensorProto.FLOAT, [4, 3], [0.1 * i for i in range(12)])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[w],
    )  # fmt: skip
    return save(graph, path)


# ----------------------------------------------------------------------------- without TensorRT


def test_tensorrt_missing_says_what_to_install(no_tensorrt):
    ok, message = trtb.tensorrt_available()
    assert ok is False
    assert message.startswith("TensorRT is not installed")
    assert "pip install tensorrt" in message and "python3-libnvinfer" in message  # x86 and Jetson


def test_build_engine_without_tensorrt_raises_backend_unavailable(no_tensorrt, tmp_path):
    onnx_path = fp32_matmul_graph(tmp_path / "mm.onnx")
    out = tmp_path / "mm.plan"
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        trtb.build_engine(onnx_path, out, precision="fp16", workspace_gb=1)
    assert not out.exists()


def test_runner_and_backend_api_without_tensorrt(no_tensorrt, tmp_path):
    plan = tmp_path / "engine.plan"
    plan.write_bytes(b"not an engine")
    with pytest.raises(BackendUnavailable, match="TensorRT is not installed"):
        trtb.TensorRTEngine(plan, "cuda")
    module = nn.Linear(4, 4)
    with pytest.raises(BackendUnavailable, match="pip install tensorrt"):
        trtb.compile_component(module, (torch.randn(1, 4),), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_build_engine_checks_its_arguments_first(no_tensorrt, tmp_path):
    with pytest.raises(ValueError, match="unknown precision 'int4'"):
        trtb.build_engine(fp32_matmul_graph(tmp_path / "mm.onnx"), tmp_path / "a.plan", precision="int4")
    with pytest.raises(FileNotFoundError, match="no ONNX file at"):
        trtb.build_engine(tmp_path / "missing.onnx", tmp_path / "a.plan", precision="fp32")


# ----------------------------------------------------------------------------- what TensorRT is handed


def fp8_qdq_graph(path: Path) -> Path:
    """ModelOpt's post-processed form: Q/DQ with a float8e4m3fn zero point on the activation, and
    DequantizeLinear of a float8e4m3fn weight."""
    zero = helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], b"\x00", raw=True)
    w8 = helper.make_tensor("w8", TensorProto.FLOAT8E4M3FN, [4, 3], bytes(range(0x30, 0x3C)), raw=True)
    scales = [helper.make_tensor(n, TensorProto.FLOAT, [], [0.05]) for n in ("sx", "sw")]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zp"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w8", "sw"], ["wd"]),
        helper.make_node("MatMul", ["xd", "wd"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes, "fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])],
        initializer=[zero, w8, *scales],
    )  # fmt: skip
    return save(graph, path)


def trt_custom_fp8_graph(path: Path) -> Path:
    """ModelOpt's raw TorchScript export: TensorRT's own FP8 Q/DQ custom ops."""
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    nodes = [
        helper.make_node("TRT_FP8QuantizeLinear", ["x", "s"], ["xq"], domain="trt"),
        helper.make_node("TRT_FP8DequantizeLinear", ["xq", "s"], ["y"], domain="trt"),
    ]
    graph = helper.make_graph(
        nodes, "trt_fp8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[scale],
    )  # fmt: skip
    return save(graph, path, extra_domains=("trt",))


def int8_qdq_graph(path: Path) -> Path:
    zero = helper.make_tensor("zp", TensorProto.INT8, [], [0])
    scale = helper.make_tensor("s", TensorProto.FLOAT, [], [0.05])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "zp"], ["y"])]
    graph = helper.make_graph(
        nodes, "int8",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4])],
        initializer=[zero, scale],
    )  # fmt: skip
    return save(graph, path)


def test_fp8_qdq_detection(tmp_path):
    native = fp8_qdq_graph(tmp_path / "native.onnx")
    onnx.checker.check_model(str(native), full_check=True)
    assert describe_onnx(native)["fp8_qdq_nodes"] == 3
    assert describe_onnx(trt_custom_fp8_graph(tmp_path / "custom.onnx"))["fp8_qdq_nodes"] == 2
    assert describe_onnx(int8_qdq_graph(tmp_path / "int8.onnx"))["fp8_qdq_nodes"] == 0  # not FP8
    assert describe_onnx(fp32_matmul_graph(tmp_path / "mm.onnx"))["fp8_qdq_nodes"] == 0
    trtb.check_onnx_for_tensorrt(native, "fp8")  # accepted


def test_fp8_without_qdq_is_refused(tmp_path):
    path = fp32_matmul_graph(tmp_path / "mm.onnx")
    with pytest.raises(ValueError, match="precision 'fp8' needs FP8 quantize/dequantize nodes .* has none.*ModelOpt"):
        trtb.build_engine(path, tmp_path / "mm.plan", precision="fp8")


def test_float64_is_refused(tmp_path):
    graph = helper.make_graph(
        [helper.make_node("Cast", ["t"], ["t64"], to=TensorProto.DOUBLE), helper.make_node("Sin", ["t64"], ["y"])], "f64",
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [2])],
        [helper.make_tensor_value_info("y", TensorProto.DOUBLE, [2])],
    )  # fmt: skip
    path = save(graph, tmp_path / "f64.onnx")
    with pytest.raises(ValueError, match=r"float64 tensors \(t64, y\); TensorRT has no float64"):
        trtb.build_engine(path, tmp_path / "f64.plan", precision="fp32")


def test_bf16_graph_must_be_built_in_bf16(tmp_path):
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [4, 3], [0.5] * 12)
    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["xb"], to=TensorProto.BFLOAT16), helper.make_node("MatMul", ["xb", "w"], ["y"])], "bf16",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [2, 3])],
        initializer=[w],
    )  # fmt: skip
    path = save(graph, tmp_path / "bf16.onnx")
    assert trtb.check_onnx_for_tensorrt(path, "bf16")["weight_dtypes"] == ["BFLOAT16"]
    for precision in ("fp16", "fp32"):
        with pytest.raises(ValueError, match=f"carries bf16 weights but precision '{precision}' was asked"):
            trtb.build_engine(path, tmp_path / "bf16.plan", precision=precision)


@pytest.fixture(scope="module")
def pi05_tiny():
    model = build_model("pi05_tiny", seed=4)
    spec = Shapes(batch=1, cameras=2, prompt_len=16, horizon=model.cfg.action_horizon, steps=2)
    return model, spec


@pytest.fixture(scope="module")
def exported(pi05_tiny, tmp_path_factory) -> dict[str, Path]:
    pytest.importorskip("onnxscript", reason="the dynamo ONNX exporter needs onnxscript")
    from pi_build.backends.onnx import export_onnx

    model, spec = pi05_tiny
    folder = tmp_path_factory.mktemp("onnx")
    paths = {}
    for name, module in build_components(model, spec).items():
        inputs = module.example_inputs(torch.Generator().manual_seed(0))
        paths[name] = export_onnx(module, inputs, module.input_names, module.output_names, folder / f"{name}.onnx")
    return paths


@pytest.mark.slow
@pytest.mark.parametrize("component", ["vision", "kvcache", "denoise"])
def test_component_onnx_is_valid_tensorrt_input(exported, component):
    path = exported[component]
    onnx.checker.check_model(str(path), full_check=True)  # schema + shape inference
    facts = trtb.check_onnx_for_tensorrt(path, "fp32")
    assert facts["float64_tensors"] == [] and facts["fp8_qdq_nodes"] == 0
    for io in list(facts["inputs"].values()) + list(facts["outputs"].values()):
        assert all(isinstance(d, int) and d > 0 for d in io["shape"])  # fixed shapes: no profiles needed
        assert io["dtype"] in ("FLOAT", "BOOL", "INT64")
    trtb.check_onnx_for_tensorrt(path, "bf16")  # float32 graph: TensorRT 10's weakly typed BF16 flag
    with pytest.raises(ValueError, match="needs FP8 quantize/dequantize nodes"):
        trtb.check_onnx_for_tensorrt(path, "fp8")


# ----------------------------------------------------------------------------- real engines (TensorRT + GPU only)


@needs_tensorrt
@pytest.mark.parametrize("component", ["vision", "kvcache", "denoise"])
def test_fp32_engine_matches_module(pi05_tiny, component, tmp_path):
    model, spec = pi05_tiny
    module = build_components(model.cuda(), spec)[component]
    inputs = tuple(x.cuda() for x in module.example_inputs(torch.Generator().manual_seed(0)))
    plan = trtb.compile_component(module, inputs, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["engine.io.json", "engine.plan"]
    engine = trtb.load_component(plan, "cuda")
    fresh = tuple(x.cuda() for x in module.example_inputs(torch.Generator().manual_seed(1)))
    got = engine(*fresh)
    torch.cuda.synchronize()
    with torch.no_grad():
        expected = module(*fresh)
    expected = expected if isinstance(expected, tuple) else (expected,)
    assert len(got) == len(expected)
    for name, a, b in zip(module.output_names, got, expected):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        m = compare_arrays(a.cpu().numpy(), b.cpu().numpy())
        if "mismatches" in m:
            assert m["mismatches"] == 0, name
        else:
            assert m["rel_err"] < 1e-4, (name, m)  # TF32 is off in fp32 engines


@needs_tensorrt
def test_engine_refuses_wrong_inputs(tmp_path):
    plan = trtb.build_engine(fp32_matmul_graph(tmp_path / "mm.onnx"), tmp_path / "mm.plan", precision="fp32", workspace_gb=1)
    engine = trtb.TensorRTEngine(plan, "cuda")
    x = torch.randn(2, 4, device="cuda")
    (y,) = engine(x)
    torch.cuda.synchronize()
    w = torch.tensor([0.1 * i for i in range(12)], device="cuda").reshape(4, 3)
    torch.testing.assert_close(y, x @ w, rtol=1e-5, atol=1e-5)
    with pytest.raises(TypeError, match="input 'x' is torch.float16"):
        engine(x.half())
    with pytest.raises(ValueError, match="input 'x' has shape \\[3, 4\\]"):
        engine(torch.randn(3, 4, device="cuda"))
    with pytest.raises(ValueError, match="input 'x' is on cpu"):
        engine(x.cpu())
