"""Engines for several batch sizes and prompt buckets: built per shape, chosen per request, exact."""

import json

import numpy as np
import pytest
import torch

from pi_build import artifacts
from pi_build.cli.run import app as run_app
from pi_build.errors import InputError
from pi_build.model.checkpoints import load_checkpoint
from pi_build.model.pi0 import ModelInputs
from pi_build.recipe import load_recipe
from pi_build.runtime.pipeline import load_pipeline, load_pipelines
from pi_build.runtime.policy import load_policy
from pi_build.transforms.libero import load_recorded_observations

from conftest import built_engines, invoke

@pytest.fixture(scope="module")
def shaped(workspace):
    recipe, engines = built_engines(workspace, "s", "batch = [1, 2]\nprompt_buckets = [16, 48]")
    return load_recipe(recipe), engines


def test_every_shape_is_built_once(shaped):
    recipe, engines = shaped
    shapes = lambda kind: sorted((a.manifest["batch"], a.manifest["prompt_len"]) for a in artifacts.artifacts_of(engines, "s", kind))  # noqa: E731
    assert shapes("vision") == [(1, 200), (2, 200)]  # vision never sees the prompt: one per batch size
    for kind in ("kvcache", "denoise"):
        assert shapes(kind) == [(b, n) for b in (1, 2) for n in (16, 48, 200)]
    kv16 = next(a for a in artifacts.artifacts_of(engines, "s", "kvcache") if a.manifest["prompt_len"] == 16)
    assert kv16.manifest["outputs"]["k"]["shape"][3] == 2 * 256 + 16  # the prefix without the padding beyond 16
    pipeline = artifacts.newest(engines, "s", artifacts.PIPELINE).manifest
    assert sorted(pipeline["shapes"]) == sorted(f"batch {b}, prompt {n}" for b in (1, 2) for n in (16, 48, 200))
    assert all(s["accuracy"]["passed"] for s in pipeline["shapes"].values())


@pytest.mark.parametrize("prompt_tokens, bucket", [(9, 16), (16, 16), (30, 48)])
def test_dropping_the_padding_is_exact(shaped, workspace, prompt_tokens, bucket):
    """A short prompt on its bucket gives the actions of the full-length engines and of the reference."""
    recipe, engines = shaped
    full = load_pipeline(engines, recipe, "cpu", batch=2, prompt_len=200)
    small = load_pipeline(engines, recipe, "cpu", batch=2, prompt_len=bucket)
    inputs = full.example_inputs(seed=prompt_tokens, prompt_tokens=prompt_tokens)  # tokens padded to 200
    on_bucket, on_full = small.run(*inputs), full.run(*inputs)
    assert ((on_bucket - on_full).norm() / on_full.norm()).item() < 1e-5
    model, _ = load_checkpoint(workspace["ckpt"])
    model.cfg = model.cfg.replace(action_horizon=10)
    images, image_masks, tokens, token_masks, noise, state = inputs
    reference = model.sample(ModelInputs(images, image_masks, tokens, token_masks, state), noise, steps=2)
    assert ((on_bucket - reference).norm() / reference.norm()).item() < 1e-5
    too_long = full.example_inputs(seed=1, prompt_tokens=bucket + 1)
    with pytest.raises(InputError, match=f"does not fit engines built for {bucket}"):
        small.run(*too_long)


def test_policy_runs_the_smallest_shape_that_holds_a_batch(shaped):
    recipe, engines = shaped
    policy = load_policy(load_pipelines(engines, recipe, "cpu"))
    assert policy.batch_sizes == (1, 2) and policy.prompt_lengths == (16, 48, 200)
    used: list[tuple[int, int]] = []
    for key, pipeline in policy.pipelines.items():
        run = pipeline.run
        pipeline.run = lambda *args, key=key, run=run: used.append(key) or run(*args)
    observations = load_recorded_observations()[:2]
    n_tokens = int(policy.transforms.inputs(observations[0]).token_masks.sum())
    bucket = min(n for n in (16, 48, 200) if n >= n_tokens)
    requests = [{**obs, "noise_seed": 100 + i} for i, obs in enumerate(observations)]
    together = policy.run([policy.prepare(r) for r in requests])
    assert used == [(2, bucket)]
    alone = [policy.run([policy.prepare(r)])[0] for r in requests]
    assert used[1:] == [(1, bucket), (1, bucket)]
    for a, b in zip(together, alone):  # the same noise seed: the same actions, whatever the batch
        np.testing.assert_allclose(a["actions"], b["actions"], rtol=1e-5, atol=1e-6)
    long_prompt = {**requests[0], "prompt": "put the bowl on the plate " * 40}
    with pytest.raises(InputError, match="prompt too long"):
        policy.prepare(long_prompt)
    assert policy.bucket(torch.ones(1, 17, dtype=torch.bool)) == 48


def test_bench_times_the_bucket_that_holds_the_prompt_length(shaped, tmp_path):
    """`pi-run bench --prompt-len N` times N prompt tokens on the smallest bucket that holds them and
    says which; a length beyond the recipe's prompt gets a one-line error, not a traceback."""
    recipe, engines = shaped
    out = tmp_path / "bench.json"
    result = invoke(run_app, ["bench", "--recipe", recipe.path, "--engines", engines, "--batch", "1", "--prompt-len", "30",
                              "--iters", "2", "--warmup", "0", "--no-reference", "--json", out])
    assert result.exit_code == 0, result.output
    (entry,) = json.loads(out.read_text())["runs"]
    assert (entry["prompt_tokens"], entry["bucket"], entry["batch"]) == (30, 48, 1)
    assert "a 30-token prompt on the 48-token bucket" in " ".join(result.output.split())
    too_long = invoke(run_app, ["bench", "--recipe", recipe.path, "--engines", engines, "--prompt-len", "201", "--no-reference"])
    assert too_long.exit_code == 1 and "--prompt-len 201" in too_long.output and "Traceback" not in too_long.output
