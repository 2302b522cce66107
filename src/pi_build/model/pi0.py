"""The pi0 / pi0.5 reference model, in one plain PyTorch file.

This is the model that every engine, accuracy gate and benchmark in pi-build is checked
against, so it follows openpi's PyTorch port (Physical-Intelligence/openpi,
``models_pytorch/pi0_pytorch.py`` + ``gemma_pytorch.py``) operation for operation:

    images ──SigLIP So400m/14──projector──┐
    prompt tokens ──embed * sqrt(width)───┴─► prefix ──Gemma-2B──► per-layer K/V cache
    x_t, t (, state) ──► suffix ──Gemma-300M "action expert", attending to the cache──► v_t
    x_{t+dt} = x_t + dt * v_t   (Euler, t from 1 = noise to 0 = actions)

The module tree mirrors openpi's checkpoint keys exactly (``paligemma_with_expert.paligemma.
model.vision_tower.vision_model...``), so loading a checkpoint is a plain ``load_state_dict``
(see ``checkpoints.py``). The three parts that become separate engines are separate methods
with explicit tensors in and out: ``vision``, ``kvcache`` and ``denoise_step``.

dtype policy (openpi's): under bfloat16 the big matrices are bf16, while the patch and position
embeddings, every Gemma RMSNorm (adaRMS dense layers included) and the top-level action/state/
time projections stay float32; each linear layer runs in its own weight's dtype.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Additive logit for masked-out keys, the value openpi uses (a large negative float32).
MASKED_LOGIT = -2.3819763e38
IMAGE_SIZE = 224


# ----------------------------------------------------------------------------- configs


@dataclass(frozen=True)
class SiglipConfig:
    width: int = 1152
    depth: int = 27
    mlp_dim: int = 4304
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = IMAGE_SIZE

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass(frozen=True)
class GemmaConfig:
    width: int
    depth: int
    mlp_dim: int
    num_heads: int = 8
    num_kv_heads: int = 1
    head_dim: int = 256


@dataclass(frozen=True)
class Config:
    name: str
    pi05: bool
    vision: SiglipConfig
    llm: GemmaConfig  # PaliGemma's Gemma-2B: the prefix
    expert: GemmaConfig  # Gemma-300M action expert: the suffix
    vocab_size: int = 257152
    action_dim: int = 32  # states and actions are zero-padded to this
    action_horizon: int = 50
    max_token_len: int = 48  # prompt length the language tokens are padded to

    @property
    def image_tokens(self) -> int:
        return self.vision.num_patches

    def replace(self, **changes) -> Config:
        return dataclasses.replace(self, **changes)


GEMMA_2B = GemmaConfig(width=2048, depth=18, mlp_dim=16384)
GEMMA_300M = GemmaConfig(width=1024, depth=18, mlp_dim=4096)
# Same structure (MQA, joint attention, 256 image tokens per camera), tiny widths: CPU tests and demo.
TINY_SIGLIP = SiglipConfig(width=32, depth=2, mlp_dim=64, num_heads=2)
TINY_LLM = GemmaConfig(width=64, depth=2, mlp_dim=128, num_heads=2, num_kv_heads=1, head_dim=16)
TINY_EXPERT = GemmaConfig(width=32, depth=2, mlp_dim=64, num_heads=2, num_kv_heads=1, head_dim=16)

CONFIGS: dict[str, Config] = {
    "pi0": Config("pi0", pi05=False, vision=SiglipConfig(), llm=GEMMA_2B, expert=GEMMA_300M),
    "pi05": Config(
        "pi05", pi05=True, vision=SiglipConfig(), llm=GEMMA_2B, expert=GEMMA_300M, max_token_len=200
    ),
    "pi0_tiny": Config("pi0_tiny", pi05=False, vision=TINY_SIGLIP, llm=TINY_LLM, expert=TINY_EXPERT, vocab_size=512),
    "pi05_tiny": Config(
        "pi05_tiny", pi05=True, vision=TINY_SIGLIP, llm=TINY_LLM, expert=TINY_EXPERT, vocab_size=512, max_token_len=200
    ),
}


def config_to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> Config:
    """Inverse of config_to_dict (manifests record the exact config an engine was built for)."""
    return Config(**{**data, "vision": SiglipConfig(**data["vision"]), "llm": GemmaConfig(**data["llm"]),
                     "expert": GemmaConfig(**data["expert"])})


def get_config(name: str) -> Config:
    if name not in CONFIGS:
        raise KeyError(f"unknown model config {name!r}; known: {', '.join(CONFIGS)}")
    return CONFIGS[name]


# ----------------------------------------------------------------------------- inputs


@dataclass
class ModelInputs:
    """Model-level inputs, after preprocessing and tokenization.

    images: float [B, C, 3, 224, 224] in [-1, 1], cameras in the order base, left wrist, right wrist.
    image_masks: bool [B, C]. tokens: int64 [B, L]. token_masks: bool [B, L].
    state: float32 [B, action_dim] (normalized, zero-padded; the model reads it for pi0 only).
    """

    images: Tensor
    image_masks: Tensor
    tokens: Tensor
    token_masks: Tensor
    state: Tensor | None = None

    def to(self, device: torch.device | str) -> ModelInputs:
        # Not dataclasses.astuple: it deep-copies every tensor (17 of the 21 ms of preparing a LIBERO request).
        tensors = (getattr(self, field.name) for field in dataclasses.fields(self))
        return ModelInputs(*(None if t is None else t.to(device) for t in tensors))

    @property
    def batch_size(self) -> int:
        return self.tokens.shape[0]


@dataclass
class KVCache:
    """What the prefix leaves for the denoise steps: per-layer keys (RoPE applied) and values,
    [layers, B, kv_heads, S, head_dim], and which of the S prefix slots are real tokens."""

    k: Tensor
    v: Tensor
    prefix_mask: Tensor  # bool [B, S]


# ----------------------------------------------------------------------------- modules


def _tree(**children: nn.Module) -> nn.Module:
    """An empty module holding children: lets the tree mirror checkpoint key paths."""
    module = nn.Module()
    for name, child in children.items():
        module.add_module(name, child)
    return module


class RMSNorm(nn.Module):
    """Gemma RMSNorm: x / rms(x) * (1 + weight), statistics in float32.

    With ``cond_dim`` it is pi0.5's adaRMSNorm: a dense layer maps the time condition to
    (scale, shift, gate); out = norm(x) * (1 + scale) + shift, and the caller gates the residual.
    """

    def __init__(self, dim: int, cond_dim: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        if cond_dim is None:
            self.weight = nn.Parameter(torch.zeros(dim))
            self.dense = None
        else:
            self.dense = nn.Linear(cond_dim, 3 * dim)

    def forward(self, x: Tensor, cond: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        var = x.float().square().mean(-1, keepdim=True)
        normed = x * torch.rsqrt(var + self.eps)  # float32 by promotion
        if self.dense is None:
            return (normed * (1.0 + self.weight.float())).to(x.dtype), None
        if cond is None:
            raise ValueError("adaRMSNorm needs the time condition")
        scale, shift, gate = _linear(self.dense, cond)[:, None, :].chunk(3, dim=-1)
        out = normed * (1 + scale.float()) + shift.float()
        return out.to(x.dtype), gate.to(x.dtype)


class GemmaLayer(nn.Module):
    def __init__(self, cfg: GemmaConfig, cond_dim: int | None):
        super().__init__()
        w, d = cfg.width, cfg.head_dim
        self.input_layernorm = RMSNorm(w, cond_dim)
        self.self_attn = _tree(
            q_proj=nn.Linear(w, cfg.num_heads * d, bias=False),
            k_proj=nn.Linear(w, cfg.num_kv_heads * d, bias=False),
            v_proj=nn.Linear(w, cfg.num_kv_heads * d, bias=False),
            o_proj=nn.Linear(cfg.num_heads * d, w, bias=False),
        )
        self.post_attention_layernorm = RMSNorm(w, cond_dim)
        self.mlp = _tree(
            gate_proj=nn.Linear(w, cfg.mlp_dim, bias=False),
            up_proj=nn.Linear(w, cfg.mlp_dim, bias=False),
            down_proj=nn.Linear(cfg.mlp_dim, w, bias=False),
        )


class Gemma(nn.Module):
    def __init__(self, cfg: GemmaConfig, vocab_size: int | None, cond_dim: int | None = None):
        super().__init__()
        self.cfg = cfg
        if vocab_size is not None:
            self.embed_tokens = nn.Embedding(vocab_size, cfg.width)
        self.layers = nn.ModuleList(GemmaLayer(cfg, cond_dim) for _ in range(cfg.depth))
        self.norm = RMSNorm(cfg.width, cond_dim)


class SiglipLayer(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        w = cfg.width
        self.layer_norm1 = nn.LayerNorm(w, eps=1e-6)
        self.self_attn = _tree(
            q_proj=nn.Linear(w, w), k_proj=nn.Linear(w, w), v_proj=nn.Linear(w, w), out_proj=nn.Linear(w, w)
        )
        self.layer_norm2 = nn.LayerNorm(w, eps=1e-6)
        self.mlp = _tree(fc1=nn.Linear(w, cfg.mlp_dim), fc2=nn.Linear(cfg.mlp_dim, w))


class Siglip(nn.Module):
    def __init__(self, cfg: SiglipConfig):
        super().__init__()
        self.cfg = cfg
        self.embeddings = _tree(
            patch_embedding=nn.Conv2d(3, cfg.width, cfg.patch_size, stride=cfg.patch_size),
            position_embedding=nn.Embedding(cfg.num_patches, cfg.width),
        )
        self.encoder = _tree(layers=nn.ModuleList(SiglipLayer(cfg) for _ in range(cfg.depth)))
        self.post_layernorm = nn.LayerNorm(cfg.width, eps=1e-6)


# ----------------------------------------------------------------------------- functions


def _linear(layer: nn.Linear, x: Tensor) -> Tensor:
    """Every linear layer runs in its own weight's dtype (openpi's mixed-precision rule)."""
    return F.linear(x.to(layer.weight.dtype), layer.weight, layer.bias)


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    """softmax(q k^T / sqrt(d) + mask) v with multi-query heads, softmax in float32.

    q [B, Hq, T, D]; k, v [B, Hkv, S, D]; mask bool [B, T, S] (True = may attend) or None.
    Returns [B, T, Hq * D].
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:  # MQA/GQA: every query head group shares one key/value head
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    logits = torch.matmul(q, k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    if mask is not None:
        logits = logits + torch.where(mask[:, None], 0.0, MASKED_LOGIT).to(logits.dtype)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.matmul(probs, v)  # [B, Hq, T, D]
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def rope(x: Tensor, positions: Tensor, base: float = 10000.0) -> Tensor:
    """Rotary embedding, rotate-half convention over the whole head dim, angles in float32.

    x [B, H, T, D]; positions int [B, T].
    """
    d = x.shape[-1]
    inv_freq = 1.0 / (base ** (torch.arange(0, d, 2, dtype=torch.int64, device=x.device).float() / d))
    freqs = positions.float()[..., None] * inv_freq  # [B, T, D/2]
    emb = torch.cat([freqs, freqs], dim=-1)[:, None]  # [B, 1, T, D]
    cos, sin = emb.cos().to(x.dtype), emb.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def sincos_time_embedding(t: Tensor, dim: int, min_period: float = 4e-3, max_period: float = 4.0) -> Tensor:
    """Sine-cosine embedding of the flow-matching time t [B], computed in float64, returned float32."""
    hi = torch.float64 if t.device.type != "mps" else torch.float32
    fraction = torch.linspace(0.0, 1.0, dim // 2, dtype=hi, device=t.device)
    period = min_period * (max_period / min_period) ** fraction
    angle = (1.0 / period * 2 * math.pi)[None, :] * t.to(hi)[:, None]
    return torch.cat([torch.sin(angle), torch.cos(angle)], dim=1).to(torch.float32)


def make_attention_mask(valid: Tensor, ar_flags: Tensor) -> Tensor:
    """Prefix-LM mask (big_vision's): query i sees key j iff cumsum(ar)[j] <= cumsum(ar)[i] and both are valid.

    valid bool [B, N]; ar_flags int [B, N] or [N]. Returns bool [B, N, N].
    """
    cum = torch.cumsum(ar_flags.expand_as(valid).long(), dim=1)
    return (cum[:, None, :] <= cum[:, :, None]) & (valid[:, None, :] & valid[:, :, None])


def suffix_ar_flags(cfg: Config, device: torch.device | None = None) -> Tensor:
    """pi0: [1 (state), 1 (first action), 0, ...]; pi0.5: [1, 0, ...] (no state token)."""
    flags = [1] * (1 + (not cfg.pi05)) + [0] * (cfg.action_horizon - 1)
    return torch.tensor(flags, dtype=torch.long, device=device)


# ----------------------------------------------------------------------------- the model


class PiModel(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.cfg = cfg
        expert_cond = cfg.expert.width if cfg.pi05 else None
        paligemma = _tree(
            model=_tree(
                vision_tower=_tree(vision_model=Siglip(cfg.vision)),
                multi_modal_projector=_tree(linear=nn.Linear(cfg.vision.width, cfg.llm.width)),
                language_model=Gemma(cfg.llm, cfg.vocab_size),
            )
        )
        self.paligemma_with_expert = _tree(
            paligemma=paligemma, gemma_expert=_tree(model=Gemma(cfg.expert, None, expert_cond))
        )
        w = cfg.expert.width
        self.action_in_proj = nn.Linear(cfg.action_dim, w)
        self.action_out_proj = nn.Linear(w, cfg.action_dim)
        if cfg.pi05:
            self.time_mlp_in = nn.Linear(w, w)
            self.time_mlp_out = nn.Linear(w, w)
        else:
            self.state_proj = nn.Linear(cfg.action_dim, w)
            self.action_time_mlp_in = nn.Linear(2 * w, w)
            self.action_time_mlp_out = nn.Linear(w, w)

    # Short names for the three networks (properties, so the state dict keeps openpi's keys only).
    @property
    def siglip(self) -> Siglip:
        return self.paligemma_with_expert.paligemma.model.vision_tower.vision_model

    @property
    def projector(self) -> nn.Linear:
        return self.paligemma_with_expert.paligemma.model.multi_modal_projector.linear

    @property
    def llm(self) -> Gemma:
        return self.paligemma_with_expert.paligemma.model.language_model

    @property
    def expert(self) -> Gemma:
        return self.paligemma_with_expert.gemma_expert.model

    # ------------------------------------------------------------------ dtype policy

    def set_dtype(self, dtype: torch.dtype) -> PiModel:
        """float32 everywhere, or openpi's bfloat16 policy (see the module docstring)."""
        if dtype == torch.float32:
            return self.float()
        if dtype != torch.bfloat16:
            raise ValueError(f"unsupported model dtype {dtype}; use float32 or bfloat16")
        self.paligemma_with_expert.to(torch.bfloat16)
        keep_fp32 = ("embeddings.patch_embedding", "embeddings.position_embedding", "layernorm", "model.norm")
        for name, param in self.paligemma_with_expert.named_parameters():
            # "layernorm" catches Gemma's input_/post_attention_layernorm (adaRMS dense too), not SigLIP's layer_normN.
            if any(key in name for key in keep_fp32) and "post_layernorm" not in name:
                param.data = param.data.float()
        return self

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the big matrices."""
        return self.llm.layers[0].self_attn.q_proj.weight.dtype

    # ------------------------------------------------------------------ vision

    def embed_images(self, pixels: Tensor) -> Tensor:
        """SigLIP + projector for a flat batch of images [N, 3, 224, 224] -> [N, 256, llm width]."""
        vm = self.siglip
        patch = vm.embeddings.patch_embedding
        x = patch(pixels.to(patch.weight.dtype)).flatten(2).transpose(1, 2)  # [N, P, W]
        x = x + vm.embeddings.position_embedding.weight[None]
        x = x.to(self.dtype)
        heads = vm.cfg.num_heads
        for layer in vm.encoder.layers:
            h = layer.layer_norm1(x)
            attn = layer.self_attn
            q, k, v = (_linear(p, h).unflatten(-1, (heads, -1)).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
            x = x + _linear(attn.out_proj, attention(q, k, v, None))
            h = layer.layer_norm2(x)
            x = x + _linear(layer.mlp.fc2, gelu_tanh(_linear(layer.mlp.fc1, h)))
        x = vm.post_layernorm(x)
        return _linear(self.projector, x)

    def vision(self, images: Tensor, image_masks: Tensor) -> Tensor:
        """images [B, C, 3, 224, 224] -> image tokens [B, C * 256, llm width].

        Exact shortcut: a camera whose mask is False for the whole batch is never attended
        (its keys are masked for every query), so its SigLIP pass is skipped and its slots hold zeros.
        """
        b, c = images.shape[:2]
        n = self.cfg.image_tokens
        used = image_masks.any(dim=0).tolist()
        tokens = torch.zeros(b, c, n, self.cfg.llm.width, dtype=self.dtype, device=images.device)
        cams = [i for i in range(c) if used[i]]
        if cams:
            flat = images[:, cams].flatten(0, 1)
            tokens[:, cams] = self.embed_images(flat).unflatten(0, (b, len(cams)))
        return tokens.flatten(1, 2)

    # ------------------------------------------------------------------ transformer layers

    def _layer(
        self,
        index: int,
        streams: list[tuple[Gemma, Tensor, Tensor | None]],
        positions: Tensor,
        mask: Tensor,
        past: tuple[Tensor, Tensor] | None = None,
    ) -> tuple[list[Tensor], Tensor, Tensor]:
        """One layer of joint attention over one or more token streams.

        Each stream is (network, hidden states [B, T_i, W_i], adaRMS condition or None); each
        network applies its own norm and q/k/v to its own tokens, the streams are concatenated
        along the sequence (in order) for one attention, then split back for each network's
        o_proj, residual, norm, MLP and residual. ``past`` is cached (k, v) that the new tokens
        attend to, placed before them. Returns the new hidden states and this layer's new (k, v).
        """
        qs, ks, vs, gates = [], [], [], []
        for net, x, cond in streams:
            layer = net.layers[index]
            h, gate = layer.input_layernorm(x, cond)
            attn = layer.self_attn
            d = net.cfg.head_dim
            qs.append(_linear(attn.q_proj, h).unflatten(-1, (-1, d)).transpose(1, 2))
            ks.append(_linear(attn.k_proj, h).unflatten(-1, (-1, d)).transpose(1, 2))
            vs.append(_linear(attn.v_proj, h).unflatten(-1, (-1, d)).transpose(1, 2))
            gates.append(gate)
        q = rope(torch.cat(qs, dim=2), positions)
        k = rope(torch.cat(ks, dim=2), positions)
        v = torch.cat(vs, dim=2)
        k_all, v_all = (k, v) if past is None else (torch.cat([past[0], k], 2), torch.cat([past[1], v], 2))
        out = attention(q, k_all, v_all, mask)

        new, start = [], 0
        for (net, x, cond), gate in zip(streams, gates):
            layer = net.layers[index]
            end = start + x.shape[1]
            y = _linear(layer.self_attn.o_proj, out[:, start:end])
            x = x + (y if gate is None else y * gate)
            h, gate2 = layer.post_attention_layernorm(x, cond)
            mlp = layer.mlp
            y = _linear(mlp.down_proj, gelu_tanh(_linear(mlp.gate_proj, h)) * _linear(mlp.up_proj, h))
            new.append(x + (y if gate2 is None else y * gate2))
            start = end
        return new, k, v

    # ------------------------------------------------------------------ prefix

    def embed_prefix(self, image_tokens: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> tuple[Tensor, Tensor]:
        """Concatenate image tokens and scaled text embeddings; returns (embeddings, valid mask [B, S])."""
        emb = self.llm.embed_tokens(tokens)
        text = emb * math.sqrt(emb.shape[-1])  # in the embedding's dtype, as openpi does
        n = self.cfg.image_tokens
        image_valid = image_masks.bool().repeat_interleave(n, dim=1)
        embs = torch.cat([image_tokens.to(self.dtype), text.to(self.dtype)], dim=1)
        return embs, torch.cat([image_valid, token_masks.bool()], dim=1)

    def kvcache(self, image_tokens: Tensor, image_masks: Tensor, tokens: Tensor, token_masks: Tensor) -> KVCache:
        """Run the prefix (images + prompt) through Gemma-2B once; keep every layer's K (RoPE applied) and V."""
        x, valid = self.embed_prefix(image_tokens, image_masks, tokens, token_masks)
        mask = make_attention_mask(valid, torch.zeros_like(valid, dtype=torch.long))
        positions = torch.cumsum(valid.long(), dim=1) - 1
        keys, values = [], []
        for i in range(self.cfg.llm.depth):
            (x,), k, v = self._layer(i, [(self.llm, x, None)], positions, mask)
            keys.append(k)
            values.append(v)
        return KVCache(torch.stack(keys), torch.stack(values), valid)

    # ------------------------------------------------------------------ suffix

    def time_condition(self, t: Tensor) -> Tensor:
        """pi0.5: the time MLP's output [B, W] that drives every adaRMSNorm of the expert."""
        emb = sincos_time_embedding(t, self.cfg.expert.width)
        h = F.silu(_linear(self.time_mlp_in, emb))
        return F.silu(_linear(self.time_mlp_out, h))

    def embed_suffix(self, x_t: Tensor, t: Tensor, state: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Suffix tokens for the expert: (embeddings [B, T_s, W], adaRMS condition or None)."""
        actions = _linear(self.action_in_proj, x_t)
        if self.cfg.pi05:
            return actions, self.time_condition(t)
        if state is None:
            raise ValueError("pi0 needs the robot state (state [B, 32])")
        time = sincos_time_embedding(t, self.cfg.expert.width)[:, None, :].expand_as(actions)
        h = F.silu(_linear(self.action_time_mlp_in, torch.cat([actions, time.to(actions.dtype)], dim=2)))
        action_time = _linear(self.action_time_mlp_out, h)
        state_token = _linear(self.state_proj, state)[:, None, :]
        return torch.cat([state_token, action_time], dim=1), None

    def _suffix_mask_and_positions(self, prefix_mask: Tensor, suffix_len: int) -> tuple[Tensor, Tensor]:
        """Suffix queries see every valid prefix token plus the suffix per its AR flags."""
        b = prefix_mask.shape[0]
        suffix_valid = torch.ones(b, suffix_len, dtype=torch.bool, device=prefix_mask.device)
        within = make_attention_mask(suffix_valid, suffix_ar_flags(self.cfg, prefix_mask.device))
        mask = torch.cat([prefix_mask[:, None, :].expand(b, suffix_len, -1), within], dim=2)
        positions = prefix_mask.sum(-1, keepdim=True) + torch.arange(suffix_len, device=prefix_mask.device)
        return mask, positions

    def _actions_out(self, h: Tensor, cond: Tensor | None) -> Tensor:
        h, _ = self.expert.norm(h[:, -self.cfg.action_horizon :], cond)
        return _linear(self.action_out_proj, h.float())

    def denoise_step(self, x_t: Tensor, t: Tensor, cache: KVCache, state: Tensor | None = None) -> Tensor:
        """The velocity v_t [B, H, 32] at noisy actions x_t [B, H, 32] and time t [B], over the cached prefix."""
        if x_t.shape[1] != self.cfg.action_horizon:
            raise ValueError(f"x_t has horizon {x_t.shape[1]}, the model was configured for {self.cfg.action_horizon}")
        x, cond = self.embed_suffix(x_t, t, state)
        x = x.to(self.dtype)
        mask, positions = self._suffix_mask_and_positions(cache.prefix_mask, x.shape[1])
        for i in range(self.cfg.expert.depth):
            (x,), _, _ = self._layer(i, [(self.expert, x, cond)], positions, mask, past=(cache.k[i], cache.v[i]))
        return self._actions_out(x, cond)

    # ------------------------------------------------------------------ sampling

    @torch.no_grad()
    def sample(self, inputs: ModelInputs, noise: Tensor, steps: int = 10) -> Tensor:
        """Euler flow matching from x = noise at t = 1 to t = 0 in ``steps`` steps: [B, H, 32] actions.

        The prefix runs once; every step reuses the same cache (it never grows).
        """
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        image_tokens = self.vision(inputs.images, inputs.image_masks)
        cache = self.kvcache(image_tokens, inputs.image_masks, inputs.tokens, inputs.token_masks)
        return self.denoise(noise, cache, inputs.state, steps)

    @torch.no_grad()
    def denoise(self, noise: Tensor, cache: KVCache, state: Tensor | None, steps: int) -> Tensor:
        """The Euler loop alone, from x = noise at t = 1 (float32 times, as in openpi)."""
        dt, times = -1.0 / steps, euler_times(steps)
        b = noise.shape[0]

        def step(x: Tensor, i: int) -> Tensor:
            return x + dt * self.denoise_step(x, times[i].to(x.device).expand(b), cache, state)

        return euler_loop(step, noise.float(), steps)

    @torch.no_grad()
    def velocity_full_sequence(self, inputs: ModelInputs, x_t: Tensor, t: Tensor) -> Tensor:
        """v_t from one joint pass over prefix + suffix with the full prefix-LM mask and no cache.

        This is the training-time computation; tests check that cached sampling agrees with it.
        """
        image_tokens = self.vision(inputs.images, inputs.image_masks)
        prefix, prefix_valid = self.embed_prefix(image_tokens, inputs.image_masks, inputs.tokens, inputs.token_masks)
        suffix, cond = self.embed_suffix(x_t, t, inputs.state)
        suffix = suffix.to(self.dtype)
        b, s = prefix_valid.shape
        valid = torch.cat([prefix_valid, torch.ones(b, suffix.shape[1], dtype=torch.bool, device=suffix.device)], 1)
        flags = torch.cat([torch.zeros(s, dtype=torch.long, device=suffix.device), suffix_ar_flags(self.cfg, suffix.device)])
        mask = make_attention_mask(valid, flags)
        positions = torch.cumsum(valid.long(), dim=1) - 1
        xs = [prefix, suffix]
        for i in range(self.cfg.llm.depth):
            xs, _, _ = self._layer(i, [(self.llm, xs[0], None), (self.expert, xs[1], cond)], positions, mask)
        return self._actions_out(xs[1], cond)


# ----------------------------------------------------------------------------- the Euler loop


def euler_times(steps: int) -> list[Tensor]:
    """t_0 = 1, t_{i+1} = t_i + dt in float32 with dt = -1 / steps, accumulated as openpi's loop does."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    dt = torch.tensor(-1.0 / steps, dtype=torch.float32)
    times, t = [], torch.tensor(1.0, dtype=torch.float32)
    for _ in range(steps):
        times.append(t)
        t = t + dt
    return times


def euler_loop(step: Callable[[Tensor, int], Tensor], x: Tensor, steps: int) -> Tensor:
    """x_{i+1} = step(x_i, i) for i = 0 .. steps - 1: noise at t = 1 in, actions at t = 0 out.

    The one Euler loop of pi-build: the reference model, the engines' denoise loop and the
    calibration of the denoise step all run it, each with its own ``step``.
    """
    for i in range(steps):
        x = step(x, i)
    return x


# ----------------------------------------------------------------------------- random weights


@torch.no_grad()
def init_random_weights(model: PiModel, seed: int = 0) -> PiModel:
    """Deterministic random weights of a plausible scale (speed work and tests; never all zeros).

    Linear weights ~ N(0, 1/fan_in), biases and norm weights ~ N(0, 0.02), embeddings ~ N(0, 1/width).
    """
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2 and "embed" not in name:
            fan_in = p[0].numel()
            std = fan_in**-0.5
        elif "embed" in name:
            std = p.shape[-1] ** -0.5
        else:
            std = 0.02
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return model


def build_model(cfg: Config | str, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu", seed: int | None = 0) -> PiModel:
    """A model of ``cfg``; random weights from ``seed`` (None leaves them uninitialised, for loading)."""
    cfg = get_config(cfg) if isinstance(cfg, str) else cfg
    if seed is None:
        with torch.device("meta"):
            model = PiModel(cfg)
        return model.to_empty(device=device).set_dtype(dtype).eval()
    model = init_random_weights(PiModel(cfg), seed)
    return model.set_dtype(dtype).to(device).eval()
