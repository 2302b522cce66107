"""The names pi-build is built from, defined once: components, precisions, backends, cameras,
stages, and the accuracy gate. Importing this module imports neither torch nor the model.

Each name is a string enum, so it compares equal to its text (``Precision.FP8 == "fp8"``) and
is written to JSON (manifests, recipes) as that text.
"""

from __future__ import annotations

import enum
import sys
from typing import Annotated, Any

from pydantic import AfterValidator, BeforeValidator, ConfigDict
from pydantic.dataclasses import dataclass

if sys.version_info >= (3, 11):
    from enum import StrEnum
else:  # Python 3.10

    class StrEnum(str, enum.Enum):
        def __str__(self) -> str:
            return str(self.value)

        def __format__(self, spec: str) -> str:
            return str(self.value).__format__(spec)


class Component(StrEnum):
    """The three engines, in pipeline order: vision -> kvcache -> denoise."""

    VISION = "vision"
    KVCACHE = "kvcache"
    DENOISE = "denoise"


COMPONENTS: tuple[Component, ...] = tuple(Component)


class Precision(StrEnum):
    """How a component computes: float32, bfloat16, or FP8 (e4m3) linears with bf16 around them.

    Listed most precise first (``Precision.least_precise`` relies on the order).
    """

    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"

    @staticmethod
    def least_precise(precisions: list[Precision]) -> Precision:
        order = list(Precision)
        return max(precisions, key=order.index)

    @property
    def weight_bytes(self) -> int:
        """Bytes per weight element in this precision."""
        return {Precision.FP32: 4, Precision.BF16: 2, Precision.FP8: 1}[self]


class Backend(StrEnum):
    """What compiles an engine: Inductor (AOTInductor or torch.compile), nothing (eager), or TensorRT."""

    INDUCTOR = "inductor"
    TENSORRT = "tensorrt"
    EAGER = "eager"


class Camera(StrEnum):
    """Model cameras, in the order the checkpoints were trained with (image tokens enter the prefix so)."""

    BASE = "base_0_rgb"
    LEFT_WRIST = "left_wrist_0_rgb"
    RIGHT_WRIST = "right_wrist_0_rgb"


CAMERAS: tuple[Camera, ...] = tuple(Camera)


class Device(StrEnum):
    AUTO = "auto"  # cuda when a GPU is visible, else cpu
    CUDA = "cuda"
    CPU = "cpu"


class Fp8Scaling(StrEnum):
    """How FP8 linears scale their operands (``engine.fp8``).

    TENSOR: one static scale for the whole input, calibrated (max |x| over the calibration data),
    and one for the whole weight. ROWWISE: each token's input row scaled by its own max |x| when
    the layer runs, each weight row (output channel) by its own: no calibration of inputs, and
    an outlier costs precision only in its own token and channel.
    """

    TENSOR = "tensor"
    ROWWISE = "rowwise"


class Stage(StrEnum):
    """The build stages, in order."""

    EXPORT = "export"
    QUANTIZE = "quantize"
    COMPILE = "compile"
    CAPTURE = "capture"


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _cosine(value: float) -> float:
    if not 0.0 < value <= 1.0:
        raise ValueError(f"must be in (0, 1], got {value}")
    return value


def _rel_err(value: float) -> float:
    if not 0.0 < value < float("inf"):
        raise ValueError(f"must be a positive number, got {value}")
    return value


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Gate:
    """What outputs must reach against the reference: a minimum cosine similarity and a maximum
    relative error ||out - ref|| / ||ref||. NaN passes no gate."""

    cosine: Annotated[float, BeforeValidator(_number), AfterValidator(_cosine)]
    rel_err: Annotated[float, BeforeValidator(_number), AfterValidator(_rel_err)]

    def passes(self, cosine: float, rel_err: float) -> bool:
        return cosine >= self.cosine and rel_err <= self.rel_err  # False for NaN
