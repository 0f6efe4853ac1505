"""How many Mistral-7B experts (2-bit, ~1% salient, per-channel; or --bits/--salient) fit on one GPU beside a bf16 base.

Byte counts are exact: each linear's delta is a ``CompressedDelta`` with the tensor shapes the
compressor produces (``CompressedDelta.nbytes()``), built on the meta device. Geometry: 32 layers
of q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336, plus embed and
lm_head 32000x4096 at the same bits. The base is bf16 (every Mistral-7B tensor, norms included).

With ``--allocate`` (on a GPU) it then VERIFIES by allocating, on the device, the base, the
computed number of experts as serving banks them (SYNTHETIC contents: nothing is computed), and the
KV-cache reserve, one expert fewer until everything fits (``--budget-gb`` caps the allocator first).
Until 2026-12-04 the check allocated each expert's 1,130 tensors apart, which the allocator's rounding
made pessimistic (49 one-bit experts under 80 GB where the bytes allow 57).

    python benchmarks/capacity.py --allocate --out capacity.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meswitch.compression.delta import CompressedDelta, DeltaConfig

LAYERS = 32
HIDDEN, KV, FFN, VOCAB = 4096, 1024, 14336, 32000
LAYER_LINEARS = {
    "q_proj": (HIDDEN, HIDDEN),
    "k_proj": (KV, HIDDEN),
    "v_proj": (KV, HIDDEN),
    "o_proj": (HIDDEN, HIDDEN),
    "gate_proj": (FFN, HIDDEN),
    "up_proj": (FFN, HIDDEN),
    "down_proj": (HIDDEN, FFN),
}
EXTRA = {"embed_tokens": (VOCAB, HIDDEN), "lm_head": (VOCAB, HIDDEN)}
NOMINAL_GPU_BYTES = 80 * 10**9
KV_RESERVE = 10 * 2**30


def linear_shapes() -> list[tuple[str, tuple[int, int]]]:
    out = [(f"layers.{i}.{name}", shape) for i in range(LAYERS) for name, shape in LAYER_LINEARS.items()]
    return out + list(EXTRA.items())


def delta_shapes(n: int, k: int, config: DeltaConfig) -> CompressedDelta:
    """A CompressedDelta with exactly the tensors compress_delta makes for [n, k] (meta device)."""
    spec = config.quant_spec()
    vpw = 32 // spec.bits
    groups = 1 if spec.group_size in (0, -1) else k // spec.group_size
    ks = config.salient_count(k)
    meta = torch.device("meta")
    return CompressedDelta(
        shape=(n, k),
        spec=spec,
        packed=torch.empty(n, -(-k // vpw), dtype=torch.int32, device=meta),
        scale=torch.empty(n, groups, dtype=torch.float16, device=meta),
        offset=None if spec.symmetric else torch.empty(n, groups, dtype=torch.float16, device=meta),
        salient_idx=torch.empty(ks, dtype=torch.int32, device=meta),
        salient_val=torch.empty(n, ks, dtype=torch.float16, device=meta),
    )


def expert_tensors(config: DeltaConfig) -> list[CompressedDelta]:
    return [delta_shapes(n, k, config) for _, (n, k) in linear_shapes()]


def base_bytes() -> int:
    params = sum(n * k for _, (n, k) in linear_shapes()) + LAYERS * 2 * HIDDEN + HIDDEN  # + RMSNorm weights
    return 2 * params


def allocate(config: DeltaConfig, experts: int, base: int, kv: int) -> dict:
    """Allocate the base, the experts as a server holds them and the KV reserve, stepping down from ``experts``
    (the byte count's upper bound) until all fit. A server stacks every expert's delta of one linear into one bank
    (``serving.banked``: each of packed codes, steps, offsets and salient columns an ``[E, ...]`` tensor), so the
    allocator rounds once a linear and tensor, not once an expert's tensor."""
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    held = [torch.empty(base // 2, dtype=torch.bfloat16, device=dev)]
    parts = [t for d in expert_tensors(config) for t in (d.packed, d.scale, d.offset, d.salient_idx, d.salient_val)]
    parts = [t for t in parts if t is not None]
    fitted, banks, reserve = experts, None, None
    while fitted > 0:
        try:
            banks = [torch.empty((fitted, *t.shape), dtype=t.dtype, device=dev) for t in parts]
            reserve = torch.empty(kv, dtype=torch.uint8, device=dev)
            break
        except torch.OutOfMemoryError:
            banks = reserve = None
            torch.cuda.empty_cache()
            fitted -= 1
            print(f"{fitted + 1} experts and the KV reserve do not fit; trying {fitted}", flush=True)
    torch.cuda.synchronize()
    out = {
        "layout": "one bank tensor per linear and part, stacked over the experts (as serving.banked holds them)",
        "experts_verified": fitted,
        "experts_from_byte_count": experts,
        "allocated_bytes": torch.cuda.memory_allocated(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "free_after": torch.cuda.mem_get_info()[0],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    del held, banks, reserve
    torch.cuda.empty_cache()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--salient", type=float, default=0.01)
    ap.add_argument("--allocate", action="store_true", help="verify on the GPU by allocating")
    ap.add_argument(
        "--budget-gb",
        type=float,
        help="verify under this many GB (10^9 bytes) of device memory instead of all of it: the allocator is "
        "capped with torch.cuda.set_per_process_memory_fraction (e.g. 80 for an H100/A100 80 GB on an H200)",
    )
    args = ap.parse_args(argv)
    config = DeltaConfig(bits=args.bits, salient=args.salient)
    per_expert = sum(d.nbytes() for d in expert_tensors(config))
    params = sum(n * k for _, (n, k) in linear_shapes())
    base = base_bytes()
    report = {
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "data": "exact byte counts from CompressedDelta.nbytes() of Mistral-7B shapes; allocation check SYNTHETIC",
        "config": {"bits": config.bits, "salient": config.salient, "group_size": config.group_size},
        "expert_bytes": per_expert,
        "expert_bits_per_param": round(8 * per_expert / params, 4),
        "base_bf16_bytes": base,
        "kv_reserve_bytes": KV_RESERVE,
        "paper": "16 experts on an A100 80 GB",
    }
    budgets = {"nominal_80GB": NOMINAL_GPU_BYTES}
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info()
        budgets["device_total"] = total
        budgets["device_free_now"] = free
        report["device"] = torch.cuda.get_device_name()
        report["torch"] = torch.__version__
    if args.budget_gb:
        budgets["budget"] = int(args.budget_gb * 10**9)
    for name, total in budgets.items():
        report[f"experts_fit_{name}"] = max(0, (total - base - KV_RESERVE) // per_expert)
    print(json.dumps(report, indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))
    if args.allocate:
        if not torch.cuda.is_available():
            raise SystemExit("--allocate needs a CUDA device")
        n = int(report["experts_fit_device_free_now"])
        if args.budget_gb:  # the cap counts what this process allocates; the device must have that much free
            total = torch.cuda.mem_get_info()[1]
            torch.cuda.set_per_process_memory_fraction(min(1.0, budgets["budget"] / total))
            report["budget_bytes"] = budgets["budget"]
            n = int(report["experts_fit_budget"])
        report["allocation_check"] = allocate(config, n, base, KV_RESERVE)
        print(json.dumps(report["allocation_check"], indent=1), flush=True)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
