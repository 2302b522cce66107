"""`pi-run predict`: model-level inputs, raw observations, lerobot checkpoints, bad input."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from pi_build.model.checkpoints import load_checkpoint
from pi_build.cli.build import app as build_app
from pi_build.cli.run import app as run_app
from pi_build.transforms.libero import load_recorded_observations
from pi_build.model.pi0 import ModelInputs

runner = CliRunner()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("predict")
    out = {}
    for config, layout in (("pi0_tiny", "lerobot"), ("pi05_tiny", "openpi")):
        path = root / f"{config}_{layout}"
        result = runner.invoke(build_app, ["checkpoint", "--config", config, "--layout", layout, "--horizon", "10", "--out", str(path)])
        assert result.exit_code == 0, result.output
        out[config] = path
    return out


def model_level_npz(path, cfg, batch=2, seed=0, with_noise=True):
    g = np.random.default_rng(seed)
    arrays = {
        "images": g.uniform(-1, 1, (batch, 3, 3, 224, 224)).astype(np.float32),
        "image_masks": np.array([[True, True, False]] * batch),
        "tokens": g.integers(1, cfg.vocab_size, (batch, cfg.max_token_len)).astype(np.int64),
        "token_masks": np.arange(cfg.max_token_len)[None] < np.array([[9], [23]])[:batch],
        "state": g.normal(size=(batch, 32)).astype(np.float32),
    }
    if with_noise:
        arrays["noise"] = g.normal(size=(batch, 10, 32)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


@pytest.mark.parametrize("config", ["pi0_tiny", "pi05_tiny"])
def test_model_level_inputs_give_the_reference_chunk(checkpoints, config, tmp_path):
    model, info = load_checkpoint(checkpoints[config])
    arrays = model_level_npz(tmp_path / "in.npz", info.config)
    out = tmp_path / "actions.npy"
    result = runner.invoke(run_app, ["predict", "--checkpoint", str(checkpoints[config]), "--inputs", str(tmp_path / "in.npz"),
                                     "--steps", "3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    actions = np.load(out)
    inputs = ModelInputs(*(torch.from_numpy(arrays[k]) for k in ("images", "image_masks", "tokens", "token_masks", "state")))
    expected = model.sample(inputs, torch.from_numpy(arrays["noise"]), steps=3).numpy()
    assert actions.shape == (2, 10, 32)
    np.testing.assert_allclose(actions, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("config", ["pi05_tiny", "pi0_tiny"])  # openpi layout, lerobot layout (its normalizer file)
def test_raw_observation_gives_unnormalized_libero_actions(checkpoints, config, tmp_path):
    obs = load_recorded_observations()[0]
    np.savez(tmp_path / "obs.npz", **{k: obs[k] for k in ("observation/image", "observation/wrist_image", "observation/state")},
             prompt=np.array(obs["prompt"]))
    out = tmp_path / "a.npy"
    result = runner.invoke(run_app, ["predict", "--checkpoint", str(checkpoints[config]), "--inputs", str(tmp_path / "obs.npz"),
                                     "--steps", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    actions = np.load(out)
    assert actions.shape == (1, 10, 7) and np.isfinite(actions).all()
    again = tmp_path / "b.npy"
    runner.invoke(run_app, ["predict", "--checkpoint", str(checkpoints[config]), "--inputs", str(tmp_path / "obs.npz"),
                            "--steps", "2", "--out", str(again)])
    np.testing.assert_array_equal(np.load(again), actions)  # seeded noise: reproducible


def test_bf16_is_close_to_float32(checkpoints, tmp_path):
    model, info = load_checkpoint(checkpoints["pi05_tiny"])
    model_level_npz(tmp_path / "in.npz", info.config)
    outs = {}
    for dtype in ("float32", "bfloat16"):
        outs[dtype] = tmp_path / f"{dtype}.npy"
        result = runner.invoke(run_app, ["predict", "--checkpoint", str(checkpoints["pi05_tiny"]), "--inputs", str(tmp_path / "in.npz"),
                                         "--dtype", dtype, "--steps", "2", "--out", str(outs[dtype])])
        assert result.exit_code == 0, result.output
    a, b = np.load(outs["float32"]), np.load(outs["bfloat16"])
    rel = np.linalg.norm(a - b) / np.linalg.norm(a)
    assert 1e-5 < rel < 5e-2


@pytest.mark.parametrize("change, message", [
    (lambda a: a.pop("tokens"), "missing key 'tokens'"),
    (lambda a: a.update(images=a["images"][:, :, :, :100]), "'images' must be"),
    (lambda a: a.update(image_masks=a["image_masks"][:, :2]), "'image_masks' has shape"),
    (lambda a: a.update(state=a["state"][:, :8]), "'state' has shape"),
    (lambda a: a.update(extra=np.zeros(3)), "unknown keys"),
    (lambda a: a["noise"].__setitem__((0, 0, 0), np.nan), "NaN"),
])
def test_bad_model_level_inputs_name_the_problem(checkpoints, tmp_path, change, message):
    _, info = load_checkpoint(checkpoints["pi0_tiny"])
    arrays = model_level_npz(tmp_path / "ok.npz", info.config)
    change(arrays)
    np.savez(tmp_path / "bad.npz", **arrays)
    result = runner.invoke(run_app, ["predict", "--checkpoint", str(checkpoints["pi0_tiny"]), "--inputs", str(tmp_path / "bad.npz")])
    assert result.exit_code != 0
    assert message in result.output or message in str(result.exception)
