"""Compile backends: turn a component module into engine files, and load them back.

- ``inductor`` (default): torch.export + AOTInductor, or torch.compile with a shipped kernel cache
  where AOTInductor packages cannot load (``inductor.py``);
- ``eager``: the exported program, uncompiled (``eager.py``);
- ``tensorrt``: ONNX (``onnx.py``) -> a TensorRT engine, only where TensorRT is installed
  (``tensorrt.py``); never emulated.

An engine is called like the component: ``engine(*inputs) -> tuple of outputs``. The manifest's
``engine_runner`` says how an engine loads: aoti, torch.compile, eager or tensorrt.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pi_build.spec import Backend

Engine = Callable[..., tuple[Tensor, ...]]
RUNNERS = ("aoti", "torch.compile", "eager", "tensorrt")


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def compile_engine(module: nn.Module, example_inputs: tuple[Tensor, ...], backend: Backend, out_dir: Path,
                   autotune: bool = False) -> dict[str, Any]:
    """Build the engine files for ``module`` into ``out_dir``; returns {"files": [...], "runner": ..., ...}.
    ``autotune`` (inductor): GEMM kernels chosen by timing them, on a GPU."""
    backend = Backend(backend)
    if backend == Backend.INDUCTOR:
        from pi_build.backends import inductor

        return inductor.compile_engine(module, example_inputs, out_dir, autotune)
    if backend == Backend.EAGER:
        from pi_build.backends import eager

        return eager.compile_engine(module, example_inputs, out_dir)
    from pi_build.backends import tensorrt

    tensorrt.compile_component(module, example_inputs, out_dir)
    return {"files": sorted(p.name for p in out_dir.iterdir() if p.is_file()), "runner": "tensorrt"}


def load_engine(folder: Path, runner: str, device: torch.device, autotune: bool = False) -> Engine:
    """Load the engine in ``folder`` built by ``compile_engine`` (``runner`` and ``autotune`` from its manifest)."""
    if runner in ("aoti", "torch.compile"):
        from pi_build.backends import inductor

        engine = inductor.load_engine(folder, runner, device, autotune)
    elif runner == "eager":
        from pi_build.backends import eager

        engine = eager.load_engine(folder, device)
    elif runner == "tensorrt":
        from pi_build.backends import tensorrt

        engine = tensorrt.load_component(folder / tensorrt.ENGINE_FILE, device)
    else:
        raise ValueError(f"unknown engine runner {runner!r}; known: {', '.join(RUNNERS)}")
    return lambda *inputs: _as_tuple(engine(*inputs))
