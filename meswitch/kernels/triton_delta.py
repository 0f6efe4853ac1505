"""Fused Triton kernels for the mixed-expert delta op (see :mod:`meswitch.kernels.reference`) and their launch.

One launch serves every expert of a batch. The grid is (N blocks, row tiles, K splits): a row tile
is up to ``BLOCK_M`` rows of one expert (an :class:`ExpertRows` segment), so each program streams
one expert's packed codes for ``BLOCK_N`` output channels once and applies them to all its rows.

The product is computed transposed, ``accᵀ[BLOCK_N, BLOCK_M] = Δ̂_tile · x_tileᵀ``, so the dequantized
weights are the tensor-core A operand and stay in registers (Hopper wgmma takes A from registers;
x, the small operand, goes through shared memory). Codes are layout 2 (:mod:`.layout`): per K chunk
one ``[BLOCK_N, 16]`` int32 tile, read as int16 pairs, copied asynchronously into shared memory and
loaded once in the MMA operand layout; each of the chunk's planes is then one ``lop3`` per register
(mask the two codes of a word's half-words and or in a bf16/fp16 exponent: ``bias + code`` in both
halves, Marlin's trick) plus at most one shift per three planes. Two ways to finish:

* ``EPILOGUE_SCALE`` (per-channel steps, decode): the MMA runs on ``bias + code`` as it is; the
  epilogue removes the bias and applies ``scale`` and ``offset`` from row sums of x, so the loop
  holds no per-weight float work at all:  ``y += s·(acc − Σ bias·x) + o·Σx``.
* register scale (per-group steps, prefill): two packed FMAs per register give ``code·s + o`` in
  bf16/fp16 before the MMA.

Salient columns: ``x[:, idx]`` gathered by index times the fp16 corrections, one tf32 MMA per 32
columns, added before the single rounded read-modify-write of y (or a bf16/fp16 atomic add when K
is split, each split taking its share of the blocks of 32 columns). A generic kernel reads layout 1
for any bits (3 and 8 included) with per-value shifts.

A grouped bank (sibling projections along N, :meth:`DeltaBank.concat`) is one launch over their concatenated
output: each program's N block lies in one projection, whose salient input columns it reads; every other
operand is indexed along N as for one matrix. The expert strides are arguments, so a projection's view of a
grouped bank launches as a bank of its own.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from meswitch.kernels.bank import DeltaBank, ExpertRows
from meswitch.kernels.launch_config import LaunchConfig, check_device_inputs, choose_config, fp8_fits, k_splits
from meswitch.kernels.layout import E4M3_BITS, LAYOUT_V1, LAYOUT_V2, v2_chunk
from meswitch.kernels.ptx_planes import (
    E4M3_BIAS,
    plane_bias,
    plane_biased,
    plane_e4m3,
    plane_scaled,
    plane_source,
    position_bias,
    to_e4m3,
)

SALIENT_BLOCK = 32


@triton.jit
def _tile_rows(tiles_ptr, BLOCK_M: tl.constexpr):
    """(expert, row count, rows, row mask) of this program's row tile: three independent loads."""
    base = tiles_ptr + tl.program_id(1) * (2 + BLOCK_M)
    offs_m = tl.arange(0, BLOCK_M)
    e = tl.load(base).to(tl.int64)
    count = tl.load(base + 1)
    rows = tl.load(base + 2 + offs_m).to(tl.int64)
    return e, count, rows, offs_m < count


@triton.jit
def _salient_row(sidx_ptr, e, stride_ie, KMAX, B1, B2, BLOCK_N: tl.constexpr):
    """This program's salient input columns: its expert's, of the projection its N block lies in (a grouped
    bank holds up to three, starting at 0, B1 and B2; a block never straddles two)."""
    n0 = tl.program_id(0) * BLOCK_N
    part = (n0 >= B1).to(tl.int64) + (n0 >= B2).to(tl.int64)
    return sidx_ptr + e * stride_ie + part * KMAX


@triton.jit
def _prefetch(y_ptr, rows, stride_ym, offs_n, nmask, mmask, sidx_row, KMAX, SPLIT_K: tl.constexpr,
              SAL_BLOCK: tl.constexpr, PREFETCH_Y: tl.constexpr):  # fmt: skip
    """Loads the epilogue needs, issued before the main loop so their latency hides behind it."""
    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1 and PREFETCH_Y:  # costs registers through the loop
        yv = tl.load(y_ptrs, mask=ymask, other=0.0)
    else:
        yv = tl.zeros(y_ptrs.shape, dtype=y_ptr.dtype.element_ty)
    so = tl.program_id(2) * SAL_BLOCK + tl.arange(0, SAL_BLOCK)  # this K split's first block of salient columns
    idx = tl.load(sidx_row + so, mask=so < KMAX, other=0)
    return y_ptrs, ymask, yv, idx


@triton.jit
def _salient_and_store(
    out, x_rows, mmask, y_ptrs, ymask, yv, idx, nmask, sidx_row, sval_rows, KMAX,
    SPLIT_K: tl.constexpr, SAL_BLOCK: tl.constexpr, PREFETCH_Y: tl.constexpr,
):  # fmt: skip
    """Add x[:, idx] · corrections (tf32 MMA), then y += out, rounded once. The blocks of salient columns are dealt
    round the K splits (split s takes blocks s, s + SPLIT_K, ...), so no split's program carries them all after
    its share of the loop: with K split 4 ways, down's 5 blocks (143 columns) in 2 at most instead of 5 in one."""
    for s0 in range(tl.program_id(2) * SAL_BLOCK, KMAX, SPLIT_K * SAL_BLOCK):
        so = s0 + tl.arange(0, SAL_BLOCK)
        smask = so < KMAX
        xs = tl.load(x_rows + idx[:, None], mask=smask[:, None] & mmask[None, :], other=0.0)
        sv = tl.load(sval_rows[:, None] + so[None, :], mask=nmask[:, None] & smask[None, :], other=0.0)
        nxt = so + SPLIT_K * SAL_BLOCK
        idx = tl.load(sidx_row + nxt, mask=nxt < KMAX, other=0)
        out = tl.dot(sv.to(tl.float32), xs.to(tl.float32), out, input_precision="tf32")
    if SPLIT_K == 1:
        if not PREFETCH_Y:
            yv = tl.load(y_ptrs, mask=ymask, other=0.0)
        tl.store(y_ptrs, (yv.to(tl.float32) + out).to(yv.dtype), mask=ymask)
    else:
        tl.atomic_add(y_ptrs, out.to(yv.dtype), mask=ymask, sem="relaxed")


@triton.jit
def _steps_2d(
    srow, orow, g, nmask, SYMMETRIC: tl.constexpr, HALF_LEVELS: tl.constexpr, DT: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Step sizes of group g as [BLOCK_N, 32] tiles of x's dtype, for the packed FMA."""
    s = tl.load(srow + g, mask=nmask, other=0.0).to(tl.float32)
    if SYMMETRIC:  # noqa: SIM108 (Triton: a constexpr branch)
        o = -s * HALF_LEVELS
    else:
        o = tl.load(orow + g, mask=nmask, other=0.0).to(tl.float32)
    s2 = tl.broadcast_to(s.to(DT)[:, None], (BLOCK_N, 32))
    o2 = tl.broadcast_to(o.to(DT)[:, None], (BLOCK_N, 32))
    return s2, o2


@triton.jit
def _x_sums_kernel(x_ptr, sums_ptr, K, span, stride_xm, BITS: tl.constexpr, IS_BF16: tl.constexpr,
                   BLOCK_K: tl.constexpr):  # fmt: skip
    """Per row of x and K split (``span`` positions each): ``Σx`` and ``Σ bias·x`` with each position's plane bias
    (:func:`plane_bias`), what the decode epilogue subtracts; computed once a launch instead of in every N block's
    loop. Per split, so that each split's partial output stays as small as the delta (they add up in y's dtype)."""
    m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    sum_x = tl.zeros([BLOCK_K], dtype=tl.float32)
    sum_bx = tl.zeros([BLOCK_K], dtype=tl.float32)
    end = tl.minimum((split + 1) * span, K)
    for k0 in range(split * span, end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        xv = tl.load(x_ptr + m * stride_xm + kk, mask=kk < end, other=0.0).to(tl.float32)
        sum_x += xv
        sum_bx += xv * position_bias(kk, BITS, IS_BF16)
    at = sums_ptr + (m * tl.num_programs(1) + split) * 2
    tl.store(at, tl.sum(sum_x, 0))
    tl.store(at + 1, tl.sum(sum_bx, 0))


@triton.jit
def _x_e4m3_kernel(x_ptr, x8_ptr, r_ptr, sums_ptr, K, n_chunks, chunks_per_split, stride_xm, stride_x8m,
                   BITS: tl.constexpr, BLOCK_K: tl.constexpr):  # fmt: skip
    """The FP8 planes' activations: per row, ``r = max|x| / 448`` and ``x8 = x / r`` rounded to e4m3, written
    in the planes' K order (:func:`~meswitch.kernels.layout.e4m3_positions`, zeros past K); per K split, the epilogue's
    sums of ``r·x8`` as the bf16 planes' (``Σx``, ``Σ bias·x``, the bias :data:`E4M3_BIAS` at every position)."""
    CHUNK: tl.constexpr = 32 * (16 // BITS)
    m = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    amax = tl.zeros([BLOCK_K], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        amax = tl.maximum(amax, tl.abs(tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)))
    r = tl.maximum(tl.max(amax, 0), 1e-30) / 448.0
    d = tl.arange(0, CHUNK)
    j = d % 64
    src = (d // 64 + (8 // BITS) * (j % 2)) * 32 + 2 * (j // 4) + (j % 4) // 2
    total = tl.zeros([CHUNK], dtype=tl.float32)
    for c in range(split * chunks_per_split, tl.minimum((split + 1) * chunks_per_split, n_chunks)):
        kk = c * CHUNK + src
        xv = tl.load(x_ptr + m * stride_xm + kk, mask=kk < K, other=0.0).to(tl.float32)
        x8 = to_e4m3(tl.clamp(xv / r, -448.0, 448.0))
        tl.store(x8_ptr + m * stride_x8m + c * CHUNK + d, x8)
        total += x8.to(tl.float32)
    sx = r * tl.sum(total, 0)
    at = sums_ptr + (m * tl.num_programs(1) + split) * 2
    tl.store(at, sx)
    tl.store(at + 1, sx * E4M3_BIAS)
    if split == 0:
        tl.store(r_ptr + m, r)


@triton.jit
def _x_tile(x_rows, kk, mmask, K, EVEN_K: tl.constexpr):
    """x at positions ``kk`` of the tile's rows, as the MMA's B operand ``[len(kk), BLOCK_M]``."""
    if EVEN_K:
        xp = tl.load(x_rows + kk[:, None], mask=mmask[None, :], other=0.0)
    else:
        xp = tl.load(x_rows + kk[:, None], mask=mmask[None, :] & (kk[:, None] < K), other=0.0)
    return xp


@triton.jit
def _delta_v2_kernel(
    x_ptr, y_ptr, w_ptr, scale_ptr, offset_ptr, sidx_ptr, sval_ptr, tiles_ptr, sums_ptr, x8_ptr, r_ptr,
    N, K, G, KMAX, n_chunks, chunks_per_split, stride_xm, stride_ym, stride_x8m,
    stride_we, stride_wc, stride_se, stride_ie, stride_ve, B1, B2,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr, EPILOGUE_SCALE: tl.constexpr,
    EVEN_K: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    SAL_BLOCK: tl.constexpr, PREFETCH_Y: tl.constexpr, X_SUMS: tl.constexpr, PAIRED: tl.constexpr,
    FP8: tl.constexpr,
):  # fmt: skip
    """Layout-2 codes (bits 1, 2, 4). w_ptr is the packed tensor viewed as int16 (int8 with ``FP8``); ``stride_*``
    are the expert (and chunk) strides of codes, steps, salient indices and values, so a bank may be a view along N.
    ``X_SUMS``: the epilogue's row sums of x come from ``sums_ptr`` (given, or :func:`_x_sums_kernel`), not from the
    loop. ``PAIRED`` (with ``X_SUMS``): two planes a dot, their operands joined along K (planes p and p+1 are 64
    consecutive positions of x): half the dots' waits, fences and descriptor work. ``FP8`` (with ``X_SUMS``, bits 1
    and 2): the planes on FP8 tensor cores, four codes a register (:func:`plane_e4m3`) against x8 and its row
    scales r from :func:`_x_e4m3_kernel`; the salient columns still take x."""
    P: tl.constexpr = 16 // BITS
    CHUNK: tl.constexpr = 32 * P
    HALF_LEVELS: tl.constexpr = ((1 << BITS) - 1) / 2
    DT: tl.constexpr = x_ptr.dtype.element_ty
    IS_BF16: tl.constexpr = tl.bfloat16 == DT

    e, count, rows, mmask = _tile_rows(tiles_ptr, BLOCK_M)
    if count == 0:  # an unused tile of a fixed-size (device-built) table: nothing to do
        return
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_t = tl.arange(0, 32)
    offs_b = tl.arange(0, 64)
    w_tile = w_ptr + e * stride_we + offs_n[:, None] * (64 if FP8 else 32) + (offs_b if FP8 else offs_t)[None, :]
    x_rows = x_ptr + rows[None, :] * stride_xm
    srow = scale_ptr + e * stride_se + offs_n * G
    orow = offset_ptr + e * stride_se + offs_n * G
    sidx_row = _salient_row(sidx_ptr, e, stride_ie, KMAX, B1, B2, BLOCK_N)
    sval_rows = sval_ptr + e * stride_ve + offs_n * KMAX
    y_ptrs, ymask, yv, idx = _prefetch(y_ptr, rows, stride_ym, offs_n, nmask, mmask, sidx_row, KMAX, SPLIT_K,
                                       SAL_BLOCK, PREFETCH_Y)  # fmt: skip
    if EPILOGUE_SCALE:
        s = tl.load(srow, mask=nmask, other=0.0).to(tl.float32)
        if SYMMETRIC:  # noqa: SIM108 (Triton: a constexpr branch)
            o = -s * HALF_LEVELS
        else:
            o = tl.load(orow, mask=nmask, other=0.0).to(tl.float32)

    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    xs = tl.zeros([32, BLOCK_M], dtype=tl.float32)
    xb = tl.zeros([32, BLOCK_M], dtype=tl.float32)
    if not EPILOGUE_SCALE and GROUP == 0:
        s2, o2 = _steps_2d(srow, orow, 0, nmask, SYMMETRIC, HALF_LEVELS, DT, BLOCK_N)
    c_begin = tl.program_id(2) * chunks_per_split
    c_end = tl.minimum(c_begin + chunks_per_split, n_chunks)
    x8_rows = x8_ptr + rows[None, :] * stride_x8m
    if FP8:
        for c in range(c_begin, c_end):
            bytes8 = tl.load(w_tile + c * stride_wc, mask=nmask[:, None], other=0)
            for q in tl.static_range(8 // BITS):  # x8 holds each chunk in the planes' order: 64 positions a plane
                xp = tl.load(x8_rows + (c * CHUNK + q * 64 + offs_b)[:, None], mask=mmask[None, :], other=0.0)
                acc = tl.dot(plane_e4m3(bytes8, BITS, q), xp, acc)
    else:
        for c in range(c_begin, c_end):
            words = tl.load(w_tile + c * stride_wc, mask=nmask[:, None], other=0)
            for p in tl.static_range(0, P if PAIRED else 0, 2):
                xp = _x_tile(x_rows, c * CHUNK + p * 32 + tl.arange(0, 64), mmask, K, EVEN_K)
                w0 = plane_biased(plane_source(words, BITS, p), BITS, p, IS_BF16)
                w1 = plane_biased(plane_source(words, BITS, p + 1), BITS, p + 1, IS_BF16)
                acc = tl.dot(tl.reshape(tl.permute(tl.join(w0, w1), (0, 2, 1)), (BLOCK_N, 64)), xp, acc)
            for p in tl.static_range(0 if PAIRED else P):
                xp = _x_tile(x_rows, c * CHUNK + p * 32 + offs_t, mmask, K, EVEN_K)
                src = plane_source(words, BITS, p)
                if EPILOGUE_SCALE:
                    wp = plane_biased(src, BITS, p, IS_BF16)
                    acc = tl.dot(wp, xp, acc)
                    if not X_SUMS:
                        xf = xp.to(tl.float32)
                        xs += xf
                        xb += xf * plane_bias(BITS, p, IS_BF16)
                else:
                    if GROUP > 0 and (p == 0 or (p * 32) % GROUP == 0):  # a new step-size group starts here
                        g = (c * CHUNK + p * 32) // GROUP
                        s2, o2 = _steps_2d(srow, orow, g, nmask, SYMMETRIC, HALF_LEVELS, DT, BLOCK_N)
                    wp = plane_scaled(src, s2, o2, BITS, p, IS_BF16)
                    acc = tl.dot(wp, xp, acc)

    if EPILOGUE_SCALE:
        if X_SUMS:  # this split's sums of its rows
            at = sums_ptr + (rows * SPLIT_K + tl.program_id(2)) * 2
            sum_x = tl.load(at, mask=mmask, other=0.0)
            sum_bx = tl.load(at + 1, mask=mmask, other=0.0)
        else:
            sum_x = tl.sum(xs, axis=0)
            sum_bx = tl.sum(xb, axis=0)
        if FP8:  # the product ran on x8 = x / r
            acc = acc * tl.load(r_ptr + rows, mask=mmask, other=0.0)[None, :]
        out = s[:, None] * (acc - sum_bx[None, :]) + o[:, None] * sum_x[None, :]
    else:
        out = acc
    _salient_and_store(
        out, x_rows, mmask, y_ptrs, ymask, yv, idx, nmask, sidx_row, sval_rows, KMAX, SPLIT_K, SAL_BLOCK, PREFETCH_Y,
    )  # fmt: skip


@triton.jit
def _delta_v1_kernel(
    x_ptr, y_ptr, w_ptr, scale_ptr, offset_ptr, sidx_ptr, sval_ptr, tiles_ptr,
    N, K, W, G, KMAX, stride_xm, stride_ym, stride_we, stride_se, stride_ie, stride_ve, B1, B2,
    BITS: tl.constexpr, GROUP: tl.constexpr, SYMMETRIC: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SAL_BLOCK: tl.constexpr,
):  # fmt: skip
    """Layout-1 codes, any bits and group size: per-value shift and convert (the generic path)."""
    VPW: tl.constexpr = 32 // BITS
    LEVELS: tl.constexpr = (1 << BITS) - 1
    HALF_LEVELS: tl.constexpr = ((1 << BITS) - 1) / 2
    DT: tl.constexpr = x_ptr.dtype.element_ty

    e, count, rows, mmask = _tile_rows(tiles_ptr, BLOCK_M)
    if count == 0:  # an unused tile of a fixed-size (device-built) table: nothing to do
        return
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < N
    offs_k = tl.arange(0, BLOCK_K)
    w_rows = w_ptr + e * stride_we + offs_n * W
    x_rows = x_ptr + rows[None, :] * stride_xm
    srow = scale_ptr + e * stride_se + offs_n * G
    orow = offset_ptr + e * stride_se + offs_n * G
    sidx_row = _salient_row(sidx_ptr, e, stride_ie, KMAX, B1, B2, BLOCK_N)
    sval_rows = sval_ptr + e * stride_ve + offs_n * KMAX
    y_ptrs, ymask, yv, idx = _prefetch(y_ptr, rows, stride_ym, offs_n, nmask, mmask, sidx_row, KMAX, 1, SAL_BLOCK,
                                       False)  # fmt: skip
    acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + offs_k
        kmask = kk < K
        wmask = nmask[:, None] & kmask[None, :]
        words = tl.load(w_rows[:, None] + (kk // VPW)[None, :], mask=wmask, other=0)
        codes = (words >> ((kk % VPW) * BITS)[None, :]) & LEVELS
        if GROUP == 0:  # noqa: SIM108 (Triton: a constexpr branch)
            g = tl.zeros([BLOCK_K], dtype=tl.int32)
        else:
            g = kk // GROUP
        s = tl.load(srow[:, None] + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        if SYMMETRIC:  # noqa: SIM108 (Triton: a constexpr branch)
            o = -s * HALF_LEVELS
        else:
            o = tl.load(orow[:, None] + g[None, :], mask=wmask, other=0.0).to(tl.float32)
        w = (codes.to(tl.float32) * s + o).to(DT)
        xk = tl.load(x_rows + kk[:, None], mask=kmask[:, None] & mmask[None, :], other=0.0)
        acc = tl.dot(w, xk, acc)
    _salient_and_store(
        acc, x_rows, mmask, y_ptrs, ymask, yv, idx, nmask, sidx_row, sval_rows, KMAX, 1, SAL_BLOCK, False,
    )  # fmt: skip


def mixed_delta_triton(
    x: torch.Tensor,
    bank: DeltaBank,
    rows: ExpertRows,
    y: torch.Tensor,
    config: LaunchConfig | None = None,
) -> torch.Tensor:
    """``y[m] += x[m] · Δ̂_{e(m)}ᵀ`` in one launch; returns y. Inputs are checked by the caller
    (:func:`meswitch.kernels.mixed_delta`) for shape, plus here for device and dtype."""
    check_device_inputs(x, bank, y)
    if rows.num_segments == 0 or x.shape[0] == 0:
        return y
    cfg = config or choose_config(bank, rows, x.device)
    return launch(x, bank, rows.tiles(cfg.block_m, x.device), y, cfg)


def launch(
    x: torch.Tensor,
    bank: DeltaBank,
    tiles: torch.Tensor,
    y: torch.Tensor,
    cfg: LaunchConfig,
    sums: torch.Tensor | None = None,
    x8: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> torch.Tensor:
    """One launch over a tile table (:meth:`ExpertRows.tiles`, or :func:`~meswitch.kernels.bank.device_tiles`,
    whose unused tiles exit at once); no host read of the batch, so a CUDA graph can hold it.

    ``cfg.x_sums``: x's row sums per K split, fp32 ``[M, splits, 2]`` (:mod:`.row_sums`), are ``sums`` where
    given, else computed by ``_x_sums_kernel`` first. ``cfg.fp8_planes``: x in e4m3 in the planes' K order, each
    row's scale and the sums of the rounded x (``x8``, ``r``, ``sums``: :func:`~meswitch.kernels.row_sums.
    e4m3_inputs`) where given, all three, else from ``_x_e4m3_kernel`` first. A grouped bank is one launch when
    ``cfg.block_n`` divides every projection boundary (each N block then reads one projection's salient columns),
    else one launch per projection."""
    n, k = bank.grid.shape
    inner = bank.bounds[1:-1]
    if any(b % cfg.block_n for b in inner):
        for p, (a, b) in enumerate(itertools.pairwise(bank.bounds)):
            launch(x, bank.part(p), tiles, y[:, a:b], cfg, sums, x8, r)
        return y
    b1, b2 = (*inner, n, n)[:2]
    offset = bank.offset if bank.offset is not None else bank.scale  # never read when symmetric
    sidx, sval = (bank.salient_idx, bank.salient_val) if bank.kmax else (tiles, bank.scale)  # never read
    strides = (bank.scale.stride(0), sidx.stride(0), sval.stride(0), b1, b2)
    if bank.grid.layout_version == LAYOUT_V2:
        if cfg.epilogue_scale and bank.grid.group_size != 0:
            raise ValueError("epilogue scaling needs per-channel steps")
        chunks = bank.packed.shape[1]
        splits, per_split = k_splits(chunks, cfg.split_k)
        grid = (triton.cdiv(n, cfg.block_n), tiles.shape[0], splits)
        fp8 = cfg.fp8_planes
        if fp8 and not fp8_fits(bank, cfg):
            raise ValueError(
                f"FP8 planes need {E4M3_BITS}-bit codes with per-channel steps in the epilogue and "
                f"16 rows a tile or more, not {bank.grid.bits}-bit, group {bank.grid.group_size}, {cfg}"
            )
        given = [t is not None for t in (x8, r)]
        if any(given) and not (fp8 and all(given) and sums is not None):
            raise ValueError("x in e4m3 (x8), its row scales (r) and their sums go together, to FP8 planes only")
        if fp8 and sums is not None and x8 is None:
            raise ValueError("FP8 planes take the sums of x in e4m3 with x8 and r (given alone: the bf16 planes')")
        w = bank.packed.view(torch.int8 if fp8 else torch.int16)
        x_sums = fp8 or (cfg.x_sums and cfg.epilogue_scale)
        m, chunk = x.shape[0], v2_chunk(bank.grid.bits)
        if fp8 and x8 is None:
            x8 = torch.empty((m, chunks * chunk), dtype=torch.float8_e4m3fn, device=x.device)
            r = torch.empty(m, dtype=torch.float32, device=x.device)
            sums = torch.empty((m, splits, 2), dtype=torch.float32, device=x.device)
            _x_e4m3_kernel[(m, splits)](x, x8, r, sums, k, chunks, per_split, x.stride(0), x8.stride(0),
                                        BITS=bank.grid.bits, BLOCK_K=1024, num_warps=4)  # fmt: skip
        elif fp8:
            _check_given(x8, (m, chunks * chunk), torch.float8_e4m3fn, x.device, "x in e4m3", row_major=True)
            _check_given(r, (m,), torch.float32, x.device, "row scales")
            _check_given(sums, (m, splits, 2), torch.float32, x.device, "row sums")
        elif x_sums and sums is not None:
            _check_given(sums, (m, splits, 2), torch.float32, x.device, "row sums")
        elif x_sums:
            sums = torch.empty((x.shape[0], splits, 2), dtype=torch.float32, device=x.device)
            _x_sums_kernel[(x.shape[0], splits)](x, sums, k, per_split * v2_chunk(bank.grid.bits), x.stride(0),
                                                  BITS=bank.grid.bits, IS_BF16=x.dtype == torch.bfloat16,
                                                  BLOCK_K=512, num_warps=4)  # fmt: skip
        x8, r = (x8, r) if fp8 else (tiles, tiles)  # never read without FP8
        _delta_v2_kernel[grid](
            x, y, w, bank.scale, offset, sidx, sval, tiles, sums if x_sums else tiles,  # never read without X_SUMS
            x8, r, n, k, bank.grid.groups, bank.kmax, chunks, per_split, x.stride(0), y.stride(0), x8.stride(0),
            w.stride(0), w.stride(1), *strides,
            BITS=bank.grid.bits, GROUP=bank.grid.group_size, SYMMETRIC=bank.offset is None,
            EPILOGUE_SCALE=cfg.epilogue_scale, EVEN_K=k % v2_chunk(bank.grid.bits) == 0,
            SPLIT_K=grid[2], BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, SAL_BLOCK=SALIENT_BLOCK,
            PREFETCH_Y=cfg.prefetch_y, X_SUMS=x_sums, PAIRED=x_sums and cfg.paired_planes and not fp8, FP8=fp8,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
        )  # fmt: skip
    elif bank.grid.layout_version == LAYOUT_V1:
        grid = (triton.cdiv(n, cfg.block_n), tiles.shape[0], 1)
        _delta_v1_kernel[grid](
            x, y, bank.packed, bank.scale, offset, sidx, sval, tiles,
            n, k, bank.packed.shape[2], bank.grid.groups, bank.kmax, x.stride(0), y.stride(0),
            bank.packed.stride(0), *strides,
            BITS=bank.grid.bits, GROUP=bank.grid.group_size, SYMMETRIC=bank.offset is None,
            BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, BLOCK_K=64, SAL_BLOCK=SALIENT_BLOCK,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    else:
        raise ValueError(f"unknown layout_version {bank.grid.layout_version}")
    return y


def _check_given(t: torch.Tensor, shape: tuple, dtype: torch.dtype, device, what: str, row_major: bool = False):
    """A launch input from the kernel that made x: its shape, dtype and device, contiguous (``row_major``: along
    its rows only), or an error naming it, never a wrong read."""
    dense = t.stride(-1) == 1 if row_major else t.is_contiguous()
    if tuple(t.shape) != shape or t.dtype != dtype or t.device != device or not dense:
        raise ValueError(f"{what} must be {'row-major' if row_major else 'contiguous'} {dtype} {list(shape)} on "
                         f"{device}, got {t.dtype} {list(t.shape)} on {t.device}")  # fmt: skip
