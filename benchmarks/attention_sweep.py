"""Launch-parameter sweep for the decode attention kernel (GPU), to set :class:`AttentionLaunch`'s defaults.

The decoder's 7B shapes (8 KV heads of 4 query heads, head size 128): batches of 8-64 rows at a decode step's
spans. Each configuration is first checked against the PyTorch reference, then timed alone: ``LAYERS`` launches
captured in one CUDA graph over rotating cache sets (more bytes than L2 holds), per launch. Bytes: the K/V rows
each sequence reads (positions before its new token), q, the new K/V and the output.

    python benchmarks/attention_sweep.py --out attention-sweep.json
    TRITON_INTERPRET=1 python benchmarks/attention_sweep.py --device cpu --out /tmp/a.json   # checks only
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from meswitch.kernels.attention_launch import AttentionLaunch, resolve
from meswitch.kernels.decode_attention import decode_attention_reference
from meswitch.kernels.triton_attention import launch

HKV, GROUP, HEAD = 8, 4, 128
LAYERS = 32
CASES = [(8, 256, 160), (32, 256, 160), (64, 256, 160), (32, 2048, 1900)]  # (batch, span, position)


def configs() -> list[AttentionLaunch]:
    out = [AttentionLaunch(block_n=bn, num_warps=w, num_stages=st)
           for bn, w, st in itertools.product((32, 64, 128), (2, 4, 8), (None, 3))]  # fmt: skip
    out += [AttentionLaunch(block_n=64, splits=s) for s in (1, 2, 4)]
    out.append(AttentionLaunch())  # the defaults: resolve's rule
    return out


def cache_sets(batch: int, span: int, position: int, dtype, device, budget: int = 256 * 2**20) -> list[tuple]:
    """Inputs of one launch, repeated until their caches outgrow L2 (at most 8 sets)."""
    gen = torch.Generator().manual_seed(batch + span)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    one = 2 * (batch + 1) * HKV * span * HEAD * torch.tensor([], dtype=dtype).element_size()
    sets = []
    for _ in range(max(1, min(8, -(-budget // one))) if device != "cpu" else 1):
        angle = torch.rand(batch, HEAD // 2, generator=gen) * 6.3
        cos, sin = (f(torch.cat([angle, angle], 1)).to(dtype).to(device) for f in (torch.cos, torch.sin))
        rows, pos = torch.arange(batch, device=device), torch.full((batch,), position, device=device)
        q, k, v = rnd(batch, HKV, GROUP, HEAD), rnd(batch, HKV, HEAD), rnd(batch, HKV, HEAD)
        sets.append((q, k, v, rnd(batch + 1, HKV, span, HEAD), rnd(batch + 1, HKV, span, HEAD), rows, pos, cos, sin))
    return sets


def check(cfg: AttentionLaunch, inputs: tuple, span: int, scale: float, sms: int) -> float:
    """Largest absolute difference from the reference (each on its own copy of the caches)."""
    q, k, v, kc, vc, rows, pos, cos, sin = inputs
    want = decode_attention_reference(q, k, v, kc.clone(), vc.clone(), rows, pos, span, scale, cos, sin)
    got = launch(q, k, v, kc.clone(), vc.clone(), rows, pos, span, scale, cos, sin, sms=sms, cfg=cfg)
    return (got.float() - want.float()).abs().max().item()


def time_graph(cfg: AttentionLaunch, sets: list[tuple], span: int, scale: float, sms: int, replays: int = 20) -> float:
    """Microseconds a launch, ``LAYERS`` launches over the rotating sets replayed from one CUDA graph."""
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        for s in sets:  # compile and warm outside the capture
            launch(*s[:7], span, scale, *s[7:], sms=sms, cfg=cfg)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for i in range(LAYERS):
                s = sets[i % len(sets)]
                launch(*s[:7], span, scale, *s[7:], sms=sms, cfg=cfg)
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (replays * LAYERS)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--device", default="cuda", help="cuda; cpu runs the checks only (TRITON_INTERPRET=1)")
    ap.add_argument("--cases", help="BATCH:SPAN:POSITION;... instead of the built-in cases")
    args = ap.parse_args(argv)
    cases = [tuple(int(v) for v in c.split(":")) for c in args.cases.split(";")] if args.cases else CASES
    gpu = args.device == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float16  # the interpreter's bf16 dot is wrong
    scale = 1 / math.sqrt(HEAD)
    sms = torch.cuda.get_device_properties(0).multi_processor_count if gpu else 132  # the H200's, for the checks
    if gpu:
        from kernel_roofline import copy_bandwidth, write_report

        copy_gbps = copy_bandwidth()
    rows = []
    for batch, span, position in cases:
        sets = cache_sets(batch, span, position, dtype, args.device)
        nbytes = batch * HKV * HEAD * 2 * (2 * position + 2 + 2 * GROUP)  # K/V read, new K/V written, q and out
        for cfg in configs():
            err = check(cfg, sets[0], span, scale, sms)
            row = {"batch": batch, "span": span, "position": position, "config": cfg.__dict__, "max_abs_error": err,
                   "resolved": resolve(cfg, batch * HKV, span, sms).__dict__}  # fmt: skip
            if gpu and err < 2e-2:
                us = time_graph(cfg, sets, span, scale, sms)
                row |= {"us": round(us, 2), "fraction_of_copy_bandwidth": round(nbytes / us / 1e3 / copy_gbps, 4)}
            rows.append(row)
            print({k: v for k, v in row.items() if k != "config"} | cfg.__dict__, flush=True)
    if gpu:
        write_report(args.out, copy_gbps, rows)
    else:
        args.out.write_text(json.dumps({"checks_only": True, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
