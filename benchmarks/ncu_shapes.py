"""What limits the delta kernel at each decode shape: Nsight Compute's counters, one launch per case (GPU).

SYNTHETIC deltas (random 2-bit codes, per-channel steps, 1% salient columns) on Mistral-7B linear shapes,
as ``kernel_roofline.py``. For each case the driver runs this script again under ``ncu`` (``--clock-control
none``: the clocks stay as they are) in target mode, which launches that case's kernel three times to compile
and warm, then once more: the launch ncu profiles. It reads ncu's CSV and writes, per case, the kernel's
duration, DRAM throughput (% of peak and bytes), SM and memory-pipe utilisation, achieved occupancy,
registers per thread, and the top warp-stall reasons: what bounds the shape (latency, issue or bandwidth),
named in each case's ``limit`` by the rule of :func:`limit`.

``--merged FIELDS`` profiles the merged prefill product instead (``gluon_merged.merged_linear_gluon``, sm_90; the
rows a prefill's, e.g. ``--rows 2048 --experts 8``), with MergedConfig fields as JSON over ``merged_config``'s (``{}``:
the default launch).

``--sums-given`` profiles the launch as the decode step makes it (x's row sums given with x, tiles of 8, 16 or
64 rows as the step picks them: ``kernel_roofline.step_launch``), where the default profiles the library path
(``mixed_delta_triton``: one tile per segment, row sums in the loop or from a kernel of their own).

    python benchmarks/ncu_shapes.py --out ncu.json [--sums-given] [--rows 1 8 32 64] [--experts 1 4 16]
    python benchmarks/ncu_shapes.py --out ncu-merged.json --merged '{}' --rows 2048 --experts 8
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime as dt
import io
import json
import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kernel_roofline import SHAPES

# the delta launches of a decode step: q/k/v's and gate/up's grouped, o and down alone
STEP_SHAPES = ("q/k/v grouped 6144x4096", "q/o 4096x4096", "gate/up grouped 28672x4096", "down 4096x14336")
KERNEL = "regex:_delta_v2_"  # the delta kernel, as the launch rules configure it
MERGED_KERNEL = "regex:_merged_kernel"  # the merged prefill product's kernel (not its prepare kernel)
METRICS = {
    "gpu__time_duration.sum": "duration_ns",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct_of_peak",
    "dram__bytes_read.sum": "dram_bytes_read",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_pct_of_peak",
    "l1tex__throughput.avg.pct_of_peak_sustained_active": "l1_pct_of_peak",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "achieved_occupancy_pct",
    "launch__registers_per_thread": "registers_per_thread",
    "launch__grid_size": "grid_size",
}
# read from the sections' raw page where this ncu has them (named outright, a missing one would fail the run)
OPTIONAL = {
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "sm__inst_issued.avg.pct_of_peak_sustained_active": "issue_active_pct",  # "issue slots busy", where ncu names it so
    "sm__maximum_warps_per_active_cycle_pct": "theoretical_occupancy_pct",
    "launch__occupancy_limit_registers": "blocks_per_sm_by_registers",
    "launch__occupancy_limit_shared_mem": "blocks_per_sm_by_shared_memory",
    "launch__shared_mem_per_block": "shared_mem_per_block",
    "lts__t_sector_hit_rate.pct": "l2_hit_rate_pct",
    "device__attribute_multiprocessor_count": "sms",
}
# Collected through ncu's sections (a metric named outright that this ncu lacks would fail the whole run);
# the warp-state section gives every stall reason this GPU has (gmma included on Hopper) in cycles per issue.
SECTIONS = ("SpeedOfLight", "Occupancy", "LaunchStats", "WarpStateStats", "ComputeWorkloadAnalysis",
            "MemoryWorkloadAnalysis")  # fmt: skip
STALL = re.compile(r"smsp__average_warps?_issue_stalled_(\w+?)_per_issue_active\.ratio")
TENSOR_PIPE = re.compile(r"sm__\w*pipe_tensor\w*\.avg\.pct_of_peak_sustained_active")


def cases(args) -> list[tuple[str, int, int]]:
    return [(s, r, e) for s in args.shapes for r in args.rows for e in args.experts if e <= r]


def target(args) -> None:
    """Launch one case (the first of ``cases``): three warm-up launches, then the profiled one."""
    import torch
    from kernel_roofline import rows_for, step_launch, synthetic_bank

    from meswitch.kernels.launch_config import choose_config
    from meswitch.kernels.triton_delta import launch, mixed_delta_triton

    torch.manual_seed(0)
    shape, rows, experts = cases(args)[0]
    n, k = SHAPES[shape]
    bank = synthetic_bank(shape, experts, round(0.01 * k))
    er, segs = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
    if args.merged is not None:
        from meswitch.kernels.gluon_merged import merged_linear_gluon
        from meswitch.kernels.launch_config import merged_config

        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
        cfg = dataclasses.replace(merged_config(bank), **json.loads(args.merged))
        run = lambda: merged_linear_gluon(x, w, bank, er, y, cfg)
    elif args.sums_given:
        cfg, tiles, given = step_launch(bank, er, segs, x, args.block_m)
        run = lambda: launch(x, bank, tiles, y, cfg, **given)
    else:
        cfg = choose_config(bank, er, x.device)
        run = lambda: mixed_delta_triton(x, bank, er, y)
    print("LAUNCH " + json.dumps(cfg.__dict__), flush=True)
    for _ in range(4):  # ncu skips the first three (--launch-skip 3)
        run()
    torch.cuda.synchronize()


def parse(text: str) -> dict:
    """ncu --csv --page raw: a header row, a units row, then the profiled launch."""
    table = list(csv.DictReader(io.StringIO(text[text.index('"ID"') :])))
    rec = table[-1]
    out = {"kernel": rec.get("Kernel Name")}
    for metric, key in METRICS.items():
        out[key] = _num(rec.get(metric))
    for metric, key in OPTIONAL.items():
        if metric in rec:
            out[key] = _num(rec[metric])
    out["tensor_pipes_pct"] = {m: _num(v) for m, v in rec.items() if m and TENSOR_PIPE.fullmatch(m) and _num(v)}
    stalls = {m.group(1): _num(v) for k, v in rec.items() if k and (m := STALL.fullmatch(k))}
    out["stalls"] = dict(sorted(((r, v) for r, v in stalls.items() if v), key=lambda kv: -kv[1]))
    out["top_stalls"] = dict(list(out["stalls"].items())[:4])
    return out


def limit(r: dict) -> str:
    """What bounds a launch, from its counters: DRAM at 70% of peak or more is bandwidth; else a tensor pipe, the
    issue slots or the SM's busiest unit (speed-of-light SM throughput) at 60% or more; else latency, named by the
    top stall (a grid under one program an SM says so)."""
    if (r.get("dram_pct_of_peak") or 0) >= 70:
        return "bandwidth"
    if max(r.get("tensor_pipes_pct", {}).values(), default=0) >= 60:
        return "tensor cores"
    if (r.get("issue_active_pct") or 0) >= 60:
        return "instruction issue"
    if (r.get("sm_pct_of_peak") or 0) >= 60:
        return "SM throughput (issue or an ALU pipe)"
    top = next(iter(r.get("stalls", {})), "?")
    small = r.get("sms") and r.get("grid_size") and r["grid_size"] < r["sms"]
    return f"latency ({top}{', grid under one program an SM' if small else ''})"


def _num(v) -> float | None:
    try:
        return float(str(v).replace(",", ""))
    except (TypeError, ValueError):
        return None


def drive(args) -> None:
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on this machine")
    import torch
    import triton

    device, versions = torch.cuda.get_device_name(), {"torch": torch.__version__, "triton": triton.__version__}
    sections = [a for s in SECTIONS for a in ("--section", s)]
    results = []
    for shape, rows, experts in cases(args):
        cmd = [
            str(ncu), "--clock-control", "none", "--csv", "--page", "raw", "-k",
            KERNEL if args.merged is None else MERGED_KERNEL, "--launch-skip", "3",
            "--launch-count", "1", *sections, "--metrics", ",".join(METRICS), sys.executable, __file__, "--target",
            "--shapes", shape, "--rows", str(rows), "--experts", str(experts),
            *(["--sums-given"] if args.sums_given else []), *(["--block-m", str(args.block_m)] if args.block_m else []),
            *(["--merged", args.merged] if args.merged is not None else []),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if run.returncode != 0 or '"ID"' not in run.stdout:
            raise SystemExit(f"ncu failed ({run.returncode}) on {shape} {rows} {experts}:\n{run.stderr[-3000:]}")
        cfg = json.loads(next(ln for ln in run.stdout.splitlines() if ln.startswith("LAUNCH "))[7:])
        r = {"shape": shape, "rows": rows, "experts": experts, "launch": cfg, **parse(run.stdout)}
        r["limit"] = limit(r)
        results.append(r)
        print(shape, rows, experts, f"bm={cfg['block_m']} split={cfg.get('split_k')}", r["duration_ns"],
              r["dram_pct_of_peak"], r.get("issue_active_pct"), r["limit"], r["top_stalls"], flush=True)  # fmt: skip
        report = {"date": dt.date.today().isoformat(), "device": device, "versions": versions,
                  "command": " ".join(["python", *sys.argv]), "ncu": " ".join(cmd[:12]), "host": platform.node(),
                  "sums_given": args.sums_given, "merged": args.merged,
                  "note": "SYNTHETIC 2-bit deltas, Mistral-7B shapes; one launch each",
                  "results": results}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every case: a cut run keeps the rest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="result JSON (driver mode)")
    ap.add_argument("--target", action="store_true", help="launch the cases (what ncu runs)")
    ap.add_argument("--shapes", nargs="*", default=list(STEP_SHAPES), choices=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--experts", type=int, nargs="*", default=[1, 4, 16])
    ap.add_argument("--sums-given", action="store_true", help="profile the launch as the decode step makes it")
    ap.add_argument("--block-m", type=int, help="with --sums-given: rows a tile (default: the step's choice)")
    ap.add_argument("--merged", metavar="FIELDS", help="profile the merged prefill kernel: MergedConfig fields as JSON")
    args = ap.parse_args(argv)
    if args.block_m and not args.sums_given:
        ap.error("--block-m needs --sums-given (the step's launch)")
    if args.merged is not None and args.sums_given:
        ap.error("--merged profiles the prefill product: --sums-given is the decode kernel's")
    if args.target:
        target(args)
    elif args.out:
        drive(args)
    else:
        ap.error("--out (driver) or --target")


if __name__ == "__main__":
    main()
