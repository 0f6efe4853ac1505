"""The decode delta kernel in Gluon: the plane MMAs issued asynchronously, one wait per plane in flight.

Same product and layout as :func:`meswitch.kernels.triton_delta._delta_v2_kernel` on its decode path
(layout-2 codes, per-channel steps applied in the epilogue, up to 32 rows per tile), written in Gluon so
the schedule is ours: Triton waits for every ``tl.dot`` whose A operand is in registers to finish
before it issues the next, so each program serialises its 8 plane MMAs per chunk on the tensor core's
latency (benchmarks/NOTES-kernels.md). Here plane ``p + 1``'s codes are unpacked while plane ``p``'s
wgmma runs (``warpgroup_mma(..., is_async=True)`` then ``warpgroup_mma_wait(1)``), and codes and
activations stream into shared memory through a ring of ``STAGES`` cp.async buffers.

Per chunk of ``32 * P`` positions a program holds a ``[BLOCK_N, 32]`` int16 tile of codes (every plane's
code of a position in one half-word), the tile's ``P`` activation planes ``[BLOCK_M, 32]``, and reads
the codes into the wgmma A-operand layout once; each plane is then one ``lop3`` per register
(:mod:`.ptx_planes`). The activations' plane sums for the epilogue (``Σx`` and ``Σ bias·x``) come from a
second MMA per plane against a constant 0/1 operand in shared memory. Opt-in: on the H200 it measured
within a few points of the Triton kernel (benchmarks/NOTES-kernels.md).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.runtime.jit import constexpr_function

from meswitch.kernels.bank import DeltaBank
from meswitch.kernels.launch_config import LaunchConfig
from meswitch.kernels.ptx_planes import _biased_asm, _shift_asm, _shift_of

SAL_BLOCK = gl.constexpr(32)


@constexpr_function
def _shift_class(bits, p):
    """Where plane p's codes sit in a half-word after its shift (ptx_planes): its bias is 2^(7 - bits·class)."""
    return p % (7 // bits)


@constexpr_function
def _rows_per_thread(block_m):
    """A [block_m, 32] tile over 128 threads (block_m 8, 16 or 32)."""
    return [1, 2] if block_m == 8 else [block_m // 16, 4]


@constexpr_function
def _threads_for_rows(block_m):
    return [2, 16] if block_m == 8 else [4, 8]


@constexpr_function
def _num_classes(bits, planes):
    return min(planes, 7 // bits)


@gluon.jit
def _plane(words, BITS: gl.constexpr, p: gl.constexpr, IS_BF16: gl.constexpr):
    """bias_p + code for plane p of an int16 code tile, in the tile's layout (one lop3, maybe a shift)."""
    if _shift_of(BITS, p) > 0:
        src = gl.inline_asm_elementwise(_shift_asm(BITS, p), "=r,r", [words], dtype=gl.int16, is_pure=True, pack=2)
    else:
        src = words
    if IS_BF16:  # (dtype must be a literal here)
        w = gl.inline_asm_elementwise(_biased_asm(BITS, p, True), "=r,r", [src], dtype=gl.bfloat16, is_pure=True,
                                      pack=2)  # fmt: skip
    else:
        w = gl.inline_asm_elementwise(_biased_asm(BITS, p, False), "=r,r", [src], dtype=gl.float16, is_pure=True,
                                      pack=2)  # fmt: skip
    return w


@gluon.jit
def _issue_chunk(w_smem, x_smem, slot, c, w_chunk0, w_offs, w_mask, x_offs, x_mask, c_end, N, CHUNK: gl.constexpr):
    """cp.async of chunk c's codes and activation planes into ring slot ``slot`` (nothing past this split's end)."""
    live = c < c_end
    cp.async_copy_global_to_shared(w_smem.index(slot), w_chunk0 + c * N * 32 + w_offs, mask=w_mask & live)
    cp.async_copy_global_to_shared(x_smem.index(slot), x_offs + c * CHUNK, mask=x_mask & live)
    cp.commit_group()


@gluon.jit
def _salient(out, idx, x_ptr, g_rows, g_mask, sidx_ptr, sval_ptr, e, vn, N, KMAX, BLOCK_M: gl.constexpr):
    """out + corrections · x[:, idx], one tf32 wgmma per 32 salient columns (gathered x through shared memory);
    ``idx``: the first block's column indices, loaded before the main loop (the gather depends on them)."""
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 8])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=1)
    g_l: gl.constexpr = gl.BlockedLayout(_rows_per_thread(BLOCK_M), _threads_for_rows(BLOCK_M), [4, 1], [1, 0])
    v_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])
    g_smem = gl.allocate_shared_memory(
        gl.float32, [BLOCK_M, SAL_BLOCK], gl.NVMMASharedLayout.get_default_for([BLOCK_M, SAL_BLOCK], gl.float32)
    )
    acc = gl.convert_layout(out, acc_l)
    for s0 in range(0, KMAX, SAL_BLOCK):
        gs = s0 + gl.arange(0, SAL_BLOCK, gl.SliceLayout(0, g_l))
        xg = gl.load(x_ptr + g_rows[:, None] + idx[None, :], mask=g_mask[:, None] & (gs < KMAX)[None, :], other=0.0)
        vs = s0 + gl.arange(0, SAL_BLOCK, gl.SliceLayout(0, v_l))
        sv = gl.load(sval_ptr + (e * N + vn[:, None]) * KMAX + vs[None, :],
                     mask=(vn < N)[:, None] & (vs < KMAX)[None, :], other=0.0)  # fmt: skip
        nxt = gs + SAL_BLOCK
        idx = gl.load(sidx_ptr + e * KMAX + nxt, mask=nxt < KMAX, other=0)
        g_smem.store(xg.to(gl.float32))
        fence_async_shared()
        acc = warpgroup_mma(gl.convert_layout(sv.to(gl.float32), a_l), g_smem.permute((1, 0)), acc)  # tf32
    return gl.convert_layout(acc, out.type.layout)


@gluon.jit
def _delta_v2_decode_gluon(
    x_ptr, y_ptr, w_ptr, scale_ptr, offset_ptr, sidx_ptr, sval_ptr, tiles_ptr,
    N, KMAX, n_chunks, chunks_per_split, stride_xm, stride_ym,
    BITS: gl.constexpr, SYMMETRIC: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr,
    BLOCK_M: gl.constexpr, STAGES: gl.constexpr, INFLIGHT: gl.constexpr, HAS_SALIENT: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    P: gl.constexpr = 16 // BITS
    CHUNK: gl.constexpr = 32 * P
    NCLS: gl.constexpr = _num_classes(BITS, P)
    HALF_LEVELS: gl.constexpr = ((1 << BITS) - 1) / 2
    DT: gl.constexpr = x_ptr.dtype.element_ty
    IS_BF16: gl.constexpr = gl.bfloat16 == DT

    # wgmma computes accᵀ[BLOCK_N, BLOCK_M] = Δ̂[BLOCK_N, 32] · xᵀ[32, BLOCK_M] per plane: codes are A (registers)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                    instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    n_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    m_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    # cp.async: 16 bytes a thread; a chunk's activations as P planes of [BLOCK_M, 32] stacked along rows
    wc_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
    g_l: gl.constexpr = gl.BlockedLayout(
        _rows_per_thread(BLOCK_M), _threads_for_rows(BLOCK_M), [4, 1], [1, 0]
    )  # gathered salient x
    v_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [4, 1], [1, 0])  # salient corrections
    w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 32], gl.int16)
    x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 32], DT)

    pid_n = gl.program_id(0)
    tile = tiles_ptr + gl.program_id(1) * (2 + BLOCK_M)
    e = gl.load(tile).to(gl.int64)
    count = gl.load(tile + 1)
    if count == 0:  # an unused tile of a fixed-size (device-built) table
        return

    # this program's chunks
    c_begin = gl.program_id(2) * chunks_per_split
    c_end = gl.minimum(c_begin + chunks_per_split, n_chunks)
    # every split has a chunk (the launch sizes them so): without a zero-trip path past the loop, no accumulator
    # is written outside a wgmma while one is in flight, which would make ptxas serialise every wgmma (C7515)
    gl.assume(c_end > c_begin)

    # codes: packed [E, chunks, N, 16] int32, read as int16 [.., N, 32]
    wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, wc_l))
    wt = gl.arange(0, 32, gl.SliceLayout(0, wc_l))
    w_offs = wn[:, None] * 32 + wt[None, :]
    w_mask = (wn < N)[:, None] & (wt >= 0)[None, :]
    w_chunk0 = w_ptr + e * n_chunks * N * 32
    # activations: row r of a chunk's [P * BLOCK_M, 32] tile is plane r // BLOCK_M of tile row r % BLOCK_M
    xr = gl.arange(0, P * BLOCK_M, gl.SliceLayout(1, wc_l))
    xm = xr % BLOCK_M
    x_rows = gl.load(tile + 2 + xm).to(gl.int64)
    x_offs = x_ptr + x_rows[:, None] * stride_xm + ((xr // BLOCK_M) * 32)[:, None] + wt[None, :]
    x_mask = (xm < count)[:, None] & (wt >= 0)[None, :]
    # loaded now, used after the loop: steps, and the first block of salient column indices (split 0 only)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, n_l)
    nmask = offs_n < N
    s = gl.load(scale_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)
    if SYMMETRIC:  # noqa: SIM108 (Gluon: a constexpr branch)
        o = -s * HALF_LEVELS
    else:
        o = gl.load(offset_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)
    if HAS_SALIENT:
        gm = gl.arange(0, BLOCK_M, gl.SliceLayout(1, g_l))
        g_rows = gl.load(tile + 2 + gm).to(gl.int64) * stride_xm
        g_mask = gm < count
        vn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, v_l))
        gs = gl.arange(0, SAL_BLOCK, gl.SliceLayout(0, g_l))
        idx = gl.load(sidx_ptr + e * KMAX + gs, mask=(gs < KMAX) & (gl.program_id(2) == 0), other=0)

    w_smem = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, 32], w_sl)
    x_smem = gl.allocate_shared_memory(DT, [STAGES, P * BLOCK_M, 32], x_sl)
    for j in gl.static_range(STAGES - 1):
        _issue_chunk(w_smem, x_smem, j, c_begin + j, w_chunk0, w_offs, w_mask, x_offs, x_mask, c_end, N, CHUNK)

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_l)
    # The epilogue needs Σx and Σ bias_p·x per row. A second MMA gives them without per-element ALU work: a
    # constant [64, 32] A (in shared memory, written once) whose row q is 1 and the rest 0 for the planes whose
    # codes sit at shift class q, so sums[q, m] = Σ of x over those planes (bias_p depends on p only via q).
    sums = gl.zeros([64, BLOCK_M], gl.float32, acc_l)
    ones_smem = gl.allocate_shared_memory(DT, [NCLS, 64, 32], gl.NVMMASharedLayout.get_default_for([64, 32], DT))
    o_row = gl.arange(0, 64, gl.SliceLayout(1, wc_l))[:, None] + gl.zeros([64, 32], gl.int32, wc_l)
    for q in gl.static_range(NCLS):
        ones_smem.index(q).store(gl.where(o_row == q, 1.0, 0.0).to(DT))
    prev = gl.zeros([BLOCK_N, 32], DT, a_l)  # the A operands of MMAs in flight: kept alive until retired
    prev2 = gl.zeros([BLOCK_N, 32], DT, a_l)
    # INFLIGHT == 2: odd planes accumulate apart (acc_b, sums_b). wgmmas into one accumulator run one after
    # another, so a single chain of 16 per chunk sets the pace (measured: a second plane in flight alone gained
    # nothing); two chains overlap.
    acc_b = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_l)
    sums_b = gl.zeros([64, BLOCK_M], gl.float32, acc_l)
    for c in range(c_begin, c_end):
        i = c - c_begin
        slot = i % STAGES
        cp.wait_group(STAGES - 2)
        fence_async_shared()  # cp.async and the stores above wrote through the generic proxy; wgmma reads async
        words = w_smem.index(slot).load(a_l)
        for p in gl.static_range(P):
            wp = _plane(words, BITS, p, IS_BF16)
            xp = x_smem.index(slot).slice(p * BLOCK_M, BLOCK_M)
            ones = ones_smem.index(_shift_class(BITS, p))
            if INFLIGHT == 2 and p % 2 == 1:
                acc_b = warpgroup_mma(wp, xp.permute((1, 0)), acc_b, is_async=True)
                sums_b = warpgroup_mma(ones, xp.permute((1, 0)), sums_b, is_async=True)
            else:
                acc = warpgroup_mma(wp, xp.permute((1, 0)), acc, is_async=True)
                sums = warpgroup_mma(ones, xp.permute((1, 0)), sums, is_async=True)
            if INFLIGHT == 2:  # planes p and p - 1 in flight, p - 2 retired (its codes' registers free)
                acc, sums, acc_b, sums_b, prev, prev2 = warpgroup_mma_wait(
                    4, deps=(acc, sums, acc_b, sums_b, prev, prev2)
                )
                prev2 = prev
            else:  # plane p in flight, p - 1 retired
                acc, sums, prev = warpgroup_mma_wait(2, deps=(acc, sums, prev))
            prev = wp
        # slot (i - 1) % STAGES is free: its last MMA retired at this chunk's first wait
        _issue_chunk(w_smem, x_smem, (i + STAGES - 1) % STAGES, c + STAGES - 1, w_chunk0, w_offs, w_mask, x_offs,
                     x_mask, c_end, N, CHUNK)  # fmt: skip
    acc, sums, acc_b, sums_b, prev, prev2 = warpgroup_mma_wait(0, deps=(acc, sums, acc_b, sums_b, prev, prev2))
    cp.wait_group(0)
    if INFLIGHT == 2:
        acc += acc_b
        sums += sums_b

    offs_m = gl.arange(0, BLOCK_M, m_l)
    mmask = offs_m < count
    rows = gl.load(tile + 2 + offs_m).to(gl.int64)
    q = gl.arange(0, 64, gl.SliceLayout(1, acc_l))
    bias = gl.exp2((7 if IS_BF16 else 10) - BITS * q.to(gl.float32))  # bias of shift class q (ptx_planes)
    sum_x = gl.sum(sums, axis=0)  # rows past the classes are 0
    sum_bx = gl.sum(sums * bias[:, None], axis=0)
    out = s[:, None] * (acc - sum_bx[None, :]) + o[:, None] * sum_x[None, :]

    if HAS_SALIENT:  # noqa: SIM102 (a constexpr branch, then a runtime one)
        if gl.program_id(2) == 0:
            out = _salient(out, idx, x_ptr, g_rows, g_mask, sidx_ptr, sval_ptr, e, vn, N, KMAX, BLOCK_M)

    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1:
        yv = gl.load(y_ptrs, mask=ymask, other=0.0)
        gl.store(y_ptrs, (yv.to(gl.float32) + out).to(yv.dtype), mask=ymask)
    else:
        gl.atomic_add(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask, sem="relaxed")


def launch_gluon(
    grid: tuple[int, int, int],
    x: torch.Tensor,
    y: torch.Tensor,
    bank: DeltaBank,
    offset: torch.Tensor,
    sidx: torch.Tensor,
    sval: torch.Tensor,
    tiles: torch.Tensor,
    per_split: int,
    cfg: LaunchConfig,
) -> None:
    """The launch :func:`meswitch.kernels.triton_delta.launch` sized (grid, K split, the operands standing in for
    absent offsets and salient columns) when ``cfg.kernel == "gluon"`` and
    :func:`~meswitch.kernels.launch_config.gluon_fits` allows it."""
    _delta_v2_decode_gluon[grid](
        x, y, bank.packed.view(torch.int16), bank.scale, offset, sidx, sval, tiles,
        bank.grid.shape[0], bank.kmax, bank.packed.shape[1], per_split, x.stride(0), y.stride(0),
        BITS=bank.grid.bits, SYMMETRIC=bank.offset is None, SPLIT_K=grid[2], BLOCK_N=cfg.block_n,
        BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, INFLIGHT=cfg.inflight, HAS_SALIENT=bank.kmax > 0, num_warps=4,
    )  # fmt: skip
