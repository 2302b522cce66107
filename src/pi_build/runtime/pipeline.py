"""The pipeline: the three engines a recipe asks for, loaded and stitched together.

    images -> vision -> kvcache -> denoise (N steps) -> raw actions [B, H, 32]

``load_pipeline`` picks, for a recipe, the newest engine of each component that is what the
recipe asks for and runs here (``artifacts.select_engines``), verifies their hashes and loads them.
On a GPU, ``Pipeline.capture`` records the three engines into CUDA graphs over static buffers: one
graph for the whole pipeline (what ``run`` replays, no host syncs inside) and one per component
(for the latency breakdown).
"""

from __future__ import annotations

import json
import shlex
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from pi_build import artifacts, backends
from pi_build.artifacts import Manifest
from pi_build.engine.denoise import denoise_loop
from pi_build.errors import InputError, RecipeError
from pi_build.recipe import Recipe, load_recipe
from pi_build.runtime import timing
from pi_build.spec import CAMERAS, Component, Device

INPUT_NAMES = ("images", "image_masks", "tokens", "token_masks", "noise", "state")


def resolve_device(name: Device | str) -> torch.device:
    """A recipe's model.device as a torch device: auto picks cuda when a GPU is visible."""
    if name == Device.AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == Device.CUDA and not torch.cuda.is_available():
        raise InputError("the recipe asks for device 'cuda' but no CUDA GPU is visible: "
                         "set model.device = \"auto\" (or \"cpu\") in the recipe, or --set model.device=cpu")
    return torch.device(str(name))


def cpu_threads_for_serving() -> int:
    """Run CPU engines on one intra-op thread (PI_BUILD_CPU_THREADS sets another count).

    Measured on a 2-core machine with other work running (a simulator rendering beside the policy,
    or other processes): the tiny engines took 150-2000 ms per inference with PyTorch's default of
    one OpenMP thread per core, whose workers wait on each other at every operator while the cores
    are taken, and 15-37 ms with one thread. A policy serving a robot wants the steady latency.
    """
    import os

    threads = int(os.environ.get("PI_BUILD_CPU_THREADS", "1"))
    torch.set_num_threads(threads)
    return threads


def describe(manifests: dict[Component, Manifest]) -> str:
    """"vision v1 (bf16, inductor); kvcache v2 (fp8, inductor); denoise v1 (bf16, inductor, 10 steps)"."""
    rows = []
    for c, m in manifests.items():
        steps = f", {m['steps']} steps" if c == Component.DENOISE else ""
        rows.append(f"{c} {m['version']} ({m['precision']}, {m['backend']}{steps})")
    return "; ".join(rows)


def select_cameras(cameras: Sequence[str], images: Tensor, image_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Model inputs carry every camera in CAMERAS order; engines take their recipe's ``cameras`` only."""
    idx = [CAMERAS.index(c) for c in cameras]
    return images[:, idx], image_masks[:, idx]


class Pipeline:
    """Three engines stitched together, with fixed shapes from their manifests."""

    def __init__(self, engines: dict[Component, backends.Engine], manifests: dict[Component, Manifest],
                 device: torch.device, paths: dict[Component, Path] | None = None):
        self.engines, self.manifests, self.device = engines, manifests, device
        self.paths = paths or {}
        self.cameras: tuple[str, ...] = tuple(manifests[Component.VISION]["cameras"])
        self.horizon: int = manifests[Component.DENOISE]["horizon"]
        self.steps: int = manifests[Component.DENOISE]["steps"]
        self.batch: int = manifests[Component.VISION]["batch"]
        self.prompt_len: int = manifests[Component.KVCACHE]["prompt_len"]
        self.graphs: dict[str, torch.cuda.CUDAGraph] = {}
        self._static: dict[str, Tensor] = {}
        self._step_indices = torch.arange(self.steps, device=device)  # on the device: graph-capturable loop

    @property
    def shape_name(self) -> str:
        """"batch 4, prompt 32": the shape these engines were built for."""
        return f"batch {self.batch}, prompt {self.prompt_len}"

    def versions(self) -> dict[str, str]:
        return {str(c): m["version"] for c, m in self.manifests.items()}

    def describe(self) -> str:
        """The version, steps and precision of each engine chosen (printed at start-up)."""
        return describe(self.manifests)

    # -------------------------------------------------------------- eager (graph-free) path

    def _vision(self, images: Tensor) -> Tensor:
        return self.engines[Component.VISION](images)[0]

    def _kvcache(self, image_tokens: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> tuple[Tensor, ...]:
        return self.engines[Component.KVCACHE](image_tokens, image_masks, tokens, token_masks)

    def _denoise(self, noise: Tensor, k: Tensor, v: Tensor, prefix_mask: Tensor, state: Tensor) -> Tensor:
        return denoise_loop(self.engines[Component.DENOISE], noise, k, v, prefix_mask, state, self._step_indices)

    def _actions(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, noise: Tensor, state: Tensor) -> Tensor:
        k, v, prefix_mask = self._kvcache(self._vision(images), image_masks, tokens, token_masks)
        return self._denoise(noise, k, v, prefix_mask, state)

    def fits_prompt(self, token_masks: Tensor) -> bool:
        """Whether every row's prompt fits these engines' prompt length."""
        return int(token_masks.sum(-1).max()) <= self.prompt_len

    def trim_prompt(self, tokens: Tensor, token_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Tokens padded beyond the engines' prompt length, cut to it. Exact: the columns dropped are
        padding, which no query attends to and which moves no position (positions count valid tokens)."""
        if tokens.shape[1] <= self.prompt_len:
            return tokens, token_masks
        if token_masks[:, self.prompt_len :].any():
            raise InputError(f"a prompt of {int(token_masks.sum(-1).max())} tokens does not fit engines built for "
                             f"{self.prompt_len}; the runtime should pick a longer prompt bucket")
        return tokens[:, : self.prompt_len], token_masks[:, : self.prompt_len]

    @torch.no_grad()
    def run(self, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor, noise: Tensor, state: Tensor) -> Tensor:
        """Raw model actions [B, H, 32]; images [B, C, 3, 224, 224] already restricted to the engines'
        cameras; tokens padded to this prompt length or beyond (then cut, see ``trim_prompt``)."""
        tokens, token_masks = self.trim_prompt(tokens, token_masks)
        inputs = (images, image_masks, tokens, token_masks, noise, state)
        self._check_shapes(inputs)
        if "all" in self.graphs:
            for name, t in zip(INPUT_NAMES, inputs):
                self._static[name].copy_(t, non_blocking=True)
            self.graphs["all"].replay()
            return self._static["actions"].clone()
        return self._actions(*(t.to(self.device) for t in inputs))

    def _check_shapes(self, inputs: tuple[Tensor, ...]) -> None:
        vin, kin, din = (self.manifests[c]["inputs"] for c in Component)
        expected = {"images": vin["images"], "image_masks": kin["image_masks"], "tokens": kin["tokens"],
                    "token_masks": kin["token_masks"], "noise": din["x"], "state": din["state"]}
        for name, t in zip(INPUT_NAMES, inputs):
            if list(t.shape) != expected[name]["shape"]:
                raise ValueError(f"{name} has shape {list(t.shape)}; these engines were built for {expected[name]['shape']}")

    def example_inputs(self, seed: int = 0, prompt_tokens: int | None = None) -> tuple[Tensor, ...]:
        """Fresh random inputs of the engines' shapes: images in [-1, 1], prompts of ``prompt_tokens``
        valid tokens (default: a random length per row)."""
        g = torch.Generator().manual_seed(seed)
        vin, kin, din = (self.manifests[c]["inputs"] for c in Component)
        images = torch.rand(vin["images"]["shape"], generator=g) * 2 - 1
        image_masks = torch.ones(kin["image_masks"]["shape"], dtype=torch.bool)
        b, length = kin["tokens"]["shape"]
        vocab = int(self.manifests[Component.KVCACHE].get("vocab_size", 256))
        tokens = torch.randint(1, vocab, (b, length), generator=g)
        lengths = torch.randint(1, length + 1, (b, 1), generator=g) if prompt_tokens is None else torch.full((b, 1), prompt_tokens)
        token_masks = torch.arange(length)[None] < lengths
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
                self._actions(*static.values())
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        pool = torch.cuda.graph_pool_handle()
        graphs = {name: torch.cuda.CUDAGraph() for name in ("vision", "kvcache", "denoise", "all")}
        # Per-component graphs chained through static tensors (the latency breakdown)...
        with torch.cuda.graph(graphs["vision"], pool=pool):
            static["image_tokens"] = self._vision(static["images"])
        with torch.cuda.graph(graphs["kvcache"], pool=pool):
            static["k"], static["v"], static["prefix_mask"] = self._kvcache(
                static["image_tokens"], static["image_masks"], static["tokens"], static["token_masks"])
        with torch.cuda.graph(graphs["denoise"], pool=pool):
            static["component_actions"] = self._denoise(static["noise"], static["k"], static["v"], static["prefix_mask"], static["state"])
        # ...and the whole pipeline as one graph (what `run` replays).
        with torch.cuda.graph(graphs["all"]):
            static["actions"] = self._actions(*(static[n] for n in INPUT_NAMES))
        torch.cuda.synchronize(self.device)
        self.graphs, self._static = graphs, static
        return {"captured": True, "graphs": list(graphs), "capture_seconds": time.perf_counter() - t0,
                "batch": self.batch, "steps": self.steps, "horizon": self.horizon, "cameras": list(self.cameras)}

    # -------------------------------------------------------------- timing

    def stages(self, inputs: tuple[Tensor, ...], graphs: bool = True) -> tuple[list[timing.Stage], Callable[[], object] | None]:
        """The three components as timed stages (graph replays once captured, unless ``graphs`` is
        False), and the whole-pipeline graph when one is replayed."""
        if self.graphs and graphs:
            for name, t in zip(INPUT_NAMES, inputs):
                self._static[name].copy_(t)
            return [(c, self.graphs[c].replay) for c in ("vision", "kvcache", "denoise")], self.graphs["all"].replay
        images, image_masks, tokens, token_masks, noise, state = inputs
        box: dict[str, Any] = {}

        def vision() -> None:
            box["image_tokens"] = self._vision(images)

        def kvcache() -> None:
            box["kv"] = self._kvcache(box["image_tokens"], image_masks, tokens, token_masks)

        def denoise() -> None:
            box["actions"] = self._denoise(noise, *box["kv"], state)

        return [("vision", vision), ("kvcache", kvcache), ("denoise", denoise)], None

    def measure_latency(self, iters: int = 50, warmup: int = 5, seed: int = 0, prompt_tokens: int | None = None) -> dict[str, dict[str, float]]:
        """Latency stats (ms) of each component and end to end, on fresh random inputs of the engines' shapes."""
        stages, end_to_end = self.stages(self.example_inputs(seed, prompt_tokens))
        return timing.measure(stages, self.device, iters=iters, warmup=warmup, end_to_end=end_to_end)

    def profile(self, seed: int = 0, prompt_tokens: int | None = None, top: int = 12) -> dict[str, dict]:
        """Where each component's time goes: its kernels (GPU) or operators (CPU) in one call without
        graphs, after one warm-up call (``timing.kernel_profile``)."""
        stages, _ = self.stages(self.example_inputs(seed, prompt_tokens), graphs=False)
        with torch.no_grad():
            for _, run in stages:  # warm-up: lazy initialization stays out of the lists
                run()
            return {name: timing.kernel_profile(run, top=top, device=self.device) for name, run in stages}


def _flat(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"gates": {"bf16": {"cosine": 0.999}}} -> {"gates.bf16.cosine": 0.999}."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        if isinstance(value, dict):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def build_command(recipe: Recipe) -> Callable[[Component], str]:
    """The command that builds a recipe's engine of one component (for error messages), with a
    ``--set`` for each setting the engine depends on where ``recipe`` differs from its file (the
    command's own ``--set`` / ``--fp8`` overrides)."""
    try:
        in_file = _flat(load_recipe(recipe.path).to_dict()) if recipe.path else None
    except RecipeError:
        in_file = None
    wanted = _flat(recipe.to_dict())

    def command(component: Component) -> str:
        where = f" --recipe {recipe.path}" if recipe.path else ""
        steps = f" --steps {recipe.denoise.steps}" if component == Component.DENOISE else ""
        sets = ""
        if in_file is not None:
            sections = ("model.", f"{component}.", "quantize.", "gates.")
            for key, value in wanted.items():
                if key.startswith(sections) and key != "denoise.steps" and in_file.get(key) != value:
                    text = json.dumps(value) if isinstance(value, (list, bool)) else str(value)
                    sets += f" --set {shlex.quote(f'{key}={text}')}"
        return f"pi-build {component}{where}{steps}{sets}"

    return command


def recipe_of_model(engines: Path, model_id: str) -> Recipe:
    """The recipe recorded in a model's newest captured pipeline (else its newest denoise engine):
    how a robot runs engines copied without their recipe file."""
    from pi_build.recipe import recipe_from_dict

    for kind in (artifacts.PIPELINE, Component.DENOISE):
        newest = artifacts.newest(engines, model_id, kind)
        if newest is not None:
            return recipe_from_dict(newest.manifest["recipe"], source=f"the recipe recorded in {newest}")
    raise artifacts.ArtifactError(f"no engines of model {model_id!r} under {engines}: `pi-build list` shows what is there")


def select_for_shapes(engines: Path, recipe: Recipe, device: torch.device,
                      shapes: list[tuple[int, int]] | None = None) -> list[tuple[tuple[int, int], dict[Component, artifacts.Artifact]]]:
    """The engines ``recipe`` asks for at each shape (batch size, prompt length), found without
    loading any: by default every shape the recipe names (each batch size x prompt bucket), smallest first."""
    info, toolchain, command = artifacts.device_info(device), artifacts.toolchain_versions(), build_command(recipe)
    shapes = shapes or [(b, length) for b in recipe.model.batch for length in recipe.model.prompt_lengths]
    return [((batch, prompt_len), artifacts.select_engines(engines, recipe, batch=batch, prompt_len=prompt_len, device=info,
                                                           toolchain=toolchain, build_command=command))
            for batch, prompt_len in shapes]


def selected_engines(engines: Path, recipe: Recipe, device: torch.device | str | None = None) -> dict[str, dict[Component, Manifest]]:
    """The manifests of the engines ``load_pipelines`` would load for each shape, found without loading any."""
    device = torch.device(device) if device is not None else resolve_device(recipe.model.device)
    return {f"batch {batch}, prompt {prompt_len}": {c: a.manifest for c, a in selected.items()}
            for (batch, prompt_len), selected in select_for_shapes(engines, recipe, device)}


def load_pipelines(engines: Path, recipe: Recipe, device: torch.device | str | None = None,
                   shapes: list[tuple[int, int]] | None = None) -> list[Pipeline]:
    """One pipeline per engine shape (batch size, prompt length): by default every one the recipe
    names (each batch size x prompt bucket), smallest first. An engine two shapes share (vision,
    which never sees the prompt) is loaded once."""
    device = torch.device(device) if device is not None else resolve_device(recipe.model.device)
    loaded: dict[Path, backends.Engine] = {}
    pipelines = []
    for _, selected in select_for_shapes(engines, recipe, device, shapes):
        for art in selected.values():
            if art.path not in loaded:
                artifacts.verify_artifact(art)
                loaded[art.path] = backends.load_engine(art.path, art.manifest["engine_runner"], device,
                                                        bool(art.manifest.get("autotune", False)))
        pipelines.append(Pipeline({c: loaded[a.path] for c, a in selected.items()}, {c: a.manifest for c, a in selected.items()},
                                  device, {c: a.path for c, a in selected.items()}))
    return pipelines


def load_pipeline(engines: Path, recipe: Recipe, device: torch.device | str | None = None, *,
                  batch: int | None = None, prompt_len: int | None = None) -> Pipeline:
    """The engines of one shape: by default the recipe's smallest batch size and full prompt length."""
    shape = (batch or min(recipe.model.batch), prompt_len or recipe.model.prompt_len)
    return load_pipelines(engines, recipe, device, [shape])[0]
