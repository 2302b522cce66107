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
import os
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

# Opset 18: has LayerNormalization (17+) and is read by every TensorRT 10.x ONNX parser and by
# onnxruntime >= 1.14. (torch 2.13's dynamo exporter defaults to 20.)
DEFAULT_OPSET = 18
PROTOBUF_LIMIT_BYTES = 2**31  # a single-file ONNX cannot hold more than 2 GB of weights
DEFAULT_MAX_REL_ERR = 1e-4
DEFAULT_MIN_COSINE = 0.9999


class OnnxExportError(RuntimeError):
    """torch.onnx could not export the module (the message says which module and why)."""


class OnnxMismatchError(AssertionError):
    """The ONNX graph, run in onnxruntime, does not match the PyTorch module within the gate."""


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


def _publish(tmp_dir: Path, path: Path) -> None:
    """Move what was saved in ``tmp_dir`` (the model, named ``path.name``, and any external data file
    it references by relative name) next to ``path``. The model moves last: once ``path`` exists,
    its data file is already in place."""
    model = tmp_dir / path.name
    for file in tmp_dir.iterdir():
        if file != model:
            os.replace(file, path.parent / file.name)
    os.replace(model, path)


@contextlib.contextmanager
def _staging_dir(path: Path) -> Iterator[Path]:
    """A temporary folder beside ``path`` (same file system, so the final renames are atomic)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


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
    with _staging_dir(path) as tmp:
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
        _publish(tmp, path)
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
    with _staging_dir(path) as tmp:
        target = tmp / path.name
        if external:
            onnx.save(cleaned, str(target), save_as_external_data=True, location=f"{path.name}.data")
        else:
            onnx.save(cleaned, str(target))
        _publish(tmp, path)
    return {
        "cleaned": True,
        "nodes_before": nodes_before,
        "nodes_after": len(cleaned.graph.node),
        "seconds": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- verification


def compare_arrays(actual: np.ndarray, expected: np.ndarray) -> dict[str, float]:
    """max_abs, rel_err = ||a - b|| / ||b|| and cosine(a, b), in float64. Non-float (bool/int)
    outputs are compared exactly: ``mismatches`` counts differing elements."""
    if expected.dtype.kind not in "fc":
        mismatches = int(np.count_nonzero(actual != expected))
        return {"mismatches": mismatches}
    a, b = actual.astype(np.float64).ravel(), expected.astype(np.float64).ravel()
    diff_norm, ref_norm = np.linalg.norm(a - b), np.linalg.norm(b)
    if ref_norm > 0:
        rel_err = diff_norm / ref_norm
    else:
        rel_err = 0.0 if diff_norm == 0 else float("inf")
    norms = np.linalg.norm(a) * ref_norm
    if norms > 0:
        cosine = float(a @ b / norms)
    else:
        cosine = 1.0 if diff_norm == 0 else 0.0
    return {"max_abs": float(np.abs(a - b).max(initial=0.0)), "rel_err": float(rel_err), "cosine": cosine}


def _worse(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """Element-wise worst of two metric dicts (NaN counts as worst)."""
    out = {}
    for key, x in a.items():
        y = b[key]
        if key == "cosine":
            out[key] = x if (np.isnan(x) or x < y) else y
        else:
            out[key] = x if (np.isnan(x) or x > y) else y
    return out


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
    max_rel_err: float = DEFAULT_MAX_REL_ERR,
    min_cosine: float = DEFAULT_MIN_COSINE,
) -> dict:
    """Run the graph in onnxruntime (CPU) and the module in PyTorch on ``n_checks`` fresh draws of
    ``module.example_inputs(generator)``; compare every output in float32.

    Gates: rel_err <= max_rel_err and cosine >= min_cosine for float outputs, exact equality for
    bool/int outputs; raises OnnxMismatchError naming the output, the draw and the numbers.
    Returns {"outputs": {name: worst metrics over the draws}, "checks", "max_rel_err",
    "min_cosine", "seconds"}.
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
            metrics = compare_arrays(actual, ref)
            worst[name] = metrics if name not in worst else _worse(worst[name], metrics)
            _check_gate(path, name, draw, metrics, max_rel_err, min_cosine)
    return {
        "outputs": worst,
        "checks": n_checks,
        "max_rel_err": max_rel_err,
        "min_cosine": min_cosine,
        "seconds": time.perf_counter() - t0,
    }


def _check_gate(path: Path, name: str, draw: int, m: dict[str, float], max_rel_err: float, min_cosine: float) -> None:
    where = f"{path.name}: output {name!r} (draw {draw})"
    if "mismatches" in m:
        if m["mismatches"]:
            raise OnnxMismatchError(f"{where}: {m['mismatches']} elements differ between onnxruntime and PyTorch")
        return
    # Written as `not (x <= limit)` so that NaN fails the gate.
    if not m["rel_err"] <= max_rel_err:
        raise OnnxMismatchError(f"{where}: rel_err {m['rel_err']:.3g} > {max_rel_err:g} (max_abs {m['max_abs']:.3g}, cosine {m['cosine']:.6f})")
    if not m["cosine"] >= min_cosine:
        raise OnnxMismatchError(f"{where}: cosine {m['cosine']:.6f} < {min_cosine} (rel_err {m['rel_err']:.3g})")
