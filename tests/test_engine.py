"""The engine components against the reference model, for pi0 and pi0.5 (tiny configs)."""

import pytest
import torch

from pi_build.engine.accuracy import component_metrics, metrics
from pi_build.engine import build_component, reference_outputs
from pi_build.engine.denoise import denoise_loop
from pi_build.engine.layers import Shapes
from pi_build.model.pi0 import euler_times
from pi_build.spec import COMPONENTS
from pi_build.model.pi0 import KVCache, ModelInputs, build_model, get_config

STEPS = 3


@pytest.fixture(scope="module", params=["pi0_tiny", "pi05_tiny"])
def model(request):
    return build_model(get_config(request.param).replace(action_horizon=10), seed=7)


def shapes(model, precision="fp32", batch=2):
    dtype = torch.float32 if precision == "fp32" else torch.bfloat16
    return Shapes(batch=batch, cameras=2, prompt_len=model.cfg.max_token_len, horizon=10, steps=STEPS,
                  image_token_dtype=dtype, kv_dtype=dtype)


@pytest.mark.parametrize("precision, rel_err", [("fp32", 1e-5), ("bf16", 3e-2)])
@pytest.mark.parametrize("name", COMPONENTS)
def test_component_matches_reference(model, name, precision, rel_err):
    module = build_component(model, name, shapes(model, precision), precision)
    for seed in (1, 2):  # fresh inputs each draw
        inputs = module.example_inputs(torch.Generator().manual_seed(seed))
        with torch.no_grad():
            out = module(*inputs)
        out = out if isinstance(out, tuple) else (out,)
        m = component_metrics(name, out, reference_outputs(model, name, inputs, STEPS))
        assert m["rel_err"] < rel_err and m["cosine"] > 1 - rel_err, m
        if precision == "bf16":
            assert m["rel_err"] > 1e-5  # really ran in bf16


def test_assembled_components_equal_sampling_with_the_masked_camera(model):
    """Two fed cameras + the dropped always-masked one == the reference with three cameras."""
    cfg = model.cfg
    g = torch.Generator().manual_seed(3)
    images = torch.rand(2, 3, 3, 224, 224, generator=g) * 2 - 1
    masks = torch.tensor([[True, True, False]] * 2)
    tokens = torch.randint(1, cfg.vocab_size, (2, cfg.max_token_len), generator=g)
    token_masks = torch.arange(cfg.max_token_len)[None] < torch.tensor([[12], [30]])
    state = torch.randn(2, 32, generator=g)
    noise = torch.randn(2, 10, 32, generator=g)
    expected = model.sample(ModelInputs(images, masks, tokens, token_masks, state), noise, STEPS)

    s = shapes(model)
    vision, kvcache, denoise = (build_component(model, n, s, "fp32") for n in COMPONENTS)
    with torch.no_grad():
        image_tokens = vision(images[:, :2])
        k, v, prefix_mask = kvcache(image_tokens, masks[:, :2], tokens, token_masks)
        actions = denoise_loop(denoise, noise, k, v, prefix_mask, state, STEPS)
    assert metrics(actions, expected)["rel_err"] < 1e-5


def test_denoise_step_tables_follow_the_reference_times(model):
    """The engine's step i uses t_i of the reference's float32 Euler loop."""
    times = euler_times(4)
    assert [round(t.item(), 6) for t in times] == [1.0, 0.75, 0.5, 0.25]
    s = shapes(model, batch=1)
    denoise = build_component(model, "denoise", Shapes(**{**s.__dict__, "steps": 4}), "fp32")
    noise, _, k, v, prefix_mask, state = denoise.example_inputs(torch.Generator().manual_seed(4))
    with torch.no_grad():
        x = denoise(noise, torch.tensor(2), k, v, prefix_mask, state)
        velocity = model.denoise_step(noise, times[2].expand(1), KVCache(k, v, prefix_mask), state)
    assert metrics(x, noise - 0.25 * velocity)["rel_err"] < 1e-5
    with torch.no_grad():
        other = denoise(noise, torch.tensor(0), k, v, prefix_mask, state)
    assert metrics(other, x)["rel_err"] > 1e-4  # the step index really selects the time


def test_unknown_component_and_precision():
    model = build_model("pi05_tiny", seed=0)
    with pytest.raises(ValueError, match="unknown component"):
        build_component(model, "decoder", Shapes(), "fp32")
    with pytest.raises(ValueError, match="unknown precision"):
        build_component(model, "vision", Shapes(), "fp16")


def test_vision_gpu_epilogues_pad_the_mlp_exactly(model):
    """use_gpu_epilogues: the hidden units padded with zeros change nothing (float32, fresh images);
    FP8 linears are left alone."""
    from pi_build.engine.fp8 import apply_fp8

    plain = build_component(model, "vision", shapes(model), "fp32")
    padded = build_component(model, "vision", shapes(model), "fp32")
    hidden = model.cfg.vision.mlp_dim
    switched = padded.use_gpu_epilogues(pad_to=hidden + 48, gelu_epilogue=False)
    assert switched == {"mlp_hidden": hidden + 48, "of_hidden": hidden, "gelu_epilogue": False}
    assert all(b.fc1.weight.shape[0] == b.fc2.weight.shape[1] == hidden + 48 for b in padded.layers)
    seed = int(torch.randint(2**31, ()))
    images = plain.example_inputs(torch.Generator().manual_seed(seed))
    with torch.no_grad():
        m = metrics(padded(*images), plain(*images))
    assert m["rel_err"] < 1e-6, (seed, m)

    fp8 = build_component(model, "vision", shapes(model), "fp8")
    weight_amax = float(fp8.layers[0].fc1.weight.abs().max())
    apply_fp8(fp8, {"layers.0.fc1": {"input_amax": 4.0, "weight_amax": weight_amax}})
    assert fp8.use_gpu_epilogues() == {} and not fp8.gelu_epilogue
    assert fp8.layers[1].fc1.out_features == hidden  # nothing padded either


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: cuBLASLt's GELU epilogue")
def test_vision_gelu_epilogue_is_tanh_gelu_on_cuda(model):
    module = build_component(model, "vision", shapes(model, "bf16"), "bf16").cuda()
    block = module.layers[0]
    h = torch.randn(2, 256, block.fc1.in_features, device="cuda", dtype=torch.bfloat16)
    expected = torch.nn.functional.gelu(torch.nn.functional.linear(h.float(), block.fc1.weight.float(), block.fc1.bias.float()), approximate="tanh")
    module.use_gpu_epilogues()
    got = module._fc1_gelu(block.fc1, h).float()[..., : expected.shape[-1]]
    assert metrics(got, expected)["rel_err"] < 1e-2
