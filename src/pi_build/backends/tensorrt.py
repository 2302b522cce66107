"""TensorRT backend: ONNX -> serialized engine (a "plan") -> a runner called like the component.

    component ──export_onnx──► .onnx ──build_engine (Builder + OnnxParser + BuilderConfig)──► engine.plan
    engine.plan ──TensorRTEngine──► engine(*inputs) -> tuple of outputs, on the current CUDA stream

Only TensorRT's public Python API is used, and ``tensorrt`` is imported lazily: everything here
raises ``BackendUnavailable`` (saying what to install) where it is missing or no GPU is visible.
Nothing emulates TensorRT.

Precision. TensorRT 10.12 deprecated "weakly typed" builds (precision flags that let the builder
pick kernels) and TensorRT 11 removed the flags (BuilderFlag.FP16 / BF16 / FP8); strongly typed
networks take each tensor's dtype from the ONNX. So the precision should live in the graph:
- fp32 / bf16 / fp16: export the component in that dtype (``build_component(..., precision="bf16")``
  gives bf16 weights with float32 norms and explicit casts) and the network is built strongly
  typed. A float32 graph with precision fp16/bf16 falls back to the weakly typed flag where the
  installed TensorRT still has it (10.x), and is refused with a clear message where it does not.
- fp8: the graph must carry FP8 quantize/dequantize nodes; TensorRT builds it strongly typed.
  NVIDIA ModelOpt produces them (nvidia-modelopt 0.47.0, checked here on a small MLP):
  ``mtq.quantize(module, mtq.FP8_DEFAULT_CFG, forward_loop)`` swaps nn.Linear for quantized
  linears; ``torch.onnx.export(module, inputs, path, dynamo=False, opset_version=19)`` (ModelOpt's
  symbolics exist for the TorchScript exporter only) writes ``trt::TRT_FP8QuantizeLinear`` /
  ``TRT_FP8DequantizeLinear`` custom ops; ``modelopt.onnx.export.FP8QuantExporter.process_model(
  onnx.load(path))`` (needs ``nvidia-modelopt[onnx]``) turns them into native QuantizeLinear with
  a float8e4m3fn zero point on activations and DequantizeLinear of float8e4m3fn weights.
  ``build_engine`` accepts either form and refuses an fp8 build of a graph with neither.
"""

from __future__ import annotations

import functools
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from pi_build.errors import BackendUnavailable
from pi_build.io import atomic_write, write_json
from pi_build.spec import Precision

# The recipe's precisions, and fp16, which TensorRT builds but recipes do not offer.
FP16 = "fp16"
PRECISIONS = (Precision.FP32, FP16, Precision.BF16, Precision.FP8)
DEFAULT_WORKSPACE_GB = 4.0
ENGINE_FILE = "engine.plan"

INSTALL_HINT = (
    "On x86-64 or ARM server Linux: `pip install tensorrt` (builder + runtime; CUDA 13 wheels by "
    "default, `pip install tensorrt-cu12` for CUDA 12); releases missing from the public package index "
    "come from NVIDIA's package index (add it with pip's --extra-index-url). On Jetson (JetPack 6): "
    "TensorRT comes with JetPack; `sudo apt install python3-libnvinfer` and create the venv with "
    "--system-site-packages so that it sees the system's `tensorrt`. torch_tensorrt is not needed."
)


def tensorrt_available() -> tuple[bool, str]:
    """(True, "TensorRT <version>") where engines can be built and run, else (False, why + how to fix)."""
    try:
        import tensorrt as trt
    except (ImportError, OSError) as e:  # OSError: the bindings are there but libnvinfer is not
        return False, f"TensorRT is not installed ({e}). {INSTALL_HINT}"
    if not torch.cuda.is_available():
        return False, f"TensorRT {trt.__version__} is installed, but PyTorch sees no CUDA GPU; TensorRT engines build and run on NVIDIA GPUs only."
    return True, f"TensorRT {trt.__version__}"


def _import_tensorrt():
    ok, why = tensorrt_available()
    if not ok:
        raise BackendUnavailable(why)
    import tensorrt as trt

    return trt


@functools.cache
def _logger(trt):
    """One logger for every builder and runtime: TensorRT keeps the first it is given process-wide."""
    return trt.Logger(trt.Logger.WARNING)


# ----------------------------------------------------------------------------- building


def _graph_precision(facts: dict) -> str:
    """The low precision a graph's weights are in (bf16 / fp16), else fp32."""
    dtypes = facts["weight_dtypes"]
    return Precision.BF16 if "BFLOAT16" in dtypes else FP16 if "FLOAT16" in dtypes else Precision.FP32


def check_onnx_for_tensorrt(onnx_path: Path, precision: str) -> dict:
    """Refuse, with the reason, a graph TensorRT cannot build at ``precision``; returns describe_onnx's facts.

    Needs only onnx, so these errors show up on machines without TensorRT too.
    """
    from pi_build.backends.onnx import describe_onnx

    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise FileNotFoundError(f"no ONNX file at {onnx_path}")
    facts = describe_onnx(onnx_path)
    if facts["float64_tensors"]:
        names = ", ".join(facts["float64_tensors"][:5])
        raise ValueError(f"{onnx_path} has float64 tensors ({names}); TensorRT has no float64: compute them in float32 or precompute them as buffers")
    if precision == Precision.FP8:
        if facts["fp8_qdq_nodes"] == 0:
            raise ValueError(
                f"precision 'fp8' needs FP8 quantize/dequantize nodes in the ONNX and {onnx_path} has none. "
                "Make them with NVIDIA ModelOpt: mtq.quantize(module, mtq.FP8_DEFAULT_CFG, forward_loop), "
                "torch.onnx.export(module, inputs, path, dynamo=False, opset_version=19), then "
                "modelopt.onnx.export.FP8QuantExporter.process_model(onnx.load(path)) "
                "(pip install 'nvidia-modelopt[onnx]'); see tensorrt_backend's docstring."
            )
        return facts
    graph = _graph_precision(facts)
    if graph != Precision.FP32 and graph != precision:
        raise ValueError(f"{onnx_path} carries {graph} weights but precision {precision!r} was asked: export the component in {precision}")
    return facts


def build_engine(onnx_path: Path, out_path: Path, *, precision: str, workspace_gb: float = DEFAULT_WORKSPACE_GB) -> Path:
    """Build a TensorRT engine for the fixed shapes of ``onnx_path`` and write it atomically to ``out_path``.

    precision: "fp32" (TF32 off, so fp32 means fp32), "fp16" / "bf16" (strongly typed when the graph
    is already in that dtype, else TensorRT 10's weakly typed flag), FP8 (the graph must carry
    FP8 Q/DQ nodes; strongly typed). workspace_gb caps the builder's scratch memory.
    """
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    facts = check_onnx_for_tensorrt(onnx_path, precision)
    trt = _import_tensorrt()

    flags = []
    strongly_typed = precision == Precision.FP8 or _graph_precision(facts) == precision
    if not strongly_typed:  # a float32 graph asked to run in fp16 / bf16
        flag = getattr(trt.BuilderFlag, precision.upper(), None)
        if flag is None:
            raise ValueError(
                f"TensorRT {trt.__version__} builds strongly typed networks only (no BuilderFlag.{precision.upper()}), "
                f"and {onnx_path} is float32: export the component in {precision} so that the ONNX carries it"
            )
        flags.append(flag)

    logger = _logger(trt)
    builder = trt.Builder(logger)
    creation_flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if strongly_typed else 0
    network = builder.create_network(creation_flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weights are found
        errors = "\n".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT {trt.__version__} could not parse {onnx_path}:\n{errors}")

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * 2**30))
    for flag in flags:
        config.set_flag(flag)
    if precision == Precision.FP32 and hasattr(trt.BuilderFlag, "TF32"):
        config.clear_flag(trt.BuilderFlag.TF32)  # on by default; PyTorch's float32 matmuls do not use it
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT {trt.__version__} could not build an engine from {onnx_path} at {precision} (its log above says why)")
    atomic_write(out_path, plan)
    return out_path


# ----------------------------------------------------------------------------- running


def _torch_dtype(trt, dtype) -> torch.dtype:
    # TensorRT's DataType member names (trt.DataType.FLOAT, ...).
    table = {
        "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
        "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64,
        "BOOL": torch.bool, "FP8": torch.float8_e4m3fn,
    }  # fmt: skip
    for name, torch_dtype in table.items():
        if getattr(trt.DataType, name, None) == dtype:
            return torch_dtype
    raise TypeError(f"TensorRT tensor type {dtype} has no PyTorch equivalent here")


class TensorRTEngine:
    """A TensorRT engine called like the component it was built from: ``engine(*inputs)`` binds the
    input tensors (CUDA, contiguous) by name, allocates the outputs, enqueues the engine on the
    current CUDA stream and returns the outputs (in ``output_names`` order) without synchronizing.

    input_names: the order the caller passes inputs in (the component's ``input_names``). TensorRT
    drops network inputs that nothing reads (pi0.5's denoise ignores ``state``); such inputs are
    accepted and ignored. Defaults to the engine's own inputs.
    """

    def __init__(
        self,
        plan_path: Path,
        device: torch.device | str = "cuda",
        input_names: Sequence[str] | None = None,
        output_names: Sequence[str] | None = None,
    ):
        trt = _import_tensorrt()
        self.path = Path(plan_path)
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"TensorRT engines run on CUDA devices, not {self.device}")
        if self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        with torch.cuda.device(self.device):
            self._runtime = trt.Runtime(_logger(trt))
            self._engine = self._runtime.deserialize_cuda_engine(self.path.read_bytes())
            if self._engine is None:
                raise RuntimeError(f"TensorRT {trt.__version__} could not load {self.path} (built by another TensorRT version or for another GPU?)")
            self._context = self._engine.create_execution_context()

        names = [self._engine.get_tensor_name(i) for i in range(self._engine.num_io_tensors)]
        engine_inputs = [n for n in names if self._engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        engine_outputs = [n for n in names if n not in engine_inputs]
        self._dtypes = {n: _torch_dtype(trt, self._engine.get_tensor_dtype(n)) for n in names}
        self._shapes = {n: tuple(self._engine.get_tensor_shape(n)) for n in names}
        self.input_names = list(input_names) if input_names is not None else engine_inputs
        self.output_names = list(output_names) if output_names is not None else engine_outputs
        missing = [n for n in engine_inputs if n not in self.input_names]
        if missing:
            raise ValueError(f"{self.path} has inputs {missing} that are not among input_names {self.input_names}")
        if sorted(self.output_names) != sorted(engine_outputs):
            raise ValueError(f"{self.path} has outputs {engine_outputs}, expected {self.output_names}")
        self._engine_inputs = set(engine_inputs)

    def __call__(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        if len(inputs) != len(self.input_names):
            raise ValueError(f"{self.path.name} takes {len(self.input_names)} inputs {self.input_names}, got {len(inputs)}")
        for name, x in zip(self.input_names, inputs):
            if name not in self._engine_inputs:
                continue  # read by nothing: TensorRT removed it from the engine
            if x.device != self.device:
                raise ValueError(f"input {name!r} is on {x.device}, the engine runs on {self.device}")
            if x.dtype != self._dtypes[name]:
                raise TypeError(f"input {name!r} is {x.dtype}, the engine was built for {self._dtypes[name]}")
            shape = tuple(x.shape)
            if not self._context.set_input_shape(name, shape):
                raise ValueError(f"input {name!r} has shape {list(shape)}, the engine was built for {list(self._shapes[name])}")
            # A temporary from .contiguous() may be freed after enqueueing: PyTorch's allocator only
            # reuses it for work on the same stream, which runs after the engine.
            self._context.set_tensor_address(name, x.contiguous().data_ptr())
        outputs = []
        for name in self.output_names:
            out = torch.empty(tuple(self._context.get_tensor_shape(name)), dtype=self._dtypes[name], device=self.device)
            self._context.set_tensor_address(name, out.data_ptr())
            outputs.append(out)
        stream = torch.cuda.current_stream(self.device)
        if not self._context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError(f"TensorRT failed to enqueue {self.path.name}")
        return tuple(outputs)


# ----------------------------------------------------------------------------- the backend API (backends.py)


def _io_file(plan_path: Path) -> Path:
    return plan_path.with_suffix(".io.json")


def compile_component(module: nn.Module, example_inputs: tuple[Tensor, ...], out_dir: Path) -> Path:
    """Export ``module`` to ONNX (in a temporary folder), clean it, and build ``out_dir/engine.plan``
    at ``module.precision``; ``engine.io.json`` beside it records the input and output names."""
    from pi_build.backends.onnx import clean_onnx, export_onnx

    ok, why = tensorrt_available()  # fail before a long export
    if not ok:
        raise BackendUnavailable(why)
    precision = getattr(module, "precision", Precision.FP32)
    if precision == Precision.FP8:
        raise ValueError(
            "the TensorRT backend builds FP8 from ONNX with FP8 quantize/dequantize nodes, which the "
            "component export does not produce (pi-build's Fp8Linear is not ModelOpt's quantized "
            "linear); build fp8 components with the inductor backend, or see tensorrt_backend's docstring"
        )
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(module, example_inputs, module.input_names, module.output_names, Path(tmp) / "component.onnx")
        clean_onnx(onnx_path)
        plan = build_engine(onnx_path, out_dir / ENGINE_FILE, precision=precision)
    io = {"input_names": list(module.input_names), "output_names": list(module.output_names)}
    write_json(_io_file(plan), io)
    return plan


def load_component(plan_path: Path, device: torch.device | str) -> TensorRTEngine:
    """The engine written by ``compile_component``, taking inputs in the component's order."""
    plan_path = Path(plan_path)
    io_path = _io_file(plan_path)
    if not io_path.is_file():
        raise FileNotFoundError(f"{io_path} is missing: it names the inputs and outputs of {plan_path.name}")
    io = json.loads(io_path.read_text())
    return TensorRTEngine(plan_path, device, io["input_names"], io["output_names"])
