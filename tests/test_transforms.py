import json

import numpy as np
import pytest
import torch

from pi_build.model.pi0 import build_model, get_config
from pi_build.model.norm_stats import NormStats, load_norm_stats
from pi_build.transforms import image_to_float, make_bool_mask, normalize, resize_with_pad, unnormalize, uses_quantile_norm
from pi_build.transforms.libero import (
    actions_to_env,
    libero_camera_image,
    libero_delta_mask,
    libero_transforms,
    observation_to_inputs,
)
from pi_build.model.tokenizer import PromptTokenizer, train_tiny_tokenizer

PI0 = get_config("pi0_tiny")
PI05 = get_config("pi05_tiny")


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_tiny_tokenizer(tmp_path_factory.mktemp("tok") / "tiny.model")


def tokenizer_for(cfg, path):
    return PromptTokenizer(path, max_len=cfg.max_token_len)


def random_stats(rng, state_dim=8, action_dim=7) -> dict[str, NormStats]:
    def one(d):
        q01 = rng.uniform(-2, 0, d)
        return NormStats(mean=rng.normal(size=d), std=rng.uniform(0.1, 2, d), q01=q01, q99=q01 + rng.uniform(0.5, 3, d))

    return {"state": one(state_dim), "actions": one(action_dim)}


def random_obs(rng, size=224, prompt="pick up the black bowl on the stove and place it on the plate"):
    return {
        "observation/image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/wrist_image": rng.integers(0, 256, (size, size, 3), dtype=np.uint8),
        "observation/state": rng.normal(size=8),
        "prompt": prompt,
    }


def channels(row):
    """A uint8 [1, n, 3] image whose three channels are row, row // 2 and 255 - row."""
    row = np.asarray(row)
    return np.stack([row, row // 2, 255 - row], axis=-1)[None].astype(np.uint8)


# ----------------------------------------------------------------------------- images


def test_resize_with_pad_upscales_and_centres():
    # 1x2 -> 4x4: ratio 0.5, resized to 2x4 (bilinear, half-pixel centres), rows 1-2 of 4
    out = resize_with_pad(channels([0, 200]), 4, 4)
    expected_rows = channels([0, 50, 150, 200])[0]
    assert (out[1] == expected_rows).all() and (out[2] == expected_rows).all()
    assert (out[0] == 0).all() and (out[3] == 0).all()


def test_resize_with_pad_odd_padding_goes_bottom_and_right():
    row = channels([10, 60, 120, 250])
    out = resize_with_pad(row, 4, 4)  # 1x4 needs no scaling: 3 rows of padding, 1 above, 2 below
    assert (out[1] == row[0]).all()
    assert (np.delete(out, 1, axis=0) == 0).all()
    column = row.transpose(1, 0, 2)  # 4x1: 1 column left, 2 right
    out = resize_with_pad(column, 4, 4)
    assert (out[:, 1] == column[:, 0]).all()
    assert (np.delete(out, 1, axis=1) == 0).all()


def test_resize_with_pad_2x4_into_4x4_is_centred():
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (2, 4, 3), dtype=np.uint8)
    out = resize_with_pad(image, 4, 4)
    assert (out[1:3] == image).all() and (out[0] == 0).all() and (out[3] == 0).all()


def test_resize_with_pad_downscale_is_pil_antialiased_bilinear():
    # 4 -> 2 per axis: PIL's triangle filter widened by the scale gives weights (3, 3, 1) / 7 and (1, 3, 3) / 7
    image = np.repeat(channels([0, 70, 140, 210]), 4, axis=0)
    out = resize_with_pad(image, 2, 2)
    assert (out[:, :, 0] == [[50, 160], [50, 160]]).all()
    assert (out[:, :, 2] == 255 - out[:, :, 0]).all()


def test_resize_with_pad_256_to_224_close_to_torch_antialias():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    out = resize_with_pad(image, 224, 224)
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(image).permute(2, 0, 1)[None].float(), (224, 224), mode="bilinear", antialias=True
    )[0].permute(1, 2, 0)
    assert out.shape == (224, 224, 3) and out.dtype == np.uint8
    assert np.abs(out - ref.round().numpy()).max() <= 1  # same filter, PIL's fixed-point rounding


def test_resize_with_pad_leaves_right_size_untouched():
    image = np.random.default_rng(2).integers(0, 256, (224, 224, 3), dtype=np.uint8)
    assert resize_with_pad(image, 224, 224) is image


def test_image_to_float_value_mapping():
    image = np.array([[[0, 255, 51]]], dtype=np.uint8)
    out = image_to_float(image)
    assert out.dtype == np.float32
    assert out[0, 0, 0] == -1.0 and out[0, 0, 1] == 1.0
    assert out[0, 0, 2] == pytest.approx(-0.6, abs=1e-6)


def test_libero_camera_image_rotates_180_then_resizes():
    image = np.zeros((256, 256, 3), dtype=np.uint8)
    image[:16, :16] = 255  # a white block in the top-left corner ends bottom-right
    out = libero_camera_image(image)
    assert out.shape == (224, 224, 3)
    assert (out[-8:, -8:] == 255).all() and (out[:8, :8] == 0).all() and (out[:16, -16:] == 0).all()
    rng = np.random.default_rng(3)
    noisy = rng.integers(0, 256, (256, 256, 3), dtype=np.uint8)
    assert (libero_camera_image(noisy) == resize_with_pad(noisy[::-1, ::-1].copy(), 224, 224)).all()


# ----------------------------------------------------------------------------- normalization


def write_stats(path, stats: dict[str, dict]):
    path.write_text(json.dumps({"norm_stats": stats}))
    return path


def test_load_norm_stats_file_and_folder(tmp_path):
    rng = np.random.default_rng(4)
    raw = {
        k: {f: rng.normal(size=d).tolist() for f in ("mean", "std", "q01", "q99")}
        for k, d in (("state", 8), ("actions", 7))
    }
    raw["actions"].pop("q01"), raw["actions"].pop("q99")
    path = write_stats(tmp_path / "norm_stats.json", raw)
    for where in (path, tmp_path):
        stats = load_norm_stats(where)
        assert stats["state"].mean.tolist() == raw["state"]["mean"] and stats["state"].q99.dtype == np.float64
        assert stats["actions"].q01 is None and stats["actions"].std.tolist() == raw["actions"]["std"]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"stats": {}}', '"norm_stats"'),
        ('{"norm_stats": {"state": {"mean": [1.0], "std": [1.0]}}}', '"actions"'),
        ('{"norm_stats": {"state": {"mean": [1.0]}, "actions": {"mean": [1.0], "std": [1.0]}}}', 'state" has no "std"'),
        (
            '{"norm_stats": {"state": {"mean": [1.0, 2.0], "std": [1.0]}, "actions": {"mean": [1.0], "std": [1.0]}}}',
            "differ in length",
        ),
        (
            '{"norm_stats": {"state": {"mean": ["a"], "std": [1.0]}, "actions": {"mean": [1.0], "std": [1.0]}}}',
            "state/mean",
        ),
    ],
)
def test_load_norm_stats_errors_name_file_and_key(tmp_path, content, message):
    path = tmp_path / "bad_stats.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad_stats.json") as err:
        load_norm_stats(path)
    assert message in str(err.value)


def test_load_norm_stats_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        load_norm_stats(tmp_path / "missing.json")


def test_normalize_hand_values():
    stats = NormStats(
        mean=np.array([1.0, 2.0, 9.0]),
        std=np.array([2.0, 4.0, 1.0]),
        q01=np.array([0.0, -1.0, 0.0]),
        q99=np.array([2.0, 1.0, 1.0]),
    )
    x = np.array([3.0, 10.0])  # shorter than the stats: the leading dims apply
    assert normalize(x, stats, quantile=False) == pytest.approx([2 / (2 + 1e-6), 8 / (4 + 1e-6)], abs=1e-12)
    assert normalize(x, stats, quantile=True) == pytest.approx(
        [3 / (2 + 1e-6) * 2 - 1, 11 / (2 + 1e-6) * 2 - 1], abs=1e-12
    )
    assert normalize(np.array([5.0]), stats, quantile=True)[0] == pytest.approx(4.0, abs=1e-5)  # not clipped
    with pytest.raises(ValueError, match="only 3 dims"):
        normalize(np.ones(4), stats, quantile=False)


def test_unnormalize_inverts_and_handles_dims_beyond_stats():
    rng = np.random.default_rng(5)
    stats = random_stats(rng)["actions"]  # 7 dims
    x = rng.normal(size=(2, 5, 7))
    for quantile in (False, True):
        np.testing.assert_allclose(
            unnormalize(normalize(x, stats, quantile=quantile), stats, quantile=quantile), x, atol=1e-12
        )
    wide = rng.normal(size=(2, 5, 32))
    z = unnormalize(wide, stats, quantile=False)
    np.testing.assert_allclose(z[..., :7], wide[..., :7] * (stats.std + 1e-6) + stats.mean, atol=1e-12)
    np.testing.assert_array_equal(z[..., 7:], wide[..., 7:] * (1 + 1e-6))
    q = unnormalize(wide, stats, quantile=True)
    np.testing.assert_allclose(
        q[..., :7], (wide[..., :7] + 1) / 2 * (stats.q99 - stats.q01 + 1e-6) + stats.q01, atol=1e-12
    )
    np.testing.assert_array_equal(q[..., 7:], wide[..., 7:])


def test_quantile_norm_needs_quantiles():
    stats = NormStats(mean=np.array([0.5]), std=np.array([1.5]))
    with pytest.raises(ValueError, match="q01 and q99"):
        normalize(np.array([0.3]), stats, quantile=True)


def test_quantile_for_pi05_zscore_for_pi0():
    assert not uses_quantile_norm(get_config("pi0")) and not uses_quantile_norm(PI0)
    assert uses_quantile_norm(get_config("pi05")) and uses_quantile_norm(PI05)


# ----------------------------------------------------------------------------- LIBERO mapping


def test_libero_inputs_cameras_masks_state_tokens_pi0(tokenizer_path):
    rng = np.random.default_rng(6)
    stats, obs = random_stats(rng), random_obs(rng)
    tok = tokenizer_for(PI0, tokenizer_path)
    inputs = observation_to_inputs(obs, model_cfg=PI0, tokenizer=tok, norm_stats=stats)
    assert inputs.images.shape == (1, 3, 3, 224, 224) and inputs.images.dtype == torch.float32
    expected_base = torch.from_numpy(obs["observation/image"]).permute(2, 0, 1).float() / 255 * 2 - 1
    expected_wrist = torch.from_numpy(obs["observation/wrist_image"]).permute(2, 0, 1).float() / 255 * 2 - 1
    torch.testing.assert_close(inputs.images[0, 0], expected_base)
    torch.testing.assert_close(inputs.images[0, 1], expected_wrist)
    assert (inputs.images[0, 2] == -1.0).all()
    assert inputs.image_masks.tolist() == [[True, True, False]]
    s = stats["state"]
    expected_state = (obs["observation/state"] - s.mean) / (s.std + 1e-6)  # z-score for pi0
    assert inputs.state.shape == (1, 32) and inputs.state.dtype == torch.float32
    np.testing.assert_allclose(inputs.state[0, :8].numpy(), expected_state, rtol=1e-6)
    assert (inputs.state[0, 8:] == 0).all()
    tokens, mask = tok.tokenize(obs["prompt"])  # pi0 format: no state in the prompt
    assert inputs.tokens.tolist() == [tokens.tolist()] and inputs.token_masks.tolist() == [mask.tolist()]
    assert inputs.tokens.dtype == torch.int64 and inputs.token_masks.dtype == torch.bool


def test_libero_inputs_resize_256_renders(tokenizer_path):
    rng = np.random.default_rng(7)
    obs = random_obs(rng, size=256)
    inputs = observation_to_inputs(
        obs, model_cfg=PI0, tokenizer=tokenizer_for(PI0, tokenizer_path), norm_stats=random_stats(rng)
    )
    expected = image_to_float(resize_with_pad(obs["observation/wrist_image"], 224, 224)).transpose(2, 0, 1)
    np.testing.assert_array_equal(inputs.images[0, 1].numpy(), expected)


def test_pi05_state_is_quantile_normalized_and_in_the_prompt(tokenizer_path):
    rng = np.random.default_rng(8)
    stats, obs = random_stats(rng), random_obs(rng)
    tok = tokenizer_for(PI05, tokenizer_path)
    inputs = observation_to_inputs(obs, model_cfg=PI05, tokenizer=tok, norm_stats=stats)
    s = stats["state"]
    normalized = (obs["observation/state"] - s.q01) / (s.q99 - s.q01 + 1e-6) * 2 - 1
    np.testing.assert_allclose(inputs.state[0, :8].numpy(), normalized, rtol=1e-6, atol=1e-7)
    tokens, _ = tok.tokenize(obs["prompt"], normalized)  # the unpadded 8-dim state
    assert inputs.tokens[0].tolist() == tokens.tolist()
    n = int(inputs.token_masks[0].sum())
    assert ", State: " in tok.processor.decode(inputs.tokens[0, 1:n].tolist())
    # pi05_libero turns the discrete state off: the pi0 prompt format
    off = observation_to_inputs(obs, model_cfg=PI05, tokenizer=tok, norm_stats=stats, discrete_state_input=False)
    assert off.tokens[0].tolist() == tok.tokenize(obs["prompt"])[0].tolist()


def test_batch_of_observations(tokenizer_path):
    rng = np.random.default_rng(9)
    stats = random_stats(rng)
    obs = [random_obs(rng, prompt="turn on the stove"), random_obs(rng, size=256, prompt="put the bowl on the plate")]
    tok = tokenizer_for(PI0, tokenizer_path)
    batch = observation_to_inputs(obs, model_cfg=PI0, tokenizer=tok, norm_stats=stats)
    assert batch.batch_size == 2 and batch.images.shape == (2, 3, 3, 224, 224)
    for i, o in enumerate(obs):
        single = observation_to_inputs(o, model_cfg=PI0, tokenizer=tok, norm_stats=stats)
        for name in ("images", "image_masks", "tokens", "token_masks", "state"):
            assert torch.equal(getattr(batch, name)[i], getattr(single, name)[0]), name


def test_actions_pi0_libero_unnormalize_add_state_first_7_dims():
    rng = np.random.default_rng(10)
    stats = random_stats(rng)
    raw = rng.normal(size=(2, 5, 32)).astype(np.float32)
    states = rng.normal(size=(2, 8))
    mask = libero_delta_mask(PI0)
    assert mask == (True,) * 6 + (False,)
    out = actions_to_env(torch.from_numpy(raw), states, model_cfg=PI0, norm_stats=stats, delta_mask=mask)
    a = stats["actions"]
    expected = raw[..., :7].astype(np.float64) * (a.std + 1e-6) + a.mean
    expected[..., :6] += states[:, None, :6]  # eef deltas made absolute; gripper (dim 6) untouched
    assert out.shape == (2, 5, 7) and out.dtype == np.float64
    np.testing.assert_allclose(out, expected, rtol=1e-12)


def test_actions_pi05_libero_quantile_no_delta():
    rng = np.random.default_rng(11)
    stats = random_stats(rng)
    raw = rng.normal(size=(1, 10, 32)).astype(np.float32)
    obs = {"observation/state": rng.normal(size=8)}
    assert libero_delta_mask(PI05) is None
    out = actions_to_env(raw, obs, model_cfg=PI05, norm_stats=stats, delta_mask=libero_delta_mask(PI05))
    a = stats["actions"]
    np.testing.assert_allclose(out[0], (raw[0, :, :7] + 1.0) / 2.0 * (a.q99 - a.q01 + 1e-6) + a.q01, rtol=1e-12)


def test_make_bool_mask():
    assert make_bool_mask(6, -1) == (True,) * 6 + (False,)
    assert make_bool_mask(2, -2, 2) == (True, True, False, False, True, True)


def test_policy_transforms_libero_end_to_end_through_tiny_model(tokenizer_path):
    rng = np.random.default_rng(12)
    stats, obs = random_stats(rng), random_obs(rng, size=256)
    for cfg in (PI0, PI05):
        transforms = libero_transforms(cfg, tokenizer_for(cfg, tokenizer_path), stats)
        chain = [type(t).__name__ for t in transforms.outputs_chain.transforms]
        assert ("AbsoluteActions" in chain) == (libero_delta_mask(cfg) is not None)
        token_step = next(t for t in transforms.inputs_chain.transforms if type(t).__name__ == "TokenizePrompt")
        assert token_step.discrete_state is False  # openpi's LIBERO configs: no state in the prompt
        inputs = transforms.inputs(obs)
        noise = torch.from_numpy(rng.normal(size=(1, cfg.action_horizon, cfg.action_dim)).astype(np.float32))
        raw = build_model(cfg).sample(inputs, noise, steps=2)
        actions = transforms.outputs(raw, obs)
        assert actions.shape == (1, cfg.action_horizon, 7) and np.isfinite(actions).all()
        expected = actions_to_env(
            raw, obs["observation/state"], model_cfg=cfg, norm_stats=stats, delta_mask=libero_delta_mask(cfg)
        )
        np.testing.assert_array_equal(actions, expected)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        (lambda o: o.pop("observation/wrist_image"), KeyError, "observation/wrist_image"),
        (lambda o: o.pop("prompt"), KeyError, "prompt"),
        (lambda o: o.update({"observation/image": o["observation/image"].astype(np.float32)}), ValueError, "uint8"),
        (lambda o: o.update({"observation/image": o["observation/image"][..., 0]}), ValueError, "observation/image"),
        (
            lambda o: o.update({"observation/wrist_image": o["observation/wrist_image"][..., :2]}),
            ValueError,
            r"\(224, 224, 2\)",
        ),
        (lambda o: o["observation/state"].__setitem__(3, np.nan), ValueError, "NaN"),
        (lambda o: o.update({"observation/state": o["observation/state"][:7]}), ValueError, r"shape \(8,\)"),
        (lambda o: o.update({"prompt": 3}), ValueError, "string"),
    ],
)
def test_bad_observations(tokenizer_path, change, error, message):
    rng = np.random.default_rng(13)
    obs = random_obs(rng)
    change(obs)
    with pytest.raises(error, match=message):
        observation_to_inputs(
            obs, model_cfg=PI0, tokenizer=tokenizer_for(PI0, tokenizer_path), norm_stats=random_stats(rng)
        )


def test_tokenizer_must_match_the_model(tokenizer_path):
    rng = np.random.default_rng(14)
    with pytest.raises(ValueError, match="expects 48"):
        observation_to_inputs(
            random_obs(rng), model_cfg=PI0, tokenizer=PromptTokenizer(tokenizer_path, 200), norm_stats=random_stats(rng)
        )
    with pytest.raises(ValueError, match="vocabulary"):
        small = PI0.replace(vocab_size=100)
        observation_to_inputs(
            random_obs(rng), model_cfg=small, tokenizer=tokenizer_for(PI0, tokenizer_path), norm_stats=random_stats(rng)
        )


def test_bad_actions():
    rng = np.random.default_rng(15)
    stats, state = random_stats(rng), rng.normal(size=8)
    with pytest.raises(ValueError, match=r"\[batch, horizon, 32\]"):
        actions_to_env(rng.normal(size=(5, 32)), state, model_cfg=PI0, norm_stats=stats)
    nan_actions = rng.normal(size=(1, 5, 32))
    nan_actions[0, 2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        actions_to_env(nan_actions, state, model_cfg=PI0, norm_stats=stats)
    with pytest.raises(ValueError, match="batch=2"):
        actions_to_env(rng.normal(size=(2, 5, 32)), state, model_cfg=PI0, norm_stats=stats)
    with pytest.raises(KeyError, match='"actions"'):
        actions_to_env(rng.normal(size=(1, 5, 32)), state, model_cfg=PI0, norm_stats={"state": stats["state"]})
