"""Which engines may run together, and here, and which fit a recipe.

``check_compatible`` refuses a set of engines that must not run together (other weights, other
shapes) or not on this device and toolchain. ``select_engines`` picks, for a recipe, the newest
engine of each component that is what the recipe asks for (backend, precision, steps, shapes,
calibration, an accuracy inside the recipe's gate) and runs here, all three from the same
weights; when one is missing it says which, why the nearest candidate does not fit, and the
command that builds it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

from pi_build.artifacts.store import Artifact, artifacts_of
from pi_build.errors import ArtifactError
from pi_build.spec import Component, Precision, Stage

# Tensors passed from one component to the next: the upstream output feeds the downstream input
# of the same name, so their shapes and dtypes must be equal.
LINKS = (
    (Component.VISION, Component.KVCACHE, ("image_tokens",)),
    (Component.KVCACHE, Component.DENOISE, ("k", "v", "prefix_mask")),
)
# The shape fields (manifest top level) that all components of one pipeline must share; the prompt
# length only the two that see the prompt (vision is built once for every prompt bucket).
SHARED_SHAPE_FIELDS = ("batch", "horizon", "cameras")
PROMPT_COMPONENTS = (Component.KVCACHE, Component.DENOISE)
# The packages an engine of each backend is tied to: another version may not load it, or may
# load it and compute something else. Eager artifacts are weights for plain PyTorch code.
TOOLCHAIN_BY_BACKEND = {"inductor": ("torch",), "tensorrt": ("tensorrt",), "eager": ()}


def check_compatible(artifacts: dict[str, Artifact], *, device: dict[str, Any] | None, toolchain: dict[str, Any]) -> None:
    """Refuse (ArtifactError) a set of components that must not run together, or not here.

    ``artifacts`` maps component names to artifacts (any subset of the three). ``device`` is
    ``device_info()`` of the device they will run on, or None to skip the device checks;
    ``toolchain`` is ``toolchain_versions()`` of this environment.
    """
    for key, artifact in artifacts.items():
        if key not in list(Component):
            raise ArtifactError(f"unknown component {key!r}; known: {', '.join(Component)}")
        if artifact.manifest.get("component") != key:
            raise ArtifactError(f"{artifact.path} is a {artifact.manifest.get('component')!r} artifact, given as {key!r}")
    _check_same_weights(artifacts)
    _check_shared_fields(artifacts)
    _check_links(artifacts)
    for artifact in artifacts.values():
        _check_device(artifact, device)
        _check_toolchain(artifact, toolchain)


def _field(artifact: Artifact, *keys: str) -> Any:
    value: Any = artifact.manifest
    for i, key in enumerate(keys):
        if not isinstance(value, dict) or key not in value:
            raise ArtifactError(f"{artifact} ({artifact.path}): the manifest has no {'.'.join(keys[: i + 1])}")
        value = value[key]
    return value


def _check_same_weights(artifacts: dict[str, Artifact]) -> None:
    weights = {str(a): _field(a, "source", "weights_sha256") for a in artifacts.values()}
    if len(set(weights.values())) > 1:
        listed = ", ".join(f"{name} from {sha[:12]}" for name, sha in weights.items())
        raise ArtifactError(f"components built from different weights (source.weights_sha256): {listed}")


def _check_shared_fields(artifacts: dict[str, Artifact]) -> None:
    for name in SHARED_SHAPE_FIELDS + ("prompt_len",):
        sharing = [a for c, a in artifacts.items() if name != "prompt_len" or c in PROMPT_COMPONENTS]
        values = {str(a): _field(a, name) for a in sharing}
        if len({json.dumps(v) for v in values.values()}) > 1:
            listed = ", ".join(f"{a} has {v}" for a, v in values.items())
            raise ArtifactError(f"components disagree on {name}: {listed}")


def _check_links(artifacts: dict[str, Artifact]) -> None:
    for upstream, downstream, names in LINKS:
        if upstream not in artifacts or downstream not in artifacts:
            continue
        up, down = artifacts[upstream], artifacts[downstream]
        for name in names:
            out_shape, in_shape = _field(up, "outputs", name, "shape"), _field(down, "inputs", name, "shape")
            if out_shape != in_shape:
                dims = [f"dim {i}: {a} vs {b}" for i, (a, b) in enumerate(zip(out_shape, in_shape)) if a != b]
                detail = "; ".join(dims) or f"rank {len(out_shape)} vs {len(in_shape)}"
                raise ArtifactError(f"{up} outputs {name!r} of shape {out_shape} but {down} takes {name!r} of shape {in_shape} ({detail})")
            out_dtype, in_dtype = _field(up, "outputs", name, "dtype"), _field(down, "inputs", name, "dtype")
            if out_dtype != in_dtype:
                raise ArtifactError(f"{up} outputs {name!r} as {out_dtype} but {down} takes it as {in_dtype}")


def _check_device(artifact: Artifact, device: dict[str, Any] | None) -> None:
    backend = _field(artifact, "backend")
    if backend not in TOOLCHAIN_BY_BACKEND:
        raise ArtifactError(f"{artifact}: unknown backend {backend!r}; known: {', '.join(TOOLCHAIN_BY_BACKEND)}")
    if device is None or backend == "eager":  # eager weights run on any device
        return
    built_type = _field(artifact, "device", "type")
    if built_type != device["type"]:
        raise ArtifactError(f"{artifact}: a {backend} engine built for {built_type}, but this device is {device['type']}")
    if built_type == "cuda" and (built_cc := _field(artifact, "device", "compute_capability")) != device["compute_capability"]:
        raise ArtifactError(
            f"{artifact}: a {backend} engine built for compute capability {built_cc} "
            f"({artifact.manifest['device'].get('name')}), but this GPU is {device['compute_capability']} "
            f"({device.get('name')}); rebuild it here"
        )


def _check_toolchain(artifact: Artifact, toolchain: dict[str, Any]) -> None:
    for package in TOOLCHAIN_BY_BACKEND[_field(artifact, "backend")]:
        built, here = _field(artifact, "toolchain", package), toolchain.get(package)
        if built != here:
            raise ArtifactError(
                f"{artifact}: built with {package} {built}, but this environment has {here or 'none installed'}; rebuild it"
            )


# ----------------------------------------------------------------------------- engines for a recipe


def mismatches(artifact: Artifact, recipe: Any, component: Component, *, batch: int, prompt_len: int,
               device: dict[str, Any] | None, toolchain: dict[str, Any]) -> list[str]:
    """Why an engine is not the one ``recipe`` asks for at one shape (batch size, prompt length), or
    cannot run here (empty: it fits)."""
    m, wanted = artifact.manifest, recipe.component(component)
    reasons = []
    if m.get("stage") != Stage.COMPILE:
        reasons.append(f"it is a {m.get('stage')} output, not an engine")
    if m.get("backend") != wanted.backend:
        reasons.append(f"backend {m.get('backend')} (the recipe asks for {wanted.backend})")
    if m.get("precision") != wanted.precision:
        reasons.append(f"precision {m.get('precision')} (the recipe asks for {wanted.precision})")
    if (autotuned := bool(m.get("autotune", False))) != wanted.autotune:
        reasons.append(f"autotune {str(autotuned).lower()} (the recipe asks for {str(wanted.autotune).lower()})")
    if component == Component.DENOISE and m.get("steps") != recipe.denoise.steps:
        reasons.append(f"built for {m.get('steps')} steps (asked: {recipe.denoise.steps})")
    asked = {"batch": batch, "horizon": recipe.model.horizon, "cameras": [str(c) for c in recipe.model.cameras]}
    if component in PROMPT_COMPONENTS:
        asked["prompt_len"] = prompt_len
    for name, value in asked.items():
        if m.get(name) != value:
            reasons.append(f"{name} {m.get(name)} (asked: {value})")
    # The runtime never reads the checkpoint, so the weights are known by the checkpoint folder's
    # name, recorded at build time: the folder may move (to another machine, or nowhere), not change.
    built_from, named = m.get("source", {}).get("checkpoint"), Path(recipe.model.checkpoint).name
    if built_from != named:
        reasons.append(f"weights from checkpoint {built_from!r} (the recipe's model.checkpoint is {named!r})")
    if recipe.model.config is not None and m.get("source", {}).get("config") != recipe.model.config:
        reasons.append(f"model config {m.get('source', {}).get('config')} (the recipe has {recipe.model.config})")
    if wanted.precision == Precision.FP8 and m.get("recipe", {}).get("quantize") != recipe.quantize.model_dump(mode="json"):
        reasons.append("calibrated with other [quantize] settings")
    accuracy, gate = m.get("accuracy") or {}, recipe.component_gate(component)
    if not gate.passes(accuracy.get("cosine", float("nan")), accuracy.get("rel_err", float("nan"))):
        reasons.append(f"its accuracy (cosine {accuracy.get('cosine')}, rel_err {accuracy.get('rel_err')}) misses the "
                       f"recipe's gate (cosine >= {gate.cosine}, rel_err <= {gate.rel_err})")
    for check in (lambda: _check_device(artifact, device), lambda: _check_toolchain(artifact, toolchain)):
        try:
            check()
        except ArtifactError as e:
            reasons.append(str(e).removeprefix(f"{artifact}: "))
    return reasons


def select_engines(engines: Path, recipe: Any, *, batch: int, prompt_len: int, device: dict[str, Any] | None,
                   toolchain: dict[str, Any], build_command: Callable[[Component], str]) -> dict[Component, Artifact]:
    """The newest engine of each component that fits ``recipe`` at one shape (batch size, prompt
    length) and runs here, all three from one set of weights.

    ``build_command(component)`` is the command a user types to build a missing one (it goes into
    the error message).
    """
    fitting: dict[Component, list[Artifact]] = {}
    shape = {"batch": batch, "prompt_len": prompt_len, "device": device, "toolchain": toolchain}
    for component in Component:
        refused: list[str] = []
        candidates = artifacts_of(engines, recipe.name, component, refused)
        fitting[component] = [a for a in candidates if not mismatches(a, recipe, component, **shape)]
        if not fitting[component]:
            raise ArtifactError(_missing(engines, recipe, component, candidates, refused, shape, build_command))
    # One set of weights for all three, the most recently built first; in pipeline order, the newest
    # engine of each component whose inputs are what the one chosen before it outputs (a kvcache engine
    # built after a bf16 vision engine takes bf16 image tokens).
    weights_of = lambda a: a.manifest.get("source", {}).get("weights_sha256")  # noqa: E731
    created = lambda a: a.manifest.get("created", "")  # noqa: E731
    everything = [a for arts in fitting.values() for a in arts]
    complete = set.intersection(*({weights_of(a) for a in arts} for arts in fitting.values()))
    for weights in sorted(complete, key=lambda w: max(created(a) for a in everything if weights_of(a) == w), reverse=True):
        chosen: dict[Component, Artifact] = {}
        for component, arts in fitting.items():
            chosen_next = next((a for a in arts if weights_of(a) == weights and _fits_links({**chosen, component: a})), None)
            if chosen_next is None:
                break
            chosen[component] = chosen_next
        if len(chosen) == len(Component):
            check_compatible(chosen, device=device, toolchain=toolchain)
            return chosen
    newest = {c: f"{arts[0]} from {str(weights_of(arts[0]))[:12]}" for c, arts in fitting.items()}
    raise ArtifactError(f"the engines that fit {recipe.name} do not fit together ({', '.join(newest.values())}: other weights, "
                        f"or inputs another engine does not output): rebuild the others, e.g. `{build_command(Component.VISION)}`")


def _fits_links(chosen: dict[Component, Artifact]) -> bool:
    try:
        _check_links(chosen)
    except ArtifactError:
        return False
    return True


def _missing(engines: Path, recipe: Any, component: Component, candidates: list[Artifact], refused: list[str],
             shape: dict[str, Any], build_command: Callable[[Component], str]) -> str:
    wanted = recipe.component(component)
    what = f"{wanted.precision}, {wanted.backend}" + (f", {recipe.denoise.steps} steps" if component == Component.DENOISE else "")
    if len(recipe.model.batch) > 1:
        what += f", batch {shape['batch']}"
    if len(recipe.model.prompt_lengths) > 1 and component in PROMPT_COMPONENTS:
        what += f", prompt {shape['prompt_len']}"
    message = f"no {component} engine ({what}) of model {recipe.name!r} under {engines} fits the recipe"
    if candidates:
        reasons = mismatches(candidates[0], recipe, component, **shape)
        message += f"; the newest, {candidates[0].version}, has {'; '.join(reasons)}"
    elif refused:
        message += f"; {refused[0]}"
    return f"{message}. Build it: `{build_command(component)}`"
