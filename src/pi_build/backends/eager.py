"""The ``eager`` backend: the torch.export'ed program saved as is and run without compilation.

It runs on any device (its weights are plain tensors), compiles in seconds, and is what tests and
debugging use when Inductor's compile time is not worth paying.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from pi_build.backends.inductor import PROGRAM_FILE, export_program, load_program

EAGER = "eager"  # the runner a manifest's engine_runner names


def compile_engine(module: nn.Module, example_inputs: tuple[Tensor, ...], out_dir: Path) -> dict[str, Any]:
    torch.export.save(export_program(module, example_inputs), str(out_dir / PROGRAM_FILE))
    return {"files": [PROGRAM_FILE], "runner": EAGER}


def load_engine(folder: Path, device: torch.device) -> nn.Module:
    return load_program(folder, device)
