"""A prefill linear as one product ``x · (W + Δ̂_e)ᵀ`` on Hopper: the base GEMM's FLOPs once, not twice.

Apart, a prefill runs the base GEMM and then the delta product over the same rows: the FLOPs twice, so 2x the base
alone is the bf16 floor (benchmarks/NOTES-kernels.md). Here each program makes its expert's merged weights a plane
(32 positions of K) at a time in shared memory while its MMAs consume the previous planes, partitions of one program
working side by side (``gl.warp_specialize``):

- a loader warp issues TMA copies of x's plane (``[BLOCK_M, 32]`` fp16) and W's (``[BLOCK_N, 32]`` bf16) into rings;
- two transform warp groups (alternate planes) read the chunk's codes (layout 2) straight into registers and make
  ``f16(W) + f16(s·q + o)`` in packed f16x2 arithmetic (:func:`_merge_asm`), then the salient columns' corrections as
  extra planes, into a ring of merged planes;
- the default partition (two warp groups) runs wgmma with both operands from shared memory, one plane in flight,
  and writes each row back to its place in y, times the row's scale.

The MMA takes fp16: rounding ``W + Δ̂`` to bf16 would drop a small delta's low bits (an expert saved in fp32 lost a
hundredfold in KL, benchmarks/merged_rounding_kl.py; in fp16 bf16-saved experts are unchanged). x enters as fp16 in
expert order (:func:`_prepare_kernel`), each row divided by a power of two that keeps it within fp16's range (exact)
and multiplied back in the epilogue. sm_90 only (wgmma, TMA); :func:`~meswitch.kernels.launch_config.merges_prefill`
says where the launch applies.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor
from triton.runtime.jit import constexpr_function

from meswitch.kernels.bank import DeltaBank, ExpertRows
from meswitch.kernels.direct_launch import DirectLauncher
from meswitch.kernels.launch_config import MergedConfig

PLANE = gl.constexpr(32)  # K positions a plane (layout 2): a TMA box's width and one MMA step
FP16_ROOM = tl.constexpr(14)  # a row's largest |x| is brought under 2^(FP16_ROOM + 1), fp16's range being 65504


@triton.jit
def _inverse_scale(top, rs_at):
    """``1 / s`` for the least power of two ``s`` with ``top / s < 2^(FP16_ROOM + 1)``; stores ``s`` at ``rs_at``."""
    exponent = ((top.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2(top)) for a normal top
    shift = tl.maximum(exponent - FP16_ROOM, 0)
    tl.store(rs_at, ((127 + shift) << 23).to(tl.float32, bitcast=True))
    return ((127 - shift) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _prepare_kernel(x_ptr, order_ptr, expert_ptr, sidx_ptr, x16_ptr, xs_ptr, rs_ptr, K, KS, KMAX, R, stride_xm,
                    stride_ie, stride_ip, PARTS: tl.constexpr, BLOCK_K: tl.constexpr, ONE_PASS: tl.constexpr,
                    BLOCK_S: tl.constexpr):  # fmt: skip
    """Row r of x in expert order (``order[r]``) as fp16 divided by ``rs[r]``, the least power of two that brings its
    largest |value| under 2^15 (1 for every usual row); and for each projection ``part`` its salient columns
    ``x16[r, sidx[e(r), part, :KMAX]]`` zero-padded to ``KS``, the extra planes of the product."""
    r = tl.program_id(0)
    src = tl.load(order_ptr + r).to(tl.int64)
    row = x_ptr + src * stride_xm
    offs = tl.arange(0, BLOCK_K)
    out = x16_ptr + r.to(tl.int64) * K
    if ONE_PASS:  # the row in registers: one read
        v = tl.load(row + offs, mask=offs < K, other=0.0).to(tl.float32)
        inv = _inverse_scale(tl.max(tl.abs(v), axis=0), rs_ptr + r)
        tl.store(out + offs, (v * inv).to(tl.float16), mask=offs < K)
    else:
        amax = tl.zeros([BLOCK_K], tl.float32)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            amax = tl.maximum(amax, tl.abs(v))
        inv = _inverse_scale(tl.max(amax, axis=0), rs_ptr + r)
        for k0 in range(0, K, BLOCK_K):
            v = tl.load(row + k0 + offs, mask=k0 + offs < K, other=0.0).to(tl.float32)
            tl.store(out + k0 + offs, (v * inv).to(tl.float16), mask=k0 + offs < K)
    if KS > 0:
        e = tl.load(expert_ptr + r).to(tl.int64)
        j = tl.arange(0, BLOCK_S)
        for part in tl.static_range(PARTS):
            idx = tl.load(sidx_ptr + e * stride_ie + part * stride_ip + j, mask=j < KMAX, other=0)
            g = tl.load(row + idx, mask=j < KMAX, other=0.0).to(tl.float32)
            tl.store(xs_ptr + (part * R + r).to(tl.int64) * KS + j, (g * inv).to(tl.float16), mask=j < KS)


@constexpr_function
def _merge_asm(bits: int, p: int) -> str:
    """``f16(W) + (v·s' + o')`` for a register pair: W bf16x2 ($1), the chunk's code words ($2), ``s' = s·2^bits`` and
    ``o' = o - s'`` as f16x2 ($3, $4). Plane p's codes are moved to the top ``bits`` of each half-word's mantissa and
    or-ed into 1.0, so ``v = 1 + q·2^-bits`` exactly and ``v·s' + o' = q·s + o``: the FMA rounds the delta once, at
    its own scale; the add rounds the merged weight once. Seven instructions a pair."""
    shift = (10 - bits) - bits * p
    move = f"shl.b32 t, $2, {shift};" if shift > 0 else f"shr.u32 t, $2, {-shift};" if shift < 0 else "mov.b32 t, $2;"
    mask = ((1 << bits) - 1) << (10 - bits)
    return (
        "{ .reg .b32 lo, hi, w, t, v, d; "
        "shl.b32 lo, $1, 16; and.b32 hi, $1, 0xFFFF0000; cvt.rn.f16x2.f32 w, hi, lo; "
        f"{move} lop3.b32 v, t, {mask | (mask << 16):#x}, 0x3C003C00, 0xEA; "
        "fma.rn.f16x2 d, v, $3, $4; add.rn.f16x2 $0, w, d; }"
    )


@gluon.jit
def _merge(wv, words, s2, o2, BITS: gl.constexpr, p: gl.constexpr):
    return gl.inline_asm_elementwise(_merge_asm(BITS, p), "=r,r,r,r,r", [wv, words, s2, o2], dtype=gl.float16,
                                     is_pure=True, pack=2)  # fmt: skip


@gluon.jit
def _fill(desc, row, k0, ready, empty, smem, i, PS: gl.constexpr):
    """Step i of a ring: wait until its slot is free, then TMA-copy the ``PS`` planes from column ``k0`` on."""
    SLOTS: gl.constexpr = smem.type.shape[0] // PS
    slot = i % SLOTS
    mbarrier.wait(empty.index(slot), ((i // SLOTS) & 1) ^ 1)
    mbarrier.expect(ready.index(slot), PS * desc.block_type.nbytes)
    for h in gl.static_range(PS):
        tma.async_copy_global_to_shared(desc, [row, k0 + h * PLANE], ready.index(slot), smem.index(slot * PS + h))


@gluon.jit
def _loader(x_desc, xs_desc, w_desc, x_smem, w_smem, bars, row0, xs_row0, n0, n_steps, n_sal_steps,
            PS: gl.constexpr):  # fmt: skip
    """One warp: TMA copies of each step's ``PS`` planes of x and W (then the salient steps' x) into their rings."""
    x_ready, x_empty, w_ready, w_empty, _, _ = bars
    for i in range(n_steps):
        _fill(x_desc, row0, i * PS * PLANE, x_ready, x_empty, x_smem, i, PS)
        _fill(w_desc, n0, i * PS * PLANE, w_ready, w_empty, w_smem, i, PS)
    for j in range(n_sal_steps):
        _fill(xs_desc, xs_row0, j * PS * PLANE, x_ready, x_empty, x_smem, n_steps + j, PS)


@gluon.jit
def _transform(w_smem, m_smem, bars, codes_ptr, scale_ptr, offset_ptr, sval_ptr, e, n0, N, n_steps, n_sal_steps,
               KMAX, stride_we, stride_wc, stride_se, stride_ve, stride_vn, BITS: gl.constexpr,
               SYMMETRIC: gl.constexpr, PS: gl.constexpr, T: gl.constexpr):  # fmt: skip
    """One of two warp groups: the steps (``PS`` planes each) of every chunk whose index within the chunk is ``T``
    modulo 2, then the salient steps ``j % 2 == T``."""
    _, _, w_ready, w_empty, m_ready, m_empty = bars
    P: gl.constexpr = 16 // BITS
    WS: gl.constexpr = w_smem.type.shape[0] // PS
    BLOCK_N: gl.constexpr = w_smem.type.shape[1]
    MS: gl.constexpr = m_smem.type.shape[0] // PS
    SPC: gl.constexpr = P // PS  # steps a chunk (even: the two warp groups alternate within it)
    L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    offs_n = n0 + gl.arange(0, BLOCK_N, gl.SliceLayout(1, L))
    nmask = offs_n < N
    t = gl.arange(0, PLANE, gl.SliceLayout(0, L))
    s = gl.load(scale_ptr + e * stride_se + offs_n, mask=nmask, other=0.0).to(gl.float32)[:, None]
    if SYMMETRIC:
        o = -s * (((1 << BITS) - 1) / 2)
    else:
        o = gl.load(offset_ptr + e * stride_se + offs_n, mask=nmask, other=0.0).to(gl.float32)[:, None]
    zeros = gl.zeros([BLOCK_N, PLANE], gl.float32, L)
    s2, _ = gl.broadcast((s * (1 << BITS)).to(gl.float16), zeros)
    o2, _ = gl.broadcast((o - s * (1 << BITS)).to(gl.float16), zeros)
    codes = codes_ptr + e * stride_we + offs_n[:, None] * PLANE + t[None, :]  # int16 [E, chunks, N, 32]
    cmask = nmask[:, None] & (t >= 0)[None, :]
    for c in range(gl.cdiv(n_steps, SPC)):
        words = gl.load(codes + c * stride_wc, mask=cmask, other=0)
        for ss in gl.static_range(SPC // 2):
            i = c * SPC + 2 * ss + T
            if i < n_steps:
                ws = i % WS
                mbarrier.wait(w_ready.index(ws), (i // WS) & 1)
                ms = i % MS
                mbarrier.wait(m_empty.index(ms), ((i // MS) & 1) ^ 1)
                for h in gl.static_range(PS):
                    merged = _merge(w_smem.index(ws * PS + h).load(L), words, s2, o2, BITS, (2 * ss + T) * PS + h)
                    m_smem.index(ms * PS + h).store(merged)
                mbarrier.arrive(w_empty.index(ws), count=1)
                fence_async_shared()
                mbarrier.arrive(m_ready.index(ms), count=1)
    vrows = sval_ptr + e * stride_ve + offs_n[:, None] * stride_vn
    for j in range(T, n_sal_steps, 2):  # the salient columns' corrections, exact in fp16
        i = n_steps + j
        ms = i % MS
        mbarrier.wait(m_empty.index(ms), ((i // MS) & 1) ^ 1)
        for h in gl.static_range(PS):
            col = (j * PS + h) * PLANE + t
            corr = gl.load(vrows + col[None, :], mask=nmask[:, None] & (col < KMAX)[None, :], other=0.0)
            m_smem.index(ms * PS + h).store(corr.to(gl.float16))
        fence_async_shared()
        mbarrier.arrive(m_ready.index(ms), count=1)


@gluon.jit
def _mma(x_smem, m_smem, bars, y_ptr, order_ptr, rs_ptr, row0, count, n0, N, stride_y, n_steps,
         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, PS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The default partition: ``acc += x_plane · merged_planeᵀ`` for each plane of a step, one step's MMAs in flight
    while it waits for the next; then each row, times its scale, into its place in y."""
    x_ready, x_empty, _, _, m_ready, m_empty = bars
    XS: gl.constexpr = x_smem.type.shape[0] // PS
    MS: gl.constexpr = m_smem.type.shape[0] // PS
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    for i in range(n_steps):
        xs = i % XS
        ms = i % MS
        mbarrier.wait(x_ready.index(xs), (i // XS) & 1)
        mbarrier.wait(m_ready.index(ms), (i // MS) & 1)
        for h in gl.static_range(PS):
            acc = warpgroup_mma(x_smem.index(xs * PS + h), m_smem.index(ms * PS + h).permute((1, 0)), acc,
                                is_async=True)  # fmt: skip
        acc = warpgroup_mma_wait(PS, deps=[acc])
        prev = gl.maximum(i - 1, 0)  # step i - 1's MMAs have retired: its slots go back
        mbarrier.arrive(x_empty.index(prev % XS), count=1, pred=i > 0)
        mbarrier.arrive(m_empty.index(prev % MS), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])

    offs_m = gl.arange(0, BLOCK_M, gl.SliceLayout(1, acc_l))
    scale = gl.load(rs_ptr + row0 + offs_m, mask=offs_m < count, other=1.0)
    out = (acc * scale[:, None]).to(y_ptr.dtype.element_ty)
    # through shared memory (the x ring, whose MMAs have all retired) into rows of 8 consecutive outputs a thread:
    # 16-byte stores where the accumulator's layout gives 2-byte ones
    TPW_N: gl.constexpr = BLOCK_N // 8
    store_l: gl.constexpr = gl.BlockedLayout([1, 8], [32 // TPW_N, TPW_N], [num_warps, 1], [1, 0])
    stage = x_smem._reinterpret(out.dtype, [BLOCK_M, BLOCK_N], gl.SwizzledSharedLayout(8, 1, 8, [1, 0]))
    stage.store(out)
    out = stage.load(store_l)
    offs_m = gl.arange(0, BLOCK_M, gl.SliceLayout(1, store_l))
    offs_n = n0 + gl.arange(0, BLOCK_N, gl.SliceLayout(0, store_l))
    mmask = offs_m < count
    rows = gl.load(order_ptr + row0 + offs_m, mask=mmask, other=0).to(gl.int64)
    gl.store(y_ptr + rows[:, None] * stride_y + offs_n[None, :], out, mask=mmask[:, None] & (offs_n < N)[None, :])


@gluon.jit
def _ring_barriers(SLOTS: gl.constexpr):
    """(ready, empty): an mbarrier each per slot of a ring, one arrival a phase."""
    ready = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(SLOTS):
        mbarrier.init(ready.index(j), count=1)
        mbarrier.init(empty.index(j), count=1)
    return ready, empty


@gluon.jit
def _tile(tiles_ptr, num_m_tiles, B1, B2, BLOCK_N: gl.constexpr):
    """This program's tile: (expert, first row in expert order, rows, first output channel, projection part). The
    row tiles of an N block are launched next to each other, so their W planes come from L2."""
    pid = gl.program_id(0)
    m_tile = pid % num_m_tiles
    n0 = (pid // num_m_tiles) * BLOCK_N
    e = gl.load(tiles_ptr + m_tile * 3).to(gl.int64)
    row0 = gl.load(tiles_ptr + m_tile * 3 + 1)
    count = gl.load(tiles_ptr + m_tile * 3 + 2)
    part = (n0 >= B1).to(gl.int32) + (n0 >= B2).to(gl.int32)
    return e, row0, count, n0, part


@gluon.jit
def _merged_kernel(x_desc, xs_desc, w_desc, y_ptr, order_ptr, rs_ptr, tiles_ptr, codes_ptr, scale_ptr, offset_ptr,
                   sval_ptr, N, K, R, KMAX, n_sal, num_m_tiles, stride_y, stride_we, stride_wc, stride_se, stride_ve,
                   stride_vn, B1, B2, BITS: gl.constexpr, SYMMETRIC: gl.constexpr, BLOCK_M: gl.constexpr,
                   BLOCK_N: gl.constexpr, PS: gl.constexpr, XS: gl.constexpr, WS: gl.constexpr, MS: gl.constexpr,
                   TRANSFORM_REGS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One tile: up to ``BLOCK_M`` rows of one expert (``tiles_ptr``: int32 [tiles, 3] expert, first row in expert
    order, rows) x ``BLOCK_N`` output channels of one projection (a grouped bank's part from ``B1``, ``B2``)."""
    e, row0, count, n0, part = _tile(tiles_ptr, num_m_tiles, B1, B2, BLOCK_N)
    n_steps = gl.cdiv(K, PS * PLANE)
    n_sal_steps = gl.cdiv(n_sal, PS)

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [XS * PS, BLOCK_M, PLANE], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [WS * PS, BLOCK_N, PLANE], w_desc.layout)
    m_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, PLANE], gl.float16)
    m_smem = gl.allocate_shared_memory(gl.float16, [MS * PS, BLOCK_N, PLANE], m_layout)
    x_ready, x_empty = _ring_barriers(XS)
    w_ready, w_empty = _ring_barriers(WS)
    m_ready, m_empty = _ring_barriers(MS)
    bars = (x_ready, x_empty, w_ready, w_empty, m_ready, m_empty)

    gl.warp_specialize(
        [
            (_mma, (x_smem, m_smem, bars, y_ptr, order_ptr, rs_ptr, row0, count, n0, N, stride_y,
                    n_steps + n_sal_steps, BLOCK_M, BLOCK_N, PS, num_warps)),
            (_loader, (x_desc, xs_desc, w_desc, x_smem, w_smem, bars, row0, part * R + row0, n0, n_steps,
                       n_sal_steps, PS)),
            (_transform, (w_smem, m_smem, bars, codes_ptr, scale_ptr, offset_ptr, sval_ptr, e, n0, N, n_steps,
                          n_sal_steps, KMAX, stride_we, stride_wc, stride_se, stride_ve, stride_vn, BITS, SYMMETRIC,
                          PS, 0)),
            (_transform, (w_smem, m_smem, bars, codes_ptr, scale_ptr, offset_ptr, sval_ptr, e, n0, N, n_steps,
                          n_sal_steps, KMAX, stride_we, stride_wc, stride_se, stride_ve, stride_vn, BITS, SYMMETRIC,
                          PS, 1)),
        ],
        [1, 4, 4],
        [24, TRANSFORM_REGS, TRANSFORM_REGS],
    )  # fmt: skip


_PREPARE = DirectLauncher(_prepare_kernel)
_MERGED = DirectLauncher(_merged_kernel)


@functools.cache
def _plane_layout(rows: int, dtype: torch.dtype) -> gl.NVMMASharedLayout:
    """The swizzled layout of a ``[rows, 32]`` plane (cached: making one takes about 10 us of Python a call)."""
    return gl.NVMMASharedLayout.get_default_for([rows, PLANE.value], {torch.float16: gl.float16,
                                                                      torch.bfloat16: gl.bfloat16}[dtype])  # fmt: skip


def _descriptor(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A plane of ``rows`` rows of a 2-D tensor."""
    return TensorDescriptor.from_tensor(t, [rows, PLANE.value], _plane_layout(rows, t.dtype))


def merged_linear_gluon(
    x: torch.Tensor, weight: torch.Tensor, bank: DeltaBank, rows: ExpertRows, y: torch.Tensor, cfg: MergedConfig
) -> torch.Tensor:
    """``y[m] = x[m] · (W + Δ̂_{e(m)})ᵀ`` for every row of an expert (``rows``; the rest of y is left as it is).
    x, W and y bf16, W ``[N, K]`` contiguous; ``bank`` layout 2 with per-channel steps (checked by the caller,
    :func:`~meswitch.kernels.launch_config.merges_prefill`)."""
    n, k = bank.grid.shape
    if cfg.x_slots * cfg.planes_per_step * PLANE.value < cfg.block_n:
        raise ValueError(f"the x ring ({cfg.x_slots} slots) is too small to stage a tile's {cfg.block_n} outputs")
    order, experts, tiles = rows.merged_tables(cfg.block_m, x.device)
    r, device = order.shape[0], x.device
    kmax = bank.kmax
    n_sal = triton.cdiv(kmax, PLANE.value)
    ks = n_sal * PLANE.value
    parts = len(bank.bounds) - 1
    sidx = bank.salient_idx if bank.salient_idx.dim() == 3 else bank.salient_idx[:, None, :]
    x16 = torch.empty(r, k, dtype=torch.float16, device=device)
    xs = torch.empty(max(parts * r, 1), max(ks, PLANE.value), dtype=torch.float16, device=device)
    rs = torch.empty(r, dtype=torch.float32, device=device)
    _PREPARE(
        r, (x, order, experts, sidx, x16, xs, rs, k, ks, kmax, r, x.stride(0), sidx.stride(0), sidx.stride(1)),
        {"PARTS": parts, "BLOCK_K": min(16384, triton.next_power_of_2(k)), "ONE_PASS": k <= 16384,
         "BLOCK_S": max(16, triton.next_power_of_2(ks))}, num_warps=8,
    )  # fmt: skip
    codes = bank.packed.view(torch.int16)  # int32 [E, chunks, N, 16] -> int16 [E, chunks, N, 32]
    bounds = (*bank.bounds[1:-1], n, n)
    offset = bank.scale if bank.offset is None else bank.offset
    args = (_descriptor(x16, cfg.block_m), _descriptor(xs, cfg.block_m), _descriptor(weight, cfg.block_n), y, order,
            rs, tiles, codes, bank.scale, offset, bank.salient_val, n, k, r, kmax, n_sal, tiles.shape[0], y.stride(0),
            codes.stride(0), codes.stride(1), bank.scale.stride(0), bank.salient_val.stride(0),
            bank.salient_val.stride(1), bounds[0], bounds[1])  # fmt: skip
    grid = tiles.shape[0] * triton.cdiv(n, cfg.block_n)
    head = {"BITS": bank.grid.bits, "SYMMETRIC": bank.offset is None, "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n}
    _MERGED(grid, args, {**head, "PS": cfg.planes_per_step, "XS": cfg.x_slots, "WS": cfg.w_slots,
                         "MS": cfg.merged_slots, "TRANSFORM_REGS": cfg.transform_regs, "num_warps": 8},
            maxnreg=cfg.maxnreg)  # fmt: skip
    return y
