"""Compile backends: turn a component module into engine files, and load them back.

- ``inductor`` (default, wherever PyTorch runs): torch.export + AOTInductor into a ``.pt2``
  package of native code that loads without recompiling. Whether this machine can load such
  packages is probed in a fresh process (and remembered) (a crash there cannot take the build down); where it
  cannot -- seen on our H100/H200 machines with torch 2.11 + CUDA 13, where loading any CUDA
  AOTInductor package segfaults -- the engine instead carries the exported program and Inductor's compiled-kernel cache
  (``torch.compiler.save_cache_artifacts``), and loads through ``torch.compile`` with that cache:
  the same Inductor kernels, recompiled from cache at load. The manifest says which runner an
  engine uses.
- ``eager``: the torch.export'ed program saved as is, run without compilation.
- ``tensorrt``: see ``tensorrt_backend.py``; only where TensorRT is installed.

An engine is called like the component: ``engine(*inputs) -> tuple of outputs``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

BACKENDS = ("inductor", "eager", "tensorrt")
Engine = Callable[..., tuple[Tensor, ...]]

AOTI_FILE, PROGRAM_FILE, CACHE_FILE = "engine.pt2", "program.pt2", "inductor_cache.bin"


def _as_tuple(out) -> tuple[Tensor, ...]:
    return tuple(out) if isinstance(out, (tuple, list)) else (out,)


def export_program(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export with fixed shapes (non-strict: our modules are plain PyTorch)."""
    with torch.no_grad():
        return torch.export.export(module, example_inputs, strict=False)


def _inductor_options(cuda: bool) -> dict[str, Any]:
    # max_autotune picks GEMM/attention kernels by measurement (GPU only; it multiplies compile time).
    return {"max_autotune": cuda and os.environ.get("PI_BUILD_MAX_AUTOTUNE") == "1"}


_PROBE = """
import sys, torch
device = sys.argv[1]
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.GELU()).to(device)
x = torch.randn(16, 64, device=device)
program = torch.export.export(m, (x,))
path = torch._inductor.aoti_compile_and_package(program, package_path=sys.argv[2])
assert torch.allclose(torch._inductor.aoti_load_package(path)(x), m(x), atol=1e-5)
"""


def aoti_works(device: torch.device) -> tuple[bool, str]:
    """Can this machine load AOTInductor packages for ``device``? Probed with a tiny package in a fresh
    process (the failure seen is a segfault); a success or a crash is remembered under ~/.cache/pi-build
    (PI_BUILD_CACHE) per torch version, device name and Python executable."""
    import hashlib
    import json
    import tempfile

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = hashlib.sha256(f"{torch.__version__}|{name}|{sys.executable}".encode()).hexdigest()[:16]
    memo = Path(os.environ.get("PI_BUILD_CACHE", Path.home() / ".cache" / "pi-build")) / f"aoti-probe-{key}.json"
    if memo.is_file():
        seen = json.loads(memo.read_text())
        return seen["ok"], seen["problem"]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            proc = subprocess.run([sys.executable, "-c", _PROBE, device.type, str(Path(tmp) / "probe.pt2")],
                                  capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return False, "the AOTInductor probe did not finish in 15 minutes"
    ok = proc.returncode == 0
    reason = f"signal {-proc.returncode}" if proc.returncode < 0 else f"exit code {proc.returncode}"
    problem = "" if ok else f"AOTInductor packages do not load on this machine ({name}, torch {torch.__version__}: {reason})"
    if ok or proc.returncode < 0:  # remember success and crashes; other failures may be passing (retry next time)
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp_memo = memo.with_name(f".{memo.name}.{os.getpid()}")
        tmp_memo.write_text(json.dumps({"ok": ok, "problem": problem, "stderr": proc.stderr[-2000:]}))
        tmp_memo.replace(memo)
    return ok, problem


def python_ops(program: torch.export.ExportedProgram) -> list[str]:
    """pi-build's own custom ops in the program (kernels.py): Python code, which an AOTInductor package cannot hold."""
    return sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("pi_build.")})


def compile_engine(module: nn.Module, example_inputs: tuple[Tensor, ...], backend: str, out_dir: Path) -> dict[str, Any]:
    """Build the engine files for ``module`` into ``out_dir``; returns {"files": [...], "runner": ..., ...}."""
    if backend == "inductor":
        program = export_program(module, example_inputs)
        cuda = example_inputs[0].is_cuda
        ok, problem = aoti_works(example_inputs[0].device)
        custom_ops = python_ops(program)
        if ok and custom_ops:
            ok, problem = False, f"the engine calls pi-build's Triton kernels ({', '.join(custom_ops)}), which AOTInductor packages cannot hold"
        if ok:
            aoti = out_dir / AOTI_FILE
            torch._inductor.aoti_compile_and_package(program, package_path=str(aoti), inductor_configs=_inductor_options(cuda))
            return {"files": [AOTI_FILE], "runner": "aoti"}
        # Fall back to the same Inductor kernels through torch.compile, with their cache shipped.
        torch.export.save(program, str(out_dir / PROGRAM_FILE))
        torch.compiler.reset()
        compiled = torch.compile(program.module(), options=_inductor_options(cuda))
        with torch.no_grad():
            compiled(*example_inputs)
        artifacts_bytes, _ = torch.compiler.save_cache_artifacts() or (b"", None)
        (out_dir / CACHE_FILE).write_bytes(artifacts_bytes)
        return {"files": [PROGRAM_FILE, CACHE_FILE], "runner": "torch.compile", "aoti_problem": problem}
    if backend == "eager":
        torch.export.save(export_program(module, example_inputs), str(out_dir / PROGRAM_FILE))
        return {"files": [PROGRAM_FILE], "runner": "eager"}
    if backend == "tensorrt":
        from pi_build.backends import tensorrt as tensorrt_backend

        tensorrt_backend.compile_component(module, example_inputs, out_dir)
        return {"files": sorted(p.name for p in out_dir.iterdir() if p.is_file()), "runner": "tensorrt"}
    raise ValueError(f"unknown backend {backend!r}; use one of {', '.join(BACKENDS)}")


def load_engine(folder: Path, runner: str, device: torch.device) -> Engine:
    """Load the engine in ``folder`` built by ``compile_engine`` (``runner`` from its manifest)."""
    if runner == "aoti":
        package = torch._inductor.aoti_load_package(str(folder / AOTI_FILE))
        return lambda *inputs: _as_tuple(package(*inputs))
    if runner in ("torch.compile", "eager"):
        from pi_build.engine import kernels  # noqa: F401  registers the custom ops a program may call

        module = torch.export.load(str(folder / PROGRAM_FILE)).module().to(device)
        if runner == "torch.compile":
            cache = (folder / CACHE_FILE).read_bytes()
            if cache:
                torch.compiler.load_cache_artifacts(cache)
            module = torch.compile(module, options=_inductor_options(device.type == "cuda"))
        return lambda *inputs: _as_tuple(module(*inputs))
    if runner == "tensorrt":
        from pi_build.backends import tensorrt as tensorrt_backend

        engine = tensorrt_backend.load_component(folder / tensorrt_backend.ENGINE_FILE, device)
        return lambda *inputs: _as_tuple(engine(*inputs))
    raise ValueError(f"unknown engine runner {runner!r}")
