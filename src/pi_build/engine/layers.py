"""Pieces the three engine components share: the shapes they are built for, fused linears, norms,
RoPE and attention written for speed. Every piece computes what ``model.pi0`` computes, up to
floating-point rounding (the accuracy gates measure by how much).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.model.pi0 import PiModel, RMSNorm
from pi_build.spec import Precision

@dataclass(frozen=True)
class Shapes:
    """The fixed shapes an engine is built for."""

    batch: int = 1
    cameras: int = 2  # cameras fed to the model (always-masked ones are dropped)
    prompt_len: int = 200
    horizon: int = 10
    steps: int = 10
    # dtypes of the tensors passed between engines: each is its producer's compute dtype
    image_token_dtype: torch.dtype = torch.float32
    kv_dtype: torch.dtype = torch.float32


def compute_dtype(precision: Precision, device_type: str) -> torch.dtype:
    """fp32 -> float32; bf16 -> bfloat16; fp8 -> FP8 GEMMs with bfloat16 around them on GPUs, and on
    the CPU FP8 quantize-dequantize around float32 (emulation: same FP8 rounding, CPU-friendly)."""
    precision = Precision(precision)
    if precision == Precision.FP32 or (precision == Precision.FP8 and device_type == "cpu"):
        return torch.float32
    return torch.bfloat16


def device_type(model: PiModel) -> str:
    return next(model.parameters()).device.type


# ----------------------------------------------------------------------------- shared pieces


def fused_linear(layers: list[nn.Linear], dtype: torch.dtype) -> nn.Linear:
    """One Linear whose output is the concatenation of ``layers``' outputs (same input)."""
    weight = torch.cat([layer.weight.detach().float() for layer in layers])
    has_bias = layers[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    fused.weight.data = weight.to(dtype)
    if has_bias:
        fused.bias.data = torch.cat([layer.bias.detach().float() for layer in layers]).to(dtype)
    return fused.requires_grad_(False)


def copy_linear(layer: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    return fused_linear([layer], dtype)


def norm_scale(norm: RMSNorm) -> Tensor:
    """(1 + weight) in float32, the reference's RMSNorm multiplier."""
    return 1.0 + norm.weight.detach().float()


def rms_normalize(x: Tensor, eps: float = 1e-6) -> Tensor:
    """x / rms(x), statistics and result in float32."""
    return x.float() * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps)


def rope_tables(positions: Tensor, head_dim: int, dtype: torch.dtype, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, T, D] for rotate-half RoPE, angles in float32 (as model.rope)."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64, device=positions.device).float() / head_dim))
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def mqa_attention(q: Tensor, k: Tensor, v: Tensor, key_mask: Tensor) -> Tensor:
    """Attention of q [B, Hq, T, D] over one KV head k/v [B, 1, S, D]; key_mask bool [B, S] (True = attend,
    the same keys for every query). Returns [B, T, Hq * D].

    K and V are broadcast to the query heads as views (no copies) and the mask as [B, 1, 1, S]:
    measured on an H200 at the prefix's shape (712 tokens, 8 heads, D = 256), cuDNN takes 51 us per
    layer this way against 75 us with the heads folded into one sequence under a [T * Hq, S] mask.
    """
    b, hq, t, d = q.shape
    k, v = (y.expand(b, hq, y.shape[2], d) for y in (k, v))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :])
    return out.transpose(1, 2).reshape(b, t, hq * d)


def folded_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """Attention with the query heads folded into the sequence, as two matmuls and a float32 softmax, for few queries.

    q [B, Hq, T, D], k/v [B, Hkv, S, D], mask bool [B, T, S] (True = attend); returns [B, T, Hq * D].

    With 8 heads x 10-51 queries folded into one sequence, fused attention kernels see one or two
    query tiles and occupy one or two of the GPU's 132 multiprocessors (measured on an H100: 60 us
    per layer for cuDNN's flash kernel over 722 keys, more than half of a denoise step). Two small
    GEMMs spread over the whole chip. Inductor fuses the scale, mask and softmax into one kernel.
    """
    b, hq, t, d = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    q = q.reshape(b, hkv, groups * t, d)
    mask = mask[:, None, None].expand(b, hkv, groups, t, mask.shape[-1]).reshape(b, hkv, groups * t, -1)
    logits = torch.matmul(q, k.transpose(-1, -2)).float() * d**-0.5
    probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), dim=-1).to(v.dtype)
    out = torch.matmul(probs, v)
    return out.reshape(b, hq, t, d).transpose(1, 2).reshape(b, t, hq * d)


class GemmaBlock(nn.Module):
    """One Gemma layer with fused projections; norms are applied by the caller."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, kv_only: bool = False):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = fused_linear([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        if not kv_only:  # a layer whose outputs are never read needs only its K/V projection
            self.o = copy_linear(attn.o_proj, dtype)
            self.gate_up = fused_linear([mlp.gate_proj, mlp.up_proj], dtype)
            self.down = copy_linear(mlp.down_proj, dtype)
        self.q_width = attn.q_proj.out_features
        self.kv_width = attn.k_proj.out_features

    def project_qkv(self, h: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(h).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        return (y.unflatten(-1, (-1, head_dim)).transpose(1, 2) for y in (q, k, v))

    def mlp(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)
