"""The best fraction of copy bandwidth each kernel-roofline row could reach, and what bounds it (no GPU needed).

A row's time is at least the largest of three floors: its bytes at the copy bandwidth measured in the same run,
its tensor-core work at the bf16 peak (each expert's rows padded to the 16-row tiles the MMA takes), and the
shortest a graph-launched kernel takes at all. The bytes floor over that largest one is the row's ceiling on
``fraction_of_copy_bandwidth``: issue 13 asks 70% of rows with 4 or more experts and 50% with one.

    python benchmarks/kernel_ceiling.py benchmarks/results/kernel_roofline-h200-2026-12-03.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

BF16_PEAK = 989e12  # H100/H200 SXM dense bf16 tensor FLOP/s (datasheet)
# a graph-launched kernel's least cost: the base-alone step's 285 kernels leave 0.77 ms between them, 2.7 us each, and
# its smallest kernels take 1-2 us (results/profile-decode-apart-2026-12-04.json, H200)
LAUNCH_FLOOR = 3e-6
TILE_ROWS = 16  # the fewest rows a tensor-core tile of the delta kernel holds


def ceilings(report: dict, peak: float = BF16_PEAK, floor: float = LAUNCH_FLOOR) -> list[dict]:
    bandwidth = report["copy_bandwidth_gbps"] * 1e9
    out = []
    for r in report["rows"]:
        per_expert = -(-r["rows"] // r["experts"])
        padded = r["experts"] * -(-per_expert // TILE_ROWS) * TILE_ROWS
        t_bytes, t_mma = r["bytes"] / bandwidth, 2 * padded * r["n"] * r["k"] / peak
        bound = max(("bytes", t_bytes), ("tensor cores", t_mma), ("launch", floor), key=lambda kv: kv[1])
        measured = r.get("graph_fraction_of_copy_bandwidth", r.get("fraction_of_copy_bandwidth"))
        out.append({"shape": r["shape"], "rows": r["rows"], "experts": r["experts"], "bytes_us": t_bytes * 1e6,
                    "tensor_us": t_mma * 1e6, "ceiling": t_bytes / bound[1], "bound_by": bound[0],
                    "measured": measured})  # fmt: skip
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("roofline", type=Path, help="a kernel_roofline.py JSON")
    ap.add_argument("--peak-tflops", type=float, default=BF16_PEAK / 1e12)
    ap.add_argument("--launch-us", type=float, default=LAUNCH_FLOOR * 1e6)
    args = ap.parse_args(argv)
    rows = ceilings(json.loads(args.roofline.read_text()), args.peak_tflops * 1e12, args.launch_us / 1e6)
    print("| shape | rows | experts | bytes us | tensor us | ceiling | bound by | measured | target |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        if r["rows"] > 64:
            continue
        target = 0.7 if r["experts"] >= 4 else 0.5 if r["experts"] == 1 else None
        mark = "-" if target is None else f"{target:.0%}" + (" (above the ceiling)" if r["ceiling"] < target else "")
        print(f"| {r['shape']} | {r['rows']} | {r['experts']} | {r['bytes_us']:.1f} | {r['tensor_us']:.1f} | "
              f"{r['ceiling']:.0%} | {r['bound_by']} | {r['measured']:.0%} | {mark} |")  # fmt: skip


if __name__ == "__main__":
    main()
