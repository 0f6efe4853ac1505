"""Prefill's linears with an expert's delta: the base GEMM plus the delta kernel against one merged product.

For each Mistral-7B shape (the decoder's grouped q/k/v and gate/up, o and down) and each mix of a 2,048-row
prefill over experts, times per launch (GPU time, CUDA graphs):
- ``base_ms``: cuBLAS ``x · Wᵀ`` alone (what the base model alone runs);
- ``base_plus_delta_ms``: that GEMM plus ``mixed_delta`` (the unmerged path);
- per launch config, ``merged_ms``: ``mixed_linear``'s one launch forming ``W + Δ̂`` in registers
  (``triton_delta.mixed_linear_triton``), each config first checked against the reference.
SYNTHETIC 2-bit per-channel deltas with 1% salient columns and random bf16 base weights.

    python benchmarks/prefill_merged.py --out merged.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_roofline import SHAPES, graph_ms, matmul_tflops, rows_for, synthetic_bank

from meswitch.kernels import mixed_delta_reference
from meswitch.kernels.launch_config import LaunchConfig, choose_config, merged_config
from meswitch.kernels.triton_delta import mixed_delta_triton, mixed_linear_triton

SHAPE_NAMES = ("q/k/v grouped 6144x4096", "q/o 4096x4096", "gate/up grouped 28672x4096", "down 4096x14336")
CONFIGS = [  # (block_n, block_m, num_warps, num_stages, planes a step, weights from shared memory); merged_config's
    # default is timed first
    (256, 128, 8, 3, 2, False), (128, 128, 4, 3, 2, False), (256, 128, 8, 3, 2, True), (128, 128, 4, 3, 2, True),
    (128, 256, 8, 3, 1, True), (128, 256, 8, 4, 2, True), (128, 256, 8, 2, 4, True),
]  # fmt: skip


def check(x, w, bank, er, y, cfg) -> tuple[float, float]:
    """Relative errors of the merged launch's output and of its delta part (the output less x · Wᵀ) against the fp32
    reference's: the delta's carries W + Δ̂ rounded to bf16, the output's bounds the launch (1%)."""
    base = x.float() @ w.float().T
    want = mixed_delta_reference(x.float(), bank, er, base.clone())
    got = mixed_linear_triton(x, w, bank, er, y, cfg).float()
    return float((got - want).norm() / want.norm()), float((got - want).norm() / (want - base).norm())


def bench_case(name: str, bank, w: torch.Tensor, rows: int, experts: int, configs: list) -> dict:
    """One shape and mix: the base GEMM, base + delta, and the merged launch per config (checked first)."""
    n, k = SHAPES[name]
    er, _ = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = torch.empty(rows, n, device="cuda", dtype=torch.bfloat16)
    flop = 2 * rows * n * k
    base = graph_ms(lambda _: torch.mm(x, w.T, out=y), [None] * 4)
    unmerged_cfg = choose_config(bank, er, x.device)

    def unmerged(_):
        torch.mm(x, w.T, out=y)
        mixed_delta_triton(x, bank, er, y, unmerged_cfg)

    both = graph_ms(unmerged, [None] * 4)
    row = {"shape": name, "n": n, "k": k, "rows": rows, "experts": experts, "base_ms": round(base, 4),
           "base_tflops": round(flop / base / 1e9, 1), "base_plus_delta_ms": round(both, 4),
           "unmerged_launch": unmerged_cfg.__dict__, "merged": []}  # fmt: skip
    default = merged_config(bank)
    tried = [default] + [
        LaunchConfig(
            block_n=bn, block_m=bm, num_warps=nw, num_stages=st, epilogue_scale=False, merged_planes=q, merged_shared=sh
        )
        for bn, bm, nw, st, q, sh in configs
    ]
    for cfg in tried:
        try:
            err, delta_err = check(x, w, bank, er, y, cfg)
            if not err < 1e-2:
                raise RuntimeError(f"merged launch disagrees with the reference: {err:.2e}")
            ms = graph_ms(lambda _, c=cfg: mixed_linear_triton(x, w, bank, er, y, c), [None] * 4)
        except Exception as e:  # a config that does not compile (shared memory) is reported, not fatal
            row["merged"].append({"launch": cfg.__dict__, "error": str(e)[:200]})
            print(f"  {cfg}: {str(e)[:120]}", flush=True)
            continue
        row["merged"].append({"launch": cfg.__dict__, "default": cfg is default, "ms": round(ms, 4),
                              "tflops": round(flop / ms / 1e9, 1), "check_error": round(err, 5),
                              "delta_error": round(delta_err, 4),
                              "vs_base": round(ms / base, 3), "vs_unmerged": round(ms / both, 3)})  # fmt: skip
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--experts", type=int, nargs="*", default=[8, 1, 16])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPE_NAMES))
    ap.add_argument(
        "--configs",
        default=None,
        help="JSON list of [block_n, block_m, warps, stages, planes a step, shared] (default: a sweep)",
    )
    args = ap.parse_args(argv)
    configs = json.loads(args.configs) if args.configs else CONFIGS
    torch.manual_seed(0)
    tflops = matmul_tflops()
    print(f"bf16 GEMM {tflops:.0f} TFLOP/s (8192^3)", flush=True)
    results = []
    for name in args.shapes:
        n, k = SHAPES[name]
        bank = synthetic_bank(name, max(args.experts), round(0.01 * k))
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        for experts in args.experts:
            row = bench_case(name, bank, w, args.rows, experts, configs)
            results.append(row)
            best = min((m for m in row["merged"] if "ms" in m), key=lambda m: m["ms"], default={})
            print(f"{name:28s} experts={experts:2d} base {row['base_ms'] * 1e3:7.1f} us ({row['base_tflops']:4.0f} "
                  f"TFLOP/s) base+delta {row['base_plus_delta_ms'] * 1e3:7.1f} us  merged default "
                  f"{row['merged'][0].get('ms', float('nan')) * 1e3:7.1f} us best "
                  f"{best.get('ms', float('nan')) * 1e3:7.1f} us {best.get('launch')}", flush=True)  # fmt: skip
        del bank, w
        torch.cuda.empty_cache()
        write(args.out, tflops, results)
    print(f"wrote {args.out}")


def write(out: Path, tflops: float, results: list[dict]) -> None:
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "data": "SYNTHETIC random 2-bit per-channel deltas, 1% salient columns; random bf16 base weights",
        "timing": "GPU time per launch from a CUDA graph of four launches (triton.testing.do_bench median / 4)",
        "bf16_gemm_tflops": round(tflops, 1),
        "rows": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
