"""Launch-parameter sweep for the mixed-expert delta kernel (GPU), to set choose_config's rules.

SYNTHETIC 2-bit per-channel deltas, 1% salient. Prints one line per (case, config) and writes
JSON; the kernel alone is timed (do_bench median, L2 flushed and input sets rotated).

    python benchmarks/kernel_sweep.py --out sweep.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_roofline import SHAPES, bench_case, check_once, copy_bandwidth, write_report

from meswitch.kernels import DeltaBank
from meswitch.kernels.launch_config import LaunchConfig, segment_block

CASES = [  # (shape, rows, experts)
    ("q/o 4096x4096", 1, 1),
    ("q/o 4096x4096", 16, 16),
    ("q/o 4096x4096", 32, 4),
    ("gate/up 14336x4096", 64, 16),
    ("gate/up 14336x4096", 64, 1),
    ("down 4096x14336", 8, 8),
    ("q/o 4096x4096", 2048, 16),
    ("gate/up 14336x4096", 2048, 1),
]


def configs_for(rows: int, experts: int) -> list[LaunchConfig]:
    seg = -(-rows // experts)
    out = []
    if seg <= 64:
        bm = segment_block(seg)
        for bn, nw in ((64, 4), (128, 4), (256, 8)):
            for st in (3, 4, 6):
                out.append(LaunchConfig(block_n=bn, block_m=bm, num_warps=nw, num_stages=st, epilogue_scale=True))
        out.append(LaunchConfig(block_m=bm, num_stages=4, epilogue_scale=False))
        for sk in (2, 4, 8):
            out.append(LaunchConfig(block_m=bm, num_stages=4, split_k=sk))
        if bm <= 32:  # x's row sums from their own kernel: fewer registers in the loop, so other depths may fit
            for sk in (1, 2):
                for st in (2, 3, 4):
                    out.append(LaunchConfig(block_m=bm, num_stages=st, split_k=sk, x_sums=True))
                # register caps (Triton 3.6, sm_90: the loop spills nothing at these): 128 lets 4 programs of 4 warps
                # share an SM where ptxas takes 129-143 registers (3 fit), 96 lets 5
                for reg in (96, 128):
                    out.append(LaunchConfig(block_m=bm, num_stages=3, split_k=sk, x_sums=True, maxnreg=reg))
                out.append(LaunchConfig(block_m=bm, num_stages=4, split_k=sk, x_sums=True, maxnreg=96))
                out.append(LaunchConfig(block_m=bm, num_stages=3, split_k=sk, maxnreg=128))  # the loop's own sums
                for reg in (None, 128):  # two planes a dot: fewer instructions, in 138 registers (128: capped)
                    out.append(LaunchConfig(block_m=bm, num_stages=3, split_k=sk, x_sums=True, paired_planes=True,
                                            maxnreg=reg))  # fmt: skip
                # FP8 planes (2-bit codes): the loop 328 -> 241 instructions, 166 registers (128, 96: spills outside
                # the loop only), x in e4m3 from a kernel of its own
                for st, reg in ((3, None), (3, 128), (3, 96), (4, 128)):
                    out.append(LaunchConfig(block_m=bm, num_stages=st, split_k=sk, fp8_planes=True, maxnreg=reg))
    else:
        for bm in (64, 128):
            for bn, nw in ((128, 4), (128, 8), (256, 8)):
                for st in (2, 3):
                    out.append(LaunchConfig(block_n=bn, block_m=bm, num_warps=nw, num_stages=st, epilogue_scale=False))
                    # steps in the epilogue from x's row sums: no packed FMAs in the loop (compiled for sm_90: the
                    # 256 x 128 loop 1,419 -> 1,159 instructions, 128 x 128 1,076 -> 942 and no spills)
                    out.append(LaunchConfig(block_n=bn, block_m=bm, num_warps=nw, num_stages=st, x_sums=True))
                    # FP8 planes: 620 -> 249 instructions a chunk at 256 x 128 (half the MMAs, at twice the rate)
                    out.append(LaunchConfig(block_n=bn, block_m=bm, num_warps=nw, num_stages=st, fp8_planes=True))
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", help="JSON list of LaunchConfig fields for each case (no block_m: the case's)")
    ap.add_argument("--decode-only", action="store_true")
    ap.add_argument("--tag", default="", help="label written with each result (e.g. the environment)")
    ap.add_argument("--cases", help="SHAPE:ROWS:EXPERTS;... instead of the built-in cases (SHAPE as in SHAPES)")
    args = ap.parse_args(argv)
    fixed = json.loads(args.configs) if args.configs else None  # a config without block_m takes the case's
    copy_gbps = copy_bandwidth()
    print(f"copy bandwidth {copy_gbps:.0f} GB/s", flush=True)
    results = []
    banks = {}
    cases = CASES
    if args.cases:
        cases = [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in args.cases.split(";")]
    for shape, rows, experts in cases:
        if args.decode_only and rows > 64:
            continue
        n, k = SHAPES[shape]
        if shape not in banks:
            banks.clear()
            torch.cuda.empty_cache()
            banks[shape] = DeltaBank.random(64, (n, k), bits=2, salient=round(0.01 * k), device="cuda")
        bank = banks[shape]
        seg = -(-rows // experts)
        bm = segment_block(seg)
        todo = [LaunchConfig(**{"block_m": bm, **c}) for c in fixed] if fixed else configs_for(rows, experts)
        for cfg in todo:
            try:
                err = check_once(bank, n, k, rows, experts, cfg)  # each config against the reference first
                r = bench_case(bank, None, None, None, n, k, rows, experts, cfg, with_baselines=False)
            except Exception as exc:  # a config the compiler or the device refuses: record and go on
                print(f"{shape} rows={rows} E={experts} {cfg}: FAILED {type(exc).__name__}: {exc}"[:300], flush=True)
                results.append({"shape": shape, "rows": rows, "experts": experts, "config": cfg.__dict__,
                                "error": f"{type(exc).__name__}: {exc}"[:500]})  # fmt: skip
                continue
            gbps = r["bytes"] / r["ms"] / 1e6
            graph_gbps = r["bytes"] / r["graph_ms"] / 1e6  # launched from a CUDA graph, as decode runs it
            results.append({"shape": shape, "rows": rows, "experts": experts, "config": cfg.__dict__, "tag": args.tag,
                            "ms": r["ms"], "gbps": gbps, "fraction": gbps / copy_gbps, "graph_ms": r["graph_ms"],
                            "graph_fraction": graph_gbps / copy_gbps, "rel_err": err})  # fmt: skip
            print(
                f"{shape:20s} rows={rows:5d} E={experts:2d} bn={cfg.block_n:3d} bm={cfg.block_m:3d} w={cfg.num_warps} "
                f"st={cfg.num_stages} sk={cfg.split_k} epi={int(cfg.epilogue_scale)} xs={int(cfg.x_sums)} "
                f"reg={cfg.maxnreg or '-'} pair={int(cfg.paired_planes)} fp8={int(cfg.fp8_planes)}: "
                f"{r['ms'] * 1e3:8.1f} us "
                f"{gbps / copy_gbps:5.1%}; graph {r['graph_ms'] * 1e3:8.1f} us {graph_gbps / copy_gbps:5.1%}",
                flush=True,
            )
    write_report(args.out, copy_gbps, results)  # with the device, versions, date and command


if __name__ == "__main__":
    main()
