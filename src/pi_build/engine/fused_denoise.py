"""One denoise step of the action expert in five Triton kernels per layer (docs/FUSED-DENOISE.md).

Why: a denoise step multiplies 10-51 token rows with the expert's 0.62 GB of bf16 weights. Read
once at the H200's copy rate that takes ~0.15 ms, but the step as the library and kernels.py
compute it is ~228 kernels of 2-8 us each (0.8 ms): the time goes to launches and to small
reduction kernels between the GEMMs, not to bytes. Here every per-layer stage that moves no
weights rides in the prologue or epilogue of a weight-streaming kernel:

    per layer (x = the float32 residual stream [M, W], M = batch x suffix tokens <= 256)
    1. norm_gemm  (qkv):     RMSNorm + (ada)RMS modulation of x -> x W_qkv^T -> RoPE of q and k -> qkv bf16
    2. attention:            the step's queries over [cached prefix keys; own keys], split over keys;
                             the last program of each row block merges the splits -> attn bf16
    3. residual_gemm (o):    x += gate1 * attn W_o^T; each column tile leaves its rows' sums of squares
    4. norm_gemm  (gate|up): RMSNorm + modulation -> x W_gu^T -> GELU(gate) * up -> hidden bf16
    5. residual_gemm (down): x += gate2 * hidden W_down^T, sums of squares again

- The next norm needs each row's mean square over all W columns, but only the program that
  finishes a column tile holds final values: it writes the tile's per-row sum of squares
  (``sumsq`` [tiles, M]) and the next kernel adds those few numbers up.
- More than 64 rows (batches of robots: pi0.5 at batch 16 is 160) take several row blocks of 64:
  each program loads its weight tile once and runs the blocks one after another on it, so the
  weights are still read once per step. Measured at 160 rows on an H200 this loses to the per-op
  kernels (2.30 against 1.39 ms a step: every kernel ~4x its 10-row time, the blocks' loads and
  MMAs run back to back without pipelining), so builds pick it for up to 16 rows only
  (``build.stages.FUSED_DENOISE_MAX_ROWS``); scripts/fused_denoise_bench.py --batch measures it.
- GEMMs whose output has too few tiles to keep 132 multiprocessors loading split K over several
  programs. Each writes a float32 partial tile; an atomic counter per tile tells the last arrival
  (deterministic: it sums the partials in split order) to apply the epilogue. No extra kernels.
- The RoPE and GELU epilogues need two rows of W in one program: row c of a head with row
  c + D/2 (rotate-half partners), gate row c with up row c. The module stores those weights with
  the partners interleaved (``pair_permutation``), so a tile of 2P consecutive rows holds P pairs.
- Hopper programmatic dependent launch (PDL): each kernel loads what no kernel of the step writes
  (its weight tile, the per-step norm tables, the cached prefix K/V) *before*
  ``gdc_wait()``, and lets the next kernel start right after the wait. So a kernel's weight
  stream overlaps the tail of the previous kernel. Correctness never rests on the early start:
  ``gdc_wait()`` returns only when the previous grid has finished and its writes are visible,
  and every program calls it before reading or writing anything the chain produces.

An experiment, not chosen by builds (``PI_BUILD_PERSISTENT=1`` asks for it): the *persistent*
schedule runs the same work items in one grid for the whole step, with a grid barrier between
stages (``persistent_layers``). On an H200 it gives the same outputs bit for bit and measured
1.3x slower than the five kernels a layer (0.718 against 0.551 ms a step; docs/FUSED-DENOISE.md,
"The persistent step"): one register allocation for every stage, and no launch-time overlap of
weight loads beyond each program's first item.

All kernels of all layers run inside one ``torch.library`` custom op (``pi_build::fused_expert_layers``)
so that torch.export keeps the step as one graph node around which Inductor compiles the small
suffix/output projections, and a CUDA graph captures every launch. On the CPU the op computes
the same arithmetic in plain torch; with TRITON_INTERPRET=1 the Triton code runs on CPU tensors
(tests/test_fused_denoise.py).

Arithmetic contract: the same function as ``components.DenoiseComponent`` in bf16 (bf16 weights
and GEMM operands, float32 accumulation, softmax and norms in float32). Two deliberate
differences, both closer to the float32 reference: the residual stream stays float32 (the library
path rounds it to bf16 after every layer), and RoPE/GELU/the gated residual are applied to the
float32 GEMM results before any rounding. FP8: e4m3 weights with one scale per output row
(weight-only: activations stay bf16; the kernels widen the weight tile to bf16 in registers).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from torch import Tensor, nn

from pi_build.engine.fp8 import quantize_rows
from pi_build.spec import Precision

# Triton is optional (None on CPU-only installs, where the torch path still works); kernels.py holds
# its one import and the interpreter flag (TRITON_INTERPRET=1: the kernels run on CPU tensors).
from pi_build.engine.kernels import INTERPRET, tl, triton
# Programmatic dependent launch (Hopper+); PI_BUILD_PDL=0 turns it off for A/B measurements.
USE_PDL = os.environ.get("PI_BUILD_PDL", "1") != "0"

ROW_BLOCK = 64  # the most token rows one MMA of a GEMM program takes (registers bound it)
MAX_ROWS = 4 * ROW_BLOCK  # batch x suffix tokens: a program runs up to 4 row blocks on its weight tile
EPS = 1e-6  # RMSNorm epsilon (Gemma)


# ----------------------------------------------------------------------------- shapes and tiling


@dataclass(frozen=True)
class ExpertDims:
    """What the kernels need to know about the expert (Gemma-300M: 1024, 8 heads of 256, MLP 4096)."""

    depth: int
    width: int
    heads: int
    head_dim: int
    mlp: int

    @property
    def qkv_rows(self) -> int:  # q heads, then the one k head and the one v head
        return (self.heads + 2) * self.head_dim

    @property
    def attn_width(self) -> int:
        return self.heads * self.head_dim


@dataclass(frozen=True)
class GemmTile:
    rows: int  # weight rows (= output columns) per program
    k_slice: int  # K per program; K // k_slice programs share (split) one output tile


@dataclass(frozen=True)
class Tiling:
    block_m: int  # token rows per MMA (M padded to a power of two >= 16: the tensor-core tile; at most ROW_BLOCK)
    qkv: GemmTile
    o: GemmTile
    gate_up: GemmTile
    down: GemmTile
    attn_keys: int = 64  # keys per attention block
    # key blocks per attention program, taken in turn with an online softmax: fewer key splits for
    # the row block's last program to merge, more serial work per program (a sweep candidate)
    attn_blocks: int = 1
    attn_rows: int = 16  # folded (token, head) query rows per attention program
    gemm_warps: int = 8  # 128-row weight tiles: 8 warps (plan_tiling), measured best
    attn_warps: int = 8
    # Attention loads the step's own keys into the cached K/V tile (a masked load whose other value is
    # that tile) instead of a second tile and a select. Offline sm_90 compile at 8 warps: a 232-byte
    # stack of spills against 600. H200: 0.547 against 0.551 ms a step, inside the sweep's spread, so off.
    attn_lean_kv: bool = False
    # One persistent grid for the whole step (grid barriers between stages) instead of five kernels
    # a layer; prefetch_l2: each stage also asks L2 for the weights two stages ahead (H200: 0.03 ms
    # a step slower with it, so off).
    persistent: bool = False
    prefetch_l2: bool = False


# Per-program work: 128 weight rows x 256 K values (64 KB in bf16) at 8 warps, 64-256 programs per
# GEMM, loaded into registers before gdc_wait. Every program reads its rows' activations, so fewer,
# wider programs read less. H200 sweeps, ms a step: pi0 (51 rows) 1.115 against 1.171 for 64-row
# tiles at 4 warps; pi0.5 (10 rows) 0.561 against 0.571 and, in a second session, 0.5496 against
# 0.5567 (docs/FUSED-DENOISE.md), so 128-row tiles for every row count.
TILE_ROWS = 128
TILE_K = 256


def _pow2_divisor(size: int, cap: int, floor: int, what: str) -> int:
    """The largest power of two <= cap that divides size; refuses below floor."""
    block = cap
    while block >= floor and size % block:
        block //= 2
    if block < floor:
        raise ValueError(f"fused denoise: {what} = {size} has no power-of-two block >= {floor} dividing it")
    return block


def plan_tiling(rows: int, dims: ExpertDims, tile_rows: int | None = None,
                k_slice: int = TILE_K, warps: int | None = None) -> Tiling:
    """Block sizes for ``rows`` token rows. Paired GEMMs (qkv: RoPE partners; gate|up) take tiles of
    2P rows with P dividing the pair group (head_dim / 2, mlp); every dimension in 16-blocks."""
    if rows > MAX_ROWS:
        raise ValueError(f"fused denoise handles at most {MAX_ROWS} suffix rows (batch x tokens), got {rows}")
    block_m = min(ROW_BLOCK, max(16, triton_next_pow2(rows)))
    tile_rows = tile_rows or TILE_ROWS

    def plain(n: int, k: int, name: str) -> GemmTile:
        return GemmTile(_pow2_divisor(n, tile_rows, 16, f"{name} rows"), _pow2_divisor(k, k_slice, 16, f"{name} K"))

    def paired(half: int, k: int, name: str) -> GemmTile:
        pairs = _pow2_divisor(half, tile_rows // 2, 8, f"{name} pair group")
        return GemmTile(2 * pairs, _pow2_divisor(k, k_slice, 16, f"{name} K"))

    return Tiling(
        block_m=block_m,
        qkv=paired(dims.head_dim // 2, dims.width, "qkv"),
        o=plain(dims.width, dims.attn_width, "o"),
        gate_up=paired(dims.mlp, dims.width, "gate_up"),
        down=plain(dims.width, dims.mlp, "down"),
        gemm_warps=warps or 8,
        attn_warps=8,  # the prefetched K/V tile (64 KB) spills at 4 warps (offline sm_90 compile)
    )


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pair_permutation(rows: int, half: int) -> Tensor:
    """Row order that puts rotate-half / gate-up partners next to each other.

    Rows form groups of 2*half (a head of q/k/v: half = head_dim / 2; gate|up: half = mlp, one group);
    pair p = (group g, offset c) joins rows g*2*half + c and g*2*half + half + c. New row 2p + e is old
    row g*2*half + c + e*half. Any tile of 2P rows (P dividing half) then holds P whole pairs of one group.
    """
    pair = torch.arange(rows // 2)
    base = (pair // half) * 2 * half + pair % half
    return torch.stack([base, base + half], dim=1).reshape(-1)


# ----------------------------------------------------------------------------- Triton kernels

if triton is not None:
    from pi_build.engine.kernels import mma, to_bf16  # the shared product and bf16 rounding

    @triton.jit
    def _pdl_wait(USE_PDL: tl.constexpr):
        if USE_PDL:  # returns once the previous grid has finished and its writes are visible
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def _pdl_release(USE_PDL: tl.constexpr):
        if USE_PDL:  # the next grid may start (its own pre-wait loads) while this one runs
            tl.extra.cuda.gdc_launch_dependents()

    @triton.jit
    def _weight_mma(w, a, INTERPRET: tl.constexpr):
        """a [BM, K] @ w [N, K]^T -> [BM, N], computed as (w @ a^T)^T: the weight tile's rows are the
        MMA's M dimension (64 rows: one Hopper wgmma per warpgroup, activations from shared memory).
        The other way round, the 16 token rows would be M and every warp would hold all of them."""
        return tl.trans(mma(w.to(tl.bfloat16), tl.trans(a), INTERPRET))

    @triton.jit
    def _gelu_tanh(x):
        # tanh(u) = 1 - 2 / (1 + exp(2u)): saturates correctly at both ends, float32 throughout
        u = 0.7978845608028654 * (x + 0.044715 * x * x * x)
        return 0.5 * x * (2.0 - 2.0 / (1.0 + tl.exp(2.0 * u)))

    @triton.jit
    def _store_partial(acc, part_ptr, tile, split, rm, M, TILE: tl.constexpr, SPLIT: tl.constexpr):
        """Split-K: this program's float32 partial tile for rows rm."""
        cols = tl.arange(0, TILE)
        tl.store(part_ptr + ((tile * SPLIT + split) * M + rm[:, None]) * TILE + cols[None, :], acc, mask=rm[:, None] < M)

    @triton.jit
    def _arrive(count_ptr, tile, SPLIT: tl.constexpr):
        """Split-K: count this program's arrival once all its partials are stored; True in the last of
        the tile's SPLIT programs (which then owns the epilogue)."""
        tl.debug_barrier()  # every thread's part is stored before the count (acq_rel, gpu scope) publishes it
        arrived = tl.atomic_add(count_ptr + tile, 1)
        return arrived == SPLIT - 1

    @triton.jit
    def _sum_partials(part_ptr, tile, rm, M, BM: tl.constexpr, TILE: tl.constexpr, SPLIT: tl.constexpr):
        """The tile's SPLIT partials summed in split order (the same rounding whichever program is last);
        .cg loads read L2, where the other programs' stores are."""
        cols = tl.arange(0, TILE)
        total = tl.zeros((BM, TILE), dtype=tl.float32)
        for s in tl.static_range(SPLIT):
            total += tl.load(part_ptr + ((tile * SPLIT + s) * M + rm[:, None]) * TILE + cols[None, :],
                             mask=rm[:, None] < M, other=0.0, cache_modifier=".cg")
        return total

    @triton.jit
    def _pair_epilogue(acc, tile, rm, M, cos_ptr, sin_ptr, out_ptr,
                       BM: tl.constexpr, PAIRS: tl.constexpr, HALF: tl.constexpr, ROT_GROUPS: tl.constexpr,
                       OUT_COLS: tl.constexpr, GELU: tl.constexpr, INTERPRET: tl.constexpr):
        """acc [BM, 2*PAIRS] holds (lo, hi) partner columns interleaved (``pair_permutation``)."""
        lo, hi = tl.split(tl.reshape(acc, (BM, PAIRS, 2)))
        first = tile * PAIRS  # the tile's first pair; a tile never straddles two groups
        c = first % HALF + tl.arange(0, PAIRS)
        ok = rm[:, None] < M
        if GELU:  # hidden = gelu_tanh(gate) * up, in float32 before the one rounding to bf16
            out = _gelu_tanh(lo) * hi
            tl.store(out_ptr + rm[:, None] * OUT_COLS + (first + tl.arange(0, PAIRS))[None, :], to_bf16(out, INTERPRET), mask=ok)
        else:  # RoPE (rotate-half) on the q heads and the k head; the v head (last group) passes
            group = first // HALF
            cos = tl.load(cos_ptr + rm[:, None] * HALF + c[None, :], mask=ok, other=1.0)
            sin = tl.load(sin_ptr + rm[:, None] * HALF + c[None, :], mask=ok, other=0.0)
            rotate = group < ROT_GROUPS
            cos = tl.where(rotate, cos, 1.0)
            sin = tl.where(rotate, sin, 0.0)
            col = group * 2 * HALF + c
            tl.store(out_ptr + rm[:, None] * OUT_COLS + col[None, :], to_bf16(lo * cos - hi * sin, INTERPRET), mask=ok)
            tl.store(out_ptr + rm[:, None] * OUT_COLS + (col + HALF)[None, :], to_bf16(hi * cos + lo * sin, INTERPRET), mask=ok)

    @triton.jit
    def _wait_inputs(SYNC: tl.constexpr, USE_PDL: tl.constexpr, bar_ptr, target, do_wait):
        """Block until what the chain produced before this work is ready and visible.

        SYNC = 0 (one kernel per stage): PDL's wait for the previous grid, then let the next grid start.
        SYNC = 1 (the persistent kernel): the previous phase's barrier (its own counter: a program with
        no work in a phase arrives at once, so one counter for all phases would mix phases) holds
        ``target`` arrivals. Only a program's first work item of a phase waits (do_wait); later items
        start after it anyway.
        """
        if SYNC:
            if do_wait:
                while tl.atomic_add(bar_ptr, 0, sem="acquire", scope="gpu") < target:
                    pass
                tl.debug_barrier()
        else:
            _pdl_wait(USE_PDL)
            _pdl_release(USE_PDL)

    @triton.jit
    def _grid_arrive(bar_ptr):
        """The persistent kernel: this program has finished a phase. The CTA barrier orders every
        thread's stores before the release (the same pattern as a split-K arrival)."""
        tl.debug_barrier()
        tl.atomic_add(bar_ptr, 1, sem="release", scope="gpu")

    @triton.jit
    def _norm_gemm_item(
        x_ptr, sumsq_ptr, n_sumsq, table_ptr, step_ptr, w_ptr, wscale_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, count_ptr,
        M, layer, stride_step, eps, tile, split, bar_ptr, bar_target, do_wait,
        K: tl.constexpr, N_SUMSQ_P2: tl.constexpr, HALF: tl.constexpr, ROT_GROUPS: tl.constexpr, OUT_COLS: tl.constexpr,
        BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr,
        GELU: tl.constexpr, FP8: tl.constexpr, SYNC: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """out = epilogue(norm(x) @ W^T) for the qkv (RoPE) and gate|up (GELU x up) projections.

        Work item (tile, split): weight rows [tile*2P, +2P) (P pairs) x K columns [split*KS, +KS), for
        every row block of BM token rows in turn.
        norm(x) = x * rsqrt(mean(x^2) + eps) * mult + shift, mult/shift from the layer's norm table
        at this step (pi0.5 adaRMS: 1 + scale, shift; pi0: 1 + weight, 0), rounded to bf16.
        Reads of what the chain writes go through L2 (.cg): in the persistent kernel another
        multiprocessor wrote them, and this one's L1 may hold an older copy.
        """
        rows = tile * 2 * PAIRS + tl.arange(0, 2 * PAIRS)
        k = split * KS + tl.arange(0, KS)
        # before the wait: only what no kernel of the step writes
        w = tl.load(w_ptr + rows[:, None] * K + k[None, :])
        table = table_ptr + tl.load(step_ptr) * stride_step + layer * 3 * K
        mult = tl.load(table + k)
        shift = tl.load(table + K + k)
        if FP8:
            wscale = tl.load(wscale_ptr + rows)
        _wait_inputs(SYNC, USE_PDL, bar_ptr, bar_target, do_wait)
        t = tl.arange(0, N_SUMSQ_P2)
        for rb in range(ROW_BLOCKS):
            rm = rb * BM + tl.arange(0, BM)
            row_ok = rm < M
            # each row's mean square from the per-tile sums of squares that the residual's writer left
            parts = tl.load(sumsq_ptr + t[:, None] * M + rm[None, :], mask=(t[:, None] < n_sumsq) & row_ok[None, :], other=0.0,
                            cache_modifier=".cg")
            rstd = tl.rsqrt(tl.sum(parts, axis=0) / K + eps)
            x = tl.load(x_ptr + rm[:, None] * K + k[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
            h = to_bf16(x * rstd[:, None] * mult[None, :] + shift[None, :], INTERPRET)
            acc = _weight_mma(w, h, INTERPRET)
            if FP8:
                acc = acc * wscale[None, :]
            if SPLIT == 1:
                _pair_epilogue(acc, tile, rm, M, cos_ptr, sin_ptr, out_ptr, BM, PAIRS, HALF, ROT_GROUPS, OUT_COLS, GELU, INTERPRET)
            else:
                _store_partial(acc, part_ptr, tile, split, rm, M, 2 * PAIRS, SPLIT)
        if SPLIT > 1:
            if _arrive(count_ptr, tile, SPLIT):
                for rb in range(ROW_BLOCKS):
                    rm = rb * BM + tl.arange(0, BM)
                    total = _sum_partials(part_ptr, tile, rm, M, BM, 2 * PAIRS, SPLIT)
                    _pair_epilogue(total, tile, rm, M, cos_ptr, sin_ptr, out_ptr, BM, PAIRS, HALF, ROT_GROUPS, OUT_COLS, GELU, INTERPRET)

    @triton.jit
    def _norm_gemm_kernel(
        x_ptr, sumsq_ptr, table_ptr, step_ptr, w_ptr, wscale_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr, count_ptr,
        M, layer, stride_step, eps,
        K: tl.constexpr, N_SUMSQ: tl.constexpr, N_SUMSQ_P2: tl.constexpr, HALF: tl.constexpr,
        ROT_GROUPS: tl.constexpr, OUT_COLS: tl.constexpr,
        BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, PAIRS: tl.constexpr, KS: tl.constexpr, SPLIT: tl.constexpr,
        GELU: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One work item per program: grid (tiles, splits)."""
        _norm_gemm_item(x_ptr, sumsq_ptr, N_SUMSQ, table_ptr, step_ptr, w_ptr, wscale_ptr, cos_ptr, sin_ptr, out_ptr, part_ptr,
                        count_ptr, M, layer, stride_step, eps, tl.program_id(0), tl.program_id(1), count_ptr, 0, False,
                        K, N_SUMSQ_P2, HALF, ROT_GROUPS, OUT_COLS, BM, ROW_BLOCKS, PAIRS, KS, SPLIT, GELU, FP8, 0, USE_PDL, INTERPRET)

    @triton.jit
    def _residual_epilogue(y, tile, rm, M, gate, x_in_ptr, x_out_ptr, sumsq_ptr, N: tl.constexpr, BN: tl.constexpr):
        """x_out = x_in + gate * y on the tile's columns; the tile's per-row sum of squares for the next norm."""
        n = tile * BN + tl.arange(0, BN)
        ok = rm[:, None] < M
        x = tl.load(x_in_ptr + rm[:, None] * N + n[None, :], mask=ok, other=0.0, cache_modifier=".cg") + y * gate[None, :]
        tl.store(x_out_ptr + rm[:, None] * N + n[None, :], x, mask=ok)
        tl.store(sumsq_ptr + tile * M + rm, tl.sum(x * x, axis=1), mask=rm < M)

    @triton.jit
    def _residual_gemm_item(
        a_ptr, w_ptr, wscale_ptr, table_ptr, step_ptr, x_in_ptr, x_out_ptr, sumsq_ptr, part_ptr, count_ptr,
        M, layer, stride_step, tile, split, bar_ptr, bar_target, do_wait,
        N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr,
        SPLIT: tl.constexpr, FP8: tl.constexpr, SYNC: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """x += gate * (a @ W^T) for the o and down projections (a: bf16 [M, K]); gate from the layer's
        norm table at this step (pi0: ones). Work item (tile, split) as in ``_norm_gemm_item``."""
        n = tile * BN + tl.arange(0, BN)
        k = split * KS + tl.arange(0, KS)
        w = tl.load(w_ptr + n[:, None] * K + k[None, :])
        gate = tl.load(table_ptr + tl.load(step_ptr) * stride_step + layer * 3 * N + 2 * N + n)
        if FP8:
            wscale = tl.load(wscale_ptr + n)
        _wait_inputs(SYNC, USE_PDL, bar_ptr, bar_target, do_wait)
        for rb in range(ROW_BLOCKS):
            rm = rb * BM + tl.arange(0, BM)
            a = tl.load(a_ptr + rm[:, None] * K + k[None, :], mask=rm[:, None] < M, other=0.0, cache_modifier=".cg")
            acc = _weight_mma(w, a, INTERPRET)
            if FP8:
                acc = acc * wscale[None, :]
            if SPLIT == 1:
                _residual_epilogue(acc, tile, rm, M, gate, x_in_ptr, x_out_ptr, sumsq_ptr, N, BN)
            else:
                _store_partial(acc, part_ptr, tile, split, rm, M, BN, SPLIT)
        if SPLIT > 1:
            if _arrive(count_ptr, tile, SPLIT):
                for rb in range(ROW_BLOCKS):
                    rm = rb * BM + tl.arange(0, BM)
                    total = _sum_partials(part_ptr, tile, rm, M, BM, BN, SPLIT)
                    _residual_epilogue(total, tile, rm, M, gate, x_in_ptr, x_out_ptr, sumsq_ptr, N, BN)

    @triton.jit
    def _residual_gemm_kernel(
        a_ptr, w_ptr, wscale_ptr, table_ptr, step_ptr, x_in_ptr, x_out_ptr, sumsq_ptr, part_ptr, count_ptr,
        M, layer, stride_step,
        N: tl.constexpr, K: tl.constexpr, BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, BN: tl.constexpr, KS: tl.constexpr,
        SPLIT: tl.constexpr, FP8: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One work item per program: grid (tiles, splits)."""
        _residual_gemm_item(a_ptr, w_ptr, wscale_ptr, table_ptr, step_ptr, x_in_ptr, x_out_ptr, sumsq_ptr, part_ptr, count_ptr,
                            M, layer, stride_step, tl.program_id(0), tl.program_id(1), count_ptr, 0, False,
                            N, K, BM, ROW_BLOCKS, BN, KS, SPLIT, FP8, 0, USE_PDL, INTERPRET)

    @triton.jit
    def _merge_splits(acc_ptr, max_ptr, sum_ptr, out_ptr, first_slot, tok, h, row_ok,
                      HQ: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                      INTERPRET: tl.constexpr):
        """softmax merge of the SPLITS partial results of one row block (flash-decoding's second pass)."""
        i = tl.arange(0, BR)
        s = tl.arange(0, SPLITS_P2)
        d = tl.arange(0, D)
        slot_rows = (first_slot + s)[:, None] * BR + i[None, :]
        in_range = (s < SPLITS)[:, None]
        m = tl.load(max_ptr + slot_rows, mask=in_range, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(sum_ptr + slot_rows, mask=in_range, other=0.0, cache_modifier=".cg")
        top = tl.max(m, axis=0)
        top = tl.where(top == float("-inf"), 0.0, top)
        total = tl.sum(l * tl.where(m == float("-inf"), 0.0, tl.exp(m - top[None, :])), axis=0)
        out = tl.zeros((BR, D), dtype=tl.float32)
        for j in tl.static_range(SPLITS):
            m_j = tl.load(max_ptr + (first_slot + j) * BR + i, cache_modifier=".cg")
            weight = tl.where(m_j == float("-inf"), 0.0, tl.exp(m_j - top))  # a split with no key for the row: 0
            out += tl.load(acc_ptr + ((first_slot + j) * BR + i[:, None]) * D + d[None, :], cache_modifier=".cg") * weight[:, None]
        out = out / tl.where(total > 0, total, 1.0)[:, None]
        tl.store(out_ptr + tok[:, None] * (HQ * D) + h[:, None] * D + d[None, :], to_bf16(out, INTERPRET), mask=row_ok[:, None])

    @triton.jit
    def _cached_block(kc_ptr, vc_ptr, pmask_ptr, j, b, S, skc_b, skc_s, svc_b, svc_s, spm_b, D: tl.constexpr):
        """Cached keys, values and prefix-mask flags of key block j (zeros and False past the cache)."""
        d = tl.arange(0, D)
        in_cache = j < S
        kc = tl.load(kc_ptr + b * skc_b + j[:, None] * skc_s + d[None, :], mask=in_cache[:, None], other=0.0)
        vc = tl.load(vc_ptr + b * svc_b + j[:, None] * svc_s + d[None, :], mask=in_cache[:, None], other=0.0)
        key_ok = tl.load(pmask_ptr + b * spm_b + j, mask=in_cache, other=0) != 0
        return kc, vc, key_ok

    @triton.jit
    def _attention_block(qkv_ptr, cum_ptr, q, cum_q, row_ok, kc, vc, key_ok, j, row_max, row_sum, acc, S, T, scale, b,
                         HQ: tl.constexpr, D: tl.constexpr, LEAN_KV: tl.constexpr, INTERPRET: tl.constexpr):
        """One block of keys j (cached ones: kc, vc, key_ok loaded) folded into the running row max, row
        sum and unnormalised output (online softmax). The step's own keys come from qkv."""
        d = tl.arange(0, D)
        NQKV = (HQ + 2) * D
        in_cache = j < S
        in_new = (j >= S) & (j < S + T)
        jn = j - S
        new_tok = b * T + jn
        if LEAN_KV:
            k = tl.load(qkv_ptr + new_tok[:, None] * NQKV + HQ * D + d[None, :], mask=in_new[:, None], other=kc, cache_modifier=".cg")
            v = tl.load(qkv_ptr + new_tok[:, None] * NQKV + (HQ + 1) * D + d[None, :], mask=in_new[:, None], other=vc, cache_modifier=".cg")
        else:
            kn = tl.load(qkv_ptr + new_tok[:, None] * NQKV + HQ * D + d[None, :], mask=in_new[:, None], other=0.0, cache_modifier=".cg")
            vn = tl.load(qkv_ptr + new_tok[:, None] * NQKV + (HQ + 1) * D + d[None, :], mask=in_new[:, None], other=0.0, cache_modifier=".cg")
            k = tl.where(in_cache[:, None], kc, kn)
            v = tl.where(in_cache[:, None], vc, vn)
        logits = mma(q, tl.trans(k), INTERPRET) * scale
        cum_k = tl.load(cum_ptr + jn, mask=in_new, other=0)
        allowed = (key_ok[None, :] | (in_new[None, :] & (cum_k[None, :] <= cum_q[:, None]))) & row_ok[:, None]
        logits = tl.where(allowed, logits, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(logits, axis=1))
        base = tl.where(new_max == float("-inf"), 0.0, new_max)  # a row with no key yet: p = 0
        p = tl.exp(logits - base[:, None])
        rescale = tl.exp(row_max - base)  # 0 for the first block: the sums start from its own
        row_sum = row_sum * rescale + tl.sum(p, axis=1)
        # probabilities meet V in bf16, as the library path
        acc = acc * rescale[:, None] + mma(to_bf16(p, INTERPRET), v, INTERPRET)
        return new_max, row_sum, acc

    @triton.jit
    def _attention_item(
        qkv_ptr, kc_ptr, vc_ptr, pmask_ptr, cum_ptr, acc_ptr, max_ptr, sum_ptr, count_ptr, out_ptr,
        S, T, scale, skc_b, skc_s, svc_b, svc_s, spm_b, split, rb, b, bar_ptr, bar_target, do_wait,
        HQ: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, KB: tl.constexpr, ROW_BLOCKS: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, LEAN_KV: tl.constexpr, SYNC: tl.constexpr, USE_PDL: tl.constexpr,
        INTERPRET: tl.constexpr,
    ):
        """Attention of the step's folded query rows (token, head) over [S cached keys; T own keys].

        Work item (split, row block, batch): KB blocks of BS keys x BR rows, the blocks taken in turn with
        an online softmax (``_attention_block``). The cached keys/values are constant over the step, so
        the first block's cached keys and values load before the wait. Query t sees cached key j if prefix_mask[j], own key u
        if cum[u] <= cum[t] (cum = cumsum of the suffix's AR flags). Each item stores an unnormalised
        partial output with its row max and row sum; the row block's last item merges them.
        LEAN_KV: the own keys load into the cached tile (a masked load whose other value is that tile)
        instead of a second tile and a select, so one K and one V tile are live, not two of each.
        In the persistent kernel (SYNC) the K/V tile loads after the barrier: held across the wait it
        spilled (offline sm_90 compile at 8 warps: a 576-byte stack against 160).
        """
        d = tl.arange(0, D)
        j = split * (KB * BS) + tl.arange(0, BS)
        if SYNC:
            _wait_inputs(SYNC, USE_PDL, bar_ptr, bar_target, do_wait)
        kc, vc, key_ok = _cached_block(kc_ptr, vc_ptr, pmask_ptr, j, b, S, skc_b, skc_s, svc_b, svc_s, spm_b, D)
        if not SYNC:
            _wait_inputs(SYNC, USE_PDL, bar_ptr, bar_target, do_wait)
        NQKV = (HQ + 2) * D
        r = rb * BR + tl.arange(0, BR)  # folded row = token * HQ + head
        t = r // HQ
        h = r % HQ
        row_ok = r < T * HQ
        tok = b * T + t
        q = tl.load(qkv_ptr + tok[:, None] * NQKV + h[:, None] * D + d[None, :], mask=row_ok[:, None], other=0.0, cache_modifier=".cg")
        cum_q = tl.load(cum_ptr + t, mask=row_ok, other=0)
        row_max = tl.full((BR,), float("-inf"), tl.float32)
        row_sum = tl.zeros((BR,), tl.float32)
        acc = tl.zeros((BR, D), tl.float32)
        row_max, row_sum, acc = _attention_block(qkv_ptr, cum_ptr, q, cum_q, row_ok, kc, vc, key_ok, j, row_max, row_sum, acc,
                                                 S, T, scale, b, HQ, D, LEAN_KV, INTERPRET)
        # The item's other key blocks, unrolled: offline sm_90 compiles of a dynamic loop (Triton 3.9)
        # came out at 32 registers and 3 KB of spills.
        for blk in tl.static_range(1, KB):
            j = split * (KB * BS) + blk * BS + tl.arange(0, BS)
            kc, vc, key_ok = _cached_block(kc_ptr, vc_ptr, pmask_ptr, j, b, S, skc_b, skc_s, svc_b, svc_s, spm_b, D)
            row_max, row_sum, acc = _attention_block(qkv_ptr, cum_ptr, q, cum_q, row_ok, kc, vc, key_ok, j, row_max, row_sum, acc,
                                                     S, T, scale, b, HQ, D, LEAN_KV, INTERPRET)
        first_slot = (b * ROW_BLOCKS + rb) * SPLITS
        i = tl.arange(0, BR)
        tl.store(acc_ptr + ((first_slot + split) * BR + i[:, None]) * D + d[None, :], acc)
        tl.store(max_ptr + (first_slot + split) * BR + i, row_max)
        tl.store(sum_ptr + (first_slot + split) * BR + i, row_sum)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + b * ROW_BLOCKS + rb, 1)
        if arrived == SPLITS - 1:
            _merge_splits(acc_ptr, max_ptr, sum_ptr, out_ptr, first_slot, tok, h, row_ok, HQ, D, BR, SPLITS, SPLITS_P2, INTERPRET)

    @triton.jit
    def _attention_kernel(
        qkv_ptr, kc_ptr, vc_ptr, pmask_ptr, cum_ptr, acc_ptr, max_ptr, sum_ptr, count_ptr, out_ptr,
        S, T, scale, skc_b, skc_s, svc_b, svc_s, spm_b,
        HQ: tl.constexpr, D: tl.constexpr, BR: tl.constexpr, BS: tl.constexpr, KB: tl.constexpr, ROW_BLOCKS: tl.constexpr,
        SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr, LEAN_KV: tl.constexpr, USE_PDL: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """One work item per program: grid (key splits, row blocks, batch)."""
        _attention_item(qkv_ptr, kc_ptr, vc_ptr, pmask_ptr, cum_ptr, acc_ptr, max_ptr, sum_ptr, count_ptr, out_ptr,
                        S, T, scale, skc_b, skc_s, svc_b, svc_s, spm_b, tl.program_id(0), tl.program_id(1), tl.program_id(2),
                        count_ptr, 0, False, HQ, D, BR, BS, KB, ROW_BLOCKS, SPLITS, SPLITS_P2, LEAN_KV, 0, USE_PDL, INTERPRET)

    @triton.jit
    def _prefetch_l2(base_ptr, n_bytes, pid, nprog, PREFETCH: tl.constexpr):
        """Ask L2 for this program's share of the n_bytes at base_ptr (one `prefetch.global.L2` per
        128-byte line), so that a later phase's weight loads find them there. Nothing waits for it."""
        if PREFETCH:
            lines = tl.cdiv(n_bytes, 128)
            share = tl.cdiv(lines, nprog)
            base = base_ptr.to(tl.pointer_type(tl.int8))
            for first in range(pid * share, tl.minimum(lines, (pid + 1) * share), 512):
                line = first + tl.arange(0, 512)
                tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [base + line.to(tl.int64) * 128],
                                          dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _persistent_layers_kernel(
        x_ptr, x_sumsq_ptr, resid_ptr, sumsq_ptr, step_ptr, kc_ptr, vc_ptr, pmask_ptr, cum_ptr, cos_ptr, sin_ptr,
        norm1_ptr, norm2_ptr, wqkv_ptr, wo_ptr, wgu_ptr, wdown_ptr, sqkv_ptr, so_ptr, sgu_ptr, sdown_ptr,
        qkv_ptr, attn_ptr, hidden_ptr, part_ptr, att_acc_ptr, att_max_ptr, att_sum_ptr, count_ptr, bar_ptr,
        M, S, T, depth, first_phase, last_phase, stride_step1, stride_step2, eps, scale,
        skc_l, skc_b, skc_s, svc_l, svc_b, svc_s, spm_b,
        B: tl.constexpr, W: tl.constexpr, HQ: tl.constexpr, D: tl.constexpr, MLP: tl.constexpr, MAX_TILES: tl.constexpr,
        BM: tl.constexpr, ROW_BLOCKS: tl.constexpr, N_SUMSQ_P2: tl.constexpr,
        QKV_PAIRS: tl.constexpr, QKV_KS: tl.constexpr, QKV_SPLIT: tl.constexpr,
        O_BN: tl.constexpr, O_KS: tl.constexpr, O_SPLIT: tl.constexpr,
        GU_PAIRS: tl.constexpr, GU_KS: tl.constexpr, GU_SPLIT: tl.constexpr,
        DOWN_BN: tl.constexpr, DOWN_KS: tl.constexpr, DOWN_SPLIT: tl.constexpr,
        BR: tl.constexpr, BS: tl.constexpr, ATT_KB: tl.constexpr, ATT_ROW_BLOCKS: tl.constexpr, ATT_SPLITS: tl.constexpr, ATT_SPLITS_P2: tl.constexpr,
        LEAN_KV: tl.constexpr, FP8: tl.constexpr, PREFETCH: tl.constexpr, INTERPRET: tl.constexpr,
    ):
        """Phases first_phase..last_phase of the step (phase = layer * 5 + stage) in one persistent grid.

        Each program takes the work items of a phase in turn (item = pid, pid + nprog, ...), the same
        items as the five kernels' programs, and arrives at a grid barrier when it is done. Its first
        item of the next phase loads its weight tile *before* waiting at the barrier, so the weight
        stream of one phase overlaps the end of the previous one without any launch. With PREFETCH, a
        phase also asks L2 for the weights two stages ahead. Every program must be resident at once
        (the host launches at most one program per multiprocessor); the interpreter, which runs
        programs one after another, gets one launch per phase instead.
        """
        pid = tl.program_id(0)
        nprog = tl.num_programs(0)
        QKV_N = (HQ + 2) * D
        if PREFETCH and first_phase == 0:
            _prefetch_l2(wqkv_ptr, QKV_N * W * (1 if FP8 else 2), pid, nprog, PREFETCH)
            _prefetch_l2(wo_ptr, W * HQ * D * (1 if FP8 else 2), pid, nprog, PREFETCH)
        for ph in range(first_phase, last_phase + 1):
            layer = ph // 5
            stage = ph % 5
            counts = count_ptr + ph * MAX_TILES
            # the previous phase's barrier: every program arrives there once. A program with no work
            # in a phase arrives at once, so each phase has its own counter; and a phase's barrier
            # implies the earlier ones, since its workers waited for those
            prev_bar = bar_ptr + ph - 1
            target = nprog
            later = ph > first_phase
            if layer == 0:  # the first layer reads the step's input rows, later ones the residual stream
                x_in = x_ptr
                ss_in = x_sumsq_ptr
                n_ss = 1
            else:
                x_in = resid_ptr
                ss_in = sumsq_ptr
                n_ss = W // DOWN_BN
            ebytes = 1 if FP8 else 2
            if stage == 0:
                _prefetch_l2(wgu_ptr + layer * 2 * MLP * W, 2 * MLP * W * ebytes, pid, nprog, PREFETCH)
                for item in range(pid, (QKV_N // (2 * QKV_PAIRS)) * QKV_SPLIT, nprog):
                    _norm_gemm_item(x_in, ss_in, n_ss, norm1_ptr, step_ptr, wqkv_ptr + layer * QKV_N * W, sqkv_ptr + layer * QKV_N,
                                    cos_ptr, sin_ptr, qkv_ptr, part_ptr, counts, M, layer, stride_step1, eps,
                                    item // QKV_SPLIT, item % QKV_SPLIT, prev_bar, target, later & (item == pid),
                                    W, N_SUMSQ_P2, D // 2, HQ + 1, QKV_N, BM, ROW_BLOCKS, QKV_PAIRS, QKV_KS, QKV_SPLIT,
                                    False, FP8, 1, False, INTERPRET)
            elif stage == 1:
                _prefetch_l2(wdown_ptr + layer * W * MLP, W * MLP * ebytes, pid, nprog, PREFETCH)
                for item in range(pid, ATT_SPLITS * ATT_ROW_BLOCKS * B, nprog):
                    split = item % ATT_SPLITS
                    rb = (item // ATT_SPLITS) % ATT_ROW_BLOCKS
                    _attention_item(qkv_ptr, kc_ptr + layer * skc_l, vc_ptr + layer * svc_l, pmask_ptr, cum_ptr,
                                    att_acc_ptr, att_max_ptr, att_sum_ptr, counts, attn_ptr,
                                    S, T, scale, skc_b, skc_s, svc_b, svc_s, spm_b, split, rb, item // (ATT_SPLITS * ATT_ROW_BLOCKS),
                                    prev_bar, target, later & (item == pid),
                                    HQ, D, BR, BS, ATT_KB, ATT_ROW_BLOCKS, ATT_SPLITS, ATT_SPLITS_P2, LEAN_KV, 1, False, INTERPRET)
            elif stage == 2:
                if layer + 1 < depth:
                    _prefetch_l2(wqkv_ptr + (layer + 1) * QKV_N * W, QKV_N * W * ebytes, pid, nprog, PREFETCH)
                for item in range(pid, (W // O_BN) * O_SPLIT, nprog):
                    _residual_gemm_item(attn_ptr, wo_ptr + layer * W * HQ * D, so_ptr + layer * W, norm1_ptr, step_ptr,
                                        x_in, resid_ptr, sumsq_ptr, part_ptr, counts, M, layer, stride_step1,
                                        item // O_SPLIT, item % O_SPLIT, prev_bar, target, later & (item == pid),
                                        W, HQ * D, BM, ROW_BLOCKS, O_BN, O_KS, O_SPLIT, FP8, 1, False, INTERPRET)
            elif stage == 3:
                if layer + 1 < depth:
                    _prefetch_l2(wo_ptr + (layer + 1) * W * HQ * D, W * HQ * D * ebytes, pid, nprog, PREFETCH)
                for item in range(pid, (2 * MLP // (2 * GU_PAIRS)) * GU_SPLIT, nprog):
                    _norm_gemm_item(resid_ptr, sumsq_ptr, W // O_BN, norm2_ptr, step_ptr, wgu_ptr + layer * 2 * MLP * W,
                                    sgu_ptr + layer * 2 * MLP, cos_ptr, sin_ptr, hidden_ptr, part_ptr, counts, M, layer, stride_step2, eps,
                                    item // GU_SPLIT, item % GU_SPLIT, prev_bar, target, later & (item == pid),
                                    W, N_SUMSQ_P2, MLP, 0, MLP, BM, ROW_BLOCKS, GU_PAIRS, GU_KS, GU_SPLIT,
                                    True, FP8, 1, False, INTERPRET)
            else:
                for item in range(pid, (W // DOWN_BN) * DOWN_SPLIT, nprog):
                    _residual_gemm_item(hidden_ptr, wdown_ptr + layer * W * MLP, sdown_ptr + layer * W, norm2_ptr, step_ptr,
                                        resid_ptr, resid_ptr, sumsq_ptr, part_ptr, counts, M, layer, stride_step2,
                                        item // DOWN_SPLIT, item % DOWN_SPLIT, prev_bar, target, later & (item == pid),
                                        W, MLP, BM, ROW_BLOCKS, DOWN_BN, DOWN_KS, DOWN_SPLIT, FP8, 1, False, INTERPRET)
            if ph < last_phase:
                _grid_arrive(bar_ptr + ph)


# ----------------------------------------------------------------------------- launches


def _step_stride(table: Tensor) -> int:
    """Stride of a norm table's step axis; 0 for a table with one row for every step (pi0)."""
    return table.stride(0) if table.shape[0] > 1 else 0


def _options(warps: int) -> dict:
    if INTERPRET:
        return {}
    return {"num_warps": warps, "num_stages": 1, "launch_pdl": USE_PDL}


def launch_norm_gemm(x: Tensor, sumsq: Tensor, table: Tensor, step: Tensor, layer: int, weight: Tensor,
                     wscale: Tensor | None, cos: Tensor, sin: Tensor, out: Tensor, parts: Tensor, counters: Tensor,
                     tile: GemmTile, block_m: int, warps: int, half: int, rot_groups: int, gelu: bool) -> None:
    """Kernel 1 / 4 of a layer: ``out`` (bf16) = RoPE or GELU-x-up epilogue of norm(x) @ weight^T."""
    m, k = x.shape
    n = weight.shape[0]
    split = k // tile.k_slice
    grid = (n // tile.rows, split)
    _norm_gemm_kernel[grid](
        x, sumsq, table, step, weight, weight if wscale is None else wscale, cos, sin, out, parts, counters,
        m, layer, _step_stride(table), EPS,
        K=k, N_SUMSQ=sumsq.shape[0], N_SUMSQ_P2=triton_next_pow2(sumsq.shape[0]), HALF=half, ROT_GROUPS=rot_groups,
        OUT_COLS=out.shape[1], BM=block_m, ROW_BLOCKS=-(-m // block_m), PAIRS=tile.rows // 2, KS=tile.k_slice, SPLIT=split,
        GELU=gelu, FP8=wscale is not None, USE_PDL=USE_PDL and not INTERPRET, INTERPRET=INTERPRET, **_options(warps),
    )


def launch_residual_gemm(a: Tensor, weight: Tensor, wscale: Tensor | None, table: Tensor, step: Tensor, layer: int,
                         x_in: Tensor, x_out: Tensor, sumsq: Tensor, parts: Tensor, counters: Tensor,
                         tile: GemmTile, block_m: int, warps: int) -> None:
    """Kernel 3 / 5 of a layer: x_out = x_in + gate * (a @ weight^T); sumsq[tile, row] for the next norm."""
    m, k = a.shape
    n = weight.shape[0]
    split = k // tile.k_slice
    _residual_gemm_kernel[(n // tile.rows, split)](
        a, weight, weight if wscale is None else wscale, table, step, x_in, x_out, sumsq, parts, counters,
        m, layer, _step_stride(table),
        N=n, K=k, BM=block_m, ROW_BLOCKS=-(-m // block_m), BN=tile.rows, KS=tile.k_slice, SPLIT=split,
        FP8=wscale is not None, USE_PDL=USE_PDL and not INTERPRET, INTERPRET=INTERPRET, **_options(warps),
    )


def attention_grid(batch: int, tokens: int, heads: int, keys: int, tiling: Tiling) -> tuple[int, int, int]:
    """(key splits, row blocks, batch) of the attention kernel."""
    return -(-keys // (tiling.attn_keys * tiling.attn_blocks)), -(-(tokens * heads) // tiling.attn_rows), batch


def launch_attention(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_mask: Tensor, suffix_cum: Tensor,
                     heads: int, out: Tensor, acc: Tensor, row_max: Tensor, row_sum: Tensor, counters: Tensor,
                     tiling: Tiling) -> None:
    """Kernel 2 of a layer: ``out`` [B*T, heads*D] bf16 from the roped qkv [B*T, (heads+2)*D] and the cache [B, S, D]."""
    b, s, d = k_cache.shape
    t = qkv.shape[0] // b
    splits, row_blocks, _ = attention_grid(b, t, heads, s + t, tiling)
    mask_u8 = prefix_mask.view(torch.uint8)
    _attention_kernel[(splits, row_blocks, b)](
        qkv, k_cache, v_cache, mask_u8, suffix_cum, acc, row_max, row_sum, counters, out,
        s, t, d**-0.5, k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1), mask_u8.stride(0),
        HQ=heads, D=d, BR=tiling.attn_rows, BS=tiling.attn_keys, KB=tiling.attn_blocks, ROW_BLOCKS=row_blocks, SPLITS=splits,
        SPLITS_P2=triton_next_pow2(splits), LEAN_KV=tiling.attn_lean_kv, USE_PDL=USE_PDL and not INTERPRET, INTERPRET=INTERPRET,
        **_options(tiling.attn_warps),
    )


KERNEL_KINDS = ("qkv", "attention", "o", "gate_up", "down")  # the order of one layer's launches


@dataclass
class StepBuffers:
    """What one call of the op writes besides its weights' products. Every layer reuses them: a stage
    touches them only after its wait, and the waits chain, so no two stages use one at the same time."""

    resid: Tensor  # [M, W] float32: the residual stream, final after the last layer
    qkv: Tensor  # [M, (heads + 2) * D] bf16, roped
    attn: Tensor  # [M, heads * D] bf16
    hidden: Tensor  # [M, mlp] bf16
    sumsq: Tensor  # [residual tiles, M] float32: per-tile sums of squares for the next norm
    parts: Tensor  # split-K partials, float32
    attn_acc: Tensor  # attention's split partials: outputs, row maxima, row sums
    attn_max: Tensor
    attn_sum: Tensor
    counters: Tensor  # [L, 5, tiles] int32 arrivals per output tile; zeroed with ``barrier`` by one memset
    barrier: Tensor  # [L * 5] int32: the persistent kernel's arrivals at the end of each phase


def step_buffers(x: Tensor, k_cache: Tensor, w_qkv: Tensor, w_o: Tensor, w_gate_up: Tensor, w_down: Tensor,
                 heads: int, tiling: Tiling) -> StepBuffers:
    m, width = x.shape
    depth, batch, _, keys, head_dim = k_cache.shape
    dev, bf16 = x.device, torch.bfloat16
    gemms = ((w_qkv, tiling.qkv), (w_o, tiling.o), (w_gate_up, tiling.gate_up), (w_down, tiling.down))
    splits, row_blocks, _ = attention_grid(batch, m // batch, heads, keys + m // batch, tiling)
    slots = batch * row_blocks * splits * tiling.attn_rows
    max_tiles = max([w.shape[1] // t.rows for w, t in gemms] + [batch * row_blocks])
    flags = torch.zeros(depth * 5 * (max_tiles + 1), dtype=torch.int32, device=dev)  # the step's one memset
    return StepBuffers(
        resid=torch.empty_like(x),
        qkv=torch.empty(m, w_qkv.shape[1], dtype=bf16, device=dev),
        attn=torch.empty(m, heads * head_dim, dtype=bf16, device=dev),
        hidden=torch.empty(m, w_down.shape[2], dtype=bf16, device=dev),
        sumsq=torch.empty(max(width // tiling.o.rows, width // tiling.down.rows), m, dtype=torch.float32, device=dev),
        parts=torch.empty(max(w.shape[1] * (w.shape[2] // t.k_slice) for w, t in gemms) * m, dtype=torch.float32, device=dev),
        attn_acc=torch.empty(slots, head_dim, dtype=torch.float32, device=dev),
        attn_max=torch.empty(slots, dtype=torch.float32, device=dev),
        attn_sum=torch.empty(slots, dtype=torch.float32, device=dev),
        counters=flags[: depth * 5 * max_tiles].view(depth, 5, max_tiles),
        barrier=flags[depth * 5 * max_tiles :],
    )


def layer_launches(x, x_sumsq, step, k_cache, v_cache, prefix_mask, cos, sin, suffix_cum, norm1, norm2,
                   w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down, heads, tiling: Tiling):
    """The buffers of one call and every layer's five launches, in order.

    Returns (residual stream [M, W] float32 that the last launch leaves final, arrival counters,
    [(kind, layer, launch)]). The op runs all launches; benchmarks time subsets (zeroing the
    counters first, as the op's one memset does).
    """
    width = x.shape[1]
    depth, head_dim, mlp = k_cache.shape[0], k_cache.shape[-1], w_down.shape[2]
    buf = step_buffers(x, k_cache, w_qkv, w_o, w_gate_up, w_down, heads, tiling)
    resid, qkv, attn, hidden, sumsq, parts, counters = buf.resid, buf.qkv, buf.attn, buf.hidden, buf.sumsq, buf.parts, buf.counters
    attn_acc, attn_max, attn_sum = buf.attn_acc, buf.attn_max, buf.attn_sum
    half, rot_groups = head_dim // 2, heads + 1
    bm, warps = tiling.block_m, tiling.gemm_warps

    def sumsq_of(tile: GemmTile) -> Tensor:  # the rows of ``sumsq`` that a residual GEMM with this tiling writes
        return sumsq[: width // tile.rows]

    def scale(s: Tensor | None, i: int) -> Tensor | None:
        return None if s is None else s[i]

    launches = []
    for i in range(depth):
        x_i, sumsq_i = (x, x_sumsq[None]) if i == 0 else (resid, sumsq_of(tiling.down))
        launches += [
            ("qkv", i, partial(launch_norm_gemm, x_i, sumsq_i, norm1, step, i, w_qkv[i], scale(s_qkv, i), cos, sin, qkv,
                               parts, counters[i, 0], tiling.qkv, bm, warps, half, rot_groups, False)),
            ("attention", i, partial(launch_attention, qkv, k_cache[i, :, 0], v_cache[i, :, 0], prefix_mask, suffix_cum, heads,
                                     attn, attn_acc, attn_max, attn_sum, counters[i, 1], tiling)),
            ("o", i, partial(launch_residual_gemm, attn, w_o[i], scale(s_o, i), norm1, step, i, x_i, resid,
                             sumsq_of(tiling.o), parts, counters[i, 2], tiling.o, bm, warps)),
            ("gate_up", i, partial(launch_norm_gemm, resid, sumsq_of(tiling.o), norm2, step, i, w_gate_up[i], scale(s_gate_up, i),
                                   cos, sin, hidden, parts, counters[i, 3], tiling.gate_up, bm, warps, mlp, 0, True)),
            ("down", i, partial(launch_residual_gemm, hidden, w_down[i], scale(s_down, i), norm2, step, i, resid, resid,
                                sumsq_of(tiling.down), parts, counters[i, 4], tiling.down, bm, warps)),
        ]
    return resid, counters, launches


def _triton_layers(*args, tiling: Tiling) -> Tensor:
    """Every layer's stages on the GPU (or the interpreter); returns the final residual stream [M, W] (float32)."""
    if tiling.persistent:
        return persistent_layers(*args, tiling=tiling)
    resid, _, launches = layer_launches(*args, tiling=tiling)
    for _, _, launch in launches:
        launch()
    return resid


INTERPRETER_PROGRAMS = 5  # the interpreter's persistent grid: fewer programs than items, so each takes several


def resident_programs(device: torch.device) -> int:
    """How many programs of the persistent kernel may run at once: one per multiprocessor (its grid
    barriers wait for every program, so every program must be resident)."""
    if INTERPRET:
        return INTERPRETER_PROGRAMS
    return torch.cuda.get_device_properties(device).multi_processor_count


def persistent_layers(x, x_sumsq, step, k_cache, v_cache, prefix_mask, cos, sin, suffix_cum, norm1, norm2,
                      w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down, heads, tiling: Tiling) -> Tensor:
    """Every layer in one launch of the persistent kernel (the interpreter: one launch per phase)."""
    m, width = x.shape
    depth, batch, _, keys, head_dim = k_cache.shape
    tokens, mlp = m // batch, w_down.shape[2]
    buf = step_buffers(x, k_cache, w_qkv, w_o, w_gate_up, w_down, heads, tiling)
    splits, row_blocks, _ = attention_grid(batch, tokens, heads, keys + tokens, tiling)
    t = tiling
    items = max((w_qkv.shape[1] // t.qkv.rows) * (width // t.qkv.k_slice), splits * row_blocks * batch,
                (width // t.o.rows) * (heads * head_dim // t.o.k_slice), (2 * mlp // t.gate_up.rows) * (width // t.gate_up.k_slice),
                (width // t.down.rows) * (mlp // t.down.k_slice))
    programs = min(items, resident_programs(x.device))
    phases = [(p, p) for p in range(5 * depth)] if INTERPRET else [(0, 5 * depth - 1)]
    mask_u8 = prefix_mask.view(torch.uint8)
    k0, v0 = k_cache[:, :, 0], v_cache[:, :, 0]  # [L, B, S, D]

    def scale_or(s: Tensor | None, w: Tensor) -> Tensor:
        return w if s is None else s

    options = {} if INTERPRET else {"num_warps": t.attn_warps, "num_stages": 1}
    for first, last in phases:
        _persistent_layers_kernel[(programs,)](
            x, x_sumsq, buf.resid, buf.sumsq, step, k0, v0, mask_u8, suffix_cum, cos, sin, norm1, norm2,
            w_qkv, w_o, w_gate_up, w_down, scale_or(s_qkv, w_qkv), scale_or(s_o, w_o), scale_or(s_gate_up, w_gate_up),
            scale_or(s_down, w_down), buf.qkv, buf.attn, buf.hidden, buf.parts, buf.attn_acc, buf.attn_max, buf.attn_sum,
            buf.counters, buf.barrier,
            m, keys, tokens, depth, first, last, _step_stride(norm1), _step_stride(norm2), EPS, head_dim**-0.5,
            k0.stride(0), k0.stride(1), k0.stride(2), v0.stride(0), v0.stride(1), v0.stride(2), mask_u8.stride(0),
            B=batch, W=width, HQ=heads, D=head_dim, MLP=mlp, MAX_TILES=buf.counters.shape[2],
            BM=t.block_m, ROW_BLOCKS=-(-m // t.block_m), N_SUMSQ_P2=triton_next_pow2(buf.sumsq.shape[0]),
            QKV_PAIRS=t.qkv.rows // 2, QKV_KS=t.qkv.k_slice, QKV_SPLIT=width // t.qkv.k_slice,
            O_BN=t.o.rows, O_KS=t.o.k_slice, O_SPLIT=heads * head_dim // t.o.k_slice,
            GU_PAIRS=t.gate_up.rows // 2, GU_KS=t.gate_up.k_slice, GU_SPLIT=width // t.gate_up.k_slice,
            DOWN_BN=t.down.rows, DOWN_KS=t.down.k_slice, DOWN_SPLIT=mlp // t.down.k_slice,
            BR=t.attn_rows, BS=t.attn_keys, ATT_KB=t.attn_blocks, ATT_ROW_BLOCKS=row_blocks, ATT_SPLITS=splits, ATT_SPLITS_P2=triton_next_pow2(splits),
            LEAN_KV=t.attn_lean_kv, FP8=s_qkv is not None, PREFETCH=t.prefetch_l2 and not INTERPRET, INTERPRET=INTERPRET, **options,
        )
    return buf.resid


# ----------------------------------------------------------------------------- the same arithmetic in torch


def _weight_product(a: Tensor, weight: Tensor, scale: Tensor | None) -> Tensor:
    """a @ weight^T in float32 from bf16 a and bf16 / FP8 weight (times the FP8 row scales)."""
    out = a.float() @ weight.float().T
    return out if scale is None else out * scale.float()


def _norm_rows(x: Tensor, sumsq: Tensor, table_row: Tensor) -> Tensor:
    """bf16 norm(x) = x * rsqrt(mean(x^2) + eps) * mult + shift (table_row [3, W]: mult, shift, gate)."""
    rstd = torch.rsqrt(sumsq / x.shape[1] + EPS)
    return (x * rstd[:, None] * table_row[0] + table_row[1]).to(torch.bfloat16)


def _unpair(acc: Tensor, half: int) -> tuple[Tensor, Tensor]:
    """Permuted GEMM columns -> lo, hi [M, groups, half] (inverse of ``pair_permutation``)."""
    m = acc.shape[0]
    pairs = acc.reshape(m, -1, 2)
    return pairs[..., 0].reshape(m, -1, half), pairs[..., 1].reshape(m, -1, half)


def _rope_pairs(acc: Tensor, cos: Tensor, sin: Tensor, rot_groups: int) -> Tensor:
    half = cos.shape[1]
    lo, hi = _unpair(acc, half)
    rotate = (torch.arange(lo.shape[1], device=acc.device) < rot_groups)[None, :, None]
    c = torch.where(rotate, cos[:, None, :], 1.0)
    s = torch.where(rotate, sin[:, None, :], 0.0)
    return torch.stack([lo * c - hi * s, hi * c + lo * s], dim=2).reshape(acc.shape[0], -1).to(torch.bfloat16)


def _gelu_pairs(acc: Tensor, half: int) -> Tensor:
    gate, up = _unpair(acc, half)
    return (torch.nn.functional.gelu(gate, approximate="tanh") * up).reshape(acc.shape[0], -1).to(torch.bfloat16)


def suffix_mask(prefix_mask: Tensor, suffix_cum: Tensor) -> Tensor:
    """bool [B, T, S + T]: query t sees valid prefix keys and own keys u with cum[u] <= cum[t]."""
    b, t = prefix_mask.shape[0], suffix_cum.shape[0]
    within = (suffix_cum[None, :] <= suffix_cum[:, None])[None].expand(b, t, t)
    return torch.cat([prefix_mask[:, None, :].expand(b, t, -1), within], dim=2)


def _attention_torch(qkv: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_mask: Tensor, suffix_cum: Tensor, heads: int) -> Tensor:
    b, s, d = k_cache.shape
    t = qkv.shape[0] // b
    rows = qkv.reshape(b, t, heads + 2, d)
    q = rows[:, :, :heads]
    keys = torch.cat([k_cache, rows[:, :, heads]], dim=1).float()
    values = torch.cat([v_cache, rows[:, :, heads + 1]], dim=1).float()
    logits = torch.einsum("bthd,bsd->bths", q.float(), keys) * d**-0.5
    logits = logits.masked_fill(~suffix_mask(prefix_mask, suffix_cum)[:, :, None, :], float("-inf"))
    p = torch.exp(logits - logits.amax(-1, keepdim=True))
    out = torch.einsum("bths,bsd->bthd", p.to(torch.bfloat16).float(), values) / p.sum(-1, keepdim=True)
    return out.reshape(b * t, heads * d).to(torch.bfloat16)


def _torch_layers(x, x_sumsq, step, k_cache, v_cache, prefix_mask, cos, sin, suffix_cum, norm1, norm2,
                  w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down, heads) -> Tensor:
    """The kernels' arithmetic in plain torch (CPU engines; the tests' second opinion)."""
    si = int(step) if norm1.shape[0] > 1 else 0
    mlp = w_down.shape[2]
    resid, sumsq = x, x_sumsq
    for i in range(k_cache.shape[0]):
        t1, t2 = norm1[si, i], norm2[si, i]
        pick = (lambda s: None if s is None else s[i])
        qkv = _rope_pairs(_weight_product(_norm_rows(resid, sumsq, t1), w_qkv[i], pick(s_qkv)), cos, sin, heads + 1)
        attn = _attention_torch(qkv, k_cache[i, :, 0], v_cache[i, :, 0], prefix_mask, suffix_cum, heads)
        resid = resid + _weight_product(attn, w_o[i], pick(s_o)) * t1[2]
        sumsq = resid.square().sum(-1)
        hidden = _gelu_pairs(_weight_product(_norm_rows(resid, sumsq, t2), w_gate_up[i], pick(s_gate_up)), mlp)
        resid = resid + _weight_product(hidden, w_down[i], pick(s_down)) * t2[2]
        sumsq = resid.square().sum(-1)
    return resid


# ----------------------------------------------------------------------------- the custom op


def _uses_triton(device: torch.device) -> bool:
    if device.type == "cuda" and triton is None:
        raise RuntimeError("fused_expert_layers: this engine calls pi-build's Triton kernels, but Triton is not installed (pip install triton)")
    return device.type == "cuda" or INTERPRET


def check_layer_inputs(x: Tensor, k_cache: Tensor, w_qkv: Tensor, heads: int) -> None:
    """Refuse what the kernels cannot compute, with a reason."""
    if x.dim() != 2 or x.dtype != torch.float32:
        raise TypeError(f"fused_expert_layers: x must be float32 [rows, width], got {x.dtype} {tuple(x.shape)}")
    if x.shape[0] > MAX_ROWS:
        raise ValueError(f"fused denoise handles at most {MAX_ROWS} suffix rows (batch x tokens), got {x.shape[0]}")
    if k_cache.dim() != 5 or k_cache.shape[2] != 1:
        raise ValueError(f"fused denoise needs one KV head: k_cache [layers, batch, 1, keys, head_dim], got {tuple(k_cache.shape)}")
    if k_cache.dtype != torch.bfloat16:
        raise TypeError(f"fused denoise reads a bf16 K/V cache, got {k_cache.dtype}")
    if x.shape[0] % k_cache.shape[1]:
        raise ValueError(f"{x.shape[0]} rows do not split into batch {k_cache.shape[1]}")
    if w_qkv.shape[1] != (heads + 2) * k_cache.shape[-1]:
        raise ValueError(f"w_qkv has {w_qkv.shape[1]} rows, expected (heads + 2) * head_dim = {(heads + 2) * k_cache.shape[-1]}")


@torch.library.custom_op("pi_build::fused_expert_layers", mutates_args=())
def fused_expert_layers(
    x: Tensor, x_sumsq: Tensor, step: Tensor, k_cache: Tensor, v_cache: Tensor, prefix_mask: Tensor,
    cos: Tensor, sin: Tensor, suffix_cum: Tensor, norm1: Tensor, norm2: Tensor,
    w_qkv: Tensor, w_o: Tensor, w_gate_up: Tensor, w_down: Tensor,
    s_qkv: Optional[Tensor], s_o: Optional[Tensor], s_gate_up: Optional[Tensor], s_down: Optional[Tensor],
    heads: int, persistent: bool = False,
) -> Tensor:
    """Every expert layer on the residual stream x [M, W] (float32) -> the final residual stream.

    x_sumsq [M]: sum of squares of x's rows. k/v_cache [L, B, 1, S, D] bf16 (RoPE applied to k);
    prefix_mask bool [B, S]; cos/sin [M, D/2] float32 RoPE tables of the rows' positions;
    suffix_cum int32 [T]: cumsum of the suffix's AR flags; norm1/norm2 [steps or 1, L, 3, W] float32:
    (mult, shift, gate) of the norm before attention / MLP (indexed by ``step`` when steps > 1).
    w_qkv [L, (heads+2)*D, W] and w_gate_up [L, 2*mlp, W] in ``pair_permutation`` order; w_o, w_down
    plain; bf16, or FP8 with float32 row scales s_* [L, rows]. persistent: one grid for every layer
    (``persistent_layers``) instead of five kernels a layer; the same arithmetic, bit for bit.
    """
    check_layer_inputs(x, k_cache, w_qkv, heads)
    args = (x, x_sumsq, step, k_cache, v_cache, prefix_mask, cos, sin, suffix_cum, norm1, norm2,
            w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down, heads)
    if _uses_triton(x.device):
        dims = ExpertDims(k_cache.shape[0], x.shape[1], heads, k_cache.shape[-1], w_down.shape[2])
        tiling = TILING_OVERRIDE or dataclasses.replace(plan_tiling(x.shape[0], dims), persistent=persistent)
        return _triton_layers(*args, tiling=tiling)
    return _torch_layers(*args)


@fused_expert_layers.register_fake
def _(x, x_sumsq, step, k_cache, v_cache, prefix_mask, cos, sin, suffix_cum, norm1, norm2,
      w_qkv, w_o, w_gate_up, w_down, s_qkv, s_o, s_gate_up, s_down, heads, persistent=False):
    return torch.empty_like(x)


TILING_OVERRIDE: Tiling | None = None  # set by benchmarks to try other block sizes


# ----------------------------------------------------------------------------- the module


class FusedDenoiseStep(nn.Module):
    """``components.DenoiseComponent`` (bf16) with the expert's layers in ``fused_expert_layers``.

    Same inputs and output: (x [B, H, 32], step [], k, v [L, B, 1, S, D], prefix_mask [B, S],
    state [B, 32]) -> x_next [B, H, 32]. The small projections around the expert (suffix embedding,
    final norm, action_out) stay torch code for Inductor to compile, float32 as in the component.
    """

    input_names = ("x", "step", "k", "v", "prefix_mask", "state")
    output_names = ("x_next",)

    def __init__(self, component: nn.Module, fp8: bool = False, persistent: bool = False):
        super().__init__()
        cfg = component.cfg.expert
        if component.dtype != torch.bfloat16:
            raise TypeError(f"FusedDenoiseStep takes a bf16 denoise component, got {component.dtype}")
        if cfg.num_kv_heads != 1:
            raise ValueError(f"fused denoise needs one KV head, the expert has {cfg.num_kv_heads}")
        self.spec, self.cfg, self.pi05 = component.spec, component.cfg, component.pi05
        self.precision = Precision.FP8 if fp8 else Precision.BF16
        self.persistent = persistent
        self.dims = ExpertDims(cfg.depth, cfg.width, cfg.num_heads, cfg.head_dim, cfg.mlp_dim)
        self.suffix_len = component.ar_flags.shape[0]
        self.tiling = plan_tiling(self.spec.batch * self.suffix_len, self.dims)  # refuses unsupported shapes now
        self.register_buffer("dt", component.dt.clone())
        self.register_buffer("suffix_cum", torch.cumsum(component.ar_flags, 0).to(torch.int32))
        d = cfg.head_dim
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.int64, device=component.dt.device).float() / d))
        self.register_buffer("inv_freq", inv_freq)  # as components.rope_tables
        self._stack_weights(component, fp8)
        self._norm_tables(component)
        self.action_in, self.action_out = component.action_in, component.action_out
        if not self.pi05:
            self.action_time_in, self.action_time_out = component.action_time_in, component.action_time_out
            self.state_in = component.state_in
            self.register_buffer("time_part", component.time_part.clone())

    @torch.no_grad()
    def _stack_weights(self, component: nn.Module, fp8: bool) -> None:
        dims = self.dims
        qkv_order = pair_permutation(dims.qkv_rows, dims.head_dim // 2)
        gate_up_order = pair_permutation(2 * dims.mlp, dims.mlp)
        weights = {
            "qkv": torch.stack([b.qkv.weight[qkv_order.to(b.qkv.weight.device)] for b in component.layers]),
            "o": torch.stack([b.o.weight for b in component.layers]),
            "gate_up": torch.stack([b.gate_up.weight[gate_up_order.to(b.gate_up.weight.device)] for b in component.layers]),
            "down": torch.stack([b.down.weight for b in component.layers]),
        }
        for block in component.layers:
            if any(getattr(block, n).bias is not None for n in ("qkv", "o", "gate_up", "down")):
                raise ValueError("fused denoise: the expert's linears have no biases (Gemma)")
        for name, w in weights.items():
            if fp8:
                w, scale = quantize_rows(w)  # e4m3 rows, one float32 scale per output row
                self.register_buffer(f"s_{name}", scale[..., 0])
            else:
                self.register_buffer(f"s_{name}", None)
            self.register_buffer(f"w_{name}", w.contiguous())

    @torch.no_grad()
    def _norm_tables(self, component: nn.Module) -> None:
        """norm1/norm2 [steps or 1, L, 3, W] = (mult, shift, gate); final_norm [steps or 1, 2, W] = (mult, shift)."""
        if self.pi05:  # adaRMS: (1 + scale, shift, gate) per step
            def table(mod: Tensor) -> Tensor:
                return torch.stack([1 + mod[..., 0, :], mod[..., 1, :], mod[..., 2, :]], dim=-2).float()
            self.register_buffer("norm1", table(component.mod1).contiguous())
            self.register_buffer("norm2", table(component.mod2).contiguous())
            self.register_buffer("final_norm", table(component.mod_final)[:, :2].contiguous())
            return
        def plain(weight: Tensor) -> Tensor:  # (1 + w, 0, 1): one row for every step
            return torch.stack([weight, torch.zeros_like(weight), torch.ones_like(weight)], dim=-2)[None].float()
        self.register_buffer("norm1", plain(component.norm1).contiguous())
        self.register_buffer("norm2", plain(component.norm2).contiguous())
        self.register_buffer("final_norm", plain(component.norm_final)[:, :2].contiguous())

    def example_inputs(self, generator: torch.Generator) -> tuple[Tensor, ...]:
        """Random inputs of the right shapes, as ``DenoiseComponent.example_inputs`` draws them."""
        from pi_build.engine.denoise import DenoiseComponent

        return DenoiseComponent.example_inputs(self, generator)

    def _suffix(self, x_t: Tensor, step: Tensor, state: Tensor) -> Tensor:
        """The expert's input tokens [B, T, W] in float32 (as ``DenoiseComponent._suffix``)."""
        actions = self.action_in(x_t)
        if self.pi05:
            return actions
        time_part = self.time_part.index_select(0, step.reshape(1))
        h = torch.nn.functional.silu(self.action_time_in(actions) + time_part)
        return torch.cat([self.state_in(state)[:, None], self.action_time_out(h)], dim=1)

    def forward(self, x: Tensor, step: Tensor, k: Tensor, v: Tensor, prefix_mask: Tensor, state: Tensor) -> Tensor:
        b, t, width = x.shape[0], self.suffix_len, self.dims.width
        x_t = x.float()
        rows = self._suffix(x_t, step, state.float()).reshape(b * t, width)
        positions = prefix_mask.sum(-1, keepdim=True) + torch.arange(t, device=x.device)
        angles = (positions.float()[..., None] * self.inv_freq).reshape(b * t, -1)
        out = fused_expert_layers(
            rows, rows.square().sum(-1), step, k.to(torch.bfloat16), v.to(torch.bfloat16), prefix_mask,
            angles.cos(), angles.sin(), self.suffix_cum, self.norm1, self.norm2,
            self.w_qkv, self.w_o, self.w_gate_up, self.w_down, self.s_qkv, self.s_o, self.s_gate_up, self.s_down,
            self.dims.heads, self.persistent,
        )
        last = out.reshape(b, t, width)[:, -self.spec.horizon :]
        final = self.final_norm.index_select(0, step.reshape(1) if self.pi05 else torch.zeros_like(step).reshape(1))[0]
        normed = last * torch.rsqrt(last.square().mean(-1, keepdim=True) + EPS) * final[0] + final[1]
        return x_t + self.dt * self.action_out(normed)


def use_fused_denoise(component: nn.Module, precision: Precision = Precision.BF16,
                      persistent: bool = False) -> tuple[FusedDenoiseStep, dict]:
    """What the build calls: the fused step for a bf16 ``DenoiseComponent`` (bf16 expert weights, or
    FP8 for e4m3 ones with per-row scales), as five kernels a layer or one persistent grid, and a
    manifest entry saying what was switched."""
    if precision not in (Precision.BF16, Precision.FP8):
        raise ValueError(f"fused denoise precision must be bf16 or fp8, got {precision!r}")
    fused = FusedDenoiseStep(component, fp8=precision == Precision.FP8, persistent=persistent).to(component.dt.device).eval()
    t = fused.tiling
    info = {"fused_denoise": precision, "kernels_per_layer": 0 if persistent else 5, "persistent": persistent,
            "layers": fused.dims.depth, "rows": fused.spec.batch * fused.suffix_len,
            "tiling": {name: [getattr(t, name).rows, getattr(t, name).k_slice] for name in ("qkv", "o", "gate_up", "down")}}
    return fused, info
