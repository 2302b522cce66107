"""Normalization statistics of states and actions: one small pydantic model, one parser, and the
two files they come in (openpi's norm_stats.json, lerobot's normalizer safetensors).

The raw form everywhere is openpi's: ``{"state": {"mean": [...], "std": [...], "q01": [...],
"q99": [...]}, "actions": {...}}`` (q01/q99 are optional for pi0 and required by pi0.5's quantile
normalization). Engines carry it as their own ``norm_stats.json``, so a robot needs no checkpoint.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pydantic
from pydantic import ConfigDict

from pi_build import io

REQUIRED = ("state", "actions")
# lerobot's feature names for openpi's norm-stats names.
LEROBOT_FEATURES = {"state": "observation.state", "actions": "action"}


def _float_vector(value: Any) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError("is not a list of numbers") from None
    if array.ndim != 1 or not np.isfinite(array).all():
        raise ValueError("must be a 1-D list of finite numbers")
    return array


class NormStats(pydantic.BaseModel):
    """Per-dimension statistics of one quantity (float64, as openpi loads them)."""

    model_config = ConfigDict(arbitrary_types_allowed=True, frozen=True)

    mean: np.ndarray
    std: np.ndarray
    q01: np.ndarray | None = None
    q99: np.ndarray | None = None

    @pydantic.field_validator("mean", "std", "q01", "q99", mode="before")
    @classmethod
    def _vector(cls, value: Any) -> Any:
        return None if value is None else _float_vector(value)

    @pydantic.model_validator(mode="after")
    def _same_length(self) -> NormStats:
        lengths = {name: len(v) for name, v in (("mean", self.mean), ("std", self.std), ("q01", self.q01), ("q99", self.q99)) if v is not None}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"fields differ in length: {lengths}")
        return self


def parse_norm_stats(raw: Mapping[str, Any], source: str) -> dict[str, NormStats]:
    """The raw {name: {mean, std, q01?, q99?}} form -> NormStats per name; errors name ``source`` and the key."""
    if not isinstance(raw, Mapping):
        raise ValueError(f'{source}: "norm_stats" must map names to {{mean, std, q01, q99}}')
    stats = {}
    for key, entry in raw.items():
        if not isinstance(entry, Mapping):
            raise ValueError(f'{source}: "norm_stats/{key}" must be an object with mean and std')
        try:
            stats[key] = NormStats(**entry)
        except pydantic.ValidationError as e:
            detail = e.errors()[0]
            field = "/".join(str(part) for part in detail["loc"])
            if detail["type"] == "missing":
                raise ValueError(f'{source}: "norm_stats/{key}" has no "{field}"') from None
            where = f"norm_stats/{key}/{field}" if field else f"norm_stats/{key}"
            raise ValueError(f'{source}: "{where}" {detail["msg"].removeprefix("Value error, ")}') from None
    for key in REQUIRED:
        if key not in stats:
            raise ValueError(f'{source}: "norm_stats" has no "{key}" entry (found: {", ".join(stats) or "none"})')
    return stats


def read_openpi_file(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The raw stats of openpi's norm_stats.json: {"norm_stats": {name: {mean, std, ...}}}."""
    data = io.read_json(path, error)
    if not isinstance(data.get("norm_stats"), dict):
        raise error(f'{path}: expected a top-level "norm_stats" object')
    return data["norm_stats"]


def read_lerobot_file(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The raw stats of lerobot's normalizer state file: flat {"<feature>.<stat>": tensor}, renamed to openpi's names."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise error(f"{path}: not a readable safetensors file (truncated or corrupt?): {e}") from None
    from_lerobot = {v: k for k, v in LEROBOT_FEATURES.items()}
    stats: dict[str, dict[str, Any]] = {}
    for flat_key, values in tensors.items():
        feature, _, stat = flat_key.rpartition(".")
        if not feature:
            raise error(f"{path}: tensor {flat_key!r} is not named '<feature>.<stat>'")
        stats.setdefault(from_lerobot.get(feature, feature), {})[stat] = values.astype(np.float64).tolist()
    return stats


def load_norm_stats(path: str | os.PathLike) -> dict[str, NormStats]:
    """Read openpi's ``norm_stats.json`` (or a folder holding one) into NormStats; "state" and
    "actions" must be present."""
    path = Path(path)
    if path.is_dir():
        path = path / "norm_stats.json"
    if not path.is_file():
        raise FileNotFoundError(f"norm stats file not found: {path}")
    return parse_norm_stats(read_openpi_file(path), str(path))


def to_json_lists(norm_stats: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, list]]:
    """{name: {stat: array-like}} -> JSON-ready lists; None stats (openpi's optional q01/q99) dropped."""
    if not isinstance(norm_stats, Mapping) or not all(isinstance(s, Mapping) for s in norm_stats.values()):
        raise ValueError("norm_stats must map a name ('state', 'actions') to {stat name: values}")
    return {
        name: {stat: np.asarray(values, dtype=np.float64).tolist() for stat, values in stats.items() if values is not None}
        for name, stats in norm_stats.items()
    }


def random_libero_norm_stats(seed: int = 0, state_dim: int = 8, action_dim: int = 7) -> dict[str, dict[str, list[float]]]:
    """Plausible norm stats for random-weight checkpoints (demo, tests): LIBERO's 8-dim state, 7-dim actions."""
    rng = np.random.default_rng(seed)

    def stats(dim: int) -> dict[str, list[float]]:
        mean = rng.normal(0.0, 0.3, dim)
        std = rng.uniform(0.2, 1.0, dim)
        return {"mean": mean.tolist(), "std": std.tolist(), "q01": (mean - 2 * std).tolist(), "q99": (mean + 2 * std).tolist()}

    return {"state": stats(state_dim), "actions": stats(action_dim)}
