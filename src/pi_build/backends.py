"""Compile backends: turn a component module into an engine file, and load it back.

- ``inductor`` (default, wherever PyTorch runs): torch.export + AOTInductor into a ``.pt2``
  package of native code that loads without recompiling.
- ``eager``: the torch.export'ed program saved as is (``.pt2`` ExportedProgram), run without
  compilation. Quick to build; useful for debugging and as the slow baseline.
- ``tensorrt``: see ``tensorrt_backend.py``; only where TensorRT is installed.

An engine is called like the component: ``engine(*inputs) -> tuple of outputs``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor, nn

BACKENDS = ("inductor", "eager", "tensorrt")
Engine = Callable[..., tuple[Tensor, ...]]


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def export_program(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export with fixed shapes (non-strict: our modules are plain PyTorch)."""
    with torch.no_grad():
        return torch.export.export(module, example_inputs, strict=False)


def compile_engine(module: nn.Module, example_inputs: tuple[Tensor, ...], backend: str, out_dir: Path) -> Path:
    """Build the engine file for ``module`` into ``out_dir``; returns its path."""
    if backend == "inductor":
        program = export_program(module, example_inputs)
        path = out_dir / "engine.pt2"
        # max_autotune picks GEMM/attention kernels by measurement (GPU only; it multiplies compile time).
        options = {"max_autotune": example_inputs[0].is_cuda and os.environ.get("PI_BUILD_MAX_AUTOTUNE") == "1"}
        torch._inductor.aoti_compile_and_package(program, package_path=str(path), inductor_configs=options)
        return path
    if backend == "eager":
        path = out_dir / "program.pt2"
        torch.export.save(export_program(module, example_inputs), str(path))
        return path
    if backend == "tensorrt":
        from pi_build import tensorrt_backend

        return tensorrt_backend.compile_component(module, example_inputs, out_dir)
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def load_engine(path: Path, backend: str, device: torch.device) -> Engine:
    """Load an engine file built by ``compile_engine``."""
    if backend == "inductor":
        runner = torch._inductor.aoti_load_package(str(path))
        return lambda *inputs: _as_tuple(runner(*inputs))
    if backend == "eager":
        module = torch.export.load(str(path)).module().to(device)
        return lambda *inputs: _as_tuple(module(*inputs))
    if backend == "tensorrt":
        from pi_build import tensorrt_backend

        engine = tensorrt_backend.load_component(path, device)
        return lambda *inputs: _as_tuple(engine(*inputs))
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")
