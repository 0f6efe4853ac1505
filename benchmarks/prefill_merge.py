"""Prefill with the base weight merged into the delta kernel's planes (``mixed_linear``), per projection shape.

A prefill of 2,048 tokens over 8 experts at Mistral-7B shapes: the base GEMM (cuBLAS) plus the delta kernel, what
a prefill ran before, against one merged launch that adds each plane of the base weight to the dequantized delta
before its MMA (one product's FLOPs where the two did two). Each merged configuration is checked against the base
GEMM plus the reference first. SYNTHETIC 2-bit per-channel deltas, 1% salient columns.

    python benchmarks/prefill_merge.py --out prefill-merge.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_roofline import SHAPES, copy_bandwidth, rows_for, synthetic_bank, write_report

from meswitch.kernels import mixed_delta_reference
from meswitch.kernels.launch_config import LaunchConfig, choose_config, merged_config
from meswitch.kernels.triton_delta import mixed_delta_triton

CONFIGS = [LaunchConfig(block_n=bn, block_m=bm, num_warps=w, num_stages=st, epilogue_scale=False)
           for bn, bm, w, st in ((128, 128, 4, 2), (128, 64, 4, 2), (64, 128, 4, 2),
                                 (128, 128, 8, 1), (256, 128, 8, 1), (256, 64, 8, 1))]  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--shapes", default="q/k/v grouped 6144x4096,q/o 4096x4096,gate/up grouped 28672x4096,"
                                        "down 4096x14336")  # fmt: skip
    args = ap.parse_args(argv)
    copy_gbps = copy_bandwidth()
    results = []
    for shape in args.shapes.split(","):
        n, k = SHAPES[shape]
        bank = synthetic_bank(shape, args.experts, round(0.01 * k))
        rows, _ = rows_for(args.rows, args.experts, 0)
        gen = torch.Generator(device="cuda").manual_seed(n)
        x = torch.randn(args.rows, k, device="cuda", generator=gen, dtype=torch.bfloat16)
        weight = (torch.randn(n, k, device="cuda", generator=gen) * 0.02).to(torch.bfloat16)
        flops = 2 * args.rows * n * k
        base = F.linear(x, weight)
        gemm_ms = do_bench(lambda: F.linear(x, weight), return_mode="median")  # noqa: B023
        unmerged = choose_config(bank, rows, x.device)
        delta_ms = do_bench(lambda: mixed_delta_triton(x, bank, rows, base.clone(), unmerged),  # noqa: B023
                            return_mode="median")  # fmt: skip
        clone_ms = do_bench(lambda: base.clone(), return_mode="median")  # noqa: B023
        delta_ms -= clone_ms
        want = mixed_delta_reference(x.float(), bank, rows, x.float() @ weight.float().T)
        row = {"shape": shape, "rows": args.rows, "experts": args.experts, "base_gemm_ms": round(gemm_ms, 4),
               "delta_ms": round(delta_ms, 4), "unmerged_config": unmerged.__dict__,
               "base_gemm_tflops": round(flops / gemm_ms / 1e9, 1), "merged": []}  # fmt: skip
        for cfg in [merged_config(unmerged), *CONFIGS]:
            y = torch.zeros(args.rows, n, device="cuda", dtype=x.dtype)
            try:
                got = mixed_delta_triton(x, bank, rows, y, cfg, base=weight)
            except Exception as exc:  # a configuration the compiler or the device refuses: recorded
                row["merged"].append({"config": cfg.__dict__, "error": f"{type(exc).__name__}: {exc}"[:300]})
                continue
            err = float((got.double() - want.double()).norm() / want.double().norm())
            zero = torch.zeros_like(y)
            ms = do_bench(lambda: mixed_delta_triton(x, bank, rows, zero.zero_(), cfg, base=weight),  # noqa: B023
                          return_mode="median")  # fmt: skip
            ms -= do_bench(lambda: zero.zero_(), return_mode="median")  # noqa: B023
            row["merged"].append({"config": cfg.__dict__, "ms": round(ms, 4), "relative_error": round(err, 6),
                                  "tflops": round(flops / ms / 1e9, 1)})  # fmt: skip
        best = min((m for m in row["merged"] if "ms" in m), key=lambda m: m["ms"], default=None)
        row["best_merged_ms"] = best and best["ms"]
        row["unmerged_ms"] = round(gemm_ms + delta_ms, 4)
        results.append(row)
        print({key: v for key, v in row.items() if key not in ("merged", "unmerged_config")}, flush=True)
        for m in row["merged"]:
            print("   ", m, flush=True)
    write_report(args.out, copy_gbps, results)


if __name__ == "__main__":
    main()
