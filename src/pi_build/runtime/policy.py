"""The policy: a robot's observation in, its actions out, from engines alone.

    observation -> transforms (tokenizer, norm stats: carried by the engines) -> pipeline -> actions

A build copies the checkpoint's tokenizer into the kvcache engine's artifact and its norm stats into
the denoise engine's, so a robot's computer needs the engines folder only, never the checkpoint.
``Policy`` is what the LIBERO loop and the policy server call.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import torch

from pi_build.errors import ArtifactError
from pi_build.io import read_json
from pi_build.model.norm_stats import parse_norm_stats
from pi_build.model.pi0 import config_from_dict
from pi_build.model.tokenizer import PromptTokenizer
from pi_build.runtime.pipeline import Pipeline, select_cameras
from pi_build.spec import Component
from pi_build.transforms import PolicyTransforms
from pi_build.transforms.libero import libero_transforms

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
    tokenizer = PromptTokenizer(pipeline.paths[Component.KVCACHE] / TOKENIZER_FILE, max_len=pipeline.prompt_len)
    stats_path = pipeline.paths[Component.DENOISE] / NORM_STATS_FILE
    norm_stats = parse_norm_stats(read_json(stats_path, ArtifactError)["norm_stats"], str(stats_path))
    return libero_transforms(cfg, tokenizer, norm_stats)


@dataclass
class Policy:
    """observation dict -> {"actions": [H, 7], "policy_timing": {...}}: what LIBERO and the server call."""

    pipeline: Pipeline
    transforms: PolicyTransforms
    seed: int = 0
    _generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._generator = torch.Generator().manual_seed(self.seed)

    def noise(self, batch: int) -> torch.Tensor:
        """[B, H, 32] standard normal noise for the first Euler step, from the policy's own generator."""
        return torch.randn(batch, self.pipeline.horizon, self.transforms.model_cfg.action_dim, generator=self._generator)

    def __call__(self, obs: dict) -> dict[str, Any]:
        t0 = time.perf_counter()
        inputs = self.transforms.inputs(obs, device=self.pipeline.device)
        images, image_masks = select_cameras(self.pipeline.cameras, inputs.images, inputs.image_masks)
        noise = self.noise(1).to(self.pipeline.device)
        t1 = time.perf_counter()
        raw = self.pipeline.run(images, image_masks, inputs.tokens, inputs.token_masks, noise, inputs.state)
        raw = raw.float().cpu().numpy()
        t2 = time.perf_counter()
        actions = self.transforms.outputs(raw, obs)[0]
        t3 = time.perf_counter()
        return {"actions": actions, "policy_timing": {"preprocess_ms": (t1 - t0) * 1e3, "infer_ms": (t2 - t1) * 1e3,
                                                      "postprocess_ms": (t3 - t2) * 1e3}}


def load_policy(pipeline: Pipeline, *, graphs: bool = True, seed: int = 0) -> Policy:
    """A policy over loaded engines: CUDA graphs captured on a GPU, transforms from the engines."""
    if graphs and pipeline.device.type == "cuda":
        pipeline.capture()
    return Policy(pipeline, transforms_from_engines(pipeline), seed=seed)
