"""The runtime: load a compatible set of engines and run the policy.

    observation -> preprocessing -> vision -> kvcache -> denoise (N steps) -> unnormalized actions

``load_pipeline`` finds the newest vision / kvcache / denoise engines of a model under
``engines/``, verifies their hashes and that they fit together (same weights, matching shapes,
this GPU architecture and toolchain), and loads them. On a GPU, ``Pipeline.capture`` records the
three engines into CUDA graphs over static buffers: one graph for the whole pipeline (what
``run`` replays, no host syncs inside) and one per component (for the latency breakdown).
``Policy`` wraps a pipeline with the observation transforms of its checkpoint: it is what the
LIBERO loop and the policy server call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor

from pi_build import artifacts, backends
from pi_build.engine import accuracy
from pi_build.engine.components import COMPONENTS, denoise_loop
from pi_build.model.pi0 import ModelInputs
from pi_build.transforms.libero import select_cameras

INPUT_NAMES = ("images", "image_masks", "tokens", "token_masks", "noise", "state")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Pipeline:
    """Three engines stitched together, with fixed shapes from their manifests."""

    def __init__(self, engines: dict[str, backends.Engine], manifests: dict[str, dict], device: torch.device):
        self.engines, self.manifests, self.device = engines, manifests, device
        self.cameras: tuple[str, ...] = tuple(manifests["vision"]["cameras"])
        self.horizon: int = manifests["denoise"]["horizon"]
        self.steps: int = manifests["denoise"]["steps"]
        self.batch: int = manifests["vision"]["batch"]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._static: dict[str, Tensor] = {}
        self._step_indices = torch.arange(self.steps, device=device)  # on the device: graph-capturable loop

    # -------------------------------------------------------------- eager (graph-free) path

    def _stages(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, noise: Tensor, state: Tensor):
        (image_tokens,) = self.engines["vision"](images)
        k, v, prefix_mask = self.engines["kvcache"](image_tokens, image_masks, tokens, token_masks)
        actions = denoise_loop(self.engines["denoise"], noise, k, v, prefix_mask, state, self._step_indices)
        return image_tokens, k, v, prefix_mask, actions

    def select_cameras(self, images: Tensor, image_masks: Tensor) -> tuple[Tensor, Tensor]:
        return select_cameras(self.cameras, images, image_masks)

    @torch.no_grad()
    def run(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, noise: Tensor, state: Tensor) -> Tensor:
        """Raw model actions [B, H, 32]; images [B, C, 3, 224, 224] already restricted to the engines' cameras."""
        inputs = (images, image_masks, tokens, token_masks, noise, state)
        self._check_shapes(inputs)
        if "all" in self.graphs:
            for name, t in zip(INPUT_NAMES, inputs):
                self._static[name].copy_(t, non_blocking=True)
            self.graphs["all"].replay()
            return self._static["actions"].clone()
        inputs = tuple(t.to(self.device) for t in inputs)
        return self._stages(*inputs)[-1]

    def _check_shapes(self, inputs: tuple[Tensor, ...]) -> None:
        expected = {
            "images": self.manifests["vision"]["inputs"]["images"]["shape"],
            "image_masks": self.manifests["kvcache"]["inputs"]["image_masks"]["shape"],
            "tokens": self.manifests["kvcache"]["inputs"]["tokens"]["shape"],
            "token_masks": self.manifests["kvcache"]["inputs"]["token_masks"]["shape"],
            "noise": self.manifests["denoise"]["inputs"]["x"]["shape"],
            "state": self.manifests["denoise"]["inputs"]["state"]["shape"],
        }
        for name, t in zip(INPUT_NAMES, inputs):
            if list(t.shape) != expected[name]:
                raise ValueError(f"{name} has shape {list(t.shape)}; these engines were built for {expected[name]}")

    def example_inputs(self, seed: int = 0) -> tuple[Tensor, ...]:
        """Fresh random inputs of the engines' shapes (images in [-1, 1], prompts of random length)."""
        g = torch.Generator().manual_seed(seed)
        vin, kin, din = (self.manifests[c]["inputs"] for c in COMPONENTS)
        images = torch.rand(vin["images"]["shape"], generator=g) * 2 - 1
        image_masks = torch.ones(kin["image_masks"]["shape"], dtype=torch.bool)
        b, length = kin["tokens"]["shape"]
        vocab = int(self.manifests["kvcache"].get("vocab_size", 256))
        tokens = torch.randint(1, vocab, (b, length), generator=g)
        token_masks = torch.arange(length)[None] < torch.randint(1, length + 1, (b, 1), generator=g)
        noise = torch.randn(din["x"]["shape"], generator=g)
        state = torch.randn(din["state"]["shape"], generator=g)
        return tuple(t.to(self.device) for t in (images, image_masks, tokens, token_masks, noise, state))

    # -------------------------------------------------------------- CUDA graphs

    @torch.no_grad()
    def capture(self) -> dict[str, Any]:
        """Capture the pipeline into CUDA graphs over static buffers; returns what was captured."""
        if self.device.type != "cuda":
            return {"captured": False, "reason": "no CUDA device: engines run without graphs"}
        static = dict(zip(INPUT_NAMES, self.example_inputs(seed=123)))
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):  # warm-up outside capture: lazy init, workspace allocation
            for _ in range(3):
                self._stages(*static.values())
        torch.cuda.current_stream(self.device).wait_stream(stream)
        _sync(self.device)
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        graphs: dict[str, torch.cuda.CUDAGraph] = {}
        # Per-component graphs chained through static tensors (latency breakdown)...
        graphs["vision"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs["vision"], pool=pool):
            (static["image_tokens"],) = self.engines["vision"](static["images"])
        graphs["kvcache"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs["kvcache"], pool=pool):
            static["k"], static["v"], static["prefix_mask"] = self.engines["kvcache"](
                static["image_tokens"], static["image_masks"], static["tokens"], static["token_masks"])
        graphs["denoise"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs["denoise"], pool=pool):
            static["component_actions"] = denoise_loop(self.engines["denoise"], static["noise"], static["k"], static["v"],
                                                       static["prefix_mask"], static["state"], self._step_indices)
        # ...and the whole pipeline as one graph (what `run` replays).
        graphs["all"] = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graphs["all"]):
            static["actions"] = self._stages(*(static[n] for n in INPUT_NAMES))[-1]
        _sync(self.device)
        self.graphs, self._static = graphs, static
        return {"captured": True, "graphs": list(graphs), "capture_seconds": time.perf_counter() - t0,
                "batch": self.batch, "steps": self.steps, "horizon": self.horizon, "cameras": list(self.cameras)}

    # -------------------------------------------------------------- timing

    @torch.no_grad()
    def timed_run(self, inputs: tuple[Tensor, ...]) -> dict[str, float]:
        """One pass with per-component latency in ms (CUDA events on GPU, perf counters on CPU)."""
        names = ("vision", "kvcache", "denoise")
        if self.device.type == "cuda":
            if self.graphs:
                for name, t in zip(INPUT_NAMES, inputs):
                    self._static[name].copy_(t)
                steps = [self.graphs[n].replay for n in names]
            else:
                steps = self._eager_steps(inputs)
            events = [torch.cuda.Event(enable_timing=True) for _ in range(4)]
            events[0].record()
            for i, step in enumerate(steps):
                step()
                events[i + 1].record()
            events[-1].synchronize()
            times = {n: events[i].elapsed_time(events[i + 1]) for i, n in enumerate(names)}
            if self.graphs:  # the whole-pipeline graph is what `run` replays: time it too
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                self.graphs["all"].replay()
                end.record()
                end.synchronize()
                times["end_to_end"] = start.elapsed_time(end)
            else:
                times["end_to_end"] = sum(times[n] for n in names)
            return times
        times = {}
        for name, step in zip(names, self._eager_steps(inputs)):
            t0 = time.perf_counter()
            step()
            times[name] = (time.perf_counter() - t0) * 1e3
        times["end_to_end"] = sum(times[n] for n in names)
        return times

    def _eager_steps(self, inputs: tuple[Tensor, ...]) -> list:
        images, image_masks, tokens, token_masks, noise, state = inputs
        box: dict[str, Any] = {}

        def vision():
            (box["image_tokens"],) = self.engines["vision"](images)

        def kvcache():
            box["kv"] = self.engines["kvcache"](box["image_tokens"], image_masks, tokens, token_masks)

        def denoise():
            k, v, mask = box["kv"]
            box["actions"] = denoise_loop(self.engines["denoise"], noise, k, v, mask, state, self._step_indices)

        return [vision, kvcache, denoise]


def _newest(engines: Path, model_id: str, name: str, steps: int | None) -> Path | None:
    """The newest artifact of a component; for denoise with ``steps``, the newest built for that step count."""
    if name != "denoise" or steps is None:
        return artifacts.latest_artifact(engines, model_id, name)
    folder = engines / model_id / "denoise"
    versions = sorted(folder.glob("v*/manifest.json"), key=lambda p: int(p.parent.name[1:]) if p.parent.name[1:].isdigit() else -1)
    for manifest in reversed(versions):
        if artifacts.load_artifact(manifest.parent).manifest.get("steps") == steps:
            return manifest.parent
    return None


def load_pipeline(engines: Path, model_id: str, device: torch.device | str, *, steps: int | None = None) -> Pipeline:
    """Load the newest version of each component (denoise: for ``steps`` if given), refusing sets that do not fit together."""
    device = torch.device(device)
    arts: dict[str, artifacts.Artifact] = {}
    for name in COMPONENTS:
        path = _newest(engines, model_id, name, steps)
        if path is None:
            hint = f"pi-build denoise --steps {steps}" if name == "denoise" and steps else f"pi-build {name}"
            raise artifacts.ArtifactError(f"no {name} engine for model {model_id!r} under {engines}"
                                          f"{f' built for {steps} steps' if name == 'denoise' and steps else ''}: run `{hint}` first")
        arts[name] = artifacts.load_artifact(path)
        artifacts.verify_artifact(arts[name])
    artifacts.check_compatible(arts, device=artifacts.device_info(device), toolchain=artifacts.toolchain_versions())
    loaded = {}
    for name, art in arts.items():
        m = art.manifest
        loaded[name] = backends.load_engine(art.path, m["engine_runner"], device)
    return Pipeline(loaded, {n: a.manifest for n, a in arts.items()}, device)


def latency_stats(samples: list[float]) -> dict[str, float]:
    a = np.asarray(samples, dtype=np.float64)
    return {"mean": float(a.mean()), "std": float(a.std()), "p50": float(np.percentile(a, 50)),
            "p95": float(np.percentile(a, 95)), "count": int(a.size)}


def measure_latency(pipeline: Pipeline, iters: int = 50, warmup: int = 5, seed: int = 0) -> dict[str, dict[str, float]]:
    inputs = pipeline.example_inputs(seed)
    for _ in range(warmup):
        pipeline.timed_run(inputs)
    runs = [pipeline.timed_run(inputs) for _ in range(iters)]
    return {name: latency_stats([r[name] for r in runs]) for name in runs[0]}


# ----------------------------------------------------------------------------- observations and the policy


def observation_batches(ctx, source: str, samples: int) -> Iterator[ModelInputs]:
    """Model inputs from raw observations: recorded LIBERO ones, an .npz of them, for calibration and checks."""
    transforms = load_transforms(Path(ctx.source["checkpoint"]), ctx.model.cfg)
    observations = load_observations(source)
    batch = ctx.recipe.model.batch
    for i in range(samples):
        chunk = [observations[(i * batch + j) % len(observations)] for j in range(batch)]
        yield transforms.inputs(chunk, device=ctx.device)


def load_observations(source: str) -> list[dict]:
    """'recorded' = the LIBERO observations shipped with pi-build; else a path to an .npz of the same layout."""
    from pi_build.envs import libero

    return libero.load_recorded_observations(None if source == "recorded" else Path(source))


def load_transforms(checkpoint: Path, cfg):
    """The observation transforms of a checkpoint: its tokenizer and norm stats (LIBERO mapping)."""
    from pi_build.model.checkpoints import TOKENIZER_FILE, read_assets
    from pi_build.transforms.libero import PolicyTransforms, norm_stats_from_dict
    from pi_build.model.tokenizer import PromptTokenizer

    tokenizer_path, stats = read_assets(checkpoint)
    if stats is None:
        raise FileNotFoundError(f"{checkpoint}: no norm stats (openpi: assets/<asset_id>/norm_stats.json; "
                                "lerobot: the normalizer processor file), needed to normalize states and actions")
    if tokenizer_path is None:
        raise FileNotFoundError(f"{checkpoint}: no {TOKENIZER_FILE} (the PaliGemma sentencepiece model) beside config.json")
    tokenizer = PromptTokenizer(tokenizer_path, max_len=cfg.max_token_len)
    return PolicyTransforms.libero(cfg, tokenizer, norm_stats_from_dict(stats, str(checkpoint)))


@torch.no_grad()
def end_to_end_check(ctx, pipeline: Pipeline, gate, samples: int = 4) -> dict[str, Any]:
    """The assembled pipeline's actions against the float32 reference's on recorded observations."""
    from pi_build.build.stages import check_gate

    draws = []
    source = "recorded"
    try:
        batches = list(observation_batches(ctx, source, samples))
    except (FileNotFoundError, ValueError) as exc:  # no tokenizer or norm stats: generated model inputs instead
        ctx.log(f"  end-to-end check on generated inputs ({exc})")
        source = "generated"
        batches = [pipeline.example_inputs(seed) for seed in range(samples)]
    for i, batch in enumerate(batches):
        if isinstance(batch, ModelInputs):
            images, image_masks = pipeline.select_cameras(batch.images, batch.image_masks)
            g = torch.Generator().manual_seed(i)
            noise = torch.randn(images.shape[0], pipeline.horizon, ctx.model.cfg.action_dim, generator=g).to(ctx.device)
            inputs = (images, image_masks, batch.tokens, batch.token_masks, noise, batch.state)
        else:
            inputs = batch
        actions = pipeline.run(*inputs)
        ref = ctx.model.sample(ModelInputs(inputs[0], inputs[1], inputs[2], inputs[3], inputs[5]), inputs[4], pipeline.steps)
        draws.append(accuracy.metrics(actions, ref))
    report = check_gate("actions", accuracy.worst(draws), gate)
    report["observations"] = source
    return report


@dataclass
class Policy:
    """observation dict -> {"actions": [H, 7], "policy_timing": {...}}: what LIBERO and the server call."""

    pipeline: Pipeline
    transforms: Any  # preprocessing.PolicyTransforms
    seed: int = 0

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def __call__(self, obs: dict) -> dict[str, Any]:
        t0 = time.perf_counter()
        inputs = self.transforms.inputs(obs, device=self.pipeline.device)
        images, image_masks = self.pipeline.select_cameras(inputs.images, inputs.image_masks)
        noise = torch.randn(1, self.pipeline.horizon, inputs.state.shape[-1], generator=self._generator).to(self.pipeline.device)
        t1 = time.perf_counter()
        raw = self.pipeline.run(images, image_masks, inputs.tokens, inputs.token_masks, noise, inputs.state)
        raw = raw.float().cpu().numpy()
        t2 = time.perf_counter()
        actions = self.transforms.outputs(raw, obs)[0]
        t3 = time.perf_counter()
        return {"actions": actions, "policy_timing": {"preprocess_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3,
                                                      "postprocess_ms": (t3 - t2) * 1e3}}


def load_policy(engines: Path, model_id: str, device: torch.device | str, *, steps: int | None = None,
                checkpoint: Path | None = None, graphs: bool = True, seed: int = 0) -> Policy:
    """Engines + the observation transforms of the checkpoint they were built from (or ``checkpoint``)."""
    from pi_build.model.pi0 import config_from_dict

    pipeline = load_pipeline(engines, model_id, device, steps=steps)
    if graphs and pipeline.device.type == "cuda":
        pipeline.capture()
    source = pipeline.manifests["vision"]["source"]
    cfg = config_from_dict(source["model_config"]).replace(action_horizon=pipeline.horizon)
    transforms = load_transforms(Path(checkpoint or source["checkpoint"]), cfg)
    return Policy(pipeline, transforms, seed=seed)
