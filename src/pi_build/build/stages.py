"""The build stages: export, quantize, compile and capture, one component at a time.

    export    ONNX of the component (fixed shapes), cleaned, verified in onnxruntime
    quantize  FP8 calibration of the component's linears with ModelOpt -> a scales artifact
    compile   the engine (AOTInductor .pt2 by default), checked against the reference (the gate)
    capture   CUDA graphs of the assembled pipeline, at load time; the build records the captured
              configuration, its latency and the end-to-end action check

Every stage writes one artifact under ``engines/<model-id>/<stage-output>/<version>/`` through
``artifacts.write_artifact`` (temp folder, then rename) and only after its checks passed: a stage
that fails lands nothing. Components: vision, kvcache, denoise; stage outputs that are not engines
are named ``<component>-onnx``, ``<component>-fp8-scales`` and ``pipeline``.
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from pi_build import artifacts, backends
from pi_build.engine import accuracy
from pi_build.engine.components import COMPONENTS, Shapes, build_component, compute_dtype, euler_times, reference_outputs
from pi_build.model.pi0 import PiModel, config_to_dict
from pi_build.transforms.libero import select_cameras
from pi_build.recipe import Recipe, recipe_hash

Log = Callable[[str], None]


class BuildError(RuntimeError):
    """A stage could not produce a trustworthy artifact (gate failed, inputs missing...)."""


@dataclass
class BuildContext:
    """What every stage of one recipe needs: the reference model (float32) and where things go."""

    recipe: Recipe
    model: PiModel
    source: dict[str, Any]  # checkpoint path, weights sha256, config name
    device: torch.device
    engines: Path
    log: Log

    @property
    def shapes(self) -> Shapes:
        m, r = self.recipe.model, self.recipe
        return Shapes(batch=m.batch, cameras=len(m.cameras), prompt_len=m.prompt_len, horizon=m.horizon,
                      steps=r.denoise.steps,
                      image_token_dtype=compute_dtype(r.vision.precision, self.device.type),
                      kv_dtype=compute_dtype(r.kvcache.precision, self.device.type))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise BuildError("the recipe asks for device 'cuda' but no CUDA GPU is visible (use --device cpu or device = \"auto\")")
    return torch.device(name)


def open_context(recipe: Recipe, engines: Path, log: Log = print) -> BuildContext:
    """Load the recipe's checkpoint as the float32 reference on the build device."""
    from pi_build.model.checkpoints import load_checkpoint

    device = resolve_device(recipe.model.device)
    # config_name makes the loader check every tensor against the recipe's preset
    model, info = load_checkpoint(recipe.checkpoint_path(), dtype=torch.float32, device=device, config_name=recipe.model.config)
    # The recipe's shapes rule the engines: horizon, and the prompt length the tokenizer pads to.
    model.cfg = cfg = info.config.replace(action_horizon=recipe.model.horizon, max_token_len=recipe.model.prompt_len)
    source = {"checkpoint": str(recipe.checkpoint_path()), "weights_sha256": weights_id(info.weight_sha256),
              "config": cfg.name, "pi05": cfg.pi05, "model_config": config_to_dict(cfg)}
    return BuildContext(recipe, model, source, device, engines, log)


def weights_id(file_hashes: dict[str, str]) -> str:
    """One sha256 for the weights: the file's own for one file, else the hash of the sorted file hashes."""
    if len(file_hashes) == 1:
        return next(iter(file_hashes.values()))
    import hashlib

    return hashlib.sha256("".join(f"{k}:{v}\n" for k, v in sorted(file_hashes.items())).encode()).hexdigest()


def _fresh_inputs(module: nn.Module, seed: int, device: torch.device) -> tuple[Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(t.to(device) for t in module.example_inputs(generator))


def _io_spec(names: tuple[str, ...], tensors: tuple[Tensor, ...]) -> dict[str, dict]:
    return {n: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")} for n, t in zip(names, tensors)}


def _manifest(ctx: BuildContext, component: str, stage: str, extra: dict[str, Any]) -> dict[str, Any]:
    spec = ctx.recipe.component(component.split("-")[0]) if component != "pipeline" else None
    m = ctx.recipe.model
    manifest = {
        "component": component,
        "model_id": ctx.recipe.name,
        "stage": stage,
        "backend": getattr(spec, "backend", None),
        "precision": getattr(spec, "precision", None),
        "steps": ctx.recipe.denoise.steps,
        "batch": m.batch,
        "horizon": m.horizon,
        "prompt_len": m.prompt_len,
        "cameras": list(m.cameras),
        "source": ctx.source,
        "recipe": ctx.recipe.to_dict(),
        "recipe_sha256": recipe_hash(ctx.recipe),
        "toolchain": artifacts.toolchain_versions(),
        "device": artifacts.device_info(ctx.device),
    }
    manifest.update(extra)
    return manifest


def check_gate(component: str, metrics: dict[str, float], gate) -> dict[str, Any]:
    passed = metrics["cosine"] >= gate.cosine and metrics["rel_err"] <= gate.rel_err
    report = {**metrics, "gate": {"cosine": gate.cosine, "rel_err": gate.rel_err}, "passed": passed}
    if not passed:
        raise BuildError(
            f"{component}: accuracy gate failed: cosine {metrics['cosine']:.6f} (needs >= {gate.cosine}), "
            f"rel_err {metrics['rel_err']:.3e} (needs <= {gate.rel_err}); nothing was written"
        )
    return report


# ----------------------------------------------------------------------------- modules per stage


def component_module(ctx: BuildContext, component: str, *, scales: dict | None = None) -> tuple[nn.Module, dict | None]:
    """The component in its recipe precision; FP8 linears applied from calibrated scales.

    The denoise step compiled by Inductor on a GPU uses pi-build's Triton kernels (kernels.py) for
    its few-token GEMMs and attention; returns the module and what was switched (None: nothing).
    """
    from pi_build.engine import kernels

    spec = ctx.recipe.component(component)
    module = build_component(ctx.model, component, ctx.shapes, spec.precision)
    if spec.precision == "fp8":
        if scales is None:
            raise BuildError(f"{component} is fp8 but has no calibrated scales: run `pi-build quantize` first")
        from pi_build.engine.fp8 import apply_fp8

        module = apply_fp8(module, scales)
    switched = None
    if component == "denoise" and spec.backend == "inductor" and kernels.triton_available(ctx.device):
        switched = module.use_triton_kernels()
    return module.to(ctx.device).eval(), switched


def gate_module(ctx: BuildContext, component: str, run: Callable[..., tuple[Tensor, ...]], probe: nn.Module, seed: int) -> dict[str, Any]:
    """Compare ``run`` with the float32 reference on fresh random inputs (two draws, worst kept)."""
    draws = []
    for draw in range(2):
        inputs = _fresh_inputs(probe, seed + draw, ctx.device)
        with torch.no_grad():
            out = run(*inputs)
            ref = reference_outputs(ctx.model, component, inputs, ctx.recipe.denoise.steps)
        draws.append(accuracy.component_metrics(component, out, ref))
    report = check_gate(component, accuracy.worst(draws), ctx.recipe.component_gate(component))
    report["seed"] = seed  # the draws are reproducible from it
    return report


# ----------------------------------------------------------------------------- stages


def stage_export(ctx: BuildContext, component: str) -> Path:
    """ONNX of the component in float32 (the graph TensorRT gets), verified in onnxruntime."""
    from pi_build.backends import onnx as onnx_export

    t0 = time.perf_counter()
    module = build_component(ctx.model, component, ctx.shapes, "fp32").cpu()
    inputs = _fresh_inputs(module, 1, torch.device("cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        path = onnx_export.export_onnx(module, inputs, module.input_names, module.output_names, Path(tmp) / f"{component}.onnx")
        cleaning = onnx_export.clean_onnx(path)
        check = onnx_export.verify_onnx(path, module, generator=torch.Generator().manual_seed(2))
        files = {p.name: p for p in Path(tmp).iterdir()}
        manifest = _manifest(ctx, f"{component}-onnx", "export", {
            "backend": "onnx",
            "precision": "fp32",  # the float32 graph; TensorRT picks its precision at its build
            "inputs": _io_spec(module.input_names, inputs),
            "onnx": {"cleaning": cleaning, "onnxruntime_check": check},
            "build_seconds": time.perf_counter() - t0,
        })
        return artifacts.write_artifact(ctx.engines, ctx.recipe.name, f"{component}-onnx", files, manifest)


def calibration_batches(ctx: BuildContext, component: str, samples: int) -> list[tuple[Tensor, ...]]:
    """Inputs of ``component`` for calibration, per the recipe's quantize.calibration."""
    path = ctx.recipe.calibration_path()  # a user's .npz: checked to exist, errors name the recipe field
    source = str(path) if path is not None else ctx.recipe.quantize.calibration
    if source == "generated":
        probe = build_component(ctx.model, component, ctx.shapes, "fp32")
        return [_fresh_inputs(probe, 1000 + i, ctx.device) for i in range(samples)]
    from pi_build.runtime.pipeline import observation_batches

    batches = []
    for inputs in observation_batches(ctx, source, samples):
        batches += component_inputs_from_observation(ctx, component, inputs)
    return batches


@torch.no_grad()
def component_inputs_from_observation(ctx: BuildContext, component: str, inputs) -> list[tuple[Tensor, ...]]:
    """Run the reference up to ``component`` on real model inputs (cameras of the recipe only).

    For denoise: one sample per Euler step, at the x_t the reference loop reaches there, so the
    calibration sees every step's activations, not only the noise.
    """
    images, image_masks = select_cameras(ctx.recipe.model.cameras, inputs.images, inputs.image_masks)
    if component == "vision":
        return [(images,)]
    image_tokens = ctx.model.vision(images, image_masks)
    if component == "kvcache":
        return [(image_tokens, image_masks, inputs.tokens, inputs.token_masks)]
    cache = ctx.model.kvcache(image_tokens, image_masks, inputs.tokens, inputs.token_masks)
    generator = torch.Generator().manual_seed(int(inputs.tokens.sum()))
    x = torch.randn(images.shape[0], ctx.recipe.model.horizon, ctx.model.cfg.action_dim, generator=generator).to(ctx.device)
    steps = ctx.recipe.denoise.steps
    samples = []
    for i, t in enumerate(euler_times(steps)):
        samples.append((x, torch.tensor(i, device=ctx.device), cache.k, cache.v, cache.prefix_mask, inputs.state))
        x = x + (-1.0 / steps) * ctx.model.denoise_step(x, t.to(ctx.device).expand(x.shape[0]), cache, inputs.state)
    return samples


def stage_quantize(ctx: BuildContext, component: str) -> Path:
    """FP8 calibration of the component's linears (bf16 module), scales written as their own artifact."""
    from pi_build.engine import fp8

    t0 = time.perf_counter()
    q = ctx.recipe.quantize
    module = build_component(ctx.model, component, ctx.shapes, "fp8")  # FP8's compute dtype, linears not yet FP8
    batches = calibration_batches(ctx, component, q.samples)

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for batch in batches:
                m(*batch)

    scales = fp8.calibrate(module, forward_loop, keep_high_precision=list(q.keep_high_precision))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scales.json"
        fp8.save_scales(scales, path)
        manifest = _manifest(ctx, f"{component}-fp8-scales", "quantize", {
            "backend": "modelopt",
            "quantize": {"calibration": q.calibration, "samples": len(batches), "layers": len(scales),
                         "keep_high_precision": list(q.keep_high_precision)},
            "build_seconds": time.perf_counter() - t0,
        })
        return artifacts.write_artifact(ctx.engines, ctx.recipe.name, f"{component}-fp8-scales", {"scales.json": path}, manifest)


def _latest_scales(ctx: BuildContext, component: str) -> tuple[dict, dict]:
    from pi_build.engine import fp8

    path = artifacts.latest_artifact(ctx.engines, ctx.recipe.name, f"{component}-fp8-scales")
    if path is None:
        raise BuildError(f"{component} is fp8 but no scales were calibrated: run `pi-build quantize {component}` first")
    art = artifacts.load_artifact(path)
    artifacts.verify_artifact(art)
    if art.manifest["source"]["weights_sha256"] != ctx.source["weights_sha256"]:
        raise BuildError(f"the newest {component} FP8 scales ({path}) were calibrated on other weights: re-run quantize")
    return fp8.load_scales(path / "scales.json"), {"path": str(path), "version": art.manifest["version"]}


def stage_compile(ctx: BuildContext, component: str) -> Path:
    """Compile the component into an engine, load it back, gate it against the reference, land it."""
    t0 = time.perf_counter()
    spec = ctx.recipe.component(component)
    scales, scales_ref = _latest_scales(ctx, component) if spec.precision == "fp8" else (None, None)
    module, triton_kernels = component_module(ctx, component, scales=scales)
    inputs = _fresh_inputs(module, 1, ctx.device)
    with torch.no_grad():
        outputs = tuple(module(*inputs)) if component == "kvcache" else (module(*inputs),)
    with tempfile.TemporaryDirectory() as tmp:
        ctx.log(f"  compiling {component} with {spec.backend} ({spec.precision})")
        engine_info = backends.compile_engine(module, inputs, spec.backend, Path(tmp))
        compile_seconds = time.perf_counter() - t0
        if engine_info["runner"] != "aoti" and spec.backend == "inductor":
            ctx.log(f"  [yellow]{engine_info['aoti_problem']}[/]: the engine loads through torch.compile with its kernel cache")
        engine = backends.load_engine(Path(tmp), engine_info["runner"], ctx.device)
        report = gate_module(ctx, component, engine, module, seed=int(time.time()))
        manifest = _manifest(ctx, component, "compile", {
            "inputs": _io_spec(module.input_names, inputs),
            "outputs": _io_spec(module.output_names, outputs),
            "engine_runner": engine_info["runner"],
            "engine_files": engine_info["files"],
            "aoti_problem": engine_info.get("aoti_problem"),
            "vocab_size": ctx.model.cfg.vocab_size,
            "fp8_scales": scales_ref,
            "triton_kernels": triton_kernels,
            "accuracy": report,
            "build_seconds": time.perf_counter() - t0,
            "compile_seconds": compile_seconds,
        })
        files = {name: Path(tmp) / name for name in engine_info["files"]}
        return artifacts.write_artifact(ctx.engines, ctx.recipe.name, component, files, manifest)


def stage_capture(ctx: BuildContext) -> Path:
    """Assemble the newest engines, capture CUDA graphs (GPU), check actions end to end, record it."""
    from pi_build.runtime import pipeline as runtime

    t0 = time.perf_counter()
    pipeline = runtime.load_pipeline(ctx.engines, ctx.recipe.name, ctx.device, steps=ctx.recipe.denoise.steps)
    capture = pipeline.capture()
    check = runtime.end_to_end_check(ctx, pipeline, ctx.recipe.actions_gate())
    latency = runtime.measure_latency(pipeline, iters=20)
    manifest = _manifest(ctx, "pipeline", "capture", {
        "engines": {c: pipeline.manifests[c]["version"] for c in COMPONENTS},
        "capture": capture,
        "latency_ms": latency,
        "accuracy": check,
        "build_seconds": time.perf_counter() - t0,
    })
    return artifacts.write_artifact(ctx.engines, ctx.recipe.name, "pipeline", {}, manifest)


def run_stages(ctx: BuildContext, component: str, stages: list[str]) -> list[Path]:
    """Run the given stages for one component in order (the per-component shortcuts)."""
    out = []
    precision = ctx.recipe.component(component).precision
    for stage in stages:
        if stage == "export":
            out.append(stage_export(ctx, component))
        elif stage == "quantize":
            if precision == "fp8":
                out.append(stage_quantize(ctx, component))
            else:
                ctx.log(f"  {component}: precision {precision}, nothing to quantize")
        elif stage == "compile":
            out.append(stage_compile(ctx, component))
        else:
            raise ValueError(f"unknown stage {stage!r}")
    return out
