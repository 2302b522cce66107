"""The three engine components, rewritten for speed from a reference model's weights.

Each component is an nn.Module with fixed-shape tensor inputs and outputs, so that it can be
exported (ONNX), quantized (FP8 linears), compiled (AOTInductor / TensorRT) and captured
(CUDA graphs) on its own:

    vision   images [B, C, 3, 224, 224]                          -> image_tokens [B, C*256, W]
    kvcache  image_tokens, image_masks [B, C], tokens [B, L],
             token_masks [B, L]                                  -> k, v [D, B, 1, S, 256], prefix_mask [B, S]
    denoise  x [B, H, 32], step [], k, v, prefix_mask, state [B, 32] -> x_next [B, H, 32]
             (one Euler step; ``denoise_loop`` runs it for every step: noise -> actions)

They compute what ``model.PiModel`` computes, with changes that are exact in real arithmetic
(floating-point rounding may differ; the accuracy gates measure by how much):
- q/k/v fused into one GEMM, gate/up into one; one KV head read by every query head without
  copies; attention through SDPA (flash / cuDNN kernels) where there are many queries (vision,
  prefix); in the denoise step (few queries) as two GEMMs + softmax, or on GPUs through
  pi-build's Triton kernels for its linears and attention (kernels.py, ``use_triton_kernels``);
- cameras that a recipe marks as always masked are not fed at all (nothing attends to them, and
  positions count valid tokens only), so C is the number of cameras in use;
- the prefix's last layer computes only its K/V (its outputs are never read);
- everything that depends only on the step index is precomputed for a fixed step count: the
  times t_i, pi0.5's time MLP and every adaRMSNorm's (scale, shift, gate), pi0's time half of
  action_time_mlp_in.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.model.pi0 import KVCache, PiModel, RMSNorm, sincos_time_embedding, suffix_ar_flags

COMPONENTS = ("vision", "kvcache", "denoise")
PRECISIONS = ("fp32", "bf16", "fp8")  # fp8: see compute_dtype; linears become FP8 after calibration


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


def compute_dtype(precision: str, device_type: str) -> torch.dtype:
    """fp32 -> float32; bf16 -> bfloat16; fp8 -> FP8 GEMMs with bfloat16 around them on GPUs, and on
    the CPU FP8 quantize-dequantize around float32 (emulation: same FP8 rounding, CPU-friendly)."""
    if precision not in PRECISIONS:
        raise ValueError(f"unknown precision {precision!r}; use one of {', '.join(PRECISIONS)}")
    if precision == "fp32" or (precision == "fp8" and device_type == "cpu"):
        return torch.float32
    return torch.bfloat16


def _device_type(model: PiModel) -> str:
    return next(model.parameters()).device.type


# ----------------------------------------------------------------------------- shared pieces


def _fused_linear(layers: list[nn.Linear], dtype: torch.dtype) -> nn.Linear:
    """One Linear whose output is the concatenation of ``layers``' outputs (same input)."""
    weight = torch.cat([layer.weight.detach().float() for layer in layers])
    has_bias = layers[0].bias is not None
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    fused.weight.data = weight.to(dtype)
    if has_bias:
        fused.bias.data = torch.cat([layer.bias.detach().float() for layer in layers]).to(dtype)
    return fused.requires_grad_(False)


def _copy_linear(layer: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    return _fused_linear([layer], dtype)


def _norm_scale(norm: RMSNorm) -> Tensor:
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


def few_query_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
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


class _GemmaBlock(nn.Module):
    """One Gemma layer with fused projections; norms are applied by the caller."""

    def __init__(self, layer: nn.Module, dtype: torch.dtype, kv_only: bool = False):
        super().__init__()
        attn, mlp = layer.self_attn, layer.mlp
        self.qkv = _fused_linear([attn.q_proj, attn.k_proj, attn.v_proj], dtype)
        if not kv_only:  # a layer whose outputs are never read needs only its K/V projection
            self.o = _copy_linear(attn.o_proj, dtype)
            self.gate_up = _fused_linear([mlp.gate_proj, mlp.up_proj], dtype)
            self.down = _copy_linear(mlp.down_proj, dtype)
        self.q_width = attn.q_proj.out_features
        self.kv_width = attn.k_proj.out_features

    def project_qkv(self, h: Tensor, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self.qkv(h).split([self.q_width, self.kv_width, self.kv_width], dim=-1)
        return (y.unflatten(-1, (-1, head_dim)).transpose(1, 2) for y in (q, k, v))

    def mlp(self, h: Tensor) -> Tensor:
        gate, up = self.gate_up(h).chunk(2, dim=-1)
        return self.down(F.gelu(gate, approximate="tanh") * up)


# ----------------------------------------------------------------------------- vision


class VisionComponent(nn.Module):
    input_names = ("images",)
    output_names = ("image_tokens",)

    def __init__(self, model: PiModel, spec: Shapes, precision: str):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, _device_type(model))
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
            block.qkv = _fused_linear([a.q_proj, a.k_proj, a.v_proj], self.dtype)
            block.out = _copy_linear(a.out_proj, self.dtype)
            block.ln2 = self._layernorm(layer.layer_norm2)
            block.fc1 = _copy_linear(layer.mlp.fc1, self.dtype)
            block.fc2 = _copy_linear(layer.mlp.fc2, self.dtype)
            self.layers.append(block)
        self.post_ln = self._layernorm(vm.post_layernorm)
        self.projector = _copy_linear(model.projector, self.dtype)

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
            x = x + block.fc2(F.gelu(block.fc1(block.ln2(x)), approximate="tanh"))
        tokens = self.projector(self.post_ln(x))
        return tokens.unflatten(0, (b, c)).flatten(1, 2)


# ----------------------------------------------------------------------------- kvcache (prefix)


class KVCacheComponent(nn.Module):
    input_names = ("image_tokens", "image_masks", "tokens", "token_masks")
    output_names = ("k", "v", "prefix_mask")

    def __init__(self, model: PiModel, spec: Shapes, precision: str):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, _device_type(model))
        self.cfg = model.cfg
        self.image_tokens = model.cfg.image_tokens
        llm = model.llm
        # The embedding table stays in the reference's dtype policy: bf16 under bf16 (openpi's).
        self.register_buffer("embed", llm.embed_tokens.weight.detach().to(self.dtype).clone())
        last = len(llm.layers) - 1
        self.layers = nn.ModuleList(_GemmaBlock(layer, self.dtype, kv_only=i == last) for i, layer in enumerate(llm.layers))
        self.register_buffer("norm1", torch.stack([_norm_scale(l.input_layernorm) for l in llm.layers]))
        self.register_buffer("norm2", torch.stack([_norm_scale(l.post_attention_layernorm) for l in llm.layers]))

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
            x = x + block.o(mqa_attention(apply_rope(q, cos, sin), k, v, valid))
            h = (rms_normalize(x) * self.norm2[i]).to(self.dtype)
            x = x + block.mlp(h)
        return torch.stack(keys), torch.stack(values), valid


# ----------------------------------------------------------------------------- denoise (expert loop)


def _at(table: Tensor, step: Tensor) -> Tensor:
    """table[step] for an int64 scalar tensor step, in a form torch.export traces (no data-dependent guard)."""
    return table.index_select(0, step.reshape(1)).squeeze(0)


def euler_times(steps: int) -> list[Tensor]:
    """t_0 = 1, t_{i+1} = t_i + dt in float32, as the reference loop accumulates them."""
    dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
    times, t = [], torch.tensor(1.0, dtype=torch.float32)
    for _ in range(steps):
        times.append(t)
        t = t + dt
    return times


class DenoiseComponent(nn.Module):
    """One Euler step x -> x + dt * v(x, t_step) over the cached prefix, for a fixed step count.

    ``step`` is an int64 scalar tensor that indexes the precomputed per-step tables, so one
    compiled engine serves every step of the loop (``denoise_loop`` runs it; a CUDA graph
    captures the whole loop). The first call takes the noise (t = 1).
    """

    input_names = ("x", "step", "k", "v", "prefix_mask", "state")
    output_names = ("x_next",)

    def __init__(self, model: PiModel, spec: Shapes, precision: str):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, _device_type(model))
        self.cfg = cfg = model.cfg
        self.pi05 = cfg.pi05
        self.steps = spec.steps
        self.register_buffer("dt", torch.tensor(-1.0 / spec.steps, dtype=torch.float32))
        expert = model.expert
        self.layers = nn.ModuleList(_GemmaBlock(layer, self.dtype) for layer in expert.layers)
        # The small top-level projections stay float32, as in openpi.
        self.action_in = _copy_linear(model.action_in_proj, torch.float32)
        self.action_out = _copy_linear(model.action_out_proj, torch.float32)
        times = euler_times(spec.steps)
        with torch.no_grad():
            if cfg.pi05:
                self._precompute_adarms(model, times)
            else:
                self._precompute_pi0_time(model, times)
        self.register_buffer("ar_flags", suffix_ar_flags(cfg.replace(action_horizon=spec.horizon)))
        self.triton_attention = False  # set by use_triton_kernels

    def use_triton_kernels(self) -> dict:
        """Compute the expert's linears and attention with pi-build's Triton kernels (kernels.py), in place.

        For CUDA builds: the step's few tokens make library GEMMs and attention kernels slow there.
        Returns what was switched, for the manifest.
        """
        from pi_build.engine import kernels

        rows = self.spec.batch * self.ar_flags.shape[0]
        names = [f"layers.{i}.{p}" for i in range(len(self.layers)) for p in ("qkv", "o", "gate_up", "down")]
        replaced = kernels.use_skinny_linears(self, names, rows)
        # the kernel reads one KV head (every pi0-family expert has one), in bf16 (in float32 its
        # tensor-core products would round to tf32: a float32 engine keeps the library path)
        self.triton_attention = self.cfg.expert.num_kv_heads == 1 and self.dtype == torch.bfloat16
        return {"skinny_linears": len(replaced), "of_linears": len(names), "attention": "triton" if self.triton_attention else "library"}

    def _precompute_adarms(self, model: PiModel, times: list[Tensor]) -> None:
        """Per step: every adaRMSNorm's (scale, shift, gate), from the time MLP at t_i."""
        cond = model.time_condition(torch.stack(times).to(model.time_mlp_in.weight.device))  # [steps, W]
        def modulation(norm: RMSNorm) -> Tensor:  # [steps, 3, W]
            return F.linear(cond.float(), norm.dense.weight.float(), norm.dense.bias.float()).unflatten(-1, (3, -1))
        layers = model.expert.layers
        self.register_buffer("mod1", torch.stack([modulation(l.input_layernorm) for l in layers], 1).cpu())  # [steps, D, 3, W]
        self.register_buffer("mod2", torch.stack([modulation(l.post_attention_layernorm) for l in layers], 1).cpu())
        self.register_buffer("mod_final", modulation(model.expert.norm).cpu())  # [steps, 3, W]

    def _precompute_pi0_time(self, model: PiModel, times: list[Tensor]) -> None:
        """pi0: action_time_mlp_in([a, time]) = W_a a + (W_t time + b); the bracket depends on the step only."""
        w = model.cfg.expert.width
        mlp_in = model.action_time_mlp_in
        emb = sincos_time_embedding(torch.stack(times), w).to(mlp_in.weight.device)  # [steps, W]
        time_part = F.linear(emb, mlp_in.weight[:, w:].float(), mlp_in.bias.float())
        self.register_buffer("time_part", time_part.cpu())  # [steps, W]
        self.action_time_in = nn.Linear(w, w, bias=False).requires_grad_(False)
        self.action_time_in.weight.data = mlp_in.weight[:, :w].detach().float().clone()
        self.action_time_out = _copy_linear(model.action_time_mlp_out, torch.float32)
        self.state_in = _copy_linear(model.state_proj, torch.float32)
        layers = model.expert.layers
        self.register_buffer("norm1", torch.stack([_norm_scale(l.input_layernorm) for l in layers]))
        self.register_buffer("norm2", torch.stack([_norm_scale(l.post_attention_layernorm) for l in layers]))
        self.register_buffer("norm_final", _norm_scale(model.expert.norm))

    def example_inputs(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        s, cfg = self.spec, self.cfg
        length = s.cameras * cfg.image_tokens + s.prompt_len
        shape = (cfg.llm.depth, s.batch, cfg.llm.num_kv_heads, length, cfg.llm.head_dim)
        noise = torch.randn(s.batch, s.horizon, cfg.action_dim, generator=generator)
        step = torch.randint(0, s.steps, (), generator=generator)
        k, v = (torch.randn(shape, generator=generator).to(s.kv_dtype) for _ in range(2))
        valid_text = torch.randint(1, s.prompt_len + 1, (s.batch, 1), generator=generator)
        prefix_mask = torch.cat([torch.ones(s.batch, s.cameras * cfg.image_tokens, dtype=torch.bool),
                                 torch.arange(s.prompt_len)[None] < valid_text], dim=1)
        state = torch.randn(s.batch, cfg.action_dim, generator=generator)
        return noise, step, k, v, prefix_mask, state

    def _norm(self, x: Tensor, step: Tensor, layer: int | None, which: int) -> tuple[Tensor, Tensor | None]:
        """The expert's (ada)RMSNorm: which = 1 (before attention), 2 (before MLP); layer None = final norm."""
        if self.pi05:
            mod = _at(self.mod_final, step) if layer is None else _at(self.mod1 if which == 1 else self.mod2, step)[layer]
            scale, shift, gate = mod[0], mod[1], mod[2]
            return (rms_normalize(x) * (1 + scale) + shift).to(x.dtype), gate.to(x.dtype)
        weight = self.norm_final if layer is None else (self.norm1 if which == 1 else self.norm2)[layer]
        return (rms_normalize(x) * weight).to(x.dtype), None

    def _suffix(self, x_t: Tensor, step: Tensor, state: Tensor) -> Tensor:
        actions = self.action_in(x_t)
        if self.pi05:
            return actions
        h = F.silu(self.action_time_in(actions) + _at(self.time_part, step))
        return torch.cat([self.state_in(state)[:, None], self.action_time_out(h)], dim=1)

    def velocity(self, x_t: Tensor, step: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor], state: Tensor) -> Tensor:
        head_dim = self.cfg.expert.head_dim
        x = self._suffix(x_t, step, state).to(self.dtype)
        cos, sin = rope
        for i, block in enumerate(self.layers):
            h, gate = self._norm(x, step, i, 1)
            if self.triton_attention:
                y = block.o(self._triton_attention(block, h, k_cache[i], v_cache[i], mask, rope))
            else:
                q, k, v = block.project_qkv(h, head_dim)
                k = torch.cat([k_cache[i], apply_rope(k, cos, sin)], dim=2)
                v = torch.cat([v_cache[i], v], dim=2)
                y = block.o(few_query_attention(apply_rope(q, cos, sin), k, v, mask))
            x = x + (y if gate is None else y * gate)
            h, gate = self._norm(x, step, i, 2)
            y = block.mlp(h)
            x = x + (y if gate is None else y * gate)
        h, _ = self._norm(x[:, -self.spec.horizon :], step, None, 0)
        return self.action_out(h.float())

    def _triton_attention(self, block: _GemmaBlock, h: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor,
                          rope: tuple[Tensor, Tensor]) -> Tensor:
        """The same attention through kernels.few_query_attention: token-major layouts, no K/V concatenation."""
        from pi_build.engine import kernels

        head_dim = self.cfg.expert.head_dim
        qkv = block.qkv(h).unflatten(-1, (-1, head_dim))  # [B, T, Hq + 2, D]: the q heads, k, v
        heads = qkv.shape[2] - 2
        # RoPE on q and k in one elementwise pass over qkv: v's row gets cos = 1, sin = 0 (exact),
        # so Inductor writes one buffer that the kernel reads q, k and v from.
        rotated = (torch.arange(heads + 2, device=h.device) <= heads)[:, None]
        cos, sin = (t.transpose(1, 2) for t in rope)  # [B, T, 1, D]
        qkv = apply_rope(qkv, torch.where(rotated, cos, 1.0).to(cos.dtype), torch.where(rotated, sin, 0.0).to(sin.dtype))
        q, k, v = qkv[:, :, :heads], qkv[:, :, heads], qkv[:, :, heads + 1]
        return kernels.few_query_attention(q, k_cache[:, 0], v_cache[:, 0], k, v, mask)

    def forward(self, x: Tensor, step: Tensor, k: Tensor, v: Tensor, prefix_mask: Tensor, state: Tensor) -> Tensor:
        b, suffix_len = x.shape[0], self.ar_flags.shape[0]
        cum = torch.cumsum(self.ar_flags, 0)
        within = (cum[None, :] <= cum[:, None])[None].expand(b, -1, -1)
        mask = torch.cat([prefix_mask[:, None, :].expand(b, suffix_len, -1), within], dim=2)
        positions = prefix_mask.sum(-1, keepdim=True) + torch.arange(suffix_len, device=x.device)
        rope = rope_tables(positions, self.cfg.expert.head_dim, self.dtype)
        x = x.float()
        return x + self.dt * self.velocity(x, step, k.to(self.dtype), v.to(self.dtype), mask, rope, state.float())


def denoise_loop(step_fn, noise: Tensor, k: Tensor, v: Tensor, prefix_mask: Tensor, state: Tensor, steps: Tensor | int) -> Tensor:
    """Run a denoise step engine (or module) over every step: noise at t = 1 -> actions at t = 0.

    ``steps`` is the step count, or a prepared int64 tensor [steps] of step indices on the device
    (the runtime keeps one, so that a CUDA graph can capture the loop).
    """
    indices = torch.arange(steps, device=noise.device) if isinstance(steps, int) else steps
    x = noise
    for i in range(indices.shape[0]):
        out = step_fn(x, indices[i], k, v, prefix_mask, state)
        x = out[0] if isinstance(out, (tuple, list)) else out
    return x


# ----------------------------------------------------------------------------- building and reference


_CLASSES = {"vision": VisionComponent, "kvcache": KVCacheComponent, "denoise": DenoiseComponent}


@torch.no_grad()
def build_component(model: PiModel, name: str, spec: Shapes, precision: str = "fp32") -> nn.Module:
    """A component module from ``model``'s weights (held on the model's device), in eval mode."""
    if name not in _CLASSES:
        raise ValueError(f"unknown component {name!r}; use one of {', '.join(COMPONENTS)}")
    device = next(model.parameters()).device
    return _CLASSES[name](model, spec, precision).to(device).eval()


def build_components(model: PiModel, spec: Shapes, precisions: dict[str, str] | None = None) -> dict[str, nn.Module]:
    precisions = precisions or {}
    return {name: build_component(model, name, spec, precisions.get(name, "fp32")) for name in COMPONENTS}


@torch.no_grad()
def reference_outputs(model: PiModel, name: str, inputs: tuple[Tensor, ...], steps: int) -> tuple[Tensor, ...]:
    """What the reference model computes for a component's inputs (the accuracy gates' truth).

    The reference runs in its own dtype: float inputs produced by lower-precision engines are upcast.
    """
    dtype = model.dtype
    inputs = tuple(t.to(dtype) if t.is_floating_point() and t.dtype != torch.float32 else t for t in inputs)
    if name == "vision":
        (images,) = inputs
        masks = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
        return (model.vision(images, masks),)
    if name == "kvcache":
        cache = model.kvcache(*inputs)
        return cache.k, cache.v, cache.prefix_mask
    if name == "denoise":  # one Euler step from step index `step`, as the engine computes it
        x, step, k, v, prefix_mask, state = inputs
        t = euler_times(steps)[int(step)].to(x.device).expand(x.shape[0])
        velocity = model.denoise_step(x.float(), t, KVCache(k, v, prefix_mask), state)
        return (x.float() + torch.tensor(-1.0 / steps, dtype=torch.float32) * velocity,)
    raise ValueError(f"unknown component {name!r}")
