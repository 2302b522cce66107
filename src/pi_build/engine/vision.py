"""The vision component: SigLIP So400m/14 and the projector, over the recipe's cameras.

    images [B, C, 3, 224, 224] in [-1, 1]  ->  image_tokens [B, C * 256, 2048]

Compared with the reference (``PiModel.vision``): q/k/v fused into one GEMM, attention through
SDPA (flash / cuDNN kernels on GPUs), and always-masked cameras not fed at all (C counts the
cameras in use). A bf16 build for a GPU also pads the MLP and runs fc1's bias and GELU inside the
GEMM (``VisionComponent.use_gpu_epilogues``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.engine.layers import Shapes, compute_dtype, copy_linear, device_type, fused_linear
from pi_build.model.pi0 import PiModel
from pi_build.spec import Precision

MLP_PAD = 128  # hidden units a GPU build pads the MLP to a multiple of (the GEMM tile)


class VisionComponent(nn.Module):
    input_names = ("images",)
    output_names = ("image_tokens",)

    def __init__(self, model: PiModel, spec: Shapes, precision: Precision):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, device_type(model))
        vm = model.siglip
        self.cfg = vm.cfg
        patch = vm.embeddings.patch_embedding
        self.patch = nn.Conv2d(3, patch.out_channels, patch.kernel_size, stride=patch.stride).requires_grad_(False)
        self.patch.load_state_dict({k: v.float() for k, v in patch.state_dict().items()})  # fp32, as openpi keeps it
        self.register_buffer("position", vm.embeddings.position_embedding.weight.detach().float()[None].clone())
        self.layers = nn.ModuleList()
        for layer in vm.encoder.layers:
            a = layer.self_attn
            block = nn.Module()
            block.ln1 = self._layernorm(layer.layer_norm1)
            block.qkv = fused_linear([a.q_proj, a.k_proj, a.v_proj], self.dtype)
            block.out = copy_linear(a.out_proj, self.dtype)
            block.ln2 = self._layernorm(layer.layer_norm2)
            block.fc1 = copy_linear(layer.mlp.fc1, self.dtype)
            block.fc2 = copy_linear(layer.mlp.fc2, self.dtype)
            self.layers.append(block)
        self.post_ln = self._layernorm(vm.post_layernorm)
        self.projector = copy_linear(model.projector, self.dtype)
        self.gelu_epilogue = False  # set by use_gpu_epilogues

    def use_gpu_epilogues(self, pad_to: int = MLP_PAD, gelu_epilogue: bool = True) -> dict:
        """For bf16 builds on a GPU, in place: the MLP's hidden units zero-padded to a multiple of
        ``pad_to`` (SigLIP's 4304 -> 4352), and fc1 + bias + GELU as one cuBLASLt call
        (``torch._addmm_activation``: tanh GELU in float32, before the bf16 rounding). The padding
        is exact: zero rows of fc1 and of its bias give GELU(0) = 0, which zero columns of fc2 read.
        Measured on an H200 (scripts/vision_experiments.py, two cameras): 2.02 ms; padded 1.85;
        GELU epilogue 1.79; both 1.75. Returns what was switched, for the manifest."""
        if any(type(b.fc1) is not nn.Linear or type(b.fc2) is not nn.Linear for b in self.layers):
            return {}  # FP8 linears keep torch._scaled_mm and their own layout
        hidden = self.layers[0].fc1.out_features
        extra = -hidden % pad_to
        for block in self.layers:
            block.fc1.weight.data = F.pad(block.fc1.weight.data, (0, 0, 0, extra))
            block.fc1.bias.data = F.pad(block.fc1.bias.data, (0, extra))
            block.fc2.weight.data = F.pad(block.fc2.weight.data, (0, extra))
            block.fc1.out_features = block.fc2.in_features = hidden + extra
        self.gelu_epilogue = gelu_epilogue
        return {"mlp_hidden": hidden + extra, "of_hidden": hidden, "gelu_epilogue": gelu_epilogue}

    def _layernorm(self, ln: nn.LayerNorm) -> nn.LayerNorm:
        new = nn.LayerNorm(ln.normalized_shape, eps=ln.eps).requires_grad_(False)
        new.load_state_dict(ln.state_dict())
        return new.to(self.dtype)

    def example_inputs(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        s = self.spec
        return (torch.rand(s.batch, s.cameras, 3, 224, 224, generator=generator) * 2 - 1,)

    def forward(self, images: Tensor) -> Tensor:
        b, c = images.shape[:2]
        x = self.patch(images.flatten(0, 1).float()).flatten(2).transpose(1, 2) + self.position
        x = x.to(self.dtype)
        heads, width = self.cfg.num_heads, self.cfg.width
        for block in self.layers:
            q, k, v = block.qkv(block.ln1(x)).unflatten(-1, (3, heads, -1)).permute(2, 0, 3, 1, 4)
            attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(x.shape[0], -1, width)
            x = x + block.out(attn)
            x = x + block.fc2(self._fc1_gelu(block.fc1, block.ln2(x)))
        tokens = self.projector(self.post_ln(x))
        return tokens.unflatten(0, (b, c)).flatten(1, 2)

    def _fc1_gelu(self, fc1: nn.Module, h: Tensor) -> Tensor:
        if not self.gelu_epilogue:
            return F.gelu(fc1(h), approximate="tanh")
        # On CUDA this is tanh GELU (cuBLASLt's epilogue); the CPU's _addmm_activation is erf GELU,
        # which is why only GPU builds switch it on.
        return torch._addmm_activation(fc1.bias, h.flatten(0, -2), fc1.weight.t(), use_gelu=True).unflatten(0, h.shape[:-1])


def reference(model: PiModel, inputs: tuple[Tensor, ...], steps: int) -> tuple[Tensor, ...]:
    """What the reference model computes for the component's inputs."""
    (images,) = inputs
    masks = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
    return (model.vision(images, masks),)


def calibration_inputs(model: PiModel, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       state: Tensor, steps: int, horizon: int) -> list[tuple[Tensor, ...]]:
    """The component's inputs for one batch of real model inputs (cameras of the engines only)."""
    return [(images,)]
