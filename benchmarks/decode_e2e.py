"""End-to-end decode throughput of the mixed-expert engine at Mistral-7B geometry (issue 7, item 3).

Why: the kernel benchmarks time one linear; a user gets the tokens per second of a whole decode step
(32 layers, attention over a KV cache, norms, embedding, LM head, Python dispatch). This times
``MixedExpertEngine.forward`` on batches of 8/32/64 rows grouped by expert as the scheduler orders them,
with the base alone (0) and 1/4/8/16 experts, and compares each with the same batch on the base alone
and with its bytes floor. Target: >= 80% of base-alone tokens/s with 8 experts at batch 32.

SYNTHETIC: a randomly initialised bf16 model built on the device and random experts (2-bit codes,
per-output-channel steps, 1% salient fp16 columns) with the exact shapes and bytes of real ones;
nothing is written to disk.

Seam: ``MixedExpertEngine`` reads its base from a folder and experts from verified artifacts (14.5 GB
plus 16 x 2 GB of files). ``InMemoryEngine`` sets the device and architecture and hands a model already
in memory to the engine's own ``_attach`` (patching, banks, tiers), and experts enter as
``ExpertSlot``s whose device payload (norm weights, packed embedding ``RowTable``) is set directly and
whose linear and LM-head deltas are one ``DeltaBank.random`` per tensor in the ``BankSet``: what
``_build_payload`` would have built. The timed call is the unchanged ``MixedExpertEngine.forward``
(packed payload: one ``mixed_delta`` launch per linear, Triton on CUDA, the PyTorch reference on CPU).

A decode step is the scheduler's: mask grown by a column, per-row positions, ``logits_to_keep=1``,
greedy next token; after a prefill and warm-up steps, the cache growing as in real decoding. ``ms``:
median step, CUDA-synchronised; ``host_ms``: median time until the step returns before the sync
(close to ``ms``: launch-bound). No CUDA graphs: the engine runs eagerly. Bytes floor per step: every
base weight but the embedding table, the KV cache read once, each active expert's banked deltas, at
the device-to-device copy bandwidth measured here; ``bytes_floor_fraction`` is base-alone floor over
this floor, the best fraction of base-alone throughput memory traffic allows.

    python benchmarks/decode_e2e.py --out benchmarks/results/decode-e2e-DATE.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoModelForCausalLM, DynamicCache

from meswitch.checkpoints import ARCHITECTURES
from meswitch.compression.delta import CompressedDelta, DeltaConfig
from meswitch.kernels import DeltaBank, mixed_delta_reference
from meswitch.kernels.layout import LAYOUT_V1
from meswitch.serving.banked import Grid, GridBanks, RowTable
from meswitch.serving.engine import EngineConfig, MixedExpertEngine, resolve_device, resolve_dtype
from meswitch.serving.tiers import ExpertSlot, nbytes
from meswitch.synthetic import mistral_7b_config

DELTA = DeltaConfig(bits=2, salient=0.01)  # the compressor's default grid: per channel, asymmetric
CHECK_BOUND = 1e-2  # relative error of the delta, engine path vs reference (bf16 rounding: ~4e-3)
TARGET = {"experts": 8, "batch": 32, "fraction_of_base": 0.8}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def random_compressed(shape: tuple[int, int], device: torch.device, gen: torch.Generator) -> CompressedDelta:
    """One random CompressedDelta (layout 1, as artifacts store it) of ``shape``."""
    spec = DELTA.quant_spec()
    b = DeltaBank.random(1, shape, bits=spec.bits, group_size=spec.group_size, salient=DELTA.salient_count(shape[1]),
                         symmetric=spec.symmetric, layout_version=LAYOUT_V1, device=device, generator=gen)  # fmt: skip
    offset = None if b.offset is None else b.offset[0]
    return CompressedDelta(shape, spec, b.packed[0], b.scale[0], offset, b.salient_idx[0], b.salient_val[0])


class InMemoryEngine(MixedExpertEngine):
    """``MixedExpertEngine`` with the packed payload over a model in memory and synthetic experts."""

    def __init__(self, model: torch.nn.Module, config: EngineConfig):
        if config.payload != "packed":
            raise ValueError("the synthetic experts are banks: the packed payload only")
        self.config = config
        self.device = resolve_device(config.device)
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.spec = ARCHITECTURES[type(model).__name__]
        self._attach(model, observer=None)

    def weight(self, name: str) -> torch.Tensor:
        return self.model.get_submodule(name.removesuffix(".weight")).weight

    @torch.no_grad()
    def add_synthetic_experts(self, count: int, gen: torch.Generator) -> list[ExpertSlot]:
        """``count`` device-resident experts: every linear's and the LM head's deltas in one bank per
        tensor; per expert, norm weights (base + δ) and a packed embedding delta in its payload."""
        spec = DELTA.quant_spec()
        grid = Grid(spec.bits, spec.group_size, spec.symmetric)
        gb = self.banks.grids.setdefault(grid, GridBanks())
        for name, role in self.patched.roles.items():
            if role in ("linear", "lm_head"):
                n, k = self.weight(name).shape
                gb.banks[name] = DeltaBank.random(count, (n, k), bits=spec.bits, group_size=spec.group_size,
                                                  salient=DELTA.salient_count(k), symmetric=spec.symmetric,
                                                  device=self.device, generator=gen)  # fmt: skip
        banked = sum(b.nbytes_per_expert() for b in gb.banks.values())
        slots = []
        for j in range(count):
            payload: dict = {}
            for name, role in self.patched.roles.items():
                if role == "norm":
                    w = self.weight(name)
                    noise = 0.01 * torch.randn(w.shape, generator=gen, device=self.device)
                    payload[name] = (w.float() + noise).to(self.dtype)
            embed = random_compressed(tuple(self.weight(self.patched.embed).shape), self.device, gen)
            payload[self.patched.embed] = RowTable(embed, None, self.dtype)
            slot = ExpertSlot(key=f"synthetic-{j}@0", name=f"synthetic-{j}", version="0", index=next(self._index),
                              reader=None, vocab=self.base_vocab, device_bytes_estimate=0, payload=payload)  # fmt: skip
            slot.device_bytes = nbytes(payload) + banked
            self.tiers.slots[slot.key] = slot
            gb.order.append(slot.key)
            self.banks.where[slot.key] = grid
            slots.append(slot)
        return slots


def check_delta(eng: InMemoryEngine, slots: list[ExpertSlot], gen: torch.Generator) -> float:
    """The engine's banked path (row slots -> ExpertRows -> mixed_delta) against the PyTorch reference on
    every distinct linear of layer 0 and the LM head: 2 base rows, then 12 rows over up to 4 experts."""
    experts = slots[:4]
    rows = [None, None, *(experts[i * len(experts) // 12] for i in range(12))]
    row_banks = [None if s is None else eng.banks.index(s.key) for s in rows]
    ids = [-1 if rb is None else rb[1] for rb in row_banks]
    gb = eng.banks.grids[row_banks[-1][0]]
    names = [f"{eng.spec.block_prefix(0)}{lin}.weight" for lin in eng.spec.linears] + [eng.patched.lm_head]
    worst = 0.0
    for name in names:
        bank = gb.banks[name]
        n, k = bank.shape
        x = torch.randn(len(rows), 1, k, generator=gen, device=eng.device).to(eng.dtype)
        y = (0.01 * torch.randn(len(rows), 1, n, generator=gen, device=eng.device)).to(eng.dtype)
        got = y.clone()
        eng.ctx.set([], len(rows), row_banks)
        try:
            eng.ctx.banked(name, x, got)
        finally:
            eng.ctx.clear()
        ref = mixed_delta_reference(x[:, 0], bank, ids, y[:, 0].clone()).float() - y[:, 0].float()
        if not torch.equal(got[:2], y[:2]):
            raise RuntimeError(f"{name}: base-only rows changed")
        err = float((got[:, 0].float() - y[:, 0].float() - ref).norm() / ref.norm())
        if not err < CHECK_BOUND:
            raise RuntimeError(f"{name}: delta disagrees with the reference, relative error {err:.2e}")
        worst = max(worst, err)
    return worst


def copy_bandwidth(device: torch.device) -> float:
    """Device-to-device copy, bytes read + written per second."""
    size = 2**30 if device.type == "cuda" else 2**26
    src = torch.ones(size, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(5):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            dst.copy_(src)
        sync(device)
        times.append((time.perf_counter() - t0) / 10)
    return 2 * size / statistics.median(times)


def decode(eng: InMemoryEngine, rows: list, prompt: int, warmup: int, steps: int, gen: torch.Generator) -> dict:
    """Prefill ``prompt`` tokens per row, then time ``steps`` decode steps after ``warmup`` untimed ones."""
    b, dev = len(rows), eng.device
    ids = torch.randint(3, eng.base_vocab, (b, prompt), generator=gen, device=dev)
    mask = torch.ones(b, prompt, dtype=torch.long, device=dev)
    cache = DynamicCache()
    logits = eng.forward(ids, rows, mask, torch.arange(prompt, device=dev).expand(b, -1), cache, logits_to_keep=1)
    last, pos = logits[:, -1].argmax(-1), torch.full((b,), prompt - 1, device=dev)
    total, host = [], []
    for t in range(warmup + steps):
        t0 = time.perf_counter()
        mask = torch.cat([mask, mask.new_ones(b, 1)], dim=1)
        pos = pos + 1
        logits = eng.forward(last[:, None], rows, mask, pos[:, None], cache, logits_to_keep=1)
        last = logits[:, -1].argmax(-1)
        t1 = time.perf_counter()
        sync(dev)
        if t >= warmup:
            total.append(time.perf_counter() - t0)
            host.append(t1 - t0)
    if not bool(torch.isfinite(logits).all()):
        raise RuntimeError("non-finite logits")
    return {"ms": 1e3 * statistics.median(total), "host_ms": 1e3 * statistics.median(host),
            "mean_context": prompt + warmup + (steps + 1) / 2}  # fmt: skip


def int_list(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def default_out() -> Path:
    out = os.environ.get("OUT")
    if out:
        return Path(out) / "decode_e2e.json"
    return Path(f"benchmarks/results/decode-e2e-{dt.date.today().isoformat()}.json")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=default_out())
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--experts-list", type=int_list, default=[0, 1, 4, 8, 16], help="0: the base alone")
    ap.add_argument("--batches", type=int_list, default=[8, 32, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=32, help="timed decode steps per configuration")
    ap.add_argument("--device", default="cuda", help="cuda; cpu only to smoke-test the script (reference path)")
    args = ap.parse_args(argv)
    started = time.perf_counter()
    device = torch.device(args.device)
    torch.manual_seed(0)
    gen = torch.Generator(device=device).manual_seed(0)
    experts_list = sorted(set(args.experts_list))

    cfg = mistral_7b_config(hidden_size=args.hidden, intermediate_size=args.inter, num_hidden_layers=args.layers,
                            num_attention_heads=args.heads, num_key_value_heads=args.kv,
                            vocab_size=args.vocab)  # fmt: skip
    dtype = resolve_dtype("auto", device)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype, attn_implementation="sdpa")
    eng = InMemoryEngine(model, EngineConfig(device=args.device, payload="packed"))
    slots = eng.add_synthetic_experts(max(experts_list), gen)
    sync(device)
    print(f"model and {len(slots)} experts built in {time.perf_counter() - started:.1f} s", flush=True)

    embed = eng.model.get_input_embeddings().weight
    base_bytes = sum(p.numel() * p.element_size() for p in eng.model.parameters() if p is not embed)
    grid_banks = next(iter(eng.banks.grids.values()), GridBanks())
    delta_bytes = sum(b.nbytes_per_expert() for b in grid_banks.banks.values())
    kv_per_token = args.layers * 2 * args.kv * (args.hidden // args.heads) * embed.element_size()
    bandwidth = copy_bandwidth(device)
    check = check_delta(eng, slots, gen) if slots else None
    print(f"copy bandwidth {bandwidth / 1e9:.0f} GB/s; delta vs reference: relative error {check}", flush=True)

    triton_version = None
    if device.type == "cuda":
        import triton

        triton_version = triton.__version__
    report: dict = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "versions": {"torch": torch.__version__, "triton": triton_version, "transformers": transformers.__version__},
        "command": " ".join(["python", *sys.argv]),
        "synthetic": True,
        "data": "SYNTHETIC: random bf16 base and random 2-bit experts with the shapes and bytes of real ones",
        "geometry": {"layers": args.layers, "hidden": args.hidden, "inter": args.inter, "heads": args.heads,
                     "kv_heads": args.kv, "vocab": args.vocab, "dtype": str(dtype).removeprefix("torch.")},
        "delta": {"bits": DELTA.bits, "salient": DELTA.salient, "group_size": DELTA.group_size,
                  "symmetric": DELTA.symmetric},
        "prompt_tokens": args.prompt, "warmup_steps": args.warmup, "timed_steps": args.steps,
        "cuda_graphs": False,
        "note": "no CUDA graphs: every step is the engine's eager forward (PyTorch ops and one Triton launch "
                "per banked linear issued from Python); host_ms is the time until the step returns unsynchronised",
        "copy_bandwidth_GBps": round(bandwidth / 1e9, 1),
        "base_bytes_per_step": base_bytes,
        "expert_delta_bytes_per_step": delta_bytes,
        "expert_device_bytes": slots[0].device_bytes if slots else None,
        "kv_bytes_per_token": kv_per_token,
        "check_relative_error": check, "check_bound": CHECK_BOUND,
        "rows": [],
    }  # fmt: skip

    base_tps: dict[int, float] = {}
    for batch in args.batches:
        for experts in experts_list:
            if experts > batch:
                print(f"skip {experts} experts in a batch of {batch}", flush=True)
                continue
            rows = [None] * batch if experts == 0 else [slots[i * experts // batch] for i in range(batch)]
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            r = decode(eng, rows, args.prompt, args.warmup, args.steps, gen)
            tps = batch / (r["ms"] / 1e3)
            if experts == 0:
                base_tps[batch] = tps
            fixed = base_bytes + kv_per_token * batch * r["mean_context"]
            floor = fixed + experts * delta_bytes
            row = {
                "experts": experts, "batch": batch, "ms": round(r["ms"], 3), "host_ms": round(r["host_ms"], 3),
                "tokens_per_s": round(tps, 1),
                "fraction_of_base": round(tps / base_tps[batch], 4) if batch in base_tps else None,
                "bytes_floor_ms": round(1e3 * floor / bandwidth, 3),
                "bytes_floor_fraction": round(fixed / floor, 4),
                "peak_gb": round(torch.cuda.max_memory_allocated(device) / 1e9, 2) if device.type == "cuda" else None,
            }  # fmt: skip
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    hit = [r for r in report["rows"] if r["experts"] == TARGET["experts"] and r["batch"] == TARGET["batch"]]
    measured = hit[0]["fraction_of_base"] if hit else None
    met = None if measured is None else measured >= TARGET["fraction_of_base"]
    report["target"] = {**TARGET, "measured": measured, "met": met}
    report["elapsed_seconds"] = round(time.perf_counter() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"target {report['target']}; wrote {args.out} in {report['elapsed_seconds']} s", flush=True)


if __name__ == "__main__":
    main()
