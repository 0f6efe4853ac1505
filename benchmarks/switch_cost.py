"""Cost of switching an expert in: its compressed delta from pinned host memory to the GPU, against
a full fp16 Mistral-7B expert (SYNTHETIC bytes; the sizes are exact, see capacity.py).

Times (CUDA events, median of repeats) one flat pinned buffer per expert (how a server would keep
it) and, for the compressed delta, also its ~1100 tensors copied one by one.

    python benchmarks/switch_cost.py --out switch_cost.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity import base_bytes, expert_tensors

from meswitch.compression.delta import DeltaConfig


def timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        out.append(start.elapsed_time(end))
    return out


def flat_copy(nbytes: int, repeats: int) -> dict:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    host[:: 2**20] = 1  # touch the pages
    dev = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    ms = timed(lambda: dev.copy_(host, non_blocking=True), repeats)
    med = statistics.median(ms)
    return {
        "bytes": nbytes,
        "ms_median": round(med, 3),
        "ms_all": [round(m, 3) for m in ms],
        "gbps": round(nbytes / med / 1e6, 1),
    }


def tensorwise_copy(config: DeltaConfig, repeats: int) -> dict:
    shapes = []
    for d in expert_tensors(config):
        for t in (d.packed, d.scale, d.offset, d.salient_idx, d.salient_val):
            if t is not None:
                shapes.append((t.shape, t.dtype))
    host = [torch.empty(s, dtype=dt_, pin_memory=True) for s, dt_ in shapes]
    dev = [torch.empty(s, dtype=dt_, device="cuda") for s, dt_ in shapes]

    def copy_all():
        for d, h in zip(dev, host, strict=True):
            d.copy_(h, non_blocking=True)

    ms = timed(copy_all, repeats)
    nbytes = sum(t.numel() * t.element_size() for t in host)
    med = statistics.median(ms)
    return {"bytes": nbytes, "tensors": len(shapes), "ms_median": round(med, 3), "gbps": round(nbytes / med / 1e6, 1)}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--repeats", type=int, default=7)
    args = ap.parse_args(argv)
    config = DeltaConfig(bits=2, salient=0.01)
    delta_bytes = sum(d.nbytes() for d in expert_tensors(config))
    full_bytes = base_bytes()  # a full fp16 expert has the base's geometry: 2 bytes per parameter
    compressed = flat_copy(delta_bytes, args.repeats)
    tensorwise = tensorwise_copy(config, args.repeats)
    full = flat_copy(full_bytes, max(3, args.repeats // 2))
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "data": "SYNTHETIC bytes, exact sizes of a Mistral-7B expert (2-bit, 1% salient) and of a full fp16 one",
        "compressed_delta_flat": compressed,
        "compressed_delta_tensorwise": tensorwise,
        "full_fp16_expert_flat": full,
        "speedup_flat": round(full["ms_median"] / compressed["ms_median"], 2),
    }
    print(json.dumps(report, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
