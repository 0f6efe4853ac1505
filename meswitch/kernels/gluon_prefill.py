"""The prefill delta kernel on Hopper, in Gluon: each plane's wgmma runs while the next plane is unpacked.

Same product, layout and epilogue as :func:`meswitch.kernels.triton_delta._delta_v2_kernel` with per-channel
steps applied in the epilogue from x's row sums (``EPILOGUE_SCALE`` and ``X_SUMS``), for prefill tiles (64-128
rows of one expert). Triton waits for every ``tl.dot`` whose A operand sits in registers before it issues the
next, so there a program's unpacking and its MMAs take turns and the tensor cores idle while a plane is unpacked
(the delta product ran at 0.65x cuBLAS's rate for the base GEMM: benchmarks/NOTES-kernels.md). Here the schedule
is ours: plane ``p``'s wgmma is issued asynchronously and retired only after plane ``p + 1``'s codes are unpacked
(``warpgroup_mma(..., is_async=True)``, ``warpgroup_mma_wait(1)``), and a chunk's codes and activation planes
stream into a ring of ``STAGES`` shared-memory slots by cp.async, the next chunk's issued once the slot it
overwrites has no MMA left reading it.

Per chunk of ``32 * P`` positions (``P = 16 // BITS`` planes) a program holds a ``[BLOCK_N, 32]`` int16 tile of codes
(every plane's code of a position in one half-word) and the chunk's ``P`` activation planes ``[BLOCK_M, 32]``, reads
the codes into the wgmma A-operand layout once, and makes each plane with one ``lop3`` per register (and a shift
per three planes; :mod:`.ptx_planes`). ``num_warps // 4`` warpgroups split the ``BLOCK_N`` output channels.
Gluon compiles for sm_90 only (:func:`~meswitch.kernels.launch_config.gluon_prefill_runs`); K a multiple of 32 and
x's rows 16-element aligned, so every cp.async moves 16 bytes (the launch takes the Triton kernel otherwise).
"""

from __future__ import annotations

from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma, warpgroup_mma_wait
from triton.runtime.jit import constexpr_function

from meswitch.kernels.ptx_planes import _biased_asm, _shift_asm, _shift_of

SAL_BLOCK = gl.constexpr(32)


@constexpr_function
def _copy_layout(num_warps):
    """cp.async of a ``[rows, 32]`` 16-bit tile: 16 bytes a thread, four threads a row."""
    return gl.BlockedLayout([1, 8], [8, 4], [num_warps, 1], [1, 0])


@gluon.jit
def _plane(words, BITS: gl.constexpr, p: gl.constexpr, IS_BF16: gl.constexpr):
    """``bias_p + code`` for plane p of an int16 code tile, in the tile's layout (one lop3, maybe a shift)."""
    if _shift_of(BITS, p) > 0:
        src = gl.inline_asm_elementwise(_shift_asm(BITS, p), "=r,r", [words], dtype=gl.int16, is_pure=True, pack=2)
    else:
        src = words
    if IS_BF16:  # (the dtype must be a literal here)
        w = gl.inline_asm_elementwise(_biased_asm(BITS, p, True), "=r,r", [src], dtype=gl.bfloat16, is_pure=True,
                                      pack=2)  # fmt: skip
    else:
        w = gl.inline_asm_elementwise(_biased_asm(BITS, p, False), "=r,r", [src], dtype=gl.float16, is_pure=True,
                                      pack=2)  # fmt: skip
    return w


@gluon.jit
def _issue_chunk(w_smem, x_smem, slot, c, w_tile, stride_wc, w_mask, x_offs, x_mask, kplane, K, c_end,
                 CHUNK: gl.constexpr, EVEN_K: gl.constexpr):  # fmt: skip
    """cp.async of chunk c's codes and activation planes into ring slot ``slot`` (nothing past this split's end;
    planes past K read as zeros: K is a multiple of 32, so a plane lies wholly within K or past it, and the mask is
    constant over each 16-byte copy)."""
    live = c < c_end
    cp.async_copy_global_to_shared(w_smem.index(slot), w_tile + c * stride_wc, mask=w_mask & live)
    if EVEN_K:
        cp.async_copy_global_to_shared(x_smem.index(slot), x_offs + c * CHUNK, mask=x_mask & live)
    else:
        cp.async_copy_global_to_shared(x_smem.index(slot), x_offs + c * CHUNK,
                                       mask=x_mask & live & (kplane < K - c * CHUNK))  # fmt: skip
    cp.commit_group()


@gluon.jit
def _salient(out, x_rows, mmask, sidx_row, sval_rows, nmask, KMAX, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr,
             BLOCK_M: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """``out + corrections · x[:, idx]``, one tf32 wgmma per 32 salient columns (x gathered through shared memory);
    the blocks of columns dealt round the K splits as the Triton kernel deals them."""
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_M, 8])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=1)
    g_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [0, 1])  # x[rows, idx]: rows fastest
    v_l: gl.constexpr = gl.BlockedLayout([1, 4], [4, 8], [num_warps, 1], [1, 0])
    g_smem = gl.allocate_shared_memory(
        gl.float32, [BLOCK_M, SAL_BLOCK], gl.NVMMASharedLayout.get_default_for([BLOCK_M, SAL_BLOCK], gl.float32)
    )
    g_rows = gl.convert_layout(x_rows, gl.SliceLayout(1, g_l))
    g_mask = gl.convert_layout(mmask, gl.SliceLayout(1, g_l))
    v_rows = gl.convert_layout(sval_rows, gl.SliceLayout(1, v_l))
    v_mask = gl.convert_layout(nmask, gl.SliceLayout(1, v_l))
    acc = gl.convert_layout(out, acc_l)
    for s0 in range(gl.program_id(2) * SAL_BLOCK, KMAX, SPLIT_K * SAL_BLOCK):
        gs = s0 + gl.arange(0, SAL_BLOCK, gl.SliceLayout(0, g_l))
        idx = gl.load(sidx_row + gs, mask=gs < KMAX, other=0)
        xg = gl.load(g_rows[:, None] + idx[None, :], mask=g_mask[:, None] & (gs < KMAX)[None, :], other=0.0)
        vs = s0 + gl.arange(0, SAL_BLOCK, gl.SliceLayout(0, v_l))
        sv = gl.load(v_rows[:, None] + vs[None, :], mask=v_mask[:, None] & (vs < KMAX)[None, :], other=0.0)
        gl.thread_barrier()  # the previous block's wgmma has retired (synchronous): g_smem may be rewritten
        g_smem.store(xg.to(gl.float32))
        fence_async_shared()
        gl.thread_barrier()
        acc = warpgroup_mma(gl.convert_layout(sv.to(gl.float32), a_l), g_smem.permute((1, 0)), acc)  # tf32
    return gl.convert_layout(acc, out.type.layout)


@gluon.jit
def _delta_prefill_gluon(
    x_ptr, y_ptr, w_ptr, scale_ptr, offset_ptr, sidx_ptr, sval_ptr, tiles_ptr, sums_ptr,
    N, K, KMAX, n_chunks, chunks_per_split, stride_xm, stride_ym,
    stride_we, stride_wc, stride_se, stride_ie, stride_ve, B1, B2,
    BITS: gl.constexpr, SYMMETRIC: gl.constexpr, EVEN_K: gl.constexpr, SPLIT_K: gl.constexpr,
    BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr, STAGES: gl.constexpr, HAS_SALIENT: gl.constexpr,
    num_warps: gl.constexpr,
):  # fmt: skip
    """Layout-2 codes (bits 1, 2, 4) viewed as int16, per-channel steps; ``sums_ptr``: fp32 ``[M, SPLIT_K, 2]``,
    each row's ``Σx`` and ``Σ bias·x`` over each K split (:func:`meswitch.kernels.triton_delta._x_sums_kernel`)."""
    P: gl.constexpr = 16 // BITS
    CHUNK: gl.constexpr = 32 * P
    HALF_LEVELS: gl.constexpr = ((1 << BITS) - 1) / 2
    DT: gl.constexpr = x_ptr.dtype.element_ty
    IS_BF16: gl.constexpr = gl.bfloat16 == DT

    # wgmma computes accᵀ[BLOCK_N, BLOCK_M] = Δ̂[BLOCK_N, 32] · xᵀ[32, BLOCK_M] per plane: codes are A (registers)
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_M, 16])  # fmt: skip
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    n_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    m_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    wc_l: gl.constexpr = _copy_layout(num_warps)
    w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 32], gl.int16)
    x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 32], DT)

    pid_n = gl.program_id(0)
    tile = tiles_ptr + gl.program_id(1) * (2 + BLOCK_M)
    e = gl.load(tile).to(gl.int64)
    count = gl.load(tile + 1)
    if count == 0:  # an unused tile of a fixed-size (device-built) table
        return
    c_begin = gl.program_id(2) * chunks_per_split
    c_end = gl.minimum(c_begin + chunks_per_split, n_chunks)
    # every split has a chunk (k_splits sizes them so): with no zero-trip path past the loop, no accumulator is
    # written outside a wgmma while one is in flight, which would make ptxas serialise every wgmma (C7515)
    gl.assume(c_end > c_begin)

    # codes: int16 [E, chunks, N, 32] through the expert and chunk strides (a bank may be a view along N)
    wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, wc_l))
    wt = gl.arange(0, 32, gl.SliceLayout(0, wc_l))
    w_tile = w_ptr + e * stride_we + wn[:, None] * 32 + wt[None, :]
    w_mask = (wn < N)[:, None] & (wt >= 0)[None, :]
    # activations: row r of a chunk's [P * BLOCK_M, 32] tile is plane r // BLOCK_M of tile row r % BLOCK_M
    xr = gl.arange(0, P * BLOCK_M, gl.SliceLayout(1, wc_l))
    xm = xr % BLOCK_M
    x_tile_rows = gl.load(tile + 2 + xm).to(gl.int64)
    kplane = ((xr // BLOCK_M) * 32)[:, None]  # the first position of each tile row's plane
    x_offs = x_ptr + x_tile_rows[:, None] * stride_xm + kplane + wt[None, :]
    x_mask = (xm < count)[:, None] & (wt >= 0)[None, :]

    w_smem = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, 32], w_sl)
    x_smem = gl.allocate_shared_memory(DT, [STAGES, P * BLOCK_M, 32], x_sl)
    for j in gl.static_range(STAGES - 1):
        _issue_chunk(w_smem, x_smem, j, c_begin + j, w_tile, stride_wc, w_mask, x_offs, x_mask, kplane, K, c_end,
                     CHUNK, EVEN_K)  # fmt: skip

    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_l)
    prev = gl.zeros([BLOCK_N, 32], DT, a_l)  # the A operand of the MMA in flight: kept alive until it retires
    for c in range(c_begin, c_end):
        i = c - c_begin
        slot = i % STAGES
        cp.wait_group(STAGES - 2)
        fence_async_shared()  # cp.async wrote through the generic proxy; wgmma reads through the async one
        gl.thread_barrier()  # every thread's copies of this chunk have landed
        words = w_smem.index(slot).load(a_l)
        for p in gl.static_range(P):
            wp = _plane(words, BITS, p, IS_BF16)
            xp = x_smem.index(slot).slice(p * BLOCK_M, BLOCK_M)
            acc = warpgroup_mma(wp, xp.permute((1, 0)), acc, is_async=True)
            acc, prev = warpgroup_mma_wait(1, deps=(acc, prev))  # plane p in flight, p - 1 retired
            prev = wp
            if p == 0:
                # the previous chunk's last MMA retired in every warpgroup: its slot takes chunk c + STAGES - 1
                gl.thread_barrier()
                _issue_chunk(w_smem, x_smem, (i + STAGES - 1) % STAGES, c + STAGES - 1, w_tile, stride_wc, w_mask,
                             x_offs, x_mask, kplane, K, c_end, CHUNK, EVEN_K)  # fmt: skip
    acc, prev = warpgroup_mma_wait(0, deps=(acc, prev))
    cp.wait_group(0)

    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, n_l)
    nmask = offs_n < N
    s = gl.load(scale_ptr + e * stride_se + offs_n, mask=nmask, other=0.0).to(gl.float32)
    if SYMMETRIC:
        o = -s * HALF_LEVELS
    else:
        o = gl.load(offset_ptr + e * stride_se + offs_n, mask=nmask, other=0.0).to(gl.float32)
    offs_m = gl.arange(0, BLOCK_M, m_l)
    mmask = offs_m < count
    rows = gl.load(tile + 2 + offs_m).to(gl.int64)
    at = sums_ptr + (rows * SPLIT_K + gl.program_id(2)) * 2
    sum_x = gl.load(at, mask=mmask, other=0.0)
    sum_bx = gl.load(at + 1, mask=mmask, other=0.0)
    out = s[:, None] * (acc - sum_bx[None, :]) + o[:, None] * sum_x[None, :]

    if HAS_SALIENT:
        # this N block's projection's salient columns (a grouped bank holds up to three, from 0, B1 and B2)
        n0 = pid_n * BLOCK_N
        part = (n0 >= B1).to(gl.int64) + (n0 >= B2).to(gl.int64)
        sidx_row = sidx_ptr + e * stride_ie + part * KMAX
        sval_rows = sval_ptr + e * stride_ve + offs_n * KMAX
        out = _salient(out, x_ptr + rows * stride_xm, mmask, sidx_row, sval_rows, nmask, KMAX, SPLIT_K, BLOCK_N,
                       BLOCK_M, num_warps)  # fmt: skip

    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    if SPLIT_K == 1:
        yv = gl.load(y_ptrs, mask=ymask, other=0.0)
        gl.store(y_ptrs, (yv.to(gl.float32) + out).to(yv.dtype), mask=ymask)
    else:
        gl.atomic_add(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask, sem="relaxed")


def launch_prefill(x, y, w, bank, offset, sidx, sval, tiles, sums, grid, per_split, strides, cfg) -> None:
    """The launch :func:`meswitch.kernels.triton_delta.launch` sized (grid, K split, the operands standing in for
    absent offsets and salient columns, x's row sums per split) for ``cfg.gluon``."""
    n, k = bank.grid.shape
    chunk = 32 * (16 // bank.grid.bits)
    _delta_prefill_gluon[grid](
        x, y, w, bank.scale, offset, sidx, sval, tiles, sums,
        n, k, bank.kmax, bank.packed.shape[1], per_split, x.stride(0), y.stride(0), w.stride(0), w.stride(1), *strides,
        BITS=bank.grid.bits, SYMMETRIC=bank.offset is None, EVEN_K=k % chunk == 0, SPLIT_K=grid[2],
        BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, STAGES=cfg.num_stages, HAS_SALIENT=bank.kmax > 0,
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if cfg.maxnreg else {}),
    )  # fmt: skip
