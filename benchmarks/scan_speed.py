"""Fingerprint-and-finiteness pass over a checkpoint (``checkpoints.scan``): seconds and GB/s per thread count.

``meswitch compress`` and the pipeline scan both the base and the expert before any work; at 7B that
was two thirds of `compress_speed.py`'s wall time (61.8 s of 90.7 s on the H100 machine, 2026-11-22).

    python benchmarks/scan_speed.py --work /tmp/scan --layers 2 --out scan-speed.json

Writes a SYNTHETIC bf16 checkpoint of Mistral-7B geometry with ``--layers`` blocks (2: 1.4 GB), reads it
once to warm the page cache, then times ``scan`` with 1 thread and with every core (at most 8).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

from meswitch.checkpoints import Checkpoint, scan
from meswitch.synthetic import mistral_7b_config, write_synthetic_pair


def _commit() -> str | None:
    """The meswitch revision measured (the tree the imported package comes from)."""
    import meswitch

    root = Path(meswitch.__file__).resolve().parents[1]
    done = subprocess.run(
        ["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=7"], capture_output=True, text=True
    )
    return done.stdout.strip() or None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True, help="folder for the synthetic checkpoint")
    p.add_argument("--layers", type=int, default=2, help="decoder blocks of Mistral-7B geometry (default 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    base = args.work / "base"
    if not (base / "config.json").is_file():
        write_synthetic_pair(args.work, mistral_7b_config(num_hidden_layers=args.layers))
    ckpt = Checkpoint(base)
    nbytes = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    scan(ckpt)  # warm the page cache: the timed passes measure hashing and checking, not the disk
    rows = []
    for workers in sorted({1, min(8, os.cpu_count() or 1)}):
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fingerprint = scan(ckpt, workers=workers).fingerprint
            times.append(time.perf_counter() - t)
        best = min(times)
        rows.append({"workers": workers, "seconds": round(best, 3), "gb_per_s": round(nbytes / best / 1e9, 2),
                     "fingerprint": fingerprint})  # fmt: skip
        print(f"{workers} thread(s): {best:.2f} s, {nbytes / best / 1e9:.2f} GB/s")
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "commit": _commit(),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "checkpoint_bytes": nbytes,
        "layers": args.layers,
        "rows": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
