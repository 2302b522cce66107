"""The policy: a robot's observation in, its actions out, from engines alone.

    observation -> transforms (tokenizer, norm stats: carried by the engines) -> pipeline -> actions

A build copies the checkpoint's tokenizer into the kvcache engine's artifact and its norm stats into
the denoise engine's, so a robot's computer needs the engines folder only, never the checkpoint.
``Policy`` is what the LIBERO loop and the policy server call.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from pi_build.errors import ArtifactError
from pi_build.io import read_json
from pi_build.model.norm_stats import parse_norm_stats
from pi_build.model.pi0 import ModelInputs, config_from_dict
from pi_build.model.tokenizer import PromptTokenizer
from pi_build.recipe import Recipe
from pi_build.runtime import batching
from pi_build.runtime.pipeline import Pipeline, select_cameras
from pi_build.spec import Component
from pi_build.transforms import PolicyTransforms
from pi_build.transforms.libero import STATE_KEY, libero_transforms

TOKENIZER_FILE, NORM_STATS_FILE = "tokenizer.model", "norm_stats.json"  # as the engines carry them


def transforms_from_engines(pipeline: Pipeline) -> PolicyTransforms:
    """The observation transforms of the checkpoint the engines were built from, read from the
    engines' own artifacts (tokenizer: kvcache's; norm stats: denoise's)."""
    kvcache, denoise = pipeline.manifests[Component.KVCACHE], pipeline.manifests[Component.DENOISE]
    for component, manifest, name in ((Component.KVCACHE, kvcache, TOKENIZER_FILE), (Component.DENOISE, denoise, NORM_STATS_FILE)):
        if name not in manifest["files"]:
            raise ArtifactError(
                f"{manifest['model_id']}/{component}/{manifest['version']} carries no {name}: the checkpoint it was built "
                f"from had none (tokenizer.model beside config.json; openpi assets/<id>/norm_stats.json). Add it and "
                f"rebuild: `pi-build {component} --recipe <recipe>`")
    cfg = config_from_dict(denoise["source"]["model_config"]).replace(action_horizon=pipeline.horizon,
                                                                       max_token_len=pipeline.prompt_len)
    # never cut a robot's instruction silently: an over-long prompt is refused (InputError)
    tokenizer = PromptTokenizer(pipeline.paths[Component.KVCACHE] / TOKENIZER_FILE, max_len=pipeline.prompt_len, truncate=False)
    stats_path = pipeline.paths[Component.DENOISE] / NORM_STATS_FILE
    norm_stats = parse_norm_stats(read_json(stats_path, ArtifactError)["norm_stats"], str(stats_path))
    return libero_transforms(cfg, tokenizer, norm_stats)


@dataclass
class PreparedObservation:
    """One request after ``Policy.prepare``: model inputs of batch 1 on the CPU, ready to be batched."""

    inputs: ModelInputs
    noise: Tensor | None  # [H, action_dim] from the request's noise_seed; None: drawn from the policy's generator
    state: np.ndarray  # the raw robot state, which the output transforms need
    prepare_ms: float


@dataclass
class Policy:
    """observation dict -> {"actions": [H, 7], "policy_timing": {...}}: what LIBERO and the server call.

    It is also a ``batching.BatchPolicy``: ``prepare`` one observation at a time (any thread),
    then ``run`` a list of them as one batch through the engines of the smallest batch size and
    prompt bucket that hold them (the policy thread). A request with a ``noise_seed`` gets the same
    actions whatever it is batched with.
    """

    pipelines: dict[tuple[int, int], Pipeline]  # by the (batch size, prompt length) their engines were built for
    transforms: PolicyTransforms
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline of the smallest shape (what describes the engines)."""
        return self.pipelines[min(self.pipelines)]

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return tuple(sorted({batch for batch, _ in self.pipelines}))

    @property
    def prompt_lengths(self) -> tuple[int, ...]:
        return tuple(sorted({length for _, length in self.pipelines}))

    @property
    def max_batch(self) -> int:
        return max(self.batch_sizes)

    def bucket(self, token_masks: Tensor) -> int:
        """The smallest prompt length that holds every row's prompt."""
        longest = int(token_masks.sum(-1).max())
        return next(length for length in self.prompt_lengths if length >= longest)

    @property
    def _noise_shape(self) -> tuple[int, int]:
        return (self.pipeline.horizon, self.transforms.model_cfg.action_dim)

    def prepare(self, obs: dict) -> PreparedObservation:
        """Validate and preprocess one observation (InputError for an over-long prompt or a bad noise seed)."""
        t0 = time.perf_counter()
        seed = batching.noise_seed(obs)
        inputs = self.transforms.inputs(obs)  # on the CPU: run() moves the whole batch at once
        noise = None if seed is None else batching.draw_noise(self._noise_shape, seed, self._generator)
        state = np.asarray(obs[STATE_KEY])
        return PreparedObservation(inputs, noise, state, (time.perf_counter() - t0) * 1e3)

    def run(self, items: Sequence[PreparedObservation]) -> list[dict[str, Any]]:
        """One pass of the engines over all ``items``, padded to an engine batch size; one reply per item."""
        t0 = time.perf_counter()
        # Unseeded noise comes from the policy's generator here, on the policy thread, in row order.
        noise = torch.stack([item.noise if item.noise is not None
                             else batching.draw_noise(self._noise_shape, None, self._generator) for item in items])
        images, image_masks = select_cameras(self.pipeline.cameras, torch.cat([i.inputs.images for i in items]),
                                             torch.cat([i.inputs.image_masks for i in items]))
        tokens = torch.cat([item.inputs.tokens for item in items])
        token_masks = torch.cat([item.inputs.token_masks for item in items])
        state = torch.cat([item.inputs.state for item in items])
        bucket = self.bucket(token_masks)
        raw = batching.run_padded((images, image_masks, tokens, token_masks, noise, state), self.batch_sizes,
                                  lambda size, padded: self.pipelines[size, bucket].run(*padded))
        raw = raw.float().cpu().numpy()
        t1 = time.perf_counter()
        actions = self.transforms.outputs(raw, np.stack([item.state for item in items]))
        t2 = time.perf_counter()
        return [{"actions": row, "policy_timing": {"preprocess_ms": item.prepare_ms, "infer_ms": (t1 - t0) * 1e3,
                                                   "postprocess_ms": (t2 - t1) * 1e3}}
                for item, row in zip(items, actions, strict=True)]

    def __call__(self, obs: dict) -> dict[str, Any]:
        return self.run([self.prepare(obs)])[0]


def load_policy(pipelines: Pipeline | Sequence[Pipeline], *, graphs: bool = True, seed: int = 0) -> Policy:
    """A policy over loaded engines (one pipeline per batch size): CUDA graphs captured on a GPU,
    transforms from the engines."""
    pipelines = [pipelines] if isinstance(pipelines, Pipeline) else list(pipelines)
    for pipeline in pipelines:
        if graphs and pipeline.device.type == "cuda":
            pipeline.capture()
    return Policy({(p.batch, p.prompt_len): p for p in pipelines}, transforms_from_engines(pipelines[-1]), seed=seed)


def policy_for_recipe(engines: Path, recipe: Recipe, device: str | None = None) -> Policy:
    """The policy over the engines ``recipe`` asks for (every batch size and prompt bucket it names):
    a picklable recipe for a worker process to load its own copy from (LIBERO evaluation on Ray)."""
    from pi_build.runtime.pipeline import cpu_threads_for_serving, load_pipelines

    pipelines = load_pipelines(engines, recipe, device)
    if pipelines[0].device.type == "cpu":
        cpu_threads_for_serving()
    return load_policy(pipelines)
