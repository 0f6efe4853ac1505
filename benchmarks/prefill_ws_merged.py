"""Prefill's merged product ``x · (W + Δ̂)ᵀ`` (:mod:`meswitch.kernels.gluon_merged`) against the products apart.

Apart, a prefill runs the base GEMM and then the delta product, the same FLOPs twice: 2x is the bf16 floor. The
merged kernel runs them once: a TMA loader warp, two warp groups making ``f16(W) + f16(Δ̂)`` a plane at a time in
packed f16x2 into a shared-memory ring, two warp groups of wgmma from shared memory. For Mistral-7B's prefill shapes
and 2,048 rows over 8 experts (SYNTHETIC 2-bit per-channel deltas, 1% salient columns), GPU time from CUDA graphs:
cuBLAS's base GEMM alone, the products apart as the prefill ran them before (``F.linear`` then ``mixed_delta``), and
the merged launch per config (x's fp16 copy in expert order included), each checked against the fp32 reference.
The kernel's ablations (its GEMM alone, W converted without the codes) were measured with the scratch copy at
e786468 (``results/prefill-ws-merged-h100-2026-12-06.json``). Needs an sm_90 GPU.

    python benchmarks/prefill_ws_merged.py --out prefill-merged.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_roofline import SHAPES, graph_ms, rows_for, synthetic_bank

from meswitch.kernels import mixed_delta
from meswitch.kernels.gluon_merged import merged_linear_gluon
from meswitch.kernels.launch_config import merged_config
from meswitch.kernels.reference import mixed_delta_reference

SHAPE_NAMES = ("q/k/v grouped 6144x4096", "q/o 4096x4096", "gate/up grouped 28672x4096", "down 4096x14336")
CONFIGS = [{}]  # fields of MergedConfig over merged_config's, each timed beside the others


def bench_case(name: str, rows: int, experts: int, configs: list[dict]) -> dict:
    n, k = SHAPES[name]
    bank = synthetic_bank(name, experts, round(0.01 * k))
    er, _ = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    flop = 2 * rows * n * k
    base = graph_ms(lambda _: torch.mm(x, w.T, out=y), [None] * 4)

    def apart(_):
        torch.mm(x, w.T, out=y)
        mixed_delta(x, bank, er, y)

    apart_ms = graph_ms(apart, [None] * 4)
    dense = x.float() @ w.float().T
    want = mixed_delta_reference(x.float(), bank, er, dense.clone())  # (it adds into its y)
    delta = want - dense  # the delta's share, checked apart: it is a small part of y
    apart(None)
    row = {"shape": name, "n": n, "k": k, "rows": rows, "experts": experts, "cublas_ms": round(base, 4),
           "cublas_tflops": round(flop / base / 1e9, 1), "apart_ms": round(apart_ms, 4),
           "apart_vs_cublas": round(apart_ms / base, 3),
           "apart_error": round(float((y.float() - want).norm() / want.norm()), 5), "merged": []}  # fmt: skip
    for fields in configs:
        cfg = dataclasses.replace(merged_config(bank), **fields)
        out = torch.full_like(y, float("nan"))
        merged_linear_gluon(x, w, bank, er, out, cfg)
        err = float((out.float() - want).norm() / want.norm())
        delta_err = float((out.float() - dense - delta).norm() / delta.norm())
        ms = graph_ms(lambda _, c=cfg, o=out: merged_linear_gluon(x, w, bank, er, o, c), [None] * 4)
        entry = {
            "launch": dataclasses.asdict(cfg),
            "ms": round(ms, 4),
            "tflops": round(flop / ms / 1e9, 1),
            "vs_cublas": round(ms / base, 3),
            "vs_apart": round(ms / apart_ms, 3),
            "error": round(err, 5),
            "delta_error": round(delta_err, 5),
        }
        row["merged"].append(entry)
    best = min(row["merged"], key=lambda m: m["ms"])
    print(
        f"{name:28s} cuBLAS {base * 1e3:7.1f} us  apart {row['apart_vs_cublas']:.2f}x  merged "
        f"{best['ms'] * 1e3:7.1f} us {best['vs_cublas']:.2f}x ({best['tflops']:.0f} TFLOP/s, "
        f"error {best['error']:.1e})",
        flush=True,
    )
    return row


class _Jit:
    """A DirectLauncher's call made through Triton's JIT every time: what the launch cost before it."""

    def __init__(self, fn) -> None:
        self.fn = fn

    def __call__(self, grid: int, args: tuple, constexprs: dict, **options) -> None:
        self.fn[(grid,)](*args, **constexprs, **options)


def host_us(rows: int, experts: int, calls: int = 200) -> dict:
    """Host time per call (us, the median of calls each made with the GPU idle; a loop of calls would time the GPU
    once its queue fills) of the launch path's parts, on q/o's shape: what an eager prefill pays per linear beside
    the GPU's time; the launches direct (the product) and through the JIT."""
    import statistics
    import time

    from meswitch.kernels import gluon_merged as gm
    from meswitch.kernels.launch_config import merges_prefill
    from meswitch.kernels.ops import merged_linear

    n, k = SHAPES["q/o 4096x4096"]
    bank = synthetic_bank("q/o 4096x4096", experts, round(0.01 * k))
    er, _ = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
    y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    cfg = merged_config(bank)
    x16 = torch.empty(rows, k, dtype=torch.float16, device="cuda")
    direct = (gm._PREPARE, gm._MERGED)
    jit = (_Jit(gm._prepare_kernel), _Jit(gm._merged_kernel))

    def through(launchers):
        gm._PREPARE, gm._MERGED = launchers
        try:
            merged_linear_gluon(x, w, bank, er, y, cfg)
        finally:
            gm._PREPARE, gm._MERGED = direct

    parts = {
        "torch.mm (cuBLAS, for scale)": lambda: torch.mm(x, w.T, out=y),
        "merges_prefill": lambda: merges_prefill(bank, er, x, w),
        "three TMA descriptors": lambda: (gm._descriptor(x16, 256), gm._descriptor(x16, 256), gm._descriptor(w, 128)),
        "merged_linear_gluon, launches direct": lambda: merged_linear_gluon(x, w, bank, er, y, cfg),
        "merged_linear_gluon, launches through the JIT": lambda: through(jit),
        "merged_linear (the op)": lambda: merged_linear(x, w, None, bank, er),
    }
    out = {}
    for name, fn in parts.items():
        fn()
        times = []
        for _ in range(calls):  # each call timed alone, the GPU idle before it: the host's time, not the queue's
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        out[name] = round(statistics.median(times) * 1e6, 1)
    torch.cuda.synchronize()
    return out


def best_config(rows: list[dict], max_error: float = 5e-3) -> dict:
    """The config whose layer (the rows' linears, one launch each) is fastest among those within ``max_error`` of the
    reference on every shape, as its fields apart from the first config's (the baseline the A/B runs against)."""
    first = rows[0]["merged"][0]["launch"]
    ok = [j for j in range(len(rows[0]["merged"])) if all(r["merged"][j]["error"] < max_error for r in rows)]
    if not ok:
        return {"fields": None, "note": f"no config within {max_error} of the reference on every shape"}
    layer = {j: sum(r["merged"][j]["ms"] for r in rows) for j in ok}
    j = min(layer, key=layer.get)
    launch = rows[0]["merged"][j]["launch"]
    base = sum(r["merged"][0]["ms"] for r in rows)
    return {"fields": {k: v for k, v in launch.items() if first[k] != v}, "layer_ms": round(layer[j], 4),
            "vs_first": round(layer[j] / base, 4)}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="JSON report")
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPE_NAMES), choices=list(SHAPE_NAMES))
    ap.add_argument("--configs", help="JSON list of MergedConfig fields over the default's (default: CONFIGS)")
    ap.add_argument("--host", action="store_true", help="also time the launch path's host side per call")
    args = ap.parse_args(argv)
    configs = json.loads(args.configs) if args.configs else CONFIGS
    torch.manual_seed(0)
    rows = [bench_case(name, args.rows, args.experts, configs) for name in args.shapes]
    cublas = sum(r["cublas_ms"] for r in rows)
    merged = sum(min(m["ms"] for m in r["merged"]) for r in rows)
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "data": "SYNTHETIC random 2-bit per-channel deltas, 1% salient columns; random bf16 base weights",
        "timing": "GPU time per launch from a CUDA graph of four launches (median / 4); merged includes x's fp16 copy",
        "layer_vs_cublas": {
            "merged": round(merged / cublas, 3),
            "apart": round(sum(r["apart_ms"] for r in rows) / cublas, 3),
        },
        "rows": rows,
        "best_config": best_config(rows),
    }
    if args.host:
        report["host_us_per_call"] = host_us(args.rows, args.experts)
        print(f"host us per call: {report['host_us_per_call']}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"a layer's linears: merged {report['layer_vs_cublas']['merged']}x cuBLAS, apart "
          f"{report['layer_vs_cublas']['apart']}x; wrote {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
