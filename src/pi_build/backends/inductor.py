"""The ``inductor`` backend (the default, wherever PyTorch runs).

torch.export + AOTInductor into a ``.pt2`` package of native code that loads without
recompiling. Whether this machine can load such packages is probed once in a fresh process and
remembered (a crash there cannot take the build down). Where it cannot -- seen on our H100/H200
machines with torch 2.11 + CUDA 13, where loading any CUDA AOTInductor package segfaults -- the
engine instead carries the exported program and Inductor's compiled-kernel cache
(``torch.compiler.save_cache_artifacts``) and loads through ``torch.compile`` with that cache:
the same Inductor kernels, recompiled from cache at load. An engine that calls pi-build's Triton
kernels (Python custom ops) always takes the second way: an AOTInductor package cannot hold them.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pi_build.io import atomic_write, read_json, write_json

AOTI_FILE, PROGRAM_FILE, CACHE_FILE = "engine.pt2", "program.pt2", "inductor_cache.bin"
AOTI, TORCH_COMPILE = "aoti", "torch.compile"  # the runners a manifest's engine_runner names


def export_program(module: nn.Module, example_inputs: tuple[Tensor, ...]) -> torch.export.ExportedProgram:
    """torch.export with fixed shapes (non-strict: our modules are plain PyTorch)."""
    with torch.no_grad():
        return torch.export.export(module, example_inputs, strict=False)


def _options(cuda: bool, autotune: bool) -> dict[str, Any]:
    # max_autotune picks GEMM kernels by timing them (GPU only; it multiplies compile time). A
    # torch.compile engine must load with the options it was built with: they are part of the key of
    # the shipped kernel cache, and other options would compile the program anew at load.
    return {"max_autotune": cuda and autotune}


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
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = hashlib.sha256(f"{torch.__version__}|{name}|{sys.executable}".encode()).hexdigest()[:16]
    memo = Path(os.environ.get("PI_BUILD_CACHE", Path.home() / ".cache" / "pi-build")) / f"aoti-probe-{key}.json"
    if memo.is_file():
        seen = read_json(memo)
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
        write_json(memo, {"ok": ok, "problem": problem, "stderr": proc.stderr[-2000:]})
    return ok, problem


def python_ops(program: torch.export.ExportedProgram) -> list[str]:
    """pi-build's own custom ops in the program (engine.kernels): Python code, which an AOTInductor package cannot hold."""
    return sorted({str(n.target) for n in program.graph.nodes if n.op == "call_function" and str(n.target).startswith("pi_build.")})


def compile_engine(module: nn.Module, example_inputs: tuple[Tensor, ...], out_dir: Path, autotune: bool = False) -> dict[str, Any]:
    """Engine files for ``module`` in ``out_dir``: {"files": [...], "runner": aoti | torch.compile, "aoti_problem"?}."""
    program = export_program(module, example_inputs)
    cuda = example_inputs[0].is_cuda
    ok, problem = aoti_works(example_inputs[0].device)
    custom_ops = python_ops(program)
    if ok and custom_ops:
        ok, problem = False, f"the engine calls pi-build's Triton kernels ({', '.join(custom_ops)}), which AOTInductor packages cannot hold"
    if ok:
        torch._inductor.aoti_compile_and_package(program, package_path=str(out_dir / AOTI_FILE), inductor_configs=_options(cuda, autotune))
        return {"files": [AOTI_FILE], "runner": AOTI}
    # Fall back to the same Inductor kernels through torch.compile, with their cache shipped.
    torch.export.save(program, str(out_dir / PROGRAM_FILE))
    torch.compiler.reset()
    compiled = torch.compile(program.module(), options=_options(cuda, autotune))
    with torch.no_grad():
        compiled(*example_inputs)
    cache_bytes, _ = torch.compiler.save_cache_artifacts() or (b"", None)
    atomic_write(out_dir / CACHE_FILE, cache_bytes)
    return {"files": [PROGRAM_FILE, CACHE_FILE], "runner": TORCH_COMPILE, "aoti_problem": problem}


def load_program(folder: Path, device: torch.device) -> nn.Module:
    """The exported program in ``folder`` as a module on ``device`` (the eager engine, and what
    torch.compile compiles), with pi-build's custom ops registered first: a program may call them."""
    from pi_build.engine import fused_denoise, kernels  # noqa: F401

    return torch.export.load(str(folder / PROGRAM_FILE)).module().to(device)


def load_engine(folder: Path, runner: str, device: torch.device, autotune: bool = False):
    """The engine in ``folder``, called like the component: ``engine(*inputs) -> outputs``."""
    if runner == AOTI:
        return torch._inductor.aoti_load_package(str(folder / AOTI_FILE))
    module = load_program(folder, device)
    cache = (folder / CACHE_FILE).read_bytes()
    if cache:
        torch.compiler.load_cache_artifacts(cache)
    return torch.compile(module, options=_options(device.type == "cuda", autotune))
