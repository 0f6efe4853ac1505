"""Compress experts of a demo family on one device and record the artifact figures and wall time.

    python benchmarks/compress_family.py FAMILY --device cuda --out gpu.json [--experts code math]
    python benchmarks/compress_family.py FAMILY --device cpu --out cpu.json --compare gpu.json

Run once on the CPU and once on the GPU: with ``--compare`` it reports, per expert, whether the
artifact figures agree (bytes, bits per parameter, salient counts exactly; salient channel sets and
relative errors within rounding) and the wall time on each device.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from meswitch.artifacts import read_manifest
from meswitch.compression.api import CompressJob, run_compress
from meswitch.compression.calibration import CalibConfig
from meswitch.compression.expert import ExpertInfo
from meswitch.compression.reconstruct import DeltaReader
from meswitch.expert_card import load_card


def compress_all(family: Path, experts: list[str], device: str) -> dict:
    out = {}
    for name in experts:
        card = load_card(family / "experts" / name)
        with tempfile.TemporaryDirectory() as tmp:
            art = Path(tmp) / name
            t = time.perf_counter()
            job = CompressJob(
                base=family / "base",
                expert=card.folder,
                calib=card.calibration_data,
                out=art,
                info=ExpertInfo(card.name, card.domain),
                calib_cfg=CalibConfig(),
                device=device,
            )
            manifest = run_compress(job)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            wall = time.perf_counter() - t
            reader = DeltaReader(art, read_manifest(art))
            salient = {r.name: reader.get(f"{r.name}.salient_idx").tolist() for r in manifest.layers}
        out[name] = {
            "wall_s": round(wall, 2),
            "bits_per_param": manifest.metrics["bits_per_param"],
            "delta_bytes": manifest.metrics["delta_bytes"],
            "layers": {
                r.name: {
                    "salient": r.salient,
                    "rel_error": r.rel_error,
                    "act_rel_error": r.act_rel_error,
                    "salient_idx": salient[r.name],
                }
                for r in manifest.layers
            },
        }
    return out


def _overlap(x: list[int], y: list[int]) -> float:
    """Shared salient channels over the larger set; two empty sets (no salient channel) agree fully."""
    return len(set(x) & set(y)) / max(len(x), len(y)) if x or y else 1.0


def compare(a: dict, b: dict) -> dict:
    """Per expert: exact agreement of sizes, overlap of salient sets, largest relative-error difference."""
    report = {}
    for name in sorted(set(a) & set(b)):
        la, lb = a[name]["layers"], b[name]["layers"]
        overlaps = [_overlap(la[k]["salient_idx"], lb[k]["salient_idx"]) for k in la]
        report[name] = {
            "same_bytes": a[name]["delta_bytes"] == b[name]["delta_bytes"],
            "same_bits_per_param": a[name]["bits_per_param"] == b[name]["bits_per_param"],
            "same_salient_counts": all(la[k]["salient"] == lb[k]["salient"] for k in la),
            "salient_set_overlap_min": round(min(overlaps), 3),
            "salient_set_overlap_mean": round(sum(overlaps) / len(overlaps), 4),
            "max_rel_error_diff": round(max(abs(la[k]["rel_error"] - lb[k]["rel_error"]) for k in la), 6),
            "wall_s": [a[name]["wall_s"], b[name]["wall_s"]],
        }
    return report


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("family", type=Path)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--experts", nargs="*", help="expert names (default: all)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--compare", type=Path, help="another run's JSON to compare against")
    args = ap.parse_args()
    names = args.experts or sorted(p.name for p in (args.family / "experts").iterdir() if p.is_dir())
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    result = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "experts": compress_all(args.family, names, device),
    }
    if args.compare:
        other = json.loads(args.compare.read_text())
        result["compared_with"] = other["device"]
        result["comparison"] = compare(result["experts"], other["experts"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(
        json.dumps(
            result.get(
                "comparison", {n: {k: v for k, v in e.items() if k != "layers"} for n, e in result["experts"].items()}
            ),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
