"""How many Mistral-7B experts (2-bit, ~1% salient, per-channel; or --bits/--salient) fit on one GPU beside a bf16 base.

Byte counts are exact: each linear's delta is a ``CompressedDelta`` with the tensor shapes the
compressor produces (``CompressedDelta.nbytes()``), built on the meta device. Geometry: 32 layers
of q 4096x4096, k/v 1024x4096, o 4096x4096, gate/up 14336x4096, down 4096x14336, plus embed and
lm_head 32000x4096 at the same bits. The base is bf16 (every Mistral-7B tensor, norms included).

With ``--allocate`` (on a GPU) it then VERIFIES by allocating, on the device, the base, the
computed number of experts tensor by tensor (SYNTHETIC contents: nothing is computed), and the
KV-cache reserve; then keeps adding experts until an allocation fails.

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


def allocate(config: DeltaConfig, experts: int, base: int, kv: int, max_extra: int = 8) -> dict:
    """Allocate base, experts (tensor by tensor) and the KV reserve; then try a few more experts."""
    dev = torch.device("cuda")
    t0 = time.perf_counter()
    held = [torch.empty(base // 2, dtype=torch.bfloat16, device=dev)]
    template = expert_tensors(config)

    def one_expert():
        out = []
        for d in template:
            for t in (d.packed, d.scale, d.offset, d.salient_idx, d.salient_val):
                if t is not None:
                    out.append(torch.empty(t.shape, dtype=t.dtype, device=dev))
        return out

    for _ in range(experts):
        held.append(one_expert())
    planned = experts
    while True:  # the allocator rounds each tensor up: step down until the KV reserve fits too
        try:
            held.append(torch.empty(kv, dtype=torch.uint8, device=dev))
            break
        except torch.OutOfMemoryError:
            if len(held) == 1:
                raise
            held.pop()
            experts -= 1
            print(f"KV reserve does not fit beside {experts + 1} experts; trying {experts}", flush=True)
    torch.cuda.synchronize()
    fitted = {
        "experts_verified": experts,
        "experts_from_byte_count": planned,
        "allocated_bytes": torch.cuda.memory_allocated(),
        "reserved_bytes": torch.cuda.memory_reserved(),
        "free_after": torch.cuda.mem_get_info()[0],
        "seconds": round(time.perf_counter() - t0, 2),
    }
    extra = 0
    try:
        while extra < max_extra:
            held.append(one_expert())
            extra += 1
    except torch.OutOfMemoryError:
        pass
    fitted["extra_experts_that_also_fit"] = extra if extra < max_extra else f">= {max_extra}"
    del held
    torch.cuda.empty_cache()
    return fitted


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
