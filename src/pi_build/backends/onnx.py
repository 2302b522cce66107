"""ONNX export of a component: export (fixed shapes), clean, and check against PyTorch in onnxruntime.

    component module ──torch.onnx.export(dynamo=True)──► <name>.onnx (+ <name>.onnx.data past 2 GB)
                     ──clean_onnx (onnx-graphsurgeon: fold constants, cleanup, toposort)
                     ──verify_onnx (onnxruntime CPU vs the module, float32, fresh random inputs)

Why the dynamo exporter (``torch.export`` + onnxscript) and not the TorchScript one (``dynamo=False``):
both export our components on torch 2.13 (the TorchScript one is deprecated but still present), but
- it folds everything that depends on no input: the time embedding (computed in float64 by the
  reference) never reaches the graph, while the TorchScript exporter leaves ``Cast(to=DOUBLE)`` nodes,
  and TensorRT has no float64;
- it keeps every declared input, used or not (pi0.5's denoise ignores ``state``), so the ONNX inputs
  are exactly ``input_names``; the TorchScript exporter silently drops unused ones;
- data-dependent Python (``.tolist()``, ``if tensor:``) makes it fail loudly instead of baking one
  branch into the graph;
- its graphs are smaller (no Shape/Mod arithmetic for static shapes).
Its cost is time: torch.export + decomposition + onnxscript's optimizer take seconds per component
even at tiny sizes (the TorchScript exporter takes a fraction of a second). It needs the
``onnxscript`` package.

The exported graph carries whatever dtypes the module computes in: a float32 module gives a float32
graph (what ``verify_onnx`` checks), a bf16 component gives bf16 weights with explicit casts (what a
strongly typed TensorRT build takes as is).
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from pi_build.engine import accuracy
from pi_build.errors import OnnxExportError, OnnxMismatchError
from pi_build.io import atomic_files
from pi_build.spec import Gate

# Opset 18: has LayerNormalization (17+) and is read by every TensorRT 10.x ONNX parser and by
# onnxruntime >= 1.14. (torch 2.13's dynamo exporter defaults to 20.)
DEFAULT_OPSET = 18
PROTOBUF_LIMIT_BYTES = 2**31  # a single-file ONNX cannot hold more than 2 GB of weights
# The exported float32 graph against the float32 module: only the kernels' rounding differs.
ONNX_GATE = Gate(cosine=0.9999, rel_err=1e-4)


# ----------------------------------------------------------------------------- export


@contextlib.contextmanager
def _quiet_exporter_logs() -> Iterator[None]:
    """The exporter logs a line per skipped fold ("Skipping constant folding for op Split ...") and
    per missing torchvision op; they say nothing about our graphs, so hide them while exporting."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _root_cause(error: BaseException) -> str:
    """The first line of the innermost cause: torch.onnx wraps the real error in a generic one."""
    while error.__cause__ is not None:
        error = error.__cause__
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def _weight_bytes(module: nn.Module) -> int:
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def export_onnx(
    module: nn.Module,
    example_inputs: tuple[Tensor, ...],
    input_names: Sequence[str],
    output_names: Sequence[str],
    path: Path,
    opset: int = DEFAULT_OPSET,
    external_data: bool | None = None,
) -> Path:
    """Export ``module`` at the shapes of ``example_inputs`` (no dynamic axes) to ``path``.

    Weights go to ``<path>.data`` beside it when ``external_data`` is True, or, when it is None,
    only if they exceed protobuf's 2 GB limit. Written atomically: on failure nothing is left at
    ``path``. Returns ``path``.
    """
    path = Path(path)
    input_names, output_names = list(input_names), list(output_names)
    if not isinstance(example_inputs, tuple) or not all(isinstance(x, Tensor) for x in example_inputs):
        raise TypeError(f"example_inputs must be a tuple of tensors, got {type(example_inputs).__name__}")
    if len(input_names) != len(example_inputs):
        raise ValueError(f"{len(example_inputs)} example inputs but {len(input_names)} input names {input_names}")
    for kind, names in (("input", input_names), ("output", output_names)):
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate {kind} names: {names}")
    if external_data is None:
        external_data = _weight_bytes(module) >= PROTOBUF_LIMIT_BYTES

    module = module.eval()
    what = type(module).__name__
    with atomic_files(path) as tmp:
        try:
            with torch.no_grad(), _quiet_exporter_logs():
                program = torch.onnx.export(
                    module,
                    example_inputs,
                    input_names=input_names,
                    output_names=output_names,
                    opset_version=opset,
                    dynamo=True,
                    verbose=False,
                )
        except ImportError as e:  # onnxscript missing: torch's message names it, make the fix explicit
            raise OnnxExportError(
                f"exporting {what} to ONNX needs the onnxscript package ({e}); install it with "
                "`pip install onnxscript` (part of pi-build's 'onnx' extra)"
            ) from e
        except Exception as e:
            raise OnnxExportError(f"exporting {what} to ONNX failed: {_root_cause(e)}") from e
        graph_outputs = [value.name for value in program.model.graph.outputs]
        if graph_outputs != output_names:
            raise OnnxExportError(
                f"{what} returns {len(graph_outputs)} outputs {graph_outputs}, but output_names are {output_names}"
            )
        program.save(tmp / path.name, external_data=external_data)
    return path


# ----------------------------------------------------------------------------- inspection


def describe_onnx(path: Path) -> dict:
    """What a backend needs to know about a graph, read without loading external weights:
    node count and op types, the dtypes of the weights, inputs and outputs, the float64 tensors
    (TensorRT has none) and the FP8 quantize/dequantize nodes."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    graph = model.graph
    type_name = onnx.TensorProto.DataType.Name
    fp8 = onnx.TensorProto.FLOAT8E4M3FN
    double = onnx.TensorProto.DOUBLE

    constants = [(init.name, init.data_type) for init in graph.initializer]
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    constants.append((node.output[0], attr.t.data_type))

    def io(values) -> dict[str, dict]:
        return {
            v.name: {
                "dtype": type_name(v.type.tensor_type.elem_type),
                "shape": [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        }

    float64 = [name for name, dtype in constants if dtype == double]
    float64 += [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info) if v.type.tensor_type.elem_type == double]
    for node in graph.node:
        if node.op_type == "Cast" and any(a.name == "to" and a.i == double for a in node.attribute):
            float64.append(node.output[0])

    # FP8 Q/DQ as ModelOpt writes them: native QuantizeLinear with a float8e4m3fn zero point (or
    # output_dtype, opset 21+), DequantizeLinear of an FP8 tensor (an FP8 weight or a Q output), or
    # the TensorRT custom ops TRT_FP8QuantizeLinear / TRT_FP8DequantizeLinear before post-processing.
    fp8_tensors = {name for name, dtype in constants if dtype == fp8}
    fp8_qdq = 0
    for node in graph.node:
        if node.op_type in ("TRT_FP8QuantizeLinear", "TRT_FP8DequantizeLinear"):
            fp8_qdq += 1
        elif node.op_type == "QuantizeLinear":
            zero_point_fp8 = len(node.input) > 2 and node.input[2] in fp8_tensors
            output_fp8 = any(a.name == "output_dtype" and a.i == fp8 for a in node.attribute)
            if zero_point_fp8 or output_fp8:
                fp8_qdq += 1
                fp8_tensors.add(node.output[0])
        elif node.op_type == "DequantizeLinear" and node.input[0] in fp8_tensors:
            fp8_qdq += 1

    return {
        "nodes": len(graph.node),
        "op_types": dict(Counter(node.op_type for node in graph.node).most_common()),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "weight_dtypes": sorted({type_name(dtype) for _, dtype in constants}),
        "inputs": io(graph.input),
        "outputs": io(graph.output),
        "float64_tensors": sorted(set(float64)),
        "fp8_qdq_nodes": fp8_qdq,
    }


# ----------------------------------------------------------------------------- cleaning


def _has_external_data(model) -> bool:
    import onnx

    return any(init.data_location == onnx.TensorProto.EXTERNAL for init in model.graph.initializer)


def clean_onnx(path: Path) -> dict:
    """Fold constants, drop dead nodes and sort the graph with onnx-graphsurgeon; rewrite ``path``
    atomically. Without onnx-graphsurgeon the file is left as exported and the result says so.

    Returns {"cleaned", "nodes_before", "nodes_after", "seconds"} (+ "note" when not cleaned).
    """
    import onnx

    path = Path(path)
    t0 = time.perf_counter()
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        nodes = describe_onnx(path)["nodes"]
        return {
            "cleaned": False,
            "nodes_before": nodes,
            "nodes_after": nodes,
            "seconds": time.perf_counter() - t0,
            "note": "onnx-graphsurgeon is not installed: graph left as exported "
            "(pip install onnx-graphsurgeon, part of pi-build's 'onnx' extra)",
        }

    model = onnx.load(str(path))  # with external weights: constant folding reads them
    external = _has_external_data(model)
    graph = gs.import_onnx(model)
    nodes_before = len(graph.nodes)
    try:
        graph.fold_constants().cleanup().toposort()
    except Exception as e:
        raise RuntimeError(f"onnx-graphsurgeon could not clean {path}: {e}") from e
    cleaned = gs.export_onnx(graph)
    with atomic_files(path) as tmp:
        target = tmp / path.name
        if external:
            onnx.save(cleaned, str(target), save_as_external_data=True, location=f"{path.name}.data")
        else:
            onnx.save(cleaned, str(target))
    return {
        "cleaned": True,
        "nodes_before": nodes_before,
        "nodes_after": len(cleaned.graph.node),
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- verification


def _module_device(module: nn.Module) -> torch.device:
    for tensor in list(module.parameters()) + list(module.buffers()):
        return tensor.device
    return torch.device("cpu")


def verify_onnx(
    path: Path,
    module: nn.Module,
    *,
    generator: torch.Generator,
    n_checks: int = 2,
    gate: Gate = ONNX_GATE,
) -> dict:
    """Run the graph in onnxruntime (CPU) and the module in PyTorch on ``n_checks`` fresh draws of
    ``module.example_inputs(generator)``; compare every output in float32.

    Float outputs must pass ``gate``, bool/int outputs must be equal (``accuracy.check_gate``);
    raises OnnxMismatchError naming the output, the draw and the numbers. Returns {"outputs":
    {name: worst metrics over the draws}, "checks", "gate", "seconds"}.
    """
    import onnxruntime as ort

    path = Path(path)
    t0 = time.perf_counter()
    facts = describe_onnx(path)
    low_precision = [d for d in facts["weight_dtypes"] if d in ("FLOAT16", "BFLOAT16")]
    if low_precision:
        raise ValueError(
            f"{path} carries {'/'.join(low_precision)} weights; verify_onnx compares in float32 on "
            "onnxruntime's CPU provider: verify the float32 export of the component instead"
        )
    input_names, output_names = list(module.input_names), list(module.output_names)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    graph_inputs = [i.name for i in session.get_inputs()]
    unknown = [name for name in graph_inputs if name not in input_names]
    if unknown:
        raise ValueError(f"{path} has inputs {unknown} that the module does not declare (input_names: {input_names})")
    graph_outputs = [o.name for o in session.get_outputs()]
    if graph_outputs != output_names:
        raise ValueError(f"{path} has outputs {graph_outputs}, the module declares {output_names}")

    device = _module_device(module)
    worst: dict[str, dict[str, float]] = {}
    for draw in range(n_checks):
        inputs = module.example_inputs(generator)
        feed = {name: x.detach().cpu().numpy() for name, x in zip(input_names, inputs) if name in graph_inputs}
        got = session.run(None, feed)
        with torch.no_grad():
            expected = module(*(x.to(device) for x in inputs))
        expected = expected if isinstance(expected, (tuple, list)) else (expected,)
        for name, actual, ref in zip(output_names, got, expected):
            ref = ref.detach().cpu().numpy()
            if actual.shape != ref.shape:
                raise OnnxMismatchError(f"{path}: output {name!r} has shape {list(actual.shape)} in onnxruntime, {list(ref.shape)} in PyTorch")
            result = accuracy.metrics(actual, ref)
            worst[name] = accuracy.worst([result, worst[name]]) if name in worst else result
            accuracy.check_gate(f"{path.name}: output {name!r} (draw {draw})", result, gate, error=OnnxMismatchError)
    return {
        "outputs": worst,
        "checks": n_checks,
        "gate": {"cosine": gate.cosine, "rel_err": gate.rel_err},
        "seconds": time.perf_counter() - t0,
    }
