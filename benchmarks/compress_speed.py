"""Wall time and peak memory to compress one expert of Mistral-7B geometry (synthetic weights), calibration included.

    python benchmarks/compress_speed.py --work /tmp/cs --out benchmarks/results/compress-speed-DATE.json

The base and expert are written first (bf16, one shard per block, fine-tuning-like deltas: small,
low-rank plus noise, a few outlier input channels). Then the timed part: check the expert against
the base (fingerprints, shapes, finiteness), calibrate block by block on the GPU, compress.
"""

from __future__ import annotations

import argparse
import json
import logging
import resource
import shutil
import sys
import time
from pathlib import Path

import torch

from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.calibration import CalibConfig, calibrate
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo, compress_expert
from meswitch.devices import resolve_device
from meswitch.synthetic import mistral_7b_config, write_synthetic_pair

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "in",
    "is",
    "was",
    "for",
    "on",
    "that",
    "with",
    "as",
    "by",
    "at",
    "from",
    "this",
    "code",
    "sum",
    "value",
    "list",
    "return",
    "def",
]


def calib_texts(n: int, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    return [" ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (400,), generator=g)) for _ in range(n)]


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for the synthetic checkpoints")
    ap.add_argument("--out", type=Path, required=True, help="JSON result file")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    device = resolve_device(args.device)
    config = mistral_7b_config(num_hidden_layers=args.layers)
    t = time.perf_counter()
    base_dir, expert_dir = write_synthetic_pair(args.work, config, device=device)
    write_s = time.perf_counter() - t
    rss_before = peak_rss_gb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    phases = {}
    t0 = time.perf_counter()
    base, expert = Checkpoint(base_dir), Checkpoint(expert_dir)
    pairing = check_expert(base, expert)
    phases["check_expert_s"] = time.perf_counter() - t0
    t = time.perf_counter()
    stats = calibrate(expert, calib_texts(args.samples * 2), CalibConfig(args.samples, args.seq_len, 8), device)
    phases["calibrate_s"] = time.perf_counter() - t
    t = time.perf_counter()
    manifest = compress_expert(
        base, expert, pairing, stats, DeltaConfig(), args.work / "artifact", ExpertInfo("synthetic-7b"), device
    )
    if device.type == "cuda":
        torch.cuda.synchronize()
    phases["compress_s"] = time.perf_counter() - t
    total = time.perf_counter() - t0
    largest_shard = max(f.stat().st_size for f in expert_dir.glob("*.safetensors")) / 2**30
    result = {
        "benchmark": "compress_speed",
        "synthetic_weights": True,
        "geometry": "Mistral-7B" if args.layers == 32 else f"Mistral-7B widths, {args.layers} layers",
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "calibration": {"samples": args.samples, "seq_len": args.seq_len},
        "method": manifest.method,
        "write_checkpoints_s": round(write_s, 1),
        **{k: round(v, 1) for k, v in phases.items()},
        "total_s": round(total, 1),
        "bits_per_param": manifest.metrics["bits_per_param"],
        "delta_bytes": manifest.metrics["delta_bytes"],
        "fp16_delta_bytes": manifest.metrics["fp16_delta_bytes"],
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.type == "cuda" else None,
        "peak_host_rss_gb": round(peak_rss_gb(), 2),
        "host_rss_before_timed_part_gb": round(rss_before, 2),
        "largest_shard_gb": round(largest_shard, 2),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    shutil.rmtree(args.work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
