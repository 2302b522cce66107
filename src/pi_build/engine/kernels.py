"""Triton kernels where the library falls short: the denoise step, where 10-51 tokens make every
GEMM and attention skinny, and the prefix pass's attention.

Why: one denoise step reads the action expert's weights (0.6 GB in bf16) to multiply them with
10-51 token rows. The library GEMMs (cuBLAS) reach about half of the copy bandwidth at that shape,
and attention kernels built for many queries occupy one or two multiprocessors (docs/PERFORMANCE.md).
For the denoise step, two small kernels, each split so that a few hundred programs share the work:

- ``SkinnyLinear`` (``skinny_mm_partials``): y = x W^T + b for M <= 64 rows and a bf16 W. Each
  program multiplies a BLOCK_N slice of W's rows over one K/SPLIT slice and writes float32 partial
  sums [SPLIT, M, N]; the sum over SPLIT (and the bias and whatever follows: residual, gate,
  GELU) is left to plain torch code, where Inductor fuses it into the next elementwise kernel.
- ``few_query_attention``: attention of the step's folded queries (tokens x heads, one KV head)
  over the cached prefix keys followed by the step's own keys, without concatenating them.
  Programs split the keys (flash-decoding): each runs one or a few key blocks with an online
  softmax and writes an unnormalised partial output with its row max and row sum; a second kernel
  merges the splits into the bf16 output. Tiles per batch size: ``few_query_attention_tiles``.

For the prefix pass:

- ``prefix_attention``: its attention (flash attention over the keys its mask
  keeps, the query heads folded into rows that share the one KV head, RoPE applied to the
  queries as they load). cuDNN's kernel under SDPA's key mask took 39 us a layer on an H200 at
  pi0.5's 544 tokens, about 13x its FLOP time (docs/PERFORMANCE.md).

All run as ``torch.library`` custom ops so that torch.export keeps them as single graph nodes,
torch.compile calls them and a CUDA graph captures their launches. On the CPU the ops compute
the same arithmetic in plain torch (engines built there never select these kernels); the tests
run the Triton code itself through Triton's interpreter (TRITON_INTERPRET=1, a fresh process).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor, nn

from pi_build.engine.layers import apply_rope

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the torch paths below still work
    triton = tl = None

# Triton's interpreter runs the kernels on CPU tensors (numpy inside); it must be chosen before
# triton is first imported, so tests run it in a fresh process with TRITON_INTERPRET=1.
INTERPRET = triton is not None and os.environ.get("TRITON_INTERPRET") == "1"


def triton_available(device: torch.device) -> bool:
    """True where the kernels can run: a CUDA device (or the interpreter) and Triton importable;
    PI_BUILD_TRITON=0 turns them off (for A/B measurements)."""
    if triton is None or os.environ.get("PI_BUILD_TRITON", "1") == "0":
        return False
    return device.type == "cuda" or INTERPRET


# ----------------------------------------------------------------------------- split choices


def skinny_split(m: int, n: int, k: int) -> int:
    """How many K slices ``skinny_mm_partials`` uses: enough programs to keep every multiprocessor
    loading weights (K slices of 256), but no more than keeps the float32 partial sums under an
    eighth of the bf16 weight bytes (S*M*N*4 <= N*K*2/8)."""
    limit = min(k // 256, k // (16 * m))
    split = 1
    while split * 2 <= limit and k % (split * 2 * 16) == 0:
        split *= 2
    return split


def skinny_supported(m: int, n: int, k: int) -> bool:
    """Shapes the skinny kernel takes: few rows, N and K in whole 16-blocks (the tensor-core tile)."""
    return m <= 64 and n % 16 == 0 and k % 16 == 0


def _largest_block(size: int, cap: int) -> int:
    """The largest power of two <= cap (and >= 16) that divides size."""
    block = cap
    while size % block:
        block //= 2
    return block


def few_query_attention_tiles(batch: int, rows: int) -> tuple[int, int, int, int, int]:
    """(folded query rows per program, keys per block, key blocks per program, warps, stages) of
    ``few_query_attention`` for ``batch`` robots of ``rows`` folded query rows (tokens x heads).
    A program's key blocks run in turn with an online softmax; its partial output is one split of
    the keys, merged with the other splits by ``_combine_splits``.

    The best of 108 tilings at each measured shape on an H200 (scripts/denoise_experiments.py
    --attention --batch B --sweep; 560 cached keys, 18 layers' caches; us a layer with the merge,
    against the earlier 16 x 64 x 1 for every shape): pi0.5's 80 rows at batch 1 6.7 against 7.9,
    batch 4 10.7 (best 10.6) against 11.9, batch 8 14.8 against 19.7, batch 16 25.1 against 29.0;
    pi0's 408 rows at batch 1 10.1 against 11.3. Shapes in between take the nearest measured one.
    Fewer, longer splits pay off as the batch grows: the partial sums the merge reads shrink.
    """
    if batch == 1:
        return (16, 32, 1, 4, 2) if rows <= 128 else (32, 64, 1, 8, 2)
    return (16, 32, 3, 4, 2) if batch < 16 else (32, 32, 5, 4, 2)


def attention_splits(keys: int, keys_per_split: int) -> int:
    return -(-keys // keys_per_split)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:

    @triton.jit
    def mma(a, b, INTERPRET: tl.constexpr):
        """a [M, K] @ b [K, N], float32 accumulation (the Triton kernels' one product)."""
        if INTERPRET:  # the interpreter's bf16 dot returns garbage; bf16 values are exact in float32
            out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
        else:
            out = tl.dot(a, b)
        return out

    @triton.jit
    def to_bf16(x, INTERPRET: tl.constexpr):
        """float32 -> bf16, rounding to nearest even. The interpreter's cast truncates (checked with
        Triton 3.9), so there the rounding is done on the bits first: the cast is then exact."""
        if INTERPRET:
            bits = x.to(tl.int32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536
            x = bits.to(tl.float32, bitcast=True)
        return x.to(tl.bfloat16)

    @triton.jit
    def _skinny_mm(x_ptr, w_ptr, out_ptr, M, N, stride_xm, stride_wn,
                   K_SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   INTERPRET: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_s = tl.program_id(1)
        rm = tl.arange(0, BLOCK_M)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rk = pid_s * K_SPLIT + tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + rm[:, None] * stride_xm + rk[None, :]
        w_ptrs = w_ptr + rn[:, None] * stride_wn + rk[None, :]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for _ in range(K_SPLIT // BLOCK_K):
            x = tl.load(x_ptrs, mask=rm[:, None] < M, other=0.0)
            w = tl.load(w_ptrs)
            acc += mma(x, tl.trans(w), INTERPRET)
            x_ptrs += BLOCK_K
            w_ptrs += BLOCK_K
        out_ptrs = out_ptr + pid_s * M * N + rm[:, None] * N + rn[None, :]
        tl.store(out_ptrs, acc, mask=rm[:, None] < M)

    @triton.jit
    def _few_query_attn(q_ptr, kc_ptr, vc_ptr, kn_ptr, vn_ptr, mask_ptr, acc_ptr, max_ptr, sum_ptr,
                        B, S_CACHE, T, R, scale,
                        sq_b, sq_t, sq_h, skc_b, skc_s, svc_b, svc_s, skn_b, skn_t, svn_b, svn_t, sm_b, sm_t,
                        HQ: tl.constexpr, D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
                        KEY_BLOCKS: tl.constexpr, INTERPRET: tl.constexpr):
        pid_s = tl.program_id(0)
        pid_r = tl.program_id(1)
        b = tl.program_id(2)
        r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)  # folded query row = token * HQ + head
        t = r // HQ
        h = r % HQ
        row_ok = r < R
        d = tl.arange(0, D)
        q = tl.load(q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h + d[None, :], mask=row_ok[:, None], other=0.0)
        row_max = tl.full((BLOCK_R,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_R,), tl.float32)
        acc = tl.zeros((BLOCK_R, D), tl.float32)
        for i in range(KEY_BLOCKS):  # online softmax over this split's key blocks; with one block the
            # rescale is exp(-inf) = 0 and the sums are exactly one block's
            j = (pid_s * KEY_BLOCKS + i) * BLOCK_S + tl.arange(0, BLOCK_S)  # key index: cache first, then the step's own keys
            in_cache = j < S_CACHE
            in_new = (j >= S_CACHE) & (j < S_CACHE + T)
            jn = j - S_CACHE
            k = tl.load(kc_ptr + b * skc_b + j[:, None] * skc_s + d[None, :], mask=in_cache[:, None], other=0.0) \
                + tl.load(kn_ptr + b * skn_b + jn[:, None] * skn_t + d[None, :], mask=in_new[:, None], other=0.0)
            v = tl.load(vc_ptr + b * svc_b + j[:, None] * svc_s + d[None, :], mask=in_cache[:, None], other=0.0) \
                + tl.load(vn_ptr + b * svn_b + jn[:, None] * svn_t + d[None, :], mask=in_new[:, None], other=0.0)
            s = mma(q, tl.trans(k), INTERPRET)
            allowed = tl.load(mask_ptr + b * sm_b + t[:, None] * sm_t + j[None, :],
                              mask=row_ok[:, None] & (j < S_CACHE + T)[None, :], other=0)
            s = tl.where(allowed != 0, s * scale, float("-inf"))
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no key yet: p = 0
            p = tl.exp(s - base[:, None])
            rescale = tl.exp(row_max - base)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + mma(p.to(v.dtype), v, INTERPRET)
            row_max = new_max
        row = (pid_s * B + b) * R + r
        tl.store(acc_ptr + row[:, None] * D + d[None, :], acc, mask=row_ok[:, None])
        tl.store(max_ptr + row, row_max, mask=row_ok)
        tl.store(sum_ptr + row, row_sum, mask=row_ok)

    @triton.jit
    def _prefix_attn(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, mask_ptr, out_ptr, S, R, qk_scale,
                     sq_b, sq_t, sq_h, sk_b, sk_s, sv_b, sv_s, sc_b, sc_t, ss_b, ss_t, sm_b,
                     HQ: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     INTERPRET: tl.constexpr):
        pid = tl.program_id(0)
        b = tl.program_id(1)
        r = pid * BLOCK_M + tl.arange(0, BLOCK_M)  # folded query row = token * HQ + head
        t = r // HQ
        h = r % HQ
        row_ok = (r < R)[:, None]
        # RoPE (rotate-half) on the query rows as they load: x * cos + (-x_hi, x_lo) * sin, the
        # rotated half read a second time from swapped addresses. float32, rounded once to q's
        # dtype, as Inductor computes the reference's bf16 apply_rope.
        d = tl.arange(0, D)
        swapped = (d + D // 2) % D
        sign = tl.where(d < D // 2, -1.0, 1.0)
        q_rows = q_ptr + b * sq_b + t[:, None] * sq_t + h[:, None] * sq_h
        x = tl.load(q_rows + d[None, :], mask=row_ok, other=0.0).to(tl.float32)
        x_rot = tl.load(q_rows + swapped[None, :], mask=row_ok, other=0.0).to(tl.float32) * sign[None, :]
        cos = tl.load(cos_ptr + b * sc_b + t[:, None] * sc_t + d[None, :], mask=row_ok, other=0.0).to(tl.float32)
        sin = tl.load(sin_ptr + b * ss_b + t[:, None] * ss_t + d[None, :], mask=row_ok, other=0.0).to(tl.float32)
        q = (x * cos + x_rot * sin).to(q_ptr.dtype.element_ty)
        row_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, D), tl.float32)
        for start in range(0, S, BLOCK_N):  # online softmax over key blocks (flash attention)
            j = start + tl.arange(0, BLOCK_N)
            in_range = j < S
            keep = tl.load(mask_ptr + b * sm_b + j, mask=in_range, other=0) != 0
            k = tl.load(k_ptr + b * sk_b + j[:, None] * sk_s + d[None, :], mask=in_range[:, None], other=0.0)
            v = tl.load(v_ptr + b * sv_b + j[:, None] * sv_s + d[None, :], mask=in_range[:, None], other=0.0)
            s = mma(q, tl.trans(k), INTERPRET)
            s = tl.where(keep[None, :], s * qk_scale, float("-inf"))  # qk_scale includes log2(e): exp2 below
            new_max = tl.maximum(row_max, tl.max(s, axis=1))
            base = tl.where(new_max == float("-inf"), 0.0, new_max)  # no key yet: nothing to rescale
            p = tl.math.exp2(s - base[:, None])
            rescale = tl.math.exp2(row_max - base)
            row_sum = row_sum * rescale + tl.sum(p, axis=1)
            acc = acc * rescale[:, None] + mma(p.to(v.dtype), v, INTERPRET)  # probabilities meet V in its dtype, as flash kernels do
            row_max = new_max
        out = acc / tl.where(row_sum == 0.0, 1.0, row_sum)[:, None]  # a batch row with no valid key: zeros
        tl.store(out_ptr + (b * R + r[:, None]) * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=row_ok)

    @triton.jit
    def _combine_splits(acc_ptr, max_ptr, sum_ptr, out_ptr, ROWS, SPLITS,
                        D: tl.constexpr, BLOCK_SPLITS: tl.constexpr):
        row = tl.program_id(0)  # one of B * T * HQ output rows
        s = tl.arange(0, BLOCK_SPLITS)
        ok = s < SPLITS
        row_max = tl.load(max_ptr + s * ROWS + row, mask=ok, other=float("-inf"))
        top = tl.max(row_max, axis=0)
        weight = tl.where(row_max == float("-inf"), 0.0, tl.exp(row_max - top))  # a split with no key: 0
        total = tl.sum(tl.load(sum_ptr + s * ROWS + row, mask=ok, other=0.0) * weight, axis=0)
        d = tl.arange(0, D)
        acc = tl.load(acc_ptr + (s[:, None] * ROWS + row) * D + d[None, :], mask=ok[:, None], other=0.0)
        out = tl.sum(acc * weight[:, None], axis=0) / total
        tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty))


# Block sizes per program. A sweep on an H100 (scripts/denoise_experiments.py --gemms --sweep:
# BLOCK_N 32-128, BLOCK_K 64-256, 4 or 8 warps) put every choice within 3% of the best: at this
# shape a kernel's time is mostly its launch and ramp-up, not its tiling.
SKINNY_BLOCK_N, SKINNY_BLOCK_K, SKINNY_WARPS, SKINNY_STAGES = 64, 128, 4, 3


def _launch_skinny(x: Tensor, weight: Tensor) -> Tensor:
    m, k = x.shape
    n = weight.shape[0]
    split = skinny_split(m, n, k)
    out = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    block_n, block_k = _largest_block(n, SKINNY_BLOCK_N), _largest_block(k // split, SKINNY_BLOCK_K)
    grid = (n // block_n, split)
    _skinny_mm[grid](
        x, weight, out, m, n, x.stride(0), weight.stride(0),
        K_SPLIT=k // split, BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=block_n, BLOCK_K=block_k,
        INTERPRET=INTERPRET,
        **({} if INTERPRET else {"num_warps": SKINNY_WARPS, "num_stages": SKINNY_STAGES}),
    )
    return out


def _launch_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, mask: Tensor,
                      tiles: tuple[int, int, int, int, int] | None = None) -> Tensor:
    b, t, hq, d = q.shape
    s_cache = k_cache.shape[1]
    rows = t * hq
    block_r, block_s, key_blocks, warps, stages = tiles or few_query_attention_tiles(b, rows)
    splits = attention_splits(s_cache + t, block_s * key_blocks)
    acc = torch.empty(splits, b, rows, d, dtype=torch.float32, device=q.device)
    row_max = torch.empty(splits, b, rows, dtype=torch.float32, device=q.device)
    row_sum = torch.empty_like(row_max)
    mask_u8 = mask.view(torch.uint8)
    launch = {} if INTERPRET else {"num_warps": warps, "num_stages": stages}
    _few_query_attn[(splits, -(-rows // block_r), b)](
        q, k_cache, v_cache, k_new, v_new, mask_u8, acc, row_max, row_sum,
        b, s_cache, t, rows, d**-0.5,
        q.stride(0), q.stride(1), q.stride(2), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1), mask_u8.stride(0), mask_u8.stride(1),
        HQ=hq, D=d, BLOCK_R=block_r, BLOCK_S=block_s, KEY_BLOCKS=key_blocks, INTERPRET=INTERPRET, **launch,
    )
    out = torch.empty(b, t, hq * d, dtype=q.dtype, device=q.device)
    _combine_splits[(b * rows,)](acc, row_max, row_sum, out, b * rows, splits, D=d,
                                 BLOCK_SPLITS=triton.next_power_of_2(splits), **({} if INTERPRET else {"num_warps": 4}))
    return out


def prefix_attention_tiles(batch: int) -> tuple[int, int, int, int]:
    """(folded query rows, keys per loop step, warps, pipeline stages) of ``prefix_attention``.

    From scripts/prefix_attention_bench.py's sweep on an H200 (docs/bench/prefix_attention*.json;
    8 heads of 256, 544 tokens): 64 x 32 at 4 warps was the best of 30 tilings at batch 1 with 3
    stages (21.9-23.7 us against cuDNN's 44), and at batch 16 with 2 (166 us, 3 stages 230).
    """
    return (64, 32, 4, 3) if batch == 1 else (64, 32, 4, 2)


def _launch_prefix_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor,
                             tiles: tuple[int, int, int, int] | None = None) -> Tensor:
    b, t, hq, d = q.shape
    rows = t * hq
    block_m, block_n, warps, stages = tiles or prefix_attention_tiles(b)
    out = torch.empty(b, t, hq * d, dtype=q.dtype, device=q.device)
    mask_u8 = key_mask.view(torch.uint8)
    _prefix_attn[(-(-rows // block_m), b)](
        q, k, v, cos, sin, mask_u8, out, k.shape[1], rows, d**-0.5 * 1.4426950408889634,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cos.stride(1), sin.stride(0), sin.stride(1), mask_u8.stride(0),
        HQ=hq, D=d, BLOCK_M=block_m, BLOCK_N=block_n, INTERPRET=INTERPRET,
        **({} if INTERPRET else {"num_warps": warps, "num_stages": stages}),
    )
    return out


# ----------------------------------------------------------------------------- the custom ops


def _use_triton(name: str, device: torch.device) -> bool:
    """Whether an op launches its Triton kernel (CUDA tensors, or the interpreter) or computes in torch."""
    if device.type == "cuda" and triton is None:
        raise RuntimeError(f"{name}: this engine calls pi-build's Triton kernels, but Triton is not installed (pip install triton)")
    return device.type == "cuda" or INTERPRET


def _check_last_dim_contiguous(name: str, *tensors: Tensor) -> None:
    for t in tensors:
        if t.stride(-1) != 1:
            raise ValueError(f"{name}: inputs need a contiguous last dimension, got strides {t.stride()}")


@torch.library.custom_op("pi_build::skinny_mm_partials", mutates_args=())
def skinny_mm_partials(x: Tensor, weight: Tensor) -> Tensor:
    """Partial sums [SPLIT, M, N] (float32) of x [M, K] times weight [N, K]^T (bf16) over SPLIT
    slices of K, SPLIT = ``skinny_split(M, N, K)``."""
    _check_last_dim_contiguous("skinny_mm_partials", x, weight)
    if x.dtype != torch.bfloat16 or weight.dtype != torch.bfloat16:
        raise TypeError(f"skinny_mm_partials takes bf16 x and weight, got {x.dtype} and {weight.dtype}")
    if _use_triton("skinny_mm_partials", x.device):
        return _launch_skinny(x, weight)
    m, k = x.shape
    split = skinny_split(m, weight.shape[0], k)
    slices = [slice(i * k // split, (i + 1) * k // split) for i in range(split)]
    return torch.stack([x[:, s].float() @ weight[:, s].float().T for s in slices])


@skinny_mm_partials.register_fake
def _(x: Tensor, weight: Tensor) -> Tensor:
    m, k = x.shape
    n = weight.shape[0]
    return x.new_empty(skinny_split(m, n, k), m, n, dtype=torch.float32)


@torch.library.custom_op("pi_build::few_query_attention", mutates_args=())
def few_query_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, k_new: Tensor, v_new: Tensor, mask: Tensor) -> Tensor:
    """softmax(q k^T / sqrt(D), masked) v over the keys [cache; new] -> [B, T, HQ * D] in q's dtype.

    q [B, T, HQ, D] (roped); k_cache/v_cache [B, S, D] (the one KV head); k_new/v_new [B, T, D] (the
    step's own, k roped); mask bool [B, T, S + T] (True = attend). Logits and the softmax are
    float32, the probabilities meet V in V's dtype (as ``components.few_query_attention``).
    """
    _check_last_dim_contiguous("few_query_attention", q, k_cache, v_cache, k_new, v_new, mask)
    if _use_triton("few_query_attention", q.device):
        return _launch_attention(q, k_cache, v_cache, k_new, v_new, mask)
    b, t, hq, d = q.shape
    keys = torch.cat([k_cache, k_new], dim=1).float()
    values = torch.cat([v_cache, v_new], dim=1)
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys) * d**-0.5
    probs = logits.masked_fill(~mask[:, :, None, :], float("-inf")).softmax(-1)
    return torch.einsum("bths,bsd->bthd", probs.to(values.dtype).float(), values.float()).reshape(b, t, hq * d).to(q.dtype)


@few_query_attention.register_fake
def _(q, k_cache, v_cache, k_new, v_new, mask):
    b, t, hq, d = q.shape
    return q.new_empty(b, t, hq * d)


def prefix_attention_supported(head_dim: int) -> bool:
    """Head dimensions the kernel takes: powers of two >= 16 (a tensor-core tile)."""
    return head_dim >= 16 and head_dim & (head_dim - 1) == 0


@torch.library.custom_op("pi_build::prefix_attention", mutates_args=())
def prefix_attention(q: Tensor, k: Tensor, v: Tensor, cos: Tensor, sin: Tensor, key_mask: Tensor) -> Tensor:
    """The prefix pass's attention: every query attends to the same keys, those where key_mask is True.

    q [B, T, HQ, D] before RoPE (any strides, e.g. a view of the q/k/v GEMM's output): RoPE with
    cos/sin [B, T, D] is applied as it loads. k (roped) and v [B, S, D]: the one KV head. key_mask
    bool [B, S]. Returns [B, T, HQ * D] in q's dtype; logits and the softmax in float32, the
    probabilities meet V in V's dtype.
    """
    _check_last_dim_contiguous("prefix_attention", q, k, v, cos, sin, key_mask)
    if not prefix_attention_supported(q.shape[-1]):
        raise ValueError(f"prefix_attention: the head dimension must be a power of two >= 16 (a tensor-core tile), got {q.shape[-1]}")
    if _use_triton("prefix_attention", q.device):
        return _launch_prefix_attention(q, k, v, cos, sin, key_mask)
    b, t, hq, d = q.shape
    roped = apply_rope(q.float(), cos.float()[:, :, None], sin.float()[:, :, None]).to(q.dtype)  # float32, rounded once
    logits = torch.einsum("bthd,bsd->bths", roped.float(), k.float()) * d**-0.5
    probs = logits.masked_fill(~key_mask[:, None, None, :], float("-inf")).softmax(-1).nan_to_num(0.0)
    return torch.einsum("bths,bsd->bthd", probs.to(v.dtype).float(), v.float()).reshape(b, t, hq * d).to(q.dtype)


@prefix_attention.register_fake
def _(q, k, v, cos, sin, key_mask):
    b, t, hq, d = q.shape
    return q.new_empty(b, t, hq * d)


# ----------------------------------------------------------------------------- what the model calls


class SkinnyLinear(nn.Module):
    """A bf16 nn.Linear computed by ``skinny_mm_partials`` (few rows); the sum over K slices is torch code."""

    def __init__(self, layer: nn.Linear):
        super().__init__()
        if type(layer) is not nn.Linear or layer.weight.dtype != torch.bfloat16:
            raise TypeError(f"SkinnyLinear takes a bf16 nn.Linear, got a {type(layer).__name__} of {layer.weight.dtype}")
        self.register_buffer("weight", layer.weight.detach())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach())

    def forward(self, x: Tensor) -> Tensor:
        lead, k = x.shape[:-1], x.shape[-1]
        out = skinny_mm_partials(x.reshape(-1, k).contiguous(), self.weight).sum(0)
        if self.bias is not None:
            out = out + self.bias.float()
        return out.to(x.dtype).reshape(*lead, -1)


def use_skinny_linears(module: nn.Module, names: list[str], rows: int) -> list[str]:
    """Replace the named bf16 nn.Linear layers by SkinnyLinear where the shape suits; returns those replaced.

    FP8 layers (fp8.Fp8Linear) keep torch._scaled_mm: measured on an H100, FP8 weights in this
    kernel save little (a step's GEMMs are bound by per-kernel latency more than by bytes) and the
    library's FP8 step was faster (docs/PERFORMANCE.md).
    """
    replaced = []
    for name in names:
        layer = module.get_submodule(name)
        n, k = layer.weight.shape
        if type(layer) is not nn.Linear or layer.weight.dtype != torch.bfloat16 or not skinny_supported(rows, n, k):
            continue
        parent, _, child = name.rpartition(".")
        setattr(module.get_submodule(parent), child, SkinnyLinear(layer))
        replaced.append(name)
    return replaced
