"""The kvcache component: the prefix (image tokens + prompt) through Gemma-2B once, keeping every
layer's K (RoPE applied) and V for the denoise steps.

    image_tokens [B, C*256, W], image_masks [B, C], tokens [B, L], token_masks [B, L]
        ->  k, v [layers, B, 1, S, 256], prefix_mask [B, S]      (S = C*256 + L)

Compared with the reference (``PiModel.kvcache``): fused q/k/v and gate/up GEMMs, attention over
the one KV head under a key mask (SDPA with the head broadcast to the query heads as views; in GPU
builds pi-build's Triton kernel, ``kernels.prefix_attention``), and the last layer computing
only its K/V (its outputs are never read).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.engine import kernels
from pi_build.engine.layers import GemmaBlock, Shapes, apply_rope, compute_dtype, device_type, mqa_attention, norm_scale, rms_normalize, rope_tables
from pi_build.model.pi0 import PiModel
from pi_build.spec import Precision



class KVCacheComponent(nn.Module):
    input_names = ("image_tokens", "image_masks", "tokens", "token_masks")
    output_names = ("k", "v", "prefix_mask")

    def __init__(self, model: PiModel, spec: Shapes, precision: Precision):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, device_type(model))
        self.cfg = model.cfg
        self.image_tokens = model.cfg.image_tokens
        llm = model.llm
        # The embedding table stays in the reference's dtype policy: bf16 under bf16 (openpi's).
        self.register_buffer("embed", llm.embed_tokens.weight.detach().to(self.dtype).clone())
        last = len(llm.layers) - 1
        self.layers = nn.ModuleList(GemmaBlock(layer, self.dtype, kv_only=i == last) for i, layer in enumerate(llm.layers))
        self.register_buffer("norm1", torch.stack([norm_scale(l.input_layernorm) for l in llm.layers]))
        self.register_buffer("norm2", torch.stack([norm_scale(l.post_attention_layernorm) for l in llm.layers]))
        self.triton_attention = False  # set by use_triton_attention

    def use_triton_attention(self) -> dict:
        """Run attention as pi-build's Triton kernel (``kernels.prefix_attention``, RoPE of the queries
        inside), for CUDA builds. It reads one KV head, in bf16 (in float32 its tensor-core products
        would round to tf32: a float32 engine keeps SDPA), with a power-of-two head dimension.
        Returns what was switched, for the manifest."""
        llm = self.cfg.llm
        self.triton_attention = (llm.num_kv_heads == 1 and self.dtype == torch.bfloat16
                                 and kernels.prefix_attention_supported(llm.head_dim))
        return {"attention": "triton" if self.triton_attention else "library"}

    def example_inputs(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        s, cfg = self.spec, self.cfg
        image_tokens = torch.randn(s.batch, s.cameras * self.image_tokens, cfg.llm.width, generator=generator).to(s.image_token_dtype)
        image_masks = torch.ones(s.batch, s.cameras, dtype=torch.bool)
        tokens = torch.randint(1, cfg.vocab_size, (s.batch, s.prompt_len), generator=generator)
        lengths = torch.randint(1, s.prompt_len + 1, (s.batch, 1), generator=generator)
        token_masks = torch.arange(s.prompt_len)[None] < lengths
        return image_tokens, image_masks, tokens, token_masks

    def forward(self, image_tokens: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        width, head_dim = self.cfg.llm.width, self.cfg.llm.head_dim
        text = F.embedding(tokens, self.embed) * math.sqrt(width)
        x = torch.cat([image_tokens.to(self.dtype), text.to(self.dtype)], dim=1)
        valid = torch.cat([image_masks.repeat_interleave(self.image_tokens, dim=1), token_masks], dim=1)
        cos, sin = rope_tables(torch.cumsum(valid.long(), dim=1) - 1, head_dim, self.dtype)
        # Prefix attention is bidirectional over valid tokens: one key mask for every query. Padding
        # queries also read the valid keys (instead of nothing) so that no softmax row is empty:
        # their outputs are never read.
        keys, values = [], []
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            h = (rms_normalize(x) * self.norm1[i]).to(self.dtype)
            q, k, v = block.project_qkv(h, head_dim)
            k = apply_rope(k, cos, sin)
            keys.append(k)
            values.append(v)
            if i == last:  # the last layer's outputs are never read: only its K/V matter
                break
            if self.triton_attention:
                attn = kernels.prefix_attention(q.transpose(1, 2), k[:, 0], v[:, 0], cos[:, 0], sin[:, 0], valid)
            else:
                attn = mqa_attention(apply_rope(q, cos, sin), k, v, valid)
            x = x + block.o(attn)
            h = (rms_normalize(x) * self.norm2[i]).to(self.dtype)
            x = x + block.mlp(h)
        return torch.stack(keys), torch.stack(values), valid


def reference(model: PiModel, inputs: tuple[Tensor, ...], steps: int) -> tuple[Tensor, ...]:
    """What the reference model computes for the component's inputs."""
    cache = model.kvcache(*inputs)
    return cache.k, cache.v, cache.prefix_mask


def calibration_inputs(model: PiModel, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       state: Tensor, steps: int, horizon: int) -> list[tuple[Tensor, ...]]:
    """The component's inputs for one batch of real model inputs: the reference's image tokens first."""
    return [(model.vision(images, image_masks), image_masks, tokens, token_masks)]
