"""Recipes: what a build is made from, read from a TOML file.

A recipe names the model (``name`` is the model id under ``engines/``), the checkpoint and the
fixed shapes the engines are built for, then how each of the three components is built and the
accuracy gates each must pass. Example (``recipes/pi05_libero.toml``)::

    name = "pi05_libero"
    [model]
    checkpoint = "checkpoints/pi05_libero"
    config = "pi05"
    cameras = ["base_0_rgb", "left_wrist_0_rgb"]
    masked_cameras = ["right_wrist_0_rgb"]
    prompt_len = 200
    horizon = 10
    [kvcache]
    precision = "fp8"

Fields, with the defaults used when a field (or its whole section) is left out. ``name`` and
``[model]`` with checkpoint, cameras, prompt_len and horizon are required.

| field | default | meaning |
|---|---|---|
| name | required | model id: the folder under engines/ (letters, digits, '.', '_', '-') |
| model.checkpoint | required | checkpoint folder; a relative path resolves against the current directory, and is checked only when a stage needs it (``Recipe.checkpoint_path``) |
| model.config | none | a name from ``pi_build.model.CONFIGS``; none = infer from the checkpoint |
| model.cameras | required | cameras fed to the model, a subset of base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb in that (trained) order |
| model.masked_cameras | [] | cameras present in observations but always masked: dropped from the engines, which is exact |
| model.prompt_len | required | token count the prompt is padded to |
| model.horizon | required | actions per chunk |
| model.batch | 1 | batch size the engines are built for |
| model.device | "auto" | auto (cuda if present, else cpu), cuda or cpu |
| vision / kvcache / denoise .backend | "inductor" | inductor (AOTInductor .pt2), tensorrt or eager |
| vision / kvcache / denoise .precision | "bf16" | fp32, bf16 or fp8 |
| denoise.steps | 10 | Euler steps baked into the denoise engine |
| quantize.calibration | "generated" | recorded (observations recorded earlier), generated (synthetic inputs), or a path to an .npz of raw observations |
| quantize.samples | 16 | calibration samples |
| quantize.keep_high_precision | see KEEP_HIGH_PRECISION | name patterns of linear layers never quantized |
| gates.<precision>.cosine / rel_err | see COMPONENT_GATES | what each component's outputs must reach against the reference model, by the component's precision |
| gates.actions.<precision>.cosine / rel_err | see ACTION_GATES | what the assembled pipeline's actions must reach, picked by the least precise of the three components (one fp8 component -> gates.actions.fp8) |

Command-line overrides are dotted keys (``{"denoise.steps": 3, "model.batch": 2}``), applied to
the file's contents before validation, so they get the same checks and errors name the key.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CAMERAS = ("base_0_rgb", "left_wrist_0_rgb", "right_wrist_0_rgb")  # the order the models were trained with
COMPONENTS = ("vision", "kvcache", "denoise")
BACKENDS = ("inductor", "tensorrt", "eager")
PRECISIONS = ("fp32", "bf16", "fp8")  # most precise first
DEVICES = ("auto", "cuda", "cpu")
CALIBRATIONS = ("recorded", "generated")  # anything else must be a path to an .npz file
# fnmatch patterns over the components' linear layer names (pi_build.components): the small
# float32 action/state/time projections of the denoise loop.
KEEP_HIGH_PRECISION = ("action_in", "action_out", "action_time_*", "state_in")


class RecipeError(ValueError):
    """A recipe that cannot be used; the message names the file (or override) and the field."""


# ----------------------------------------------------------------------------- the recipe


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str
    cameras: tuple[str, ...]
    prompt_len: int
    horizon: int
    config: str | None = None
    masked_cameras: tuple[str, ...] = ()
    batch: int = 1
    device: str = "auto"


@dataclass(frozen=True)
class ComponentSpec:
    backend: str = "inductor"
    precision: str = "bf16"


@dataclass(frozen=True)
class DenoiseSpec(ComponentSpec):
    steps: int = 10


@dataclass(frozen=True)
class QuantizeSpec:
    calibration: str = "generated"
    samples: int = 16
    keep_high_precision: tuple[str, ...] = KEEP_HIGH_PRECISION


@dataclass(frozen=True)
class Gate:
    """Minimum cosine similarity and maximum relative error (||x - ref|| / ||ref||) against the reference."""

    cosine: float
    rel_err: float


@dataclass(frozen=True)
class GateTable:
    """One gate per precision."""

    fp32: Gate
    bf16: Gate
    fp8: Gate


# Starting points: fp32 should match the reference to rounding; bf16 keeps ~3 significant digits;
# FP8 (e4m3) ~2. Actions pass through every component and the Euler steps, so their gates are looser.
COMPONENT_GATES = GateTable(fp32=Gate(0.99999, 1e-4), bf16=Gate(0.999, 3e-2), fp8=Gate(0.99, 0.15))
ACTION_GATES = GateTable(fp32=Gate(0.9999, 1e-3), bf16=Gate(0.995, 0.1), fp8=Gate(0.99, 0.2))


@dataclass(frozen=True)
class Gates:
    fp32: Gate = COMPONENT_GATES.fp32
    bf16: Gate = COMPONENT_GATES.bf16
    fp8: Gate = COMPONENT_GATES.fp8
    actions: GateTable = ACTION_GATES


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSpec
    vision: ComponentSpec = ComponentSpec()
    kvcache: ComponentSpec = ComponentSpec()
    denoise: DenoiseSpec = DenoiseSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    gates: Gates = Gates()
    # Where it was read from (for messages); not part of the recipe's content or hash.
    path: Path | None = field(default=None, compare=False)

    def component(self, name: str) -> ComponentSpec:
        if name not in COMPONENTS:
            raise KeyError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
        return getattr(self, name)

    def component_gate(self, name: str) -> Gate:
        """The gate for one component's outputs, by that component's precision."""
        return getattr(self.gates, self.component(name).precision)

    def actions_gate(self) -> Gate:
        """The gate for the assembled pipeline's actions, by the least precise component."""
        least = max((self.component(c).precision for c in COMPONENTS), key=PRECISIONS.index)
        return getattr(self.gates.actions, least)

    def checkpoint_path(self) -> Path:
        """model.checkpoint resolved against the current directory; it must exist."""
        path = Path(self.model.checkpoint).expanduser().resolve()
        if not path.exists():
            raise RecipeError(f"{self.path or self.name}: model.checkpoint {self.model.checkpoint!r} does not exist ({path})")
        return path

    def calibration_path(self) -> Path | None:
        """The .npz of quantize.calibration resolved against the current directory, or None for recorded/generated."""
        if self.quantize.calibration in CALIBRATIONS:
            return None
        path = Path(self.quantize.calibration).expanduser().resolve()
        if not path.is_file():
            raise RecipeError(f"{self.path or self.name}: quantize.calibration {self.quantize.calibration!r} is not a file ({path})")
        return path

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready content (lists, not tuples), as stored in manifests."""
        data = dataclasses.asdict(self)
        del data["path"]
        return json.loads(json.dumps(data))


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON: equal content gives an equal hash, whatever the file's layout."""
    canonical = json.dumps(recipe.to_dict(), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` maps dotted keys to values that replace the file's."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    overrides = overrides or {}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return _parse(data, _Origin(str(path), frozenset(overrides)), path)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (e.g. a manifest's "recipe"); ``source`` names it in errors."""
    return _parse(json.loads(json.dumps(data)), _Origin(source, frozenset()), None)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """Command-line ``key=value`` strings to an overrides dict.

    A value is read as a TOML value when it is one (``3``, ``0.5``, ``true``, ``["base_0_rgb"]``,
    ``"fp8"``), else kept as a plain string (``fp8``).
    """
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} is not of the form section.field=value")
        try:
            overrides[key] = tomllib.loads(f"value = {text.strip()}")["value"]
        except tomllib.TOMLDecodeError:
            overrides[key] = text.strip()
    return overrides


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    *sections, leaf = key.split(".")
    table = data
    for i, section in enumerate(sections):
        table = table.setdefault(section, {})
        if not isinstance(table, dict):
            raise RecipeError(f"override {key}: {'.'.join(sections[: i + 1])} is not a table")
    table[leaf] = value


# ----------------------------------------------------------------------------- validation


@dataclass(frozen=True)
class _Origin:
    """Where values came from, so an error can say "override denoise.steps" or "recipes/x.toml: denoise.steps"."""

    source: str
    overridden: frozenset[str]

    def is_overridden(self, key: str) -> bool:
        return any(o == key or o.startswith(key + ".") for o in self.overridden)

    def error(self, key: str, problem: str) -> RecipeError:
        where = f"override {key}" if self.is_overridden(key) else f"{self.source}: {key}"
        return RecipeError(f"{where}: {problem}")


_REQUIRED = object()


class _Table:
    """One TOML table being validated: rejects unknown keys up front, then hands out typed values."""

    def __init__(self, data: Any, prefix: str, known: tuple[str, ...], origin: _Origin):
        self.prefix, self.origin = prefix, origin
        if not isinstance(data, dict):
            raise origin.error(prefix, f"expected a table, got {data!r}")
        for key in data:
            if key not in known:
                close = difflib.get_close_matches(key, known, n=1)
                hint = f"; did you mean {self.key(close[0])!r}?" if close else f"; known: {', '.join(known)}"
                raise origin.error(self.key(key), f"unknown field{hint}")
        self.data = data

    def key(self, name: str) -> str:
        return f"{self.prefix}.{name}" if self.prefix else name

    def error(self, name: str, problem: str) -> RecipeError:
        return self.origin.error(self.key(name), problem)

    def get(self, name: str, default: Any = _REQUIRED) -> Any:
        if name in self.data:
            return self.data[name]
        if default is _REQUIRED:
            raise self.error(name, "missing (required)")
        return default

    def table(self, name: str, known: tuple[str, ...], required: bool = False) -> _Table:
        value = self.get(name, _REQUIRED if required else {})
        return _Table(value, self.key(name), known, self.origin)

    def integer(self, name: str, default: Any = _REQUIRED, minimum: int = 1) -> int:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(name, f"expected an integer, got {value!r}")
        if value < minimum:
            raise self.error(name, f"must be >= {minimum}, got {value}")
        return value

    def text(self, name: str, default: Any = _REQUIRED) -> str:
        value = self.get(name, default)
        if not isinstance(value, str) or not value:
            raise self.error(name, f"expected a non-empty string, got {value!r}")
        return value

    def choice(self, name: str, allowed: tuple[str, ...], default: Any = _REQUIRED) -> str:
        value = self.get(name, default)
        if value not in allowed:
            raise self.error(name, f"{value!r} is not one of {', '.join(allowed)}")
        return value

    def texts(self, name: str, default: Any = _REQUIRED) -> tuple[str, ...]:
        value = self.get(name, default)
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
            raise self.error(name, f"expected a list of non-empty strings, got {value!r}")
        return tuple(value)

    def number(self, name: str, default: Any) -> float:
        value = self.get(name, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(name, f"expected a number, got {value!r}")
        return float(value)


def _fields(cls: type) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name != "path")


def _parse(data: dict[str, Any], origin: _Origin, path: Path | None) -> Recipe:
    top = _Table(data, "", _fields(Recipe), origin)
    name = top.text("name")
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9._-]*", name):
        raise top.error("name", f"{name!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    model = _parse_model(top.table("model", _fields(ModelSpec), required=True))
    components = {}
    for component in COMPONENTS:
        spec_class = DenoiseSpec if component == "denoise" else ComponentSpec
        table = top.table(component, _fields(spec_class))
        components[component] = _parse_component(table, spec_class, model)
    return Recipe(
        name=name,
        model=model,
        quantize=_parse_quantize(top.table("quantize", _fields(QuantizeSpec))),
        gates=_parse_gates(top.table("gates", _fields(Gates))),
        path=path,
        **components,
    )


def _parse_model(t: _Table) -> ModelSpec:
    config = t.get("config", None)
    if config is not None:
        from pi_build.model.pi0 import CONFIGS  # here, not at the top: importing the model imports torch

        if config not in CONFIGS:
            raise t.error("config", f"{config!r} is not one of {', '.join(CONFIGS)}")
    cameras = _cameras(t, "cameras", allow_empty=False)
    masked = _cameras(t, "masked_cameras", allow_empty=True)
    if both := [c for c in cameras if c in masked]:
        # Blame the list an override just changed, if any, so that the message points at it.
        blamed, other = ("cameras", "masked_cameras") if t.origin.is_overridden(t.key("cameras")) else ("masked_cameras", "cameras")
        raise t.error(blamed, f"{', '.join(both)} also listed in {t.key(other)}")
    return ModelSpec(
        checkpoint=t.text("checkpoint"),
        cameras=cameras,
        prompt_len=t.integer("prompt_len"),
        horizon=t.integer("horizon"),
        config=config,
        masked_cameras=masked,
        batch=t.integer("batch", 1),
        device=t.choice("device", DEVICES, "auto"),
    )


def _cameras(t: _Table, name: str, allow_empty: bool) -> tuple[str, ...]:
    cameras = t.texts(name, () if allow_empty else _REQUIRED)
    for camera in cameras:
        if camera not in CAMERAS:
            raise t.error(name, f"{camera!r} is not one of {', '.join(CAMERAS)}")
    if len(set(cameras)) != len(cameras):
        raise t.error(name, f"lists a camera twice: {list(cameras)}")
    if not cameras and not allow_empty:
        raise t.error(name, "needs at least one camera")
    # Image tokens enter the prefix in this order; the checkpoints were trained with CAMERAS' order.
    if list(cameras) != sorted(cameras, key=CAMERAS.index):
        raise t.error(name, f"{list(cameras)} must follow the model's camera order {', '.join(CAMERAS)}")
    return cameras


def _parse_component(t: _Table, spec_class: type[ComponentSpec], model: ModelSpec) -> ComponentSpec:
    backend = t.choice("backend", BACKENDS, "inductor")
    if backend == "tensorrt" and model.device == "cpu":
        raise t.error("backend", "tensorrt needs a CUDA device, but model.device is 'cpu'")
    values = dict(backend=backend, precision=t.choice("precision", PRECISIONS, "bf16"))
    if spec_class is DenoiseSpec:
        values["steps"] = t.integer("steps", 10)
    return spec_class(**values)


def _parse_quantize(t: _Table) -> QuantizeSpec:
    calibration = t.text("calibration", "generated")
    if calibration not in CALIBRATIONS and not calibration.endswith(".npz"):
        raise t.error("calibration", f"{calibration!r} is neither {' nor '.join(CALIBRATIONS)} nor a path to an .npz file")
    return QuantizeSpec(
        calibration=calibration,
        samples=t.integer("samples", 16),
        keep_high_precision=t.texts("keep_high_precision", KEEP_HIGH_PRECISION),
    )


def _parse_gates(t: _Table) -> Gates:
    gates = {p: _parse_gate(t.table(p, _fields(Gate)), getattr(COMPONENT_GATES, p)) for p in PRECISIONS}
    actions = t.table("actions", PRECISIONS)
    action_gates = {p: _parse_gate(actions.table(p, _fields(Gate)), getattr(ACTION_GATES, p)) for p in PRECISIONS}
    return Gates(**gates, actions=GateTable(**action_gates))


def _parse_gate(t: _Table, default: Gate) -> Gate:
    cosine = t.number("cosine", default.cosine)
    if not 0.0 < cosine <= 1.0:
        raise t.error("cosine", f"must be in (0, 1], got {cosine}")
    rel_err = t.number("rel_err", default.rel_err)
    if not 0.0 < rel_err < float("inf"):
        raise t.error("rel_err", f"must be a positive number, got {rel_err}")
    return Gate(cosine, rel_err)
