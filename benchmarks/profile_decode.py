"""Where a decode step's GPU time goes: kernels of one static-decoder step by name, count and time (issue 13).

A captured step replays the same kernels as an eager step of the static decoder, without the host in
between; so the eager step under the PyTorch profiler says what the graph spends its time on: the
base GEMMs, the delta kernel, and the many small kernels of norms, rotary embedding, cache writes
and attention whose count, at a few microseconds each, sets a floor of its own.

SYNTHETIC weights at Mistral-7B geometry (as benchmarks/decode_e2e.py).

    python benchmarks/profile_decode.py --out profile-decode.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import itertools
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from decode_e2e import InMemoryEngine, int_list
from transformers import AutoModelForCausalLM

from meswitch.serving.decoder import DecoderConfig, StaticDecoder
from meswitch.serving.engine import EngineConfig
from meswitch.synthetic import mistral_7b_config


def kind(name: str) -> str:
    """A coarse class of a kernel, by its name."""
    n = name.lower()
    if "_merged_kernel" in n or "_prepare_kernel" in n:
        return "merged product (prefill)"
    if "delta" in n or "x_sums" in n:
        return "delta kernel"
    if n.startswith("triton_"):  # Inductor's (the compiled glue: norms with their slot-table gathers, SwiGLU)
        return "compiled glue"
    if "gemm" in n or "gemv" in n or "cutlass" in n or "sm90_xmma" in n or "nvjet" in n:
        return "base GEMM"
    if n in ("_attend", "_merge") or "attention" in n or "fmha" in n or "flash" in n or "sdpa" in n:
        return "attention"
    if "sort" in n or "scan" in n or "cub" in n:
        return "tile table (sort/scan)"
    if "index" in n or "scatter" in n or "gather" in n:
        return "index/gather/scatter"
    return "elementwise/reduce"


def profile_step(dec: StaticDecoder, rows: list, prompt: int, gen: torch.Generator) -> dict:
    b = len(rows)
    prompts = torch.randint(3, dec.engine.base_vocab, (b, prompt), generator=gen, device=gen.device).tolist()
    last = dec.prefill(range(b), prompts, rows).argmax(-1)
    for i in range(3):
        last = dec.decode(last, [prompt + i] * b, rows).argmax(-1)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec.decode(last, [prompt + 3] * b, rows)
        torch.cuda.synchronize()
    return by_kernel(prof)


def profile_prefill(dec: StaticDecoder, rows: list, prompt: int, gen: torch.Generator) -> dict:
    """One eager prefill of ``len(rows)`` prompts of ``prompt`` tokens: its kernels, and its wall time beside their
    sum (where the wall time is longer, the GPU waited for the host)."""
    b = len(rows)
    prompts = torch.randint(3, dec.engine.base_vocab, (b, prompt), generator=gen, device=gen.device).tolist()
    dec.prefill(range(b), prompts, rows)  # compiles, builds the tables
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    dec.prefill(range(b), prompts, rows)
    end.record()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        dec.prefill(range(b), prompts, rows)
        torch.cuda.synchronize()
    return {"wall_ms": round(start.elapsed_time(end), 2), **by_kernel(prof), "idle_before": idle_before(prof)}


def idle_before(prof) -> dict:
    """GPU idle time (us) between consecutive kernels, by the kind of the kernel that waited: where the GPU waited
    for the host to launch it."""
    kernels = sorted(
        (ev.time_range.start, ev.time_range.end, ev.name)
        for ev in prof.events()
        if ev.device_type == torch.autograd.DeviceType.CUDA
    )
    idle: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for (_, end, _), (start, _, name) in itertools.pairwise(kernels):
        if start > end:
            idle[kind(name)][0] += 1
            idle[kind(name)][1] += start - end
    return {k: {"gaps": c, "us": round(us, 1)} for k, (c, us) in sorted(idle.items(), key=lambda kv: -kv[1][1])}


def by_kernel(prof) -> dict:
    """The profiled kernels by name and by :func:`kind`: count and GPU time."""
    per_name: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per_name[ev.name][0] += 1
            per_name[ev.name][1] += ev.device_time_total
    by_kind: dict[str, list] = collections.defaultdict(lambda: [0, 0.0])
    for name, (count, us) in per_name.items():
        by_kind[kind(name)][0] += count
        by_kind[kind(name)][1] += us
    top = sorted(per_name.items(), key=lambda kv: -kv[1][1])  # every kernel: the small ones add up at ~2.6 us each
    return {
        "kernels": sum(c for c, _ in per_name.values()),
        "gpu_us": round(sum(us for _, us in per_name.values()), 1),
        "by_kind": {
            k: {"count": c, "us": round(us, 1)} for k, (c, us) in sorted(by_kind.items(), key=lambda kv: -kv[1][1])
        },
        "top": [{"name": n[:160], "count": c, "us": round(us, 1)} for n, (c, us) in top],
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--configs", default="0x32,8x32,16x64", help="EXPERTSxBATCH, comma-separated")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--prefill", action="store_true", help="profile a prefill of BATCH prompts of --prompt tokens")
    args = ap.parse_args(argv)
    device = torch.device("cuda")
    gen = torch.Generator(device=device).manual_seed(0)
    cfg = mistral_7b_config(num_hidden_layers=args.layers)
    with device:
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    eng = InMemoryEngine(model, EngineConfig(device="cuda", payload="packed"))
    configs = [tuple(int_list(c.replace("x", ","))) for c in args.configs.split(",")]
    most = max(e for e, _ in configs)
    slots = eng.add_synthetic_experts(most, gen) if most else []  # "0x32" alone: the base, no banks
    batches = sorted({b for _, b in configs})
    dec = StaticDecoder(eng, DecoderConfig(max_rows=max(batches), max_len=512, buckets=tuple(batches), graphs=False))
    report = {"date": dt.date.today().isoformat(), "device": torch.cuda.get_device_name(),
              "versions": {"torch": torch.__version__}, "command": " ".join(["python", *sys.argv]),
              "synthetic": True, "steps": []}  # fmt: skip
    for experts, batch in configs:
        rows = [None] * batch if experts == 0 else [slots[i * experts // batch] for i in range(batch)]
        profile = profile_prefill if args.prefill else profile_step
        r = {"experts": experts, "batch": batch, "prefill": args.prefill, **profile(dec, rows, args.prompt, gen)}
        report["steps"].append(r)
        print(json.dumps({k: v for k, v in r.items() if k != "top"}), flush=True)
        for t in r["top"][:12]:
            print("   ", t, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
