"""Recipes: what a build is made from, read from a TOML file and validated with pydantic.

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
| model.config | none | a name from ``pi_build.model.pi0.CONFIGS``; none = infer from the checkpoint |
| model.cameras | required | cameras fed to the model, a subset of base_0_rgb, left_wrist_0_rgb, right_wrist_0_rgb in that (trained) order |
| model.masked_cameras | [] | cameras present in observations but always masked: dropped from the engines, which is exact |
| model.prompt_len | required | the most prompt tokens the engines take (the tokenizer pads to it) |
| model.prompt_buckets | [prompt_len] | prompt lengths the prefix and denoise engines are built for: the runtime runs the smallest that holds a prompt (the padding beyond it is dropped, which is exact); prompt_len is always one |
| model.horizon | required | actions per chunk |
| model.batch | 1 | batch size(s) the engines are built for: 1, or a list such as [1, 4, 16]; the runtime runs the smallest that holds the waiting requests |
| model.device | "auto" | auto (cuda if present, else cpu), cuda or cpu |
| vision / kvcache / denoise .backend | "inductor" | inductor (AOTInductor .pt2), tensorrt or eager |
| vision / kvcache / denoise .precision | "bf16" | fp32, bf16 or fp8 |
| vision / kvcache / denoise .autotune | false | inductor only, on a GPU: pick GEMM kernels (cuBLAS or Triton templates with fused epilogues) by timing them while compiling; slower builds, recorded in the manifest and asked of the engine at load |
| denoise.steps | 10 | Euler steps baked into the denoise engine |
| quantize.calibration | "generated" | recorded (observations recorded earlier), generated (synthetic inputs), or a path to an .npz of raw observations |
| quantize.samples | 16 | calibration samples |
| quantize.keep_high_precision | see KEEP_HIGH_PRECISION | name patterns of linear layers never quantized |
| quantize.scaling | "tensor" | tensor (static per-tensor scales from calibration) or rowwise (per-token input scales taken when the layer runs, per-channel weight scales) |
| gates.<precision>.cosine / rel_err | see COMPONENT_GATES | what each component's outputs must reach against the reference model, by the component's precision |
| gates.actions.<precision>.cosine / rel_err | see ACTION_GATES | what the assembled pipeline's actions must reach, picked by the least precise of the three components (one fp8 component -> gates.actions.fp8) |

Command-line overrides are dotted keys (``{"denoise.steps": 3, "model.batch": 2}``), applied to
the file's contents before validation, so they get the same checks and errors name the key.

Which recipe a command uses when ``--recipe`` is not given (``find_recipe``): the environment
variable ``PI_BUILD_RECIPE``, else the ``recipe`` key of a ``pi-build.toml`` in the current folder.
"""

from __future__ import annotations

import difflib
import enum
import os
from pathlib import Path
from typing import Annotated, Any

import pydantic
from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr

from pi_build.errors import RecipeError
from pi_build.io import sha256_json
from pi_build.spec import CAMERAS, Backend, Camera, Component, Device, Fp8Scaling, Gate, Precision

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

CALIBRATIONS = ("recorded", "generated")  # anything else must be a path to an .npz file
# fnmatch patterns over the components' linear layer names (pi_build.engine): the small float32
# action/state/time projections of the denoise loop.
KEEP_HIGH_PRECISION = ("action_in", "action_out", "action_time_*", "state_in")
RECIPE_ENV = "PI_BUILD_RECIPE"
PROJECT_FILE = "pi-build.toml"  # names the default recipe of a working folder: recipe = "recipes/x.toml"


# ----------------------------------------------------------------------------- field types


def _integer(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _at_least_one(value: int) -> int:
    if value < 1:
        raise ValueError(f"must be >= 1, got {value}")
    return value


def _number(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _names(value: Any) -> Any:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"expected a list of non-empty strings, got {value!r}")
    return tuple(value)


def _camera_list(value: Any) -> Any:
    value = _names(value)
    for camera in value:
        if camera not in CAMERAS:
            raise ValueError(f"{camera!r} is not one of {', '.join(CAMERAS)}")
    if len(set(value)) != len(value):
        raise ValueError(f"lists a camera twice: {list(value)}")
    # Image tokens enter the prefix in this order; the checkpoints were trained with CAMERAS' order.
    if list(value) != sorted(value, key=list(CAMERAS).index):
        raise ValueError(f"{list(value)} must follow the model's camera order {', '.join(CAMERAS)}")
    return value


def _choice(enum: type) -> Any:
    def check(value: Any) -> Any:
        if value not in [e.value for e in enum]:
            raise ValueError(f"{value!r} is not one of {', '.join(e.value for e in enum)}")
        return value

    return BeforeValidator(check)


Count = Annotated[int, BeforeValidator(_integer), AfterValidator(_at_least_one)]


def _counts(value: Any) -> Any:
    """One count or a list of them -> a sorted tuple of distinct counts >= 1."""
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not values:
        raise ValueError("needs at least one value")
    counts = [_at_least_one(_integer(v)) for v in values]
    if len(set(counts)) != len(counts):
        raise ValueError(f"lists a value twice: {counts}")
    return tuple(sorted(counts))


Counts = Annotated[tuple[int, ...], BeforeValidator(_counts)]
Text = Annotated[str, Field(min_length=1)]
Cameras = Annotated[tuple[Camera, ...], BeforeValidator(_camera_list)]
Names = Annotated[tuple[str, ...], BeforeValidator(_names)]


# ----------------------------------------------------------------------------- the recipe


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False)


class ModelSpec(_Section):
    checkpoint: Text
    cameras: Cameras
    prompt_len: Count
    horizon: Count
    config: Text | None = None
    masked_cameras: Annotated[tuple[Camera, ...], BeforeValidator(_camera_list)] = ()
    prompt_buckets: Counts | None = None
    batch: Counts = (1,)
    device: Annotated[Device, _choice(Device)] = Device.AUTO

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        """The prompt lengths engines are built for: the buckets and prompt_len, ascending."""
        return tuple(sorted(set(self.prompt_buckets or ()) | {self.prompt_len}))

    @pydantic.field_validator("cameras")
    @classmethod
    def _not_empty(cls, value: tuple[Camera, ...]) -> tuple[Camera, ...]:
        if not value:
            raise ValueError("needs at least one camera")
        return value


class ComponentSpec(_Section):
    backend: Annotated[Backend, _choice(Backend)] = Backend.INDUCTOR
    precision: Annotated[Precision, _choice(Precision)] = Precision.BF16
    autotune: bool = False  # Inductor's max-autotune: GEMM kernels chosen by timing them at build time


class DenoiseSpec(ComponentSpec):
    steps: Count = 10


class QuantizeSpec(_Section):
    calibration: Text = "generated"
    samples: Count = 16
    keep_high_precision: Names = KEEP_HIGH_PRECISION
    scaling: Fp8Scaling = Fp8Scaling.TENSOR

    @pydantic.field_validator("calibration")
    @classmethod
    def _known_or_npz(cls, value: str) -> str:
        if value not in CALIBRATIONS and not value.endswith(".npz"):
            raise ValueError(f"{value!r} is neither {' nor '.join(CALIBRATIONS)} nor a path to an .npz file")
        return value


# Starting points: fp32 should match the reference to rounding; bf16 keeps ~3 significant digits;
# FP8 (e4m3) ~2. Actions pass through every component and the Euler steps, so their gates are looser.
COMPONENT_GATES = {Precision.FP32: Gate(0.99999, 1e-4), Precision.BF16: Gate(0.999, 3e-2), Precision.FP8: Gate(0.99, 0.15)}
ACTION_GATES = {Precision.FP32: Gate(0.9999, 1e-3), Precision.BF16: Gate(0.995, 0.1), Precision.FP8: Gate(0.99, 0.2)}


def _gate_field(default: Gate) -> Any:
    """A gate table whose missing keys take ``default``'s values."""

    def fill(value: Any) -> Any:
        if isinstance(value, dict):
            return {"cosine": default.cosine, "rel_err": default.rel_err, **value}
        return value

    return Annotated[Gate, BeforeValidator(fill)]


class _GateTable(_Section):
    def of(self, precision: Precision) -> Gate:
        return getattr(self, Precision(precision).value)


class ActionGates(_GateTable):
    fp32: _gate_field(ACTION_GATES[Precision.FP32]) = ACTION_GATES[Precision.FP32]
    bf16: _gate_field(ACTION_GATES[Precision.BF16]) = ACTION_GATES[Precision.BF16]
    fp8: _gate_field(ACTION_GATES[Precision.FP8]) = ACTION_GATES[Precision.FP8]


class Gates(_GateTable):
    fp32: _gate_field(COMPONENT_GATES[Precision.FP32]) = COMPONENT_GATES[Precision.FP32]
    bf16: _gate_field(COMPONENT_GATES[Precision.BF16]) = COMPONENT_GATES[Precision.BF16]
    fp8: _gate_field(COMPONENT_GATES[Precision.FP8]) = COMPONENT_GATES[Precision.FP8]
    actions: ActionGates = ActionGates()


class Recipe(_Section):
    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_][A-Za-z0-9._-]*$")]
    model: ModelSpec
    vision: ComponentSpec = ComponentSpec()
    kvcache: ComponentSpec = ComponentSpec()
    denoise: DenoiseSpec = DenoiseSpec()
    quantize: QuantizeSpec = QuantizeSpec()
    gates: Gates = Gates()
    # Where it was read from (for messages); not part of the recipe's content or hash.
    _path: Path | None = PrivateAttr(default=None)

    @property
    def path(self) -> Path | None:
        return self._path

    def __eq__(self, other: object) -> bool:  # the content, not where it was read from
        return isinstance(other, Recipe) and self.to_dict() == other.to_dict()

    def __hash__(self) -> int:
        return hash(recipe_hash(self))

    def component(self, name: Component | str) -> ComponentSpec:
        return getattr(self, Component(name).value)

    def component_gate(self, name: Component | str) -> Gate:
        """The gate for one component's outputs, by that component's precision."""
        return self.gates.of(self.component(name).precision)

    def actions_precision(self) -> Precision:
        """The least precise of the three components: it picks the gate of the assembled actions."""
        return Precision.least_precise([self.component(c).precision for c in Component])

    def actions_gate(self) -> Gate:
        """The gate for the assembled pipeline's actions, by the least precise component."""
        return self.gates.actions.of(self.actions_precision())

    def with_overrides(self, overrides: dict[str, Any]) -> Recipe:
        """This recipe with dotted keys replaced (``{"model.device": "cpu"}``), validated again."""
        data = self.to_dict()
        for key, value in overrides.items():
            _set_dotted(data, key, str(value) if isinstance(value, enum.Enum) else value)
        return _validate(data, _Origin(str(self.path or self.name), frozenset(overrides)), self.path)

    def with_component(self, name: Component, **changes: Any) -> Recipe:
        """This recipe with one component's settings changed (the CLI's --fp8 / --steps), validated again."""
        return self.with_overrides({f"{Component(name)}.{key}": value for key, value in changes.items()})

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
        """Plain JSON-ready content (lists and strings), as stored in manifests."""
        return self.model_dump(mode="json")


def recipe_hash(recipe: Recipe) -> str:
    """sha256 of the recipe's canonical JSON: equal content gives an equal hash, whatever the file's layout."""
    return sha256_json(recipe.to_dict())


# ----------------------------------------------------------------------------- loading


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe file; ``overrides`` maps dotted keys to values that replace the file's."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise RecipeError(f"recipe file {path} does not exist") from None
    except IsADirectoryError:
        raise RecipeError(f"recipe {path} is a folder, not a TOML file") from None
    except tomllib.TOMLDecodeError as e:
        raise RecipeError(f"{path}: not valid TOML: {e}") from None
    overrides = overrides or {}
    for key, value in overrides.items():
        _set_dotted(data, key, value)
    return _validate(data, _Origin(str(path), frozenset(overrides)), path)


def recipe_from_dict(data: dict[str, Any], source: str = "recipe") -> Recipe:
    """Validate a recipe given as a dict (e.g. a manifest's "recipe"); ``source`` names it in errors."""
    return _validate(data, _Origin(source, frozenset()), None)


def find_recipe(given: Path | None) -> Path:
    """The recipe a command uses: ``--recipe``, else $PI_BUILD_RECIPE, else ``recipe`` in ./pi-build.toml."""
    if given is not None:
        return Path(given)
    if os.environ.get(RECIPE_ENV):
        return Path(os.environ[RECIPE_ENV])
    project = Path(PROJECT_FILE)
    if project.is_file():
        try:
            named = tomllib.loads(project.read_text()).get("recipe")
        except tomllib.TOMLDecodeError as e:
            raise RecipeError(f"{project.resolve()}: not valid TOML: {e}") from None
        if not isinstance(named, str) or not named:
            raise RecipeError(f'{project.resolve()} names no recipe: add a line recipe = "recipes/<name>.toml"')
        return Path(named)
    raise RecipeError(
        f"no recipe given: pass --recipe FILE, set {RECIPE_ENV}, or name one in ./{PROJECT_FILE} "
        '(recipe = "recipes/tiny.toml")'
    )


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


class _Origin:
    """Where values came from, so an error can say "override denoise.steps" or "recipes/x.toml: denoise.steps"."""

    def __init__(self, source: str, overridden: frozenset[str]):
        self.source, self.overridden = source, overridden

    def is_overridden(self, key: str) -> bool:
        return any(o == key or o.startswith(key + ".") for o in self.overridden)

    def error(self, key: str, problem: str) -> RecipeError:
        where = f"override {key}" if self.is_overridden(key) else f"{self.source}: {key}"
        return RecipeError(f"{where}: {problem}")


def _validate(data: dict[str, Any], origin: _Origin, path: Path | None) -> Recipe:
    try:
        recipe = Recipe.model_validate(data)
    except pydantic.ValidationError as e:
        raise _first_error(e, origin) from None
    _check_across_fields(recipe, origin)
    recipe._path = path
    return recipe


def _first_error(error: pydantic.ValidationError, origin: _Origin) -> RecipeError:
    """pydantic's first complaint as one line naming the dotted key and the fix."""
    detail = error.errors()[0]
    loc = [str(part) for part in detail["loc"] if not isinstance(part, int)]  # list positions name no field
    key = ".".join(loc)
    kind, value = detail["type"], detail.get("input")
    if kind == "missing":
        return origin.error(key, "missing (required)")
    if kind in ("extra_forbidden", "unexpected_keyword_argument"):
        known = _known_fields(loc[:-1])
        close = difflib.get_close_matches(loc[-1], known, n=1)
        prefix = ".".join(loc[:-1])
        hint = f"; did you mean {'.'.join([prefix, close[0]]) if prefix else close[0]!r}?" if close else f"; known: {', '.join(known)}"
        return origin.error(key, f"unknown field{hint}")
    if kind in ("model_type", "dict_type", "model_attributes_type", "dataclass_type", "dataclass_exact_type"):
        return origin.error(key, f"expected a table, got {value!r}")
    if kind == "string_pattern_mismatch" and key == "name":
        return origin.error(key, f"{value!r} must be letters, digits, '.', '_' or '-' (it names a folder)")
    if kind in ("string_type", "string_too_short"):
        return origin.error(key, f"expected a non-empty string, got {value!r}")
    message = detail["msg"].removeprefix("Value error, ")
    return origin.error(key, message)


def _known_fields(loc: list[str]) -> list[str]:
    """Field names of the section at ``loc`` (a list of field names from the top)."""
    section: Any = Recipe
    for part in loc:
        section = _fields_of(section)[part].annotation
    return list(_fields_of(section))


def _fields_of(section: Any) -> dict[str, Any]:
    """A pydantic model's fields, or a pydantic dataclass's (Gate)."""
    return getattr(section, "model_fields", None) or section.__pydantic_fields__


def _check_across_fields(recipe: Recipe, origin: _Origin) -> None:
    """Rules that tie fields together; each error names the field an override just changed, if any."""
    m = recipe.model
    if m.config is not None:
        from pi_build.model.pi0 import CONFIGS  # here, not at the top: importing the model imports torch

        if m.config not in CONFIGS:
            raise origin.error("model.config", f"{m.config!r} is not one of {', '.join(CONFIGS)}")
    if both := [c.value for c in m.cameras if c in m.masked_cameras]:
        blamed, other = ("cameras", "masked_cameras") if origin.is_overridden("model.cameras") else ("masked_cameras", "cameras")
        raise origin.error(f"model.{blamed}", f"{', '.join(both)} also listed in model.{other}")
    if m.prompt_buckets and max(m.prompt_buckets) > m.prompt_len:
        raise origin.error("model.prompt_buckets", f"{max(m.prompt_buckets)} is longer than model.prompt_len {m.prompt_len}")
    for component in Component:
        if recipe.component(component).backend == Backend.TENSORRT and m.device == Device.CPU:
            raise origin.error(f"{component}.backend", "tensorrt needs a CUDA device, but model.device is 'cpu'")
