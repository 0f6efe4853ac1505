"""Prefill's merged product ``x · (W + Δ̂)ᵀ`` in a warp-specialized Gluon kernel: can it run near cuBLAS's rate?

Apart, a prefill runs the base GEMM and then the delta product, the same FLOPs twice: 2x is the bf16 floor and the
2,048-token prefill stands at 1.97x base alone (benchmarks/NOTES-kernels.md). One product of x with the merged
weights runs the FLOPs once; two earlier merged kernels (Triton) ran it at half cuBLAS's rate, because each warp group
unpacked and multiplied in turn. Here the work is split between partitions of one program:

- a loader warp issues TMA copies of x's plane (``[BLOCK_M, 32]``), W's plane (``[BLOCK_N, 32]`` bf16) and, once a
  chunk, the chunk's codes (``[BLOCK_N, 32]`` int16, layout 2) into rings of shared-memory slots;
- one or two transform warp groups (alternate planes) make ``f16(W) + f16(s·q + o)`` from a W slot and the chunk's
  codes in packed f16x2 arithmetic (seven instructions a register pair, :func:`_merge_asm`) and store it into a ring
  the MMA reads; fp16, not bf16, since bf16 would drop a small delta's low bits (``merged_rounding_kl.py``);
- the default partition (two warp groups) issues wgmma with both operands from shared memory (x fp16 as A, the merged
  plane as B), one plane in flight while it waits for the next, and stores the tile.

``--modes`` separates the costs: ``merged`` (all of it), ``copy`` (the transform only converts W: no codes), ``gemm``
(no transform: the MMA reads W's slots itself, an fp16 GEMM through this pipeline). Rows are grouped by expert (a
prefill copies x into expert order once per launch; each tile is one expert's). SYNTHETIC 2-bit per-channel deltas,
no salient columns (they stay a small product of their own). A scratch experiment: nothing in ``meswitch`` uses it.

    python benchmarks/prefill_ws_merged.py --out ws-merged.json           # on an sm_90 GPU
    python benchmarks/prefill_ws_merged.py --compile-only                 # here: compile for sm_90, SASS counts
"""

from __future__ import annotations

import argparse
import datetime as dt
import functools
import json
import platform
import sys
from pathlib import Path

import torch
import triton
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODES = {"merged": 0, "copy": 1, "gemm": 2}
SHAPES = {  # Mistral-7B's prefill linears as the decoder launches them (N, K)
    "q/k/v grouped": (6144, 4096),
    "o": (4096, 4096),
    "gate/up grouped": (28672, 4096),
    "down": (4096, 14336),
}


@gluon.jit
def _loader(x_desc, w_desc, q_desc, x_smem, w_smem, q_smem, bars, row0, n0, q_row0, N, n_planes,
            P: gl.constexpr, MODE: gl.constexpr):  # fmt: skip
    """One warp: TMA copies of each plane's x and W, and each chunk's codes, into their rings."""
    x_ready, x_empty, w_ready, w_empty, q_ready, q_empty, _, _ = bars
    XS: gl.constexpr = x_smem.type.shape[0]
    WS: gl.constexpr = w_smem.type.shape[0]
    for i in range(n_planes):
        xs = i % XS
        mbarrier.wait(x_empty.index(xs), ((i // XS) & 1) ^ 1)
        mbarrier.expect(x_ready.index(xs), x_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(x_desc, [row0, i * 32], x_ready.index(xs), x_smem.index(xs))
        ws = i % WS
        mbarrier.wait(w_empty.index(ws), ((i // WS) & 1) ^ 1)
        mbarrier.expect(w_ready.index(ws), w_desc.block_type.nbytes)
        tma.async_copy_global_to_shared(w_desc, [n0, i * 32], w_ready.index(ws), w_smem.index(ws))
        if MODE == 0 and i % P == 0:
            c = i // P
            qs = c % 2
            mbarrier.wait(q_empty.index(qs), ((c // 2) & 1) ^ 1)
            mbarrier.expect(q_ready.index(qs), q_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(q_desc, [q_row0 + c * N, 0], q_ready.index(qs), q_smem.index(qs))


@constexpr_function
def _merge_asm(bits: int, p: int) -> str:
    """``f16(W) + (v·s4 + o4)`` for a register pair: W bf16x2 ($1), the chunk's code words ($2), ``s4 = 4s`` and
    ``o4 = o - 4s`` as f16x2 ($3, $4). Plane p's codes are moved to bits 8-9 of each half-word and or-ed into 1.0, so
    ``v = 1 + q/4`` exactly; the FMA rounds the delta once to fp16 and the add rounds the merged weight once."""
    shift = 8 - bits * p
    move = f"shl.b32 t, $2, {shift};" if shift > 0 else f"shr.u32 t, $2, {-shift};" if shift < 0 else "mov.b32 t, $2;"
    mask = ((1 << bits) - 1) << 8
    return (
        "{ .reg .b32 lo, hi, w, t; .reg .b32 v, d; "
        "shl.b32 lo, $1, 16; and.b32 hi, $1, 0xFFFF0000; cvt.rn.f16x2.f32 w, hi, lo; "
        f"{move} lop3.b32 v, t, {mask | (mask << 16):#x}, 0x3C003C00, 0xEA; "
        "fma.rn.f16x2 d, v, $3, $4; add.rn.f16x2 $0, w, d; }"
    )


@gluon.jit
def _merge(wv, words, s4, o4, BITS: gl.constexpr, p: gl.constexpr):
    return gl.inline_asm_elementwise(_merge_asm(BITS, p), "=r,r,r,r,r", [wv, words, s4, o4], dtype=gl.float16,
                                     is_pure=True, pack=2)  # fmt: skip


@gluon.jit
def _transform(w_smem, q_smem, m_smem, bars, scale_ptr, offset_ptr, e, n0, N, n_chunks_k, BITS: gl.constexpr,
               P: gl.constexpr, MODE: gl.constexpr, T: gl.constexpr, TRANSFORMS: gl.constexpr):  # fmt: skip
    """One warp group (of ``TRANSFORMS``, this one plane ``p`` of each chunk where ``p % TRANSFORMS == T``): the merged
    plane ``W + s·q + o`` in fp16 (:func:`_merge_asm`; MODE 1: W converted only) into the merged ring."""
    _, _, w_ready, w_empty, q_ready, q_empty, m_ready, m_empty = bars
    if MODE != 2:
        BLOCK_N: gl.constexpr = w_smem.type.shape[1]
        WS: gl.constexpr = w_smem.type.shape[0]
        MS: gl.constexpr = m_smem.type.shape[0]
        L: gl.constexpr = gl.BlockedLayout([1, 8], [8, 4], [4, 1], [1, 0])
        offs_n = n0 + gl.arange(0, BLOCK_N, gl.SliceLayout(1, L))
        nmask = offs_n < N
        s = gl.load(scale_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)[:, None]
        o = gl.load(offset_ptr + e * N + offs_n, mask=nmask, other=0.0).to(gl.float32)[:, None]
        zeros = gl.zeros([BLOCK_N, 32], gl.float32, L)
        s4, _ = gl.broadcast((4.0 * s).to(gl.float16), zeros)
        o4, _ = gl.broadcast((o - 4.0 * s).to(gl.float16), zeros)
        for c in range(n_chunks_k):
            qs = c % 2
            if MODE == 0:
                mbarrier.wait(q_ready.index(qs), (c // 2) & 1)
                words = q_smem.index(qs).load(L)
            for pp in gl.static_range(P // TRANSFORMS):
                p = pp * TRANSFORMS + T
                i = c * P + p
                ws = i % WS
                mbarrier.wait(w_ready.index(ws), (i // WS) & 1)
                wv = w_smem.index(ws).load(L)
                m = _merge(wv, words, s4, o4, BITS, pp * TRANSFORMS + T) if MODE == 0 else wv.to(gl.float16)
                mbarrier.arrive(w_empty.index(ws), count=1)
                ms = i % MS
                mbarrier.wait(m_empty.index(ms), ((i // MS) & 1) ^ 1)
                m_smem.index(ms).store(m)
                fence_async_shared()
                mbarrier.arrive(m_ready.index(ms), count=1)
            if MODE == 0:
                mbarrier.arrive(q_empty.index(qs), count=1)


@gluon.jit
def _mma(x_smem, w_smem, m_smem, bars, y_ptr, row0, count, n0, N, stride_y, n_planes,
         BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, MODE: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """The default partition: ``acc += x_plane · merged_planeᵀ``, one wgmma in flight, then the tile's store."""
    x_ready, x_empty, w_ready, w_empty, _, _, m_ready, m_empty = bars
    XS: gl.constexpr = x_smem.type.shape[0]
    WS: gl.constexpr = w_smem.type.shape[0]
    MS: gl.constexpr = m_smem.type.shape[0]
    acc_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_N, 16])  # fmt: skip
    acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_l)
    for i in range(n_planes):
        xs = i % XS
        mbarrier.wait(x_ready.index(xs), (i // XS) & 1)
        if MODE == 2:
            bs = i % WS
            mbarrier.wait(w_ready.index(bs), (i // WS) & 1)
            b = w_smem.index(bs)
        else:
            bs = i % MS
            mbarrier.wait(m_ready.index(bs), (i // MS) & 1)
            b = m_smem.index(bs)
        acc = warpgroup_mma(x_smem.index(xs), b.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(1, deps=[acc])
        # plane i - 1's MMA has retired: its slots go back to the loader and the transform
        prev = gl.maximum(i - 1, 0)
        mbarrier.arrive(x_empty.index(prev % XS), count=1, pred=i > 0)
        if MODE == 2:
            mbarrier.arrive(w_empty.index(prev % WS), count=1, pred=i > 0)
        else:
            mbarrier.arrive(m_empty.index(prev % MS), count=1, pred=i > 0)
    acc = warpgroup_mma_wait(0, deps=[acc])

    offs_m = gl.arange(0, BLOCK_M, gl.SliceLayout(1, acc_l))
    offs_n = n0 + gl.arange(0, BLOCK_N, gl.SliceLayout(0, acc_l))
    ptrs = y_ptr + (row0 + offs_m)[:, None].to(gl.int64) * stride_y + offs_n[None, :]
    gl.store(ptrs, acc.to(y_ptr.dtype.element_ty), mask=(offs_m < count)[:, None] & (offs_n < N)[None, :])


@gluon.jit
def _ws_merged_kernel(x_desc, w_desc, q_desc, y_ptr, scale_ptr, offset_ptr, tiles_ptr, N, K, n_chunks, stride_y,
                      num_m_tiles, BITS: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                      XS: gl.constexpr, WS: gl.constexpr, MS: gl.constexpr, MODE: gl.constexpr,
                      TRANSFORM_REGS: gl.constexpr, TRANSFORMS: gl.constexpr, num_warps: gl.constexpr):  # fmt: skip
    """One tile: ``BLOCK_M`` rows of one expert (``tiles_ptr``: int32 [tiles, 3] expert, first row, rows) x
    ``BLOCK_N`` output channels; the row tiles of an N block run next to each other, so W's planes come from L2."""
    P: gl.constexpr = 16 // BITS
    pid = gl.program_id(0)
    m_tile = pid % num_m_tiles
    n0 = (pid // num_m_tiles) * BLOCK_N
    e = gl.load(tiles_ptr + m_tile * 3)
    row0 = gl.load(tiles_ptr + m_tile * 3 + 1)
    count = gl.load(tiles_ptr + m_tile * 3 + 2)
    n_planes = K // 32
    n_chunks_k = K // (32 * P)
    q_row0 = e * n_chunks * N + n0

    x_smem = gl.allocate_shared_memory(x_desc.dtype, [XS, BLOCK_M, 32], x_desc.layout)
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [WS, BLOCK_N, 32], w_desc.layout)
    q_smem = gl.allocate_shared_memory(q_desc.dtype, [2, BLOCK_N, 32], q_desc.layout)
    m_sl: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, 32], gl.float16)
    m_smem = gl.allocate_shared_memory(gl.float16, [MS, BLOCK_N, 32], m_sl)
    x_ready = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    x_empty = gl.allocate_shared_memory(gl.int64, [XS, 1], mbarrier.MBarrierLayout())
    w_ready = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    w_empty = gl.allocate_shared_memory(gl.int64, [WS, 1], mbarrier.MBarrierLayout())
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    m_ready = gl.allocate_shared_memory(gl.int64, [MS, 1], mbarrier.MBarrierLayout())
    m_empty = gl.allocate_shared_memory(gl.int64, [MS, 1], mbarrier.MBarrierLayout())
    for j in gl.static_range(XS):
        mbarrier.init(x_ready.index(j), count=1)
        mbarrier.init(x_empty.index(j), count=1)
    for j in gl.static_range(WS):
        mbarrier.init(w_ready.index(j), count=1)
        mbarrier.init(w_empty.index(j), count=1)
    for j in gl.static_range(2):
        mbarrier.init(q_ready.index(j), count=1)
        mbarrier.init(q_empty.index(j), count=TRANSFORMS)
    for j in gl.static_range(MS):
        mbarrier.init(m_ready.index(j), count=1)
        mbarrier.init(m_empty.index(j), count=1)
    bars = (x_ready, x_empty, w_ready, w_empty, q_ready, q_empty, m_ready, m_empty)

    if TRANSFORMS == 1:
        gl.warp_specialize(
            [
                (_mma, (x_smem, w_smem, m_smem, bars, y_ptr, row0, count, n0, N, stride_y, n_planes, BLOCK_M,
                        BLOCK_N, MODE, num_warps)),
                (_loader, (x_desc, w_desc, q_desc, x_smem, w_smem, q_smem, bars, row0, n0, q_row0, N, n_planes, P,
                           MODE)),
                (_transform, (w_smem, q_smem, m_smem, bars, scale_ptr, offset_ptr, e, n0, N, n_chunks_k, BITS, P,
                              MODE, 0, TRANSFORMS)),
            ],
            [1, 4],
            [24, TRANSFORM_REGS],
        )  # fmt: skip
    else:
        gl.warp_specialize(
            [
                (_mma, (x_smem, w_smem, m_smem, bars, y_ptr, row0, count, n0, N, stride_y, n_planes, BLOCK_M,
                        BLOCK_N, MODE, num_warps)),
                (_loader, (x_desc, w_desc, q_desc, x_smem, w_smem, q_smem, bars, row0, n0, q_row0, N, n_planes, P,
                           MODE)),
                (_transform, (w_smem, q_smem, m_smem, bars, scale_ptr, offset_ptr, e, n0, N, n_chunks_k, BITS, P,
                              MODE, 0, TRANSFORMS)),
                (_transform, (w_smem, q_smem, m_smem, bars, scale_ptr, offset_ptr, e, n0, N, n_chunks_k, BITS, P,
                              MODE, 1, TRANSFORMS)),
            ],
            [1, 4, 4],
            [24, TRANSFORM_REGS, TRANSFORM_REGS],
        )  # fmt: skip


def descriptors(x: torch.Tensor, w: torch.Tensor, codes: torch.Tensor, block_m: int, block_n: int):
    """TMA descriptors of x ``[M, K]`` fp16, W ``[N, K]`` and codes int16 ``[E * chunks * N, 32]``, one plane a box."""

    def desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
        dtype = {torch.float16: gl.float16, torch.bfloat16: gl.bfloat16, torch.int16: gl.int16}[t.dtype]
        return TensorDescriptor.from_tensor(t, [rows, 32], gl.NVMMASharedLayout.get_default_for([rows, 32], dtype))

    return desc(x, block_m), desc(w, block_n), desc(codes, block_n)


def launch(x, w, codes, scale, offset, tiles, y, n_chunks, cfg: dict, mode: str = "merged") -> None:
    """``y[rows of tile t] = x · (W + Δ̂_e)ᵀ`` for every tile (expert e, first row, rows) of ``tiles``."""
    n, k = w.shape
    bm, bn = cfg["block_m"], cfg["block_n"]
    x_desc, w_desc, q_desc = descriptors(x, w, codes, bm, bn)
    m_tiles = tiles.shape[0]
    grid = (m_tiles * triton.cdiv(n, bn),)
    _ws_merged_kernel[grid](
        x_desc, w_desc, q_desc, y, scale, offset, tiles, n, k, n_chunks, y.stride(0), m_tiles,
        BITS=2, BLOCK_M=bm, BLOCK_N=bn, XS=cfg["xs"], WS=cfg["ws"], MS=cfg["ms"], MODE=MODES[mode],
        TRANSFORM_REGS=cfg["transform_regs"], TRANSFORMS=cfg["transforms"], num_warps=8, maxnreg=cfg["maxnreg"],
    )  # fmt: skip


CONFIGS = [  # block_m, block_n, x / W / merged slots, transform warp groups, their registers, the kernel's cap
    {"block_m": 256, "block_n": 128, "xs": 4, "ws": 4, "ms": 4, "transforms": 1, "transform_regs": 96, "maxnreg": 128},
    {"block_m": 256, "block_n": 128, "xs": 4, "ws": 4, "ms": 4, "transforms": 2, "transform_regs": 64, "maxnreg": 96},
    {"block_m": 256, "block_n": 128, "xs": 6, "ws": 6, "ms": 4, "transforms": 2, "transform_regs": 56, "maxnreg": 96},
]


def compile_only(cfg: dict, mode: str) -> dict:
    """Compile for sm_90 without a GPU (Triton 3.6, as on the GPU machine): registers, shared memory, SASS counts."""
    from sass_loop import registers, sass_lines
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    n, k, m = 28672, 4096, 2048
    x = torch.zeros(m, k, dtype=torch.float16)
    w = torch.zeros(n, k, dtype=torch.float16 if mode == "gemm" else torch.bfloat16)
    codes = torch.zeros(8 * 16 * n, 32, dtype=torch.int16)
    descs = descriptors(x, w, codes, cfg["block_m"], cfg["block_n"])
    names = _ws_merged_kernel.arg_names
    consts = dict(BITS=2, BLOCK_M=cfg["block_m"], BLOCK_N=cfg["block_n"], XS=cfg["xs"], WS=cfg["ws"], MS=cfg["ms"],
                  MODE=MODES[mode], TRANSFORM_REGS=cfg["transform_regs"], TRANSFORMS=cfg["transforms"],
                  num_warps=8)  # fmt: skip
    types = {"x_desc": mangle_type(descs[0]), "w_desc": mangle_type(descs[1]), "q_desc": mangle_type(descs[2]),
             "y_ptr": "*bf16", "scale_ptr": "*fp16", "offset_ptr": "*fp16", "tiles_ptr": "*i32"}  # fmt: skip
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in names}
    constexprs = {(i,): consts[a] for i, a in enumerate(names) if a in consts}
    src = GluonASTSource(fn=_ws_merged_kernel, signature=signature, constexprs=constexprs)
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options={"num_warps": 8, "maxnreg": cfg["maxnreg"]})
    instructions, _ = sass_lines(kernel.asm["cubin"])

    def count(op: str) -> int:
        return sum(op in s for s in instructions)

    return {"mode": mode, **cfg, "registers": registers(kernel.asm["cubin"]), "shared_bytes": kernel.metadata.shared,
            "instructions": len(instructions), "wgmma": count("HGMMA"), "setmaxnreg": count("USETMAXREG"),
            "syncs": count("SYNCS"), "bar": count("BAR.")}  # fmt: skip


def reference(x, w, bank, segs) -> torch.Tensor:
    """fp32 ``x · (W + Δ̂_e)ᵀ`` per expert's rows: what the apart path computes to its rounding."""
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=torch.float32)
    for e, start, end in segs:
        y[start:end] = x[start:end].float() @ (w.float() + bank.dequantize(e).float()).T
    return y


def bench_shape(name: str, rows: int, experts: int, configs: list[dict], modes: list[str]) -> dict:
    from kernel_roofline import graph_ms, rows_for

    from meswitch.kernels.bank import DeltaBank
    from meswitch.kernels.launch_config import choose_config
    from meswitch.kernels.triton_delta import mixed_delta_triton

    n, k = SHAPES[name]
    bank = DeltaBank.random(experts, (n, k), bits=2, salient=0, device="cuda")
    er, segs = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    flop = 2 * rows * n * k
    base = graph_ms(lambda _: torch.mm(x, w.T, out=y), [None] * 4)
    x16, w16, y16 = x.half(), w.half(), y.half()
    base16 = graph_ms(lambda _: torch.mm(x16, w16.T, out=y16), [None] * 4)
    cfg = choose_config(bank, er, x.device)

    def apart(_):
        torch.mm(x, w.T, out=y)
        mixed_delta_triton(x, bank, er, y, cfg)

    apart_ms = graph_ms(apart, [None] * 4)
    want = reference(x, w, bank, segs)
    apart(None)
    apart_err = float((y.float() - want).norm() / want.norm())
    n_chunks = bank.packed.shape[1]
    codes = bank.packed.view(torch.int16).reshape(experts * n_chunks * n, 32)
    scale, offset = bank.scale.reshape(experts, n), bank.offset.reshape(experts, n)
    row = {"shape": name, "n": n, "k": k, "rows": rows, "experts": experts, "flop": flop,
           "cublas_bf16_ms": round(base, 4), "cublas_bf16_tflops": round(flop / base / 1e9, 1),
           "cublas_fp16_ms": round(base16, 4), "cublas_fp16_tflops": round(flop / base16 / 1e9, 1),
           "apart_ms": round(apart_ms, 4), "apart_vs_base": round(apart_ms / base, 3), "apart_error": apart_err,
           "ws": []}  # fmt: skip
    for c in configs:
        bm = c["block_m"]
        tiles = torch.tensor([[e, s0, min(bm, end - s0)] for e, start, end in segs for s0 in range(start, end, bm)],
                             device="cuda", dtype=torch.int32)  # fmt: skip
        for mode in modes:
            wm = w16 if mode == "gemm" else w
            out = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
            entry = {"launch": c, "mode": mode}
            try:
                launch(x16, wm, codes, scale, offset, tiles, out, n_chunks, c, mode)
                torch.cuda.synchronize()
                check = want if mode == "merged" else x.float() @ w.float().T
                entry["error"] = float((out.float() - check).norm() / check.norm())
                run = functools.partial(launch, x16, wm, codes, scale, offset, tiles, out, n_chunks, c, mode)
                ms = graph_ms(lambda _, run=run: run(), [None] * 4)
                entry.update(ms=round(ms, 4), tflops=round(flop / ms / 1e9, 1), vs_base=round(ms / base, 3),
                             vs_apart=round(ms / apart_ms, 3))  # fmt: skip
            except Exception as exc:  # a config that does not compile or run is reported, not fatal
                entry["failure"] = str(exc)[:400]
            row["ws"].append(entry)
            print(f"  {name} {bm}x{c['block_n']} {mode:6s} {entry.get('ms', float('nan')) * 1e3:8.1f} us "
                  f"{entry.get('tflops', 0):5.0f} TFLOP/s err {entry.get('error', float('nan')):.2e} "
                  f"{entry.get('failure', '')[:120]}", flush=True)  # fmt: skip
    print(f"{name}: cuBLAS bf16 {base * 1e3:.1f} us ({row['cublas_bf16_tflops']} TFLOP/s), fp16 "
          f"{base16 * 1e3:.1f} us, apart {apart_ms * 1e3:.1f} us ({row['apart_vs_base']}x)", flush=True)  # fmt: skip
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON report (GPU run)")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--configs", help="JSON list of configs (default: CONFIGS)")
    ap.add_argument("--modes", nargs="*", default=list(MODES), choices=list(MODES))
    ap.add_argument("--compile-only", action="store_true", help="compile each config and mode for sm_90, no GPU")
    args = ap.parse_args(argv)
    configs = json.loads(args.configs) if args.configs else CONFIGS
    if args.compile_only:
        for c in configs:
            for mode in args.modes:
                try:
                    print(json.dumps(compile_only(c, mode)), flush=True)
                except Exception as exc:
                    print(json.dumps({"mode": mode, **c, "failure": str(exc)[-1500:]}), flush=True)
        return
    torch.manual_seed(0)
    rows = [bench_shape(name, args.rows, args.experts, configs, args.modes) for name in args.shapes]
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "data": "SYNTHETIC random 2-bit per-channel deltas, no salient columns; random bf16 base weights",
        "timing": "GPU time per launch from a CUDA graph of four launches (median / 4)",
        "rows": rows,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
