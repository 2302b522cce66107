"""The reference model: cached sampling vs the full joint pass, masks, positions, exact shortcuts."""

import math

import pytest
import torch

from pi_build.model.pi0 import (
    CONFIGS,
    ModelInputs,
    attention,
    build_model,
    get_config,
    make_attention_mask,
    rope,
    sincos_time_embedding,
    suffix_ar_flags,
)


def random_inputs(cfg, batch, seed, masks=None, lengths=None) -> ModelInputs:
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, 3, 224, 224, generator=g) * 2 - 1
    image_masks = torch.tensor(masks if masks is not None else [[True, True, False]] * batch)
    tokens = torch.randint(1, cfg.vocab_size, (batch, cfg.max_token_len), generator=g)
    lengths = torch.tensor(lengths if lengths is not None else [7 + 5 * i for i in range(batch)])
    token_masks = torch.arange(cfg.max_token_len)[None] < lengths[:, None]
    state = torch.randn(batch, cfg.action_dim, generator=g)
    return ModelInputs(images, image_masks, tokens, token_masks, state)


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module", params=["pi0_tiny", "pi05_tiny"])
def model(request):
    return build_model(get_config(request.param).replace(action_horizon=6), seed=3)


def test_cached_velocity_equals_full_joint_pass(model):
    cfg = model.cfg
    inputs = random_inputs(cfg, 2, seed=11, masks=[[True, True, False], [True, False, True]])
    g = torch.Generator().manual_seed(12)
    x_t = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=g)
    t = torch.rand(2, generator=g)
    with torch.no_grad():
        tokens = model.vision(inputs.images, inputs.image_masks)
        cache = model.kvcache(tokens, inputs.image_masks, inputs.tokens, inputs.token_masks)
        cached = model.denoise_step(x_t, t, cache, inputs.state)
    full = model.velocity_full_sequence(inputs, x_t, t)
    assert rel(cached, full) < 1e-5
    assert full.abs().mean() > 1e-2  # a real signal, not zeros


def test_cache_does_not_grow_and_sampling_is_deterministic(model):
    cfg = model.cfg
    inputs = random_inputs(cfg, 1, seed=5)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(6))
    tokens = model.vision(inputs.images, inputs.image_masks)
    cache = model.kvcache(tokens, inputs.image_masks, inputs.tokens, inputs.token_masks)
    k_before = cache.k.clone()
    a = model.denoise(noise, cache, inputs.state, steps=3)
    assert cache.k.shape == k_before.shape and torch.equal(cache.k, k_before)
    b = model.sample(inputs, noise, steps=3)
    assert torch.equal(a, b)
    # Euler by hand from the same cache: x <- x + dt * v(x, t) for t = 1, 2/3, 1/3 (float32 accumulation)
    x, t, dt = noise.clone(), torch.tensor(1.0), torch.tensor(-1 / 3)
    for _ in range(3):
        x = x + dt * model.denoise_step(x, t.expand(1), cache, inputs.state)
        t = t + dt
    assert torch.allclose(x, a, atol=0, rtol=0)


def test_masked_camera_and_padding_change_nothing(model):
    """A masked camera's pixels and padding tokens' ids must not reach the actions (and the
    skipped SigLIP pass of an all-masked camera is exact)."""
    cfg = model.cfg
    inputs = random_inputs(cfg, 2, seed=21)
    noise = torch.randn(2, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(22))
    base = model.sample(inputs, noise, steps=2)
    g = torch.Generator().manual_seed(23)
    other = ModelInputs(inputs.images.clone(), inputs.image_masks, inputs.tokens.clone(), inputs.token_masks, inputs.state)
    other.images[:, 2] = torch.rand(2, 3, 224, 224, generator=g) * 2 - 1  # the masked camera
    other.tokens[~inputs.token_masks] = torch.randint(1, cfg.vocab_size, (int((~inputs.token_masks).sum()),), generator=g)
    assert torch.equal(model.sample(other, noise, steps=2), base)
    # the masked camera really is skipped: its tokens are zeros, the others are not
    tokens = model.vision(inputs.images, inputs.image_masks).unflatten(1, (3, cfg.image_tokens))
    assert tokens[:, 2].abs().max() == 0 and tokens[:, :2].abs().min() >= 0 and tokens[:, 0].abs().mean() > 0
    # ...and where another row needs the camera (so its SigLIP pass runs), this row's actions are unchanged
    masks = torch.tensor([[True, True, False], [True, True, True]])
    mixed = model.sample(ModelInputs(inputs.images, masks, inputs.tokens, inputs.token_masks, inputs.state), noise, 2)
    assert torch.allclose(mixed[0], base[0], atol=1e-6)
    assert rel(mixed[1], base[1]) > 1e-4


def test_unmasking_a_camera_changes_actions(model):
    cfg = model.cfg
    inputs = random_inputs(cfg, 1, seed=31)
    noise = torch.randn(1, cfg.action_horizon, cfg.action_dim, generator=torch.Generator().manual_seed(32))
    a = model.sample(inputs, noise, steps=1)
    inputs.image_masks[0, 2] = True
    assert rel(model.sample(inputs, noise, steps=1), a) > 1e-4


def test_prefix_lm_mask_hand_case():
    valid = torch.tensor([[True, True, False, True, True, True]])
    flags = torch.tensor([0, 0, 0, 1, 1, 0])
    m = make_attention_mask(valid, flags)[0].int()
    expected = torch.tensor([
        [1, 1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0],
        [1, 1, 0, 1, 0, 0],
        [1, 1, 0, 1, 1, 1],
        [1, 1, 0, 1, 1, 1],
    ])
    assert torch.equal(m, expected)


def test_suffix_flags_and_positions():
    pi0, pi05 = get_config("pi0").replace(action_horizon=3), get_config("pi05").replace(action_horizon=3)
    assert suffix_ar_flags(pi0).tolist() == [1, 1, 0, 0]
    assert suffix_ar_flags(pi05).tolist() == [1, 0, 0]
    model = build_model(get_config("pi0_tiny").replace(action_horizon=3), seed=0)
    prefix_mask = torch.tensor([[True, False, True, True, False]])
    mask, positions = model._suffix_mask_and_positions(prefix_mask, 4)
    assert positions.tolist() == [[3, 4, 5, 6]]  # 3 valid prefix tokens, then consecutive
    assert mask[0, 0].int().tolist() == [1, 0, 1, 1, 0, 1, 0, 0, 0]  # state sees the prefix and itself
    assert mask[0, 1].int().tolist() == [1, 0, 1, 1, 0, 1, 1, 1, 1]  # actions see state + all actions


def test_time_embedding_hand_values():
    emb = sincos_time_embedding(torch.tensor([0.5]), 8)
    periods = [4e-3 * (4.0 / 4e-3) ** (i / 3) for i in range(4)]
    expected = [math.sin(2 * math.pi * 0.5 / p) for p in periods] + [math.cos(2 * math.pi * 0.5 / p) for p in periods]
    assert torch.allclose(emb[0].double(), torch.tensor(expected, dtype=torch.float64), atol=1e-6)
    assert emb.dtype == torch.float32


def test_rope_rotates_pairs_and_preserves_norm():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 2, 3, 8, generator=g)
    pos = torch.tensor([[0, 1, 5]])
    y = rope(x, pos)
    assert torch.allclose(y[:, :, 0], x[:, :, 0])  # position 0 is the identity
    assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), atol=1e-5)
    # pair (i, i + d/2) at position p rotates by p * 10000^(-2i/d)
    angle = 5 * 10000 ** (-2 * 1 / 8)
    a, b = x[0, 0, 2, 1], x[0, 0, 2, 5]
    assert torch.allclose(y[0, 0, 2, 1], a * math.cos(angle) - b * math.sin(angle), atol=1e-5)
    assert torch.allclose(y[0, 0, 2, 5], b * math.cos(angle) + a * math.sin(angle), atol=1e-5)


def test_attention_matches_explicit_softmax():
    g = torch.Generator().manual_seed(1)
    q, k, v = torch.randn(1, 4, 3, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g), torch.randn(1, 1, 5, 8, generator=g)
    mask = torch.tensor([[[1, 1, 0, 1, 0], [1, 1, 1, 1, 1], [0, 0, 0, 1, 1]]], dtype=torch.bool)
    out = attention(q, k, v, mask).unflatten(-1, (4, 8))
    for h in range(4):
        logits = q[0, h] @ k[0, 0].T / math.sqrt(8)
        logits[~mask[0]] = float("-inf")
        expected = torch.softmax(logits, -1) @ v[0, 0]
        assert torch.allclose(out[0, :, h], expected, atol=1e-6)


def test_configs_have_the_published_sizes():
    pi05 = CONFIGS["pi05"]
    assert (pi05.vision.width, pi05.vision.depth, pi05.vision.mlp_dim, pi05.vision.num_heads) == (1152, 27, 4304, 16)
    assert (pi05.llm.width, pi05.llm.depth, pi05.llm.mlp_dim, pi05.llm.num_heads, pi05.llm.num_kv_heads, pi05.llm.head_dim) == (2048, 18, 16384, 8, 1, 256)
    assert (pi05.expert.width, pi05.expert.mlp_dim) == (1024, 4096)
    assert pi05.max_token_len == 200 and CONFIGS["pi0"].max_token_len == 48
    with torch.device("meta"):
        from pi_build.model.pi0 import PiModel

        n = sum(p.numel() for p in PiModel(CONFIGS["pi0"]).parameters())
    assert 3.2e9 < n < 3.6e9  # pi0 is a ~3.3B-parameter model


def test_bf16_policy_keeps_openpi_float32_params():
    model = build_model("pi05_tiny", dtype=torch.bfloat16, seed=0)
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    assert dtypes["paligemma_with_expert.paligemma.model.vision_tower.vision_model.embeddings.patch_embedding.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.paligemma.model.language_model.layers.0.input_layernorm.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.gemma_expert.model.layers.0.input_layernorm.dense.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.gemma_expert.model.norm.dense.weight"] == torch.float32
    assert dtypes["paligemma_with_expert.paligemma.model.language_model.layers.0.self_attn.q_proj.weight"] == torch.bfloat16
    assert dtypes["paligemma_with_expert.paligemma.model.vision_tower.vision_model.post_layernorm.weight"] == torch.bfloat16
    assert dtypes["action_out_proj.weight"] == torch.float32
    inputs = random_inputs(model.cfg, 1, seed=3)
    noise = torch.randn(1, model.cfg.action_horizon, 32, generator=torch.Generator().manual_seed(4))
    ref = build_model("pi05_tiny", seed=0).sample(inputs, noise, 2)
    out = model.sample(inputs, noise, 2)
    assert out.dtype == torch.float32 and 1e-5 < rel(out, ref) < 5e-2


def test_bad_inputs_raise():
    model = build_model(get_config("pi0_tiny").replace(action_horizon=4), seed=0)
    inputs = random_inputs(model.cfg, 1, seed=0)
    with pytest.raises(ValueError, match="steps"):
        model.sample(inputs, torch.randn(1, 4, 32), steps=0)
    with pytest.raises(ValueError, match="horizon"):
        model.sample(inputs, torch.randn(1, 5, 32), steps=1)
    inputs.state = None
    with pytest.raises(ValueError, match="state"):
        model.sample(inputs, torch.randn(1, 4, 32), steps=1)
    with pytest.raises(KeyError, match="unknown model config"):
        get_config("pi1")
