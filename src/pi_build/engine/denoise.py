"""The denoise component: one Euler step of the action expert over the cached prefix.

    x [B, H, 32], step [] (int64), k, v [layers, B, 1, S, 256], prefix_mask [B, S], state [B, 32]
        ->  x_next [B, H, 32]

``denoise_loop`` runs the step for every step of the loop (noise at t = 1 -> actions at t = 0);
one compiled engine serves every step because ``step`` indexes tables precomputed for a fixed
step count: the times t_i, pi0.5's time MLP and every adaRMSNorm's (scale, shift, gate), and
pi0's time half of action_time_mlp_in. Attention with few queries runs as two GEMMs and a
softmax (``layers.folded_query_attention``), or on GPUs through pi-build's Triton kernels for its
linears and attention (``kernels``, ``DenoiseComponent.use_triton_kernels``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pi_build.engine.layers import (GemmaBlock, Shapes, apply_rope, compute_dtype, copy_linear, device_type,
                                    folded_query_attention, norm_scale, rms_normalize, rope_tables)
from pi_build.model.pi0 import KVCache, PiModel, RMSNorm, euler_loop, euler_times, sincos_time_embedding, suffix_ar_flags
from pi_build.spec import Precision


def _at(table: Tensor, step: Tensor) -> Tensor:
    """table[step] for an int64 scalar tensor step, in a form torch.export traces (no data-dependent guard)."""
    return table.index_select(0, step.reshape(1)).squeeze(0)


class DenoiseComponent(nn.Module):
    """One Euler step x -> x + dt * v(x, t_step) over the cached prefix, for a fixed step count.

    ``step`` is an int64 scalar tensor that indexes the precomputed per-step tables, so one
    compiled engine serves every step of the loop (``denoise_loop`` runs it; a CUDA graph
    captures the whole loop). The first call takes the noise (t = 1).
    """

    input_names = ("x", "step", "k", "v", "prefix_mask", "state")
    output_names = ("x_next",)

    def __init__(self, model: PiModel, spec: Shapes, precision: Precision):
        super().__init__()
        self.spec, self.precision = spec, precision
        self.dtype = compute_dtype(precision, device_type(model))
        self.cfg = cfg = model.cfg
        self.pi05 = cfg.pi05
        self.steps = spec.steps
        self.register_buffer("dt", torch.tensor(-1.0 / spec.steps, dtype=torch.float32))
        expert = model.expert
        self.layers = nn.ModuleList(GemmaBlock(layer, self.dtype) for layer in expert.layers)
        # The small top-level projections stay float32, as in openpi.
        self.action_in = copy_linear(model.action_in_proj, torch.float32)
        self.action_out = copy_linear(model.action_out_proj, torch.float32)
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
        self.action_time_out = copy_linear(model.action_time_mlp_out, torch.float32)
        self.state_in = copy_linear(model.state_proj, torch.float32)
        layers = model.expert.layers
        self.register_buffer("norm1", torch.stack([norm_scale(l.input_layernorm) for l in layers]))
        self.register_buffer("norm2", torch.stack([norm_scale(l.post_attention_layernorm) for l in layers]))
        self.register_buffer("norm_final", norm_scale(model.expert.norm))

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
                y = block.o(folded_query_attention(apply_rope(q, cos, sin), k, v, mask))
            x = x + (y if gate is None else y * gate)
            h, gate = self._norm(x, step, i, 2)
            y = block.mlp(h)
            x = x + (y if gate is None else y * gate)
        h, _ = self._norm(x[:, -self.spec.horizon :], step, None, 0)
        return self.action_out(h.float())

    def _triton_attention(self, block: GemmaBlock, h: Tensor, k_cache: Tensor, v_cache: Tensor, mask: Tensor,
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

    def step(x: Tensor, i: int) -> Tensor:
        out = step_fn(x, indices[i], k, v, prefix_mask, state)
        return out[0] if isinstance(out, (tuple, list)) else out

    return euler_loop(step, noise, indices.shape[0])


def reference(model: PiModel, inputs: tuple[Tensor, ...], steps: int) -> tuple[Tensor, ...]:
    """One Euler step of the reference model from step index ``step``, as the engine computes it."""
    x, step, k, v, prefix_mask, state = inputs
    t = euler_times(steps)[int(step)].to(x.device).expand(x.shape[0])
    velocity = model.denoise_step(x.float(), t, KVCache(k, v, prefix_mask), state)
    return (x.float() + torch.tensor(-1.0 / steps, dtype=torch.float32) * velocity,)


def calibration_inputs(model: PiModel, images: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor,
                       state: Tensor, steps: int, horizon: int) -> list[tuple[Tensor, ...]]:
    """One sample per Euler step, at the x_t the reference loop reaches there, so that FP8
    calibration sees every step's activations, not only the noise's."""
    image_tokens = model.vision(images, image_masks)
    cache = model.kvcache(image_tokens, image_masks, tokens, token_masks)
    generator = torch.Generator().manual_seed(int(tokens.sum()))  # fixed by the inputs: reproducible
    noise = torch.randn(images.shape[0], horizon, model.cfg.action_dim, generator=generator).to(images.device)
    times, dt, samples = euler_times(steps), -1.0 / steps, []

    def step(x: Tensor, i: int) -> Tensor:
        samples.append((x, torch.tensor(i, device=x.device), cache.k, cache.v, cache.prefix_mask, state))
        return x + dt * model.denoise_step(x, times[i].to(x.device).expand(x.shape[0]), cache, state)

    euler_loop(step, noise, steps)
    return samples
