"""Prefill's delta product on Hopper: the Gluon kernel (asynchronous plane MMAs) against the Triton kernel and cuBLAS.

For each Mistral-7B shape the decoder launches at prefill (grouped q/k/v and gate/up, o, down) and a 2,048-row
prefill over 8 experts (256 rows each), times per launch (GPU time, CUDA graphs of four launches):
- ``base_ms``: cuBLAS ``x · Wᵀ`` alone, the product the base model runs;
- ``triton_ms``: ``mixed_delta`` as the prefill launches it today (``choose_config``: steps in registers);
- per launch config, ``ms``: the Gluon kernel (``LaunchConfig(gluon=True)``), x's row sums included (the launch
  computes them), each config first checked against the fp32 reference.
SYNTHETIC 2-bit per-channel deltas with 1% salient columns. Needs an sm_90 GPU.

    python benchmarks/prefill_gluon.py --out prefill-gluon.json
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
from meswitch.kernels.launch_config import LaunchConfig, choose_config
from meswitch.kernels.triton_delta import mixed_delta_triton

SHAPE_NAMES = ("q/k/v grouped 6144x4096", "q/o 4096x4096", "gate/up grouped 28672x4096", "down 4096x14336")
CONFIGS = [  # (block_n, block_m, stages, warps, split_k, register cap or None)
    (256, 128, 2, 8, 1, None), (256, 64, 2, 8, 1, None), (256, 64, 2, 8, 1, 128), (128, 64, 2, 4, 1, 128),
    (128, 64, 3, 4, 1, 128), (128, 128, 2, 8, 1, None), (128, 128, 2, 8, 1, 128),
]  # fmt: skip


def check(x, bank, er, n, cfg) -> float:
    """Relative error of the launch's delta against the fp32 reference's, added to a fresh small y (the timed launches
    keep adding into theirs: the delta would drown in its rounding)."""
    y = torch.randn(x.shape[0], n, device=x.device, dtype=x.dtype) * 0.01
    want = mixed_delta_reference(x.float(), bank, er, torch.zeros_like(y, dtype=torch.float32))
    got = mixed_delta_triton(x, bank, er, y.clone(), cfg).float() - y.float()
    return float((got - want).norm() / want.norm())


def bench_case(name: str, bank, w: torch.Tensor, rows: int, experts: int, configs: list) -> dict:
    n, k = SHAPES[name]
    er, _ = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 0.01
    flop = 2 * rows * n * k
    base = graph_ms(lambda _: torch.mm(x, w.T, out=y), [None] * 4)
    default = choose_config(bank, er, x.device)
    tri_err = check(x, bank, er, n, default)
    tri = graph_ms(lambda _: mixed_delta_triton(x, bank, er, y, default), [None] * 4)
    row = {"shape": name, "n": n, "k": k, "rows": rows, "experts": experts, "base_ms": round(base, 4),
           "base_tflops": round(flop / base / 1e9, 1), "triton_ms": round(tri, 4),
           "triton_tflops": round(flop / tri / 1e9, 1), "triton_check_error": round(tri_err, 5),
           "triton_launch": default.__dict__, "gluon": []}  # fmt: skip
    for bn, bm, st, nw, sk, reg in configs:
        cfg = LaunchConfig(block_n=bn, block_m=bm, num_stages=st, num_warps=nw, split_k=sk, maxnreg=reg, gluon=True)
        try:
            err = check(x, bank, er, n, cfg)
            if not err < 1e-2:
                raise RuntimeError(f"Gluon launch disagrees with the reference: {err:.2e}")
            ms = graph_ms(lambda _, c=cfg: mixed_delta_triton(x, bank, er, y, c), [None] * 4)
        except Exception as e:  # a config that does not compile (shared memory, registers) is reported, not fatal
            row["gluon"].append({"launch": cfg.__dict__, "error": str(e)[:300]})
            print(f"  {cfg}: {str(e)[:200]}", flush=True)
            continue
        row["gluon"].append({"launch": cfg.__dict__, "ms": round(ms, 4), "tflops": round(flop / ms / 1e9, 1),
                             "check_error": round(err, 5), "vs_base": round(ms / base, 3),
                             "vs_triton": round(ms / tri, 3)})  # fmt: skip
    return row


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--rows", type=int, default=2048)
    ap.add_argument("--experts", type=int, nargs="*", default=[8])
    ap.add_argument("--shapes", nargs="*", default=list(SHAPE_NAMES))
    ap.add_argument(
        "--configs", default=None, help="JSON list of [block_n, block_m, stages, warps, split_k, maxnreg or null]"
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
            best = min((g for g in row["gluon"] if "ms" in g), key=lambda g: g["ms"], default={})
            print(
                f"{name:28s} experts={experts:2d} base {row['base_ms'] * 1e3:7.1f} us ({row['base_tflops']:4.0f} "
                f"TFLOP/s) triton {row['triton_ms'] * 1e3:7.1f} us ({row['triton_tflops']:4.0f}) gluon best "
                f"{best.get('ms', float('nan')) * 1e3:7.1f} us ({best.get('tflops', 0):4.0f}) "
                f"{best.get('launch', {}).get('block_n')}x{best.get('launch', {}).get('block_m')}",
                flush=True,
            )
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
        "timing": "GPU time per launch from a CUDA graph of four launches (triton.testing.do_bench median / 4); "
        "the Gluon launches include x's row sums (_x_sums_kernel)",
        "bf16_gemm_tflops": round(tflops, 1),
        "rows": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
