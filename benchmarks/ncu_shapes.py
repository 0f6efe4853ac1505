"""What limits the delta kernel at each decode shape: Nsight Compute's counters, one launch per case (GPU).

SYNTHETIC deltas (random 2-bit codes, per-channel steps, 1% salient columns) on Mistral-7B linear shapes,
as ``kernel_roofline.py``. For each case the driver runs this script again under ``ncu`` (``--clock-control
none``: the clocks stay as they are) in target mode, which launches that case's kernel three times to compile
and warm, then once more: the launch ncu profiles. It reads ncu's CSV and writes, per case, the kernel's
duration, DRAM throughput (% of peak and bytes), SM and memory-pipe utilisation, achieved occupancy,
registers per thread, and the top warp-stall reasons: what bounds the shape (latency, issue or bandwidth).

    python benchmarks/ncu_shapes.py --out ncu.json [--rows 1 8 32 64] [--experts 1 4 16]
"""

from __future__ import annotations

import argparse
import csv
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

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}  # fmt: skip
KERNEL = "regex:_delta_v2_"  # the delta kernel, as the launch rules configure it
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

    from meswitch.kernels import DeltaBank, ExpertRows
    from meswitch.kernels.triton_delta import mixed_delta_triton

    torch.manual_seed(0)
    shape, rows, experts = cases(args)[0]
    n, k = SHAPES[shape]
    bank = DeltaBank.random(experts, (n, k), bits=2, salient=round(0.01 * k), device="cuda")
    per = [rows // experts + (1 if i < rows % experts else 0) for i in range(experts)]
    starts = [0]
    for c in per:
        starts.append(starts[-1] + c)
    er = ExpertRows.from_segments(starts, list(range(experts)), device="cuda")
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(rows, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(4):  # ncu skips the first three (--launch-skip 3)
        mixed_delta_triton(x, bank, er, y)
    torch.cuda.synchronize()


def parse(text: str) -> dict:
    """ncu --csv --page raw: a header row, a units row, then the profiled launch."""
    table = list(csv.DictReader(io.StringIO(text[text.index('"ID"') :])))
    rec = table[-1]
    out = {"kernel": rec.get("Kernel Name")}
    for metric, key in METRICS.items():
        out[key] = _num(rec.get(metric))
    out["tensor_pipes_pct"] = {m: _num(v) for m, v in rec.items() if m and TENSOR_PIPE.fullmatch(m) and _num(v)}
    stalls = {m.group(1): _num(v) for k, v in rec.items() if k and (m := STALL.fullmatch(k))}
    out["stalls"] = dict(sorted(((r, v) for r, v in stalls.items() if v), key=lambda kv: -kv[1]))
    out["top_stalls"] = dict(list(out["stalls"].items())[:4])
    return out


def _num(v) -> float | None:
    try:
        return float(str(v).replace(",", ""))
    except (TypeError, ValueError):
        return None


def drive(args) -> None:
    ncu = shutil.which("ncu") or next(iter(sorted(Path("/opt/nvidia").glob("nsight-compute/*/ncu"))), None)
    if ncu is None:
        raise SystemExit("ncu (Nsight Compute) is not on this machine")
    sections = [a for s in SECTIONS for a in ("--section", s)]
    results = []
    for shape, rows, experts in cases(args):
        cmd = [
            str(ncu), "--clock-control", "none", "--csv", "--page", "raw", "-k", KERNEL, "--launch-skip", "3",
            "--launch-count", "1", *sections, "--metrics", ",".join(METRICS), sys.executable, __file__, "--target",
            "--shapes", shape, "--rows", str(rows), "--experts", str(experts),
        ]  # fmt: skip
        run = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        if run.returncode != 0 or '"ID"' not in run.stdout:
            raise SystemExit(f"ncu failed ({run.returncode}) on {shape} {rows} {experts}:\n{run.stderr[-3000:]}")
        r = {"shape": shape, "rows": rows, "experts": experts, **parse(run.stdout)}
        results.append(r)
        print(shape, rows, experts, r["duration_ns"], r["dram_pct_of_peak"], r["top_stalls"], flush=True)
        report = {"command": " ".join(["python", *sys.argv]), "ncu": " ".join(cmd[:12]), "host": platform.node(),
                  "note": "SYNTHETIC 2-bit deltas, Mistral-7B shapes; one launch each", "results": results}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=2) + "\n")  # after every case: a cut run keeps the rest


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="result JSON (driver mode)")
    ap.add_argument("--target", action="store_true", help="launch the cases (what ncu runs)")
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="*", default=[1, 8, 32, 64])
    ap.add_argument("--experts", type=int, nargs="*", default=[1, 4, 16])
    args = ap.parse_args(argv)
    if args.target:
        target(args)
    elif args.out:
        drive(args)
    else:
        ap.error("--out (driver) or --target")


if __name__ == "__main__":
    main()
