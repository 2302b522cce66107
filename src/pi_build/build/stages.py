"""The build stages: export, quantize, compile and capture, one component at a time.

    export    ONNX of the component (fixed shapes), cleaned, verified in onnxruntime
    quantize  FP8 calibration of the component's linears with ModelOpt -> a scales artifact
    compile   the engine (AOTInductor .pt2 by default), checked against the reference (the gate)
    capture   CUDA graphs of the engines the recipe asks for, at load time; the build records the
              captured configuration, its latency and the end-to-end action check

Every stage takes what it needs as arguments (the reference, the recipe, the engines folder) and
writes one artifact under ``engines/<model-id>/<kind>/<version>/`` through
``artifacts.write_artifact``, only after its checks passed: a stage that fails lands nothing.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pi_build import artifacts, backends, engine
from pi_build.build.calibration import calibration_batches, observation_batches
from pi_build.build.reference import Reference
from pi_build.engine import accuracy
from pi_build.engine.fp8 import Scales
from pi_build.errors import BuildError, PiBuildError
from pi_build.io import write_json
from pi_build.model.checkpoints import read_assets
from pi_build.model.pi0 import ModelInputs
from pi_build.recipe import Recipe, recipe_hash
from pi_build.engine.layers import Shapes
from pi_build.runtime.pipeline import Pipeline, load_pipelines, select_cameras
from pi_build.runtime.policy import NORM_STATS_FILE, TOKENIZER_FILE
from pi_build.spec import Backend, Component, Gate, Precision, Stage

Log = Callable[[str], None]


def _io_spec(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> dict[str, dict]:
    return {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in zip(names, tensors)}


def engine_shapes(recipe: Recipe, component: Component) -> list[tuple[int, int]]:
    """(batch, prompt_len) of each engine a component is built as: one per batch size and prompt
    bucket (vision never sees the prompt: one per batch size)."""
    lengths = (recipe.model.prompt_len,) if component == Component.VISION else recipe.model.prompt_lengths
    return [(batch, length) for batch in recipe.model.batch for length in lengths]


def _manifest(reference: Reference, recipe: Recipe, component: Component | None, stage: Stage, extra: dict[str, Any],
              batch: int | None = None, prompt_len: int | None = None) -> dict[str, Any]:
    """What every artifact of a stage records (the shape it was built for among them), plus the stage's own ``extra``."""
    spec = recipe.component(component) if component is not None else None
    m = recipe.model
    return {
        "stage": stage,
        "backend": spec.backend if spec else None,
        "precision": spec.precision if spec else None,
        "steps": recipe.denoise.steps,
        "batch": batch or min(m.batch),
        "horizon": m.horizon,
        "prompt_len": prompt_len or m.prompt_len,
        "cameras": list(m.cameras),
        "source": reference.source,
        "recipe": recipe.to_dict(),
        "recipe_sha256": recipe_hash(recipe),
        "toolchain": artifacts.toolchain_versions(),
        "device": artifacts.device_info(reference.device),
        **extra,
    }


def gate_seed(recipe: Recipe, component: Component) -> int:
    """The seed of a component's gate inputs: fixed by the recipe, so a failure can be reproduced."""
    return int(hashlib.sha256(f"{recipe_hash(recipe)}:{component}".encode()).hexdigest()[:8], 16)


def _inputs(module: nn.Module, seed: int, device: torch.device) -> tuple[Tensor, ...]:
    return tuple(t.to(device) for t in module.example_inputs(torch.Generator().manual_seed(seed)))


# ----------------------------------------------------------------------------- modules


# The fused denoise step (engine.fused_denoise: 5 kernels a layer) beats the per-op Triton kernels
# up to this many token rows; at pi0's 51 rows it does not (docs/FUSED-DENOISE.md), nor at pi0.5's
# 160 rows of batch 16 in 64-row blocks (H200: 2.30 against 1.39 ms a step, docs/PERFORMANCE.md).
FUSED_DENOISE_MAX_ROWS = 16


def component_module(reference: Reference, recipe: Recipe, component: Component, scales: Scales | None,
                     shapes: Shapes) -> tuple[nn.Module, dict | None]:
    """The component in its recipe precision, FP8 linears made from ``scales``. A denoise step
    compiled by Inductor on a GPU runs pi-build's Triton kernels: the fused step for bf16 and few
    rows, else the per-op kernels; so does the prefix pass's attention (PI_BUILD_PREFIX_ATTENTION=library
    keeps SDPA, for A/B runs); a bf16 vision tower there pads its MLP and runs fc1's GELU in
    the GEMM's epilogue. Returns the module and what was switched (None: nothing)."""
    from pi_build.engine import fused_denoise, kernels
    from pi_build.engine.fp8 import apply_fp8

    spec = recipe.component(component)
    module = engine.build_component(reference.model, component, shapes, spec.precision)
    if spec.precision == Precision.FP8:
        module = apply_fp8(module, scales, recipe.quantize.scaling)
    switched = None
    if component == Component.DENOISE and spec.backend == Backend.INDUCTOR and kernels.triton_available(reference.device):
        rows = shapes.batch * module.ar_flags.shape[0]
        if spec.precision == Precision.BF16 and rows <= FUSED_DENOISE_MAX_ROWS and os.environ.get("PI_BUILD_FUSED", "1") != "0":
            persistent = os.environ.get("PI_BUILD_PERSISTENT", "0") == "1"
            module, switched = fused_denoise.use_fused_denoise(module.to(reference.device), Precision.BF16, persistent=persistent)
        else:
            switched = module.use_triton_kernels()
    if (component == Component.KVCACHE and spec.backend == Backend.INDUCTOR and kernels.triton_available(reference.device)
            and os.environ.get("PI_BUILD_PREFIX_ATTENTION", "triton") == "triton"):
        switched = module.use_triton_attention()
    if (component == Component.VISION and spec.backend == Backend.INDUCTOR and spec.precision == Precision.BF16
            and reference.device.type == "cuda"):
        switched = module.use_gpu_epilogues()
    return module.to(reference.device).eval(), switched


def gate_engine(reference: Reference, recipe: Recipe, component: Component, run: Callable[..., tuple[Tensor, ...]],
                probe: nn.Module) -> dict[str, Any]:
    """Compare ``run`` with the float32 reference on fresh random inputs (two draws from a recorded
    seed, the worse kept); raises GateError when the recipe's gate is missed."""
    seed = gate_seed(recipe, component)
    draws = []
    for draw in range(2):
        inputs = _inputs(probe, seed + draw, reference.device)
        with torch.no_grad():
            draws.append(accuracy.component_metrics(
                component, run(*inputs), engine.reference_outputs(reference.model, component, inputs, recipe.denoise.steps)))
    report = accuracy.check_gate(f"{component} (gate inputs from seed {seed})", accuracy.worst(draws), recipe.component_gate(component))
    return {**report, "seed": seed}


# ----------------------------------------------------------------------------- stages


def stage_export(reference: Reference, recipe: Recipe, component: Component, engines: Path) -> Path:
    """ONNX of the component in float32 (the graph TensorRT gets), verified in onnxruntime."""
    from pi_build.backends import onnx

    t0 = time.perf_counter()
    module = engine.build_component(reference.model, component, reference.shapes(recipe), Precision.FP32).cpu()
    inputs = _inputs(module, 1, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx.export_onnx(module, inputs, module.input_names, module.output_names, Path(tmp) / f"{component}.onnx")
        cleaning = onnx.clean_onnx(path)
        check = onnx.verify_onnx(path, module, generator=torch.Generator().manual_seed(2))
        manifest = _manifest(reference, recipe, component, Stage.EXPORT, {
            "backend": "onnx",
            "precision": Precision.FP32,  # the float32 graph; TensorRT picks its precision at its build
            "inputs": _io_spec(module.input_names, inputs),
            "onnx": {"cleaning": cleaning, "onnxruntime_check": check},
            "build_seconds": time.perf_counter() - t0,
        })
        files = {p.name: p for p in Path(tmp).iterdir()}
        return artifacts.write_artifact(engines, recipe.name, artifacts.onnx_kind(component), files, manifest)


def stage_quantize(reference: Reference, recipe: Recipe, component: Component, engines: Path) -> tuple[Path, Scales]:
    """FP8 calibration of the component's linears; the scales are returned (for a compile in the
    same run) and written as their own artifact (for a later one)."""
    from pi_build.engine import fp8

    t0 = time.perf_counter()
    q = recipe.quantize
    # FP8's compute dtype, linears not yet FP8
    module = engine.build_component(reference.model, component, reference.shapes(recipe), Precision.FP8)
    batches = calibration_batches(reference, recipe, component, q.samples)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(*batch)

    scales = fp8.calibrate(module, forward_loop, keep_high_precision=list(q.keep_high_precision))
    with tempfile.TemporaryDirectory() as tmp:
        path = fp8.save_scales(scales, Path(tmp) / "scales.json")
        manifest = _manifest(reference, recipe, component, Stage.QUANTIZE, {
            "backend": "modelopt",
            "quantize": {"calibration": q.calibration, "samples": len(batches), "layers": len(scales),
                         "keep_high_precision": list(q.keep_high_precision), "scaling": q.scaling},
            "build_seconds": time.perf_counter() - t0,
        })
        return artifacts.write_artifact(engines, recipe.name, artifacts.scales_kind(component), {"scales.json": path}, manifest), scales


def _recorded_scales(reference: Reference, recipe: Recipe, component: Component, engines: Path) -> tuple[Scales, dict]:
    """The newest scales calibrated for this component from these weights with the recipe's settings."""
    from pi_build.engine import fp8

    def fits(art: artifacts.Artifact) -> bool:
        m = art.manifest
        same_steps = component != Component.DENOISE or m.get("steps") == recipe.denoise.steps
        return (m.get("source", {}).get("weights_sha256") == reference.source["weights_sha256"] and same_steps
                and m.get("recipe", {}).get("quantize") == recipe.quantize.model_dump(mode="json"))

    art = artifacts.newest(engines, recipe.name, artifacts.scales_kind(component), fits)
    if art is None:
        raise BuildError(f"{component} is fp8 but no scales were calibrated for these weights and [quantize] settings: "
                         f"run `pi-build quantize {component} --recipe {recipe.path or '<recipe>'}` first")
    artifacts.verify_artifact(art)
    return fp8.load_scales(art.path / "scales.json"), {"path": str(art.path), "version": art.version}


def _asset_files(reference: Reference, component: Component, folder: Path) -> dict[str, Path]:
    """What the runtime needs besides the engines, copied into them: the tokenizer (kvcache's input
    tokens) and the norm stats (denoise's state in, actions out)."""
    tokenizer, raw_stats = read_assets(reference.checkpoint)
    if component == Component.KVCACHE and tokenizer is not None:
        return {TOKENIZER_FILE: tokenizer}
    if component == Component.DENOISE and raw_stats is not None:
        return {NORM_STATS_FILE: write_json(folder / NORM_STATS_FILE, {"norm_stats": raw_stats})}
    return {}


def stage_compile(reference: Reference, recipe: Recipe, component: Component, engines: Path, *, batch: int,
                  prompt_len: int, calibrated: tuple[Scales, dict] | None = None, log: Log = print) -> Path:
    """Compile the component for one shape into an engine, load it back, gate it against the
    reference, land it.

    An fp8 component takes ``calibrated`` (scales, {path, version}) from a quantize stage of the same
    run, in memory, else the newest recorded scales that fit."""
    t0 = time.perf_counter()
    spec = recipe.component(component)
    scales, scales_ref = calibrated or (None, None)
    if spec.precision == Precision.FP8 and scales is None:
        scales, scales_ref = _recorded_scales(reference, recipe, component, engines)
    module, gpu_kernels = component_module(reference, recipe, component, scales, reference.shapes(recipe, batch, prompt_len))
    inputs = _inputs(module, 1, reference.device)
    with torch.no_grad():
        outputs = tuple(module(*inputs)) if component == Component.KVCACHE else (module(*inputs),)
    with tempfile.TemporaryDirectory() as tmp, tempfile.TemporaryDirectory() as assets_tmp:
        log(f"  compiling {component} with {spec.backend} ({spec.precision}, batch {batch}"
            + (f", prompt {prompt_len})" if component != Component.VISION else ")"))
        engine_info = backends.compile_engine(module, inputs, spec.backend, Path(tmp), spec.autotune)
        compile_seconds = time.perf_counter() - t0
        if engine_info["runner"] != "aoti" and spec.backend == Backend.INDUCTOR:
            log(f"  [yellow]{engine_info['aoti_problem']}[/]: the engine loads through torch.compile with its kernel cache")
        engine_fn = backends.load_engine(Path(tmp), engine_info["runner"], reference.device, spec.autotune)
        report = gate_engine(reference, recipe, component, engine_fn, module)
        assets = _asset_files(reference, component, Path(assets_tmp))
        manifest = _manifest(reference, recipe, component, Stage.COMPILE, {
            "inputs": _io_spec(module.input_names, inputs),
            "outputs": _io_spec(module.output_names, outputs),
            "engine_runner": engine_info["runner"],
            "autotune": spec.autotune,
            "engine_files": engine_info["files"],
            "aoti_problem": engine_info.get("aoti_problem"),
            "vocab_size": reference.model.cfg.vocab_size,
            "fp8_scales": scales_ref,
            "gpu_kernels": gpu_kernels,
            "assets": sorted(assets),
            "accuracy": report,
            "build_seconds": time.perf_counter() - t0,
            "compile_seconds": compile_seconds,
        }, batch, prompt_len)
        files = {name: Path(tmp) / name for name in engine_info["files"]} | assets
        return artifacts.write_artifact(engines, recipe.name, component, files, manifest)


@torch.no_grad()
def end_to_end_check(reference: Reference, pipeline: Pipeline, gate: Gate, samples: int = 4) -> dict[str, Any]:
    """The assembled pipeline's actions against the float32 reference's, on generated inputs of the
    pipeline's shape and on the recorded LIBERO observations whose prompts fit it (where the
    checkpoint has a tokenizer and norm stats)."""
    cfg = reference.model.cfg
    batches = [pipeline.example_inputs(seed) for seed in range(samples)]
    try:
        for i, inputs in enumerate(observation_batches(reference, "recorded", samples, pipeline.batch)):
            if int(inputs.token_masks.sum(-1).max()) <= pipeline.prompt_len:
                images, image_masks = select_cameras(pipeline.cameras, inputs.images, inputs.image_masks)
                noise = torch.randn(pipeline.batch, pipeline.horizon, cfg.action_dim, generator=torch.Generator().manual_seed(i))
                batches.append((images, image_masks, inputs.tokens, inputs.token_masks, noise.to(reference.device), inputs.state))
    except (PiBuildError, FileNotFoundError, ValueError):
        pass  # no tokenizer or norm stats: the generated inputs alone
    draws = []
    for images, image_masks, tokens, token_masks, noise, state in batches:
        actions = pipeline.run(images, image_masks, tokens, token_masks, noise, state)
        expected = reference.model.sample(ModelInputs(images, image_masks, tokens, token_masks, state), noise, pipeline.steps)
        draws.append(accuracy.metrics(actions, expected))
    report = accuracy.check_gate(f"actions (batch {pipeline.batch}, prompt {pipeline.prompt_len})", accuracy.worst(draws), gate)
    return {**report, "observations": "generated" if len(batches) == samples else "generated + recorded"}


def stage_capture(reference: Reference, recipe: Recipe, engines: Path) -> Path:
    """Load the engines the recipe asks for (every batch size and prompt bucket), capture CUDA graphs
    (GPU), check actions end to end, record it."""
    t0 = time.perf_counter()
    shapes = {}
    for pipeline in load_pipelines(engines, recipe, reference.device):
        shapes[pipeline.shape_name] = {
            "engines": pipeline.versions(),
            "capture": pipeline.capture(),
            "accuracy": end_to_end_check(reference, pipeline, recipe.actions_gate()),
            "latency_ms": pipeline.measure_latency(iters=20),
        }
    worst = accuracy.worst([s["accuracy"] for s in shapes.values()])
    manifest = _manifest(reference, recipe, None, Stage.CAPTURE, {
        "shapes": shapes,
        "accuracy": {**worst, "passed": True, "gate": next(iter(shapes.values()))["accuracy"]["gate"]},
        "build_seconds": time.perf_counter() - t0,
    })
    return artifacts.write_artifact(engines, recipe.name, artifacts.PIPELINE, {}, manifest)


def build_component_stages(reference: Reference, recipe: Recipe, component: Component, stages: list[Stage],
                           engines: Path, log: Log = print) -> list[Path]:
    """Run the given stages for one component in order; a quantize stage hands its scales to the
    compile stage of the same run in memory."""
    landed, calibrated = [], None
    precision = recipe.component(component).precision
    for stage in stages:
        if stage == Stage.EXPORT:
            landed.append(stage_export(reference, recipe, component, engines))
        elif stage == Stage.QUANTIZE:
            if precision != Precision.FP8:
                log(f"  {component}: precision {precision}, nothing to quantize")
                continue
            path, scales = stage_quantize(reference, recipe, component, engines)
            calibrated = scales, {"path": str(path), "version": path.name}
            landed.append(path)
        elif stage == Stage.COMPILE:
            for batch, prompt_len in engine_shapes(recipe, component):
                landed.append(stage_compile(reference, recipe, component, engines, batch=batch, prompt_len=prompt_len,
                                            calibrated=calibrated, log=log))
        else:
            raise ValueError(f"{stage} is not a per-component stage")
    return landed
