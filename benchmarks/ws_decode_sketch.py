"""A warp-specialized sketch of the decode delta kernel, compiled ahead of time for sm_90 to count its loops: is a
producer warp worth its registers? Not run on a GPU and not used by meswitch (its barrier counts and phases are
untested); it answers, at compile time, what the consumers' loop costs once the copies leave it.

One consumer warpgroup (the default partition: codes from shared memory into the wgmma A layout, the planes'
``lop3`` and async wgmmas, x's row sums given, the epilogue) and one producer warp (cp.async of each chunk's codes
and gathered activation rows into a ring of ``STAGES`` slots, ready and empty mbarriers). Needs Triton 3.6 (the GPU
machine's; ``pip install --target /tmp/tri36 triton==3.6.0``):

    PYTHONPATH=/tmp/tri36 python benchmarks/ws_decode_sketch.py [--stages 3] [--maxnreg 128]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import triton
from sass_loop import backward_loops, innermost, opcode, registers, sass_lines
from triton.backends.compiler import GPUTarget
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon._runtime import GluonASTSource
from triton.experimental.gluon.language.nvidia.ampere import async_copy as cp
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, warpgroup_mma, warpgroup_mma_wait

from meswitch.kernels.gluon_delta import _plane


@gluon.jit
def _consumer(w_smem, x_smem, ready, empty, n_iter, y_ptr, scale_ptr, offset_ptr, sums_ptr, tile, e, pid_n, N, count,
              stride_ym, BITS: gl.constexpr, IS_BF16: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_M: gl.constexpr, STAGES: gl.constexpr):  # fmt: skip
    P: gl.constexpr = 16 // BITS
    DT: gl.constexpr = x_smem.dtype
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    a_l: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_l, k_width=2)
    acc = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, acc_l)
    prev = gl.zeros([BLOCK_N, 32], DT, a_l)
    for i in range(n_iter):
        slot = i % STAGES
        mbarrier.wait(ready.index(slot), (i // STAGES) & 1)
        words = w_smem.index(slot).load(a_l)
        for p in gl.static_range(P):
            wp = _plane(words, BITS, p, IS_BF16)
            xp = x_smem.index(slot).slice(p * BLOCK_M, BLOCK_M)
            acc = warpgroup_mma(wp, xp.permute((1, 0)), acc, is_async=True)
            acc, prev = warpgroup_mma_wait(1, deps=(acc, prev))
            prev = wp
        acc, prev = warpgroup_mma_wait(0, deps=(acc, prev))
        mbarrier.arrive(empty.index(slot))
    n_l: gl.constexpr = gl.SliceLayout(1, acc_l)
    m_l: gl.constexpr = gl.SliceLayout(0, acc_l)
    offs_n = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, n_l)
    nmask = offs_n < N
    s = gl.load(scale_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)
    o = gl.load(offset_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)
    offs_m = gl.arange(0, BLOCK_M, m_l)
    mmask = offs_m < count
    rows = gl.load(tile + 2 + offs_m).to(gl.int64)
    at = sums_ptr + (rows * SPLIT_K + gl.program_id(2)) * 2
    sum_x = gl.load(at, mask=mmask, other=0.0)
    sum_bx = gl.load(at + 1, mask=mmask, other=0.0)
    out = s[:, None] * (acc - sum_bx[None, :]) + o[:, None] * sum_x[None, :]
    y_ptrs = y_ptr + rows[None, :] * stride_ym + offs_n[:, None]
    ymask = nmask[:, None] & mmask[None, :]
    gl.atomic_add(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=ymask, sem="relaxed")


@gluon.jit
def _producer(w_smem, x_smem, ready, empty, n_iter, w_ptr, x_ptr, tiles_ptr, e, c_begin, pid_n, N, n_chunks,
              stride_xm, count, BITS: gl.constexpr, BLOCK_N: gl.constexpr, BLOCK_M: gl.constexpr,
              STAGES: gl.constexpr):  # fmt: skip
    P: gl.constexpr = 16 // BITS
    CHUNK: gl.constexpr = 32 * P
    wc_l: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [1, 1], [1, 0])
    wn = pid_n * BLOCK_N + gl.arange(0, BLOCK_N, gl.SliceLayout(1, wc_l))
    wt = gl.arange(0, 32, gl.SliceLayout(0, wc_l))
    w_ptrs = w_ptr + (e * n_chunks + c_begin) * N * 32 + wn[:, None] * 32 + wt[None, :]
    w_mask = (wn < N)[:, None] & (wt >= 0)[None, :]
    xr = gl.arange(0, P * BLOCK_M, gl.SliceLayout(1, wc_l))
    xm = xr % BLOCK_M
    x_rows = gl.load(tiles_ptr + 2 + xm).to(gl.int64)
    x_ptrs = x_ptr + x_rows[:, None] * stride_xm + (c_begin * CHUNK + (xr // BLOCK_M) * 32)[:, None] + wt[None, :]
    x_mask = (xm < count)[:, None] & (wt >= 0)[None, :]
    for i in range(n_iter):
        slot = i % STAGES
        mbarrier.wait(empty.index(slot), ((i // STAGES) & 1) ^ 1)
        cp.async_copy_global_to_shared(w_smem.index(slot), w_ptrs + i * (N * 32), mask=w_mask)
        cp.async_copy_global_to_shared(x_smem.index(slot), x_ptrs + i * CHUNK, mask=x_mask)
        cp.mbarrier_arrive(ready.index(slot), increment_count=False)


@gluon.jit
def _delta_ws(x_ptr, y_ptr, w_ptr, scale_ptr, offset_ptr, tiles_ptr, sums_ptr, N, n_chunks, chunks_per_split,
              stride_xm, stride_ym, BITS: gl.constexpr, SPLIT_K: gl.constexpr, BLOCK_N: gl.constexpr,
              BLOCK_M: gl.constexpr, STAGES: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    P: gl.constexpr = 16 // BITS
    DT: gl.constexpr = x_ptr.dtype.element_ty
    IS_BF16: gl.constexpr = gl.bfloat16 == DT
    w_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 32], gl.int16)
    x_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_M, 32], DT)
    pid_n = gl.program_id(0)
    tile = tiles_ptr + gl.program_id(1) * (2 + BLOCK_M)
    e = gl.load(tile).to(gl.int64)
    count = gl.load(tile + 1)
    if count == 0:
        return
    c_begin = gl.program_id(2) * chunks_per_split
    c_end = gl.minimum(c_begin + chunks_per_split, n_chunks)
    n_iter = c_end - c_begin
    w_smem = gl.allocate_shared_memory(gl.int16, [STAGES, BLOCK_N, 32], w_sl)
    x_smem = gl.allocate_shared_memory(DT, [STAGES, P * BLOCK_M, 32], x_sl)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(STAGES):
        mbarrier.init(ready.index(j), count=32)
        mbarrier.init(empty.index(j), count=1)
    gl.warp_specialize([
        (_consumer, (w_smem, x_smem, ready, empty, n_iter, y_ptr, scale_ptr, offset_ptr, sums_ptr, tile, e, pid_n, N,
                     count, stride_ym, BITS, IS_BF16, SPLIT_K, BLOCK_N, BLOCK_M, STAGES)),
        (_producer, (w_smem, x_smem, ready, empty, n_iter, w_ptr, x_ptr, tile, e, c_begin, pid_n, N, n_chunks,
                     stride_xm, count, BITS, BLOCK_N, BLOCK_M, STAGES)),
    ], [1], [48])  # fmt: skip


POINTERS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*i16", "scale_ptr": "*fp16", "offset_ptr": "*fp16",
            "tiles_ptr": "*i32", "sums_ptr": "*fp32"}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--stages", type=int, default=3)
    ap.add_argument("--maxnreg", type=int, help="registers a thread at launch (default: ptxas's choice)")
    args = ap.parse_args(argv)
    names = _delta_ws.arg_names
    consts = {"BITS": 2, "SPLIT_K": 2, "BLOCK_N": 128, "BLOCK_M": 16, "STAGES": args.stages, "num_warps": 4}
    signature = {n: "constexpr" if n in consts else POINTERS.get(n, "i32") for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names)
             if n in POINTERS or n in ("N", "stride_xm", "stride_ym")}  # fmt: skip
    options = {"num_warps": 4, **({"maxnreg": args.maxnreg} if args.maxnreg else {})}
    kernel = triton.compile(GluonASTSource(fn=_delta_ws, signature=signature, constexprs=constexprs, attrs=attrs),
                            target=GPUTarget("cuda", 90, 128), options=options)  # fmt: skip
    cubin = kernel.asm["cubin"]
    instructions, labels = sass_lines(cubin)
    print(f"registers at launch {registers(cubin)} (5 warps), shared {kernel.metadata.shared // 1024} KiB, spills "
          f"{sum(opcode(i) in ('LDL', 'STL') for i in instructions)}")  # fmt: skip
    loops = backward_loops(instructions, labels)
    for name, work in (("consumer", "HGMMA"), ("producer", "LDGSTS")):  # each the innermost loop holding its work
        body = innermost(loops, lambda i, work=work: opcode(i) == work)
        ops = collections.Counter(opcode(x) for x in body)
        print(f"{name} loop: {len(body)} instructions a chunk {dict(ops.most_common(8))}")


if __name__ == "__main__":
    main()
