"""Mixed-expert 2-bit delta kernel against its bytes floor, on Mistral-7B linear shapes (GPU).

SYNTHETIC deltas (random codes, steps and corrections; 2-bit, per-channel, 1% salient columns):
the bytes and shapes of real experts, not their values. Rows are grouped by expert (segments),
spread evenly over the batch's experts.

For each linear shape, row count and number of distinct experts in the batch it reports the
median time of one launch (triton.testing.do_bench, input sets rotated so that a set's bytes are
not in L2 from the previous call), the bytes moved (each active expert's packed delta with its
steps and salient columns read once, x read, y read and written), the achieved bandwidth and its
fraction of the device-to-device copy bandwidth measured in the same run, and speed-ups over (a)
the naive PyTorch path (dequantize each expert's delta to bf16, then matmul) and (b) a dense bf16
delta matmul per expert. ``ms`` times the delta op alone; ``base_plus_delta_ms`` adds the bf16
base GEMM (torch) before it, with bytes counting the base weight too.

``--sums-given`` launches as the decode step does: x's row sums come with x (the decoder's norm and SwiGLU
compute them, ``meswitch.kernels.row_sums``; here before timing), so every decode launch with steps in the
epilogue takes them from outside its loop (16-row tiles: two planes a dot in 128 registers), not only the MLP's
launches of 8 or more tiles, which otherwise compute them in a kernel of their own, timed with the delta; and
in tiles of as many rows as the step picks (8 where no expert has more than 8 rows, 16 up to 32, else 64:
``row_block``), not the library path's one tile per segment of up to 64 rows (``choose_config``). With FP8 planes
(``MESWITCH_DELTA_CONFIG='{"fp8_planes": true}'``) x in e4m3 comes with x the same way, where without ``--sums-given``
a kernel of its own rounds it before each launch, timed with the delta.

Each row also says what a launch of its shape could reach at best (``attainable_fraction``): its bytes at copy
bandwidth, or its FLOPs at the dense bf16 rate cuBLAS reaches on this device (measured in the run), whichever is
longer, plus the GPU time of an empty launch of the same grid from a CUDA graph (``empty_launch_ms``: start, one
load and store a program, drain) -- what no kernel of that grid avoids.

    python benchmarks/kernel_roofline.py --out benchmarks/results/kernel_roofline-DATE.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meswitch.compression.quantize import step_params
from meswitch.kernels import DeltaBank, ExpertRows
from meswitch.kernels.launch_config import LaunchConfig, choose_config, config_for, k_splits, row_block, sums_plan
from meswitch.kernels.layout import LAYOUT_V1
from meswitch.kernels.reference import error_bound
from meswitch.kernels.row_sums import launch_args, launch_inputs, sum_weights
from meswitch.kernels.triton_delta import launch, mixed_delta_triton

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}  # fmt: skip
# what the decoder launches (DecoderConfig.group_deltas): sibling projections banked as one, one launch for them all
GROUPED = {"q/k/v grouped 6144x4096": ((4096, 1024, 1024), 4096), "gate/up grouped 28672x4096": ((14336, 14336), 4096)}
for _name, (_widths, _k) in GROUPED.items():
    SHAPES[_name] = (sum(_widths), _k)


def synthetic_bank(name: str, experts: int, salient: int) -> DeltaBank:
    """Random experts of one shape; a grouped shape as its projections' banks side by side (DeltaBank.concat)."""
    n, k = SHAPES[name]
    if name not in GROUPED:
        return DeltaBank.random(experts, (n, k), bits=2, salient=salient, device="cuda")
    parts = [DeltaBank.random(experts, (w, k), bits=2, salient=salient, device="cuda") for w in GROUPED[name][0]]
    return DeltaBank.concat(parts)


ROWS = (1, 8, 32, 64, 256, 2048)
EXPERTS = (1, 4, 8, 16)
L2_BYTES = 50 * 2**20
ROTATE_BYTES = 4 * L2_BYTES  # each timed call touches fresh bytes: rotate sets until this much


def copy_bandwidth(nbytes: int = 2 * 2**30) -> float:
    """Device-to-device copy, bytes read + written per second (GB/s)."""
    src = torch.randn(nbytes // 4, device="cuda")
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=50, rep=300, return_mode="median")
    return 2 * nbytes / ms / 1e6


def matmul_tflops(size: int = 8192) -> float:
    """Dense bf16 GEMM rate cuBLAS reaches here (TFLOP/s): the compute floor's rate."""
    a, b = (torch.randn(size, size, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median")
    return 2 * size**3 / ms / 1e9


@triton.jit
def _empty_kernel(ptr):
    pid = (
        tl.program_id(0)
        + tl.program_id(1) * tl.num_programs(0)
        + tl.program_id(2) * tl.num_programs(0) * tl.num_programs(1)
    )
    tl.store(ptr + pid, tl.load(ptr + pid) + 1)


def empty_launch_ms(grid: tuple[int, int, int], num_warps: int, launches: int = 16) -> float:
    """GPU time per launch of a kernel that does nothing but exist (one load and store a program) on ``grid``,
    back to back in a CUDA graph as the step's launches run."""
    buf = torch.zeros(math.prod(grid), dtype=torch.int32, device="cuda")
    return graph_ms(lambda _: _empty_kernel[grid](buf, num_warps=num_warps), [None] * launches)


def rows_for(rows: int, experts: int, first_expert: int) -> tuple[ExpertRows, list[tuple[int, int, int]]]:
    """Rows grouped by expert, as even as possible: segments [(expert, start, end)]."""
    per = [rows // experts + (1 if i < rows % experts else 0) for i in range(experts)]
    starts = [0]
    for c in per:
        starts.append(starts[-1] + c)
    segs = [(first_expert + i, starts[i], starts[i + 1]) for i in range(experts)]
    return ExpertRows.from_segments(starts, [first_expert + i for i in range(experts)], device="cuda"), segs


def step_launch(
    bank: DeltaBank, er: ExpertRows, segs: list[tuple[int, int, int]], x: torch.Tensor, block_m: int | None = None
) -> tuple[LaunchConfig, torch.Tensor, dict]:
    """(config, tile table, given inputs) of the launch the decode step makes for these rows: sized for their
    tiles, with x's row sums (and with FP8 planes x in e4m3) given where the config takes them
    (``launch_config.sums_plan``), computed here as the decoder's glue computes them with x
    (``row_sums.launch_inputs``), outside the time of the launch. ``block_m``: the tiles' rows
    (``DecoderConfig.block_m``), else the step's own choice for the longest segment (``row_block``: 8, 16 or 64)."""
    block_m = block_m or row_block(max(b - a for _, a, b in segs))
    tiles = sum(-(-(b - a) // block_m) for _, a, b in segs)
    cfg = config_for(bank, block_m, tiles, x.device, sums_given=True)
    plan = sums_plan(bank, block_m, tiles, x.device, x.dtype)
    given = None if plan is None else launch_inputs(x, [sum_weights(plan, x.device)])[0]
    return cfg, er.tiles(block_m, x.device), launch_args(given, x.shape[0])


def naive_dequant_bf16(bank: DeltaBank, e: int) -> torch.Tensor:
    """What one writes without a kernel (layout 1, int32 shifts): codes -> bf16 weights, salient added."""
    (n, k), bits = bank.grid.shape, bank.grid.bits
    vpw = 32 // bits
    shifts = torch.arange(vpw, device=bank.device, dtype=torch.int32) * bits
    codes = ((bank.packed[e].unsqueeze(-1) >> shifts) & ((1 << bits) - 1)).view(n, -1)[:, :k]
    scale, offset = step_params(bank.scale[e], None if bank.offset is None else bank.offset[e], bits)
    g = scale.shape[1]
    w = codes.to(torch.bfloat16).view(n, g, k // g) * scale.to(torch.bfloat16).unsqueeze(-1)
    w = (w + offset.to(torch.bfloat16).unsqueeze(-1)).view(n, k)
    w.index_add_(1, bank.salient_idx[e].long(), bank.salient_val[e].to(torch.bfloat16))
    return w


def graph_ms(launch, sets) -> float:
    """GPU time per launch with no host overhead: one CUDA graph holds a launch on each input set
    (so consecutive launches touch different memory), replayed under do_bench (median) / sets."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for s in sets:
            launch(s)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for s in sets:
            launch(s)
    return do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / len(sets)


class Rotation:
    """Callables over several input sets, one set per call, so timing never reads warm L2."""

    def __init__(self, sets):
        self.sets = sets
        self.i = 0

    def __call__(self, fn):
        s = self.sets[self.i]
        self.i = (self.i + 1) % len(self.sets)
        fn(*s)


def bench_case(
    bank, naive_bank, dense, base_ws, n, k, rows, experts, config, with_baselines=True, sums_given=False, block_m=None
):
    per_expert = bank.nbytes_per_expert()
    active = experts * per_expert
    io_bytes = rows * k * 2 + 2 * rows * n * 2
    sets_needed = max(1, math.ceil(ROTATE_BYTES / max(active + io_bytes, 1)))
    nsets = max(1, min(sets_needed, bank.num_experts // experts, 16))
    sets = []
    for s in range(nsets):
        er, segs = rows_for(rows, experts, s * experts)
        x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
        y = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 0.01
        er.tiles((config or choose_config(bank, er, x.device)).block_m, x.device)
        sets.append((x, y, er, segs, step_launch(bank, er, segs, x, block_m) if sums_given else None))
    rot = Rotation(sets)

    def run_kernel(x, y, er, segs, step):
        if step is None:
            mixed_delta_triton(x, bank, er, y, config)
        else:
            launch(x, bank, step[1], y, step[0], **step[2])

    ms = do_bench(lambda: rot(run_kernel), warmup=25, rep=200, return_mode="median")
    used = sets[0][4][0] if sums_given else config or choose_config(bank, sets[0][2], sets[0][0].device)
    tiles = sets[0][4][1] if sums_given else sets[0][2].tiles(used.block_m, sets[0][0].device)
    grid = (-(-n // used.block_n), tiles.shape[0], k_splits(bank.packed.shape[1], used.split_k)[0])  # as launch's
    out = {"ms": ms, "bytes": active + io_bytes, "rotation_sets": nsets, "config": used.__dict__, "grid": grid}
    out["graph_ms"] = graph_ms(lambda s: run_kernel(*s), sets)
    if not with_baselines:
        return out

    def run_naive(x, y, er, segs, step):
        for e, a, b in segs:
            w = naive_dequant_bf16(naive_bank, e % naive_bank.num_experts)
            y[a:b].addmm_(x[a:b], w.T)

    def run_dense(x, y, er, segs, step):
        for e, a, b in segs:
            y[a:b].addmm_(x[a:b], dense[e % dense.shape[0]].T)

    out["naive_ms"] = do_bench(lambda: rot(run_naive), warmup=10, rep=100, return_mode="median")
    out["dense_ms"] = do_bench(lambda: rot(run_dense), warmup=10, rep=100, return_mode="median")

    def run_base_delta(x, y, er, segs, step, wb):
        torch.mm(x, wb.T, out=y)
        run_kernel(x, y, er, segs, step)

    def run_base(x, y, er, segs, step, wb):
        torch.mm(x, wb.T, out=y)

    rot_b = Rotation([(*s, base_ws[i % len(base_ws)]) for i, s in enumerate(sets)])
    out["base_ms"] = do_bench(lambda: rot_b(run_base), warmup=10, rep=100, return_mode="median")
    out["base_plus_delta_ms"] = do_bench(lambda: rot_b(run_base_delta), warmup=10, rep=100, return_mode="median")
    out["base_bytes"] = n * k * 2
    return out


def check_once(bank, n, k, rows=16, experts=4, config=None):
    """A quick kernel-vs-reference check on this bank (and launch config) before timing it."""
    from meswitch.kernels import mixed_delta_reference

    er, _ = rows_for(rows, experts, 0)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    y = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16) * 0.01
    ref = mixed_delta_reference(x, bank, er, y.clone()).float() - y.float()
    got = mixed_delta_triton(x, bank, er, y.clone(), config).float() - y.float()
    err = float((got - ref).norm() / ref.norm())
    cfg = config or choose_config(bank, er, x.device)
    bound = error_bound(cfg.fp8_planes)  # FP8 planes: by MESWITCH_DELTA_CONFIG or the config
    if not err < bound:
        raise RuntimeError(f"kernel disagrees with the reference: relative error {err:.2e} (bound {bound})")
    return err


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--shapes", nargs="*", default=list(SHAPES))
    ap.add_argument("--rows", type=int, nargs="*", default=list(ROWS))
    ap.add_argument("--experts", type=int, nargs="*", default=list(EXPERTS))
    ap.add_argument("--no-baselines", action="store_true", help="time the kernel only")
    ap.add_argument(
        "--sums-given", action="store_true",
        help="launch as the decode step does: x's row sums given with x (see above)",
    )  # fmt: skip
    ap.add_argument(
        "--block-m", type=int,
        help="with --sums-given: rows a tile (default: the step's row_block: 8, 16 or 64 by an expert's most rows)",
    )  # fmt: skip
    args = ap.parse_args(argv)
    if args.block_m and not args.sums_given:
        ap.error("--block-m needs --sums-given (the step's launch)")

    torch.manual_seed(0)
    copy_gbps = copy_bandwidth()
    tflops = matmul_tflops()
    print(f"device-to-device copy: {copy_gbps:.0f} GB/s (read + write); bf16 GEMM {tflops:.0f} TFLOP/s", flush=True)
    results = []
    for name in args.shapes:
        n, k = SHAPES[name]
        salient = round(0.01 * k)
        probe = synthetic_bank(name, 1, salient)
        per_expert = probe.nbytes_per_expert()
        del probe
        pool = min(128, max(max(args.experts), math.ceil(ROTATE_BYTES / per_expert) * max(args.experts) // 4))
        pool = max(pool, max(args.experts))
        bank = synthetic_bank(name, pool, salient)
        err = check_once(bank, n, k)
        dense_count = max(args.experts) if n * k * 2 * max(args.experts) > ROTATE_BYTES else 16
        naive_bank = DeltaBank.random(dense_count, (n, k), salient=salient, layout_version=LAYOUT_V1, device="cuda")
        dense = torch.randn(dense_count, n, k, device="cuda", dtype=torch.bfloat16) * 0.01
        base_ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02
                   for _ in range(max(1, math.ceil(ROTATE_BYTES / (n * k * 2))))]  # fmt: skip
        print(f"{name}: {pool} synthetic experts of {per_expert / 1e6:.2f} MB, check err {err:.1e}", flush=True)
        for rows, experts in itertools.product(args.rows, args.experts):
            if experts > rows:
                continue
            r = bench_case(
                bank, naive_bank, dense, base_ws, n, k, rows, experts, None, not args.no_baselines, args.sums_given,
                args.block_m,
            )  # fmt: skip
            gbps = r["bytes"] / r["ms"] / 1e6
            empty = empty_launch_ms(r["grid"], r["config"]["num_warps"])
            bytes_ms, flops_ms = r["bytes"] / copy_gbps / 1e6, 2 * rows * n * k / tflops / 1e9
            row = {
                "shape": name,
                "n": n,
                "k": k,
                "rows": rows,
                "experts": experts,
                "ms": round(r["ms"], 5),
                "bytes": r["bytes"],
                "gbps": round(gbps, 1),
                "fraction_of_copy_bandwidth": round(gbps / copy_gbps, 3),
                "tflops": round(2 * rows * n * k / r["ms"] / 1e9, 1),
                "graph_ms": round(r["graph_ms"], 5),
                "graph_fraction_of_copy_bandwidth": round(r["bytes"] / r["graph_ms"] / 1e6 / copy_gbps, 3),
                "empty_launch_ms": round(empty, 5),
                "flops_floor_ms": round(flops_ms, 5),
                "attainable_fraction": round(bytes_ms / (max(bytes_ms, flops_ms) + empty), 3),
                "rotation_sets": r["rotation_sets"],
                "sums_given": args.sums_given,
                "launch": r["config"],
            }
            if "naive_ms" in r:
                both = r["bytes"] + r["base_bytes"]
                row.update(
                    speedup_vs_naive=round(r["naive_ms"] / r["ms"], 2),
                    speedup_vs_dense_bf16=round(r["dense_ms"] / r["ms"], 2),
                    naive_ms=round(r["naive_ms"], 4),
                    dense_bf16_ms=round(r["dense_ms"], 4),
                    base_ms=round(r["base_ms"], 5),
                    base_plus_delta_ms=round(r["base_plus_delta_ms"], 5),
                    base_plus_delta_gbps=round(both / r["base_plus_delta_ms"] / 1e6, 1),
                    base_plus_delta_fraction=round(both / r["base_plus_delta_ms"] / 1e6 / copy_gbps, 3),
                )
            results.append(row)
            print(
                f"{name:20s} rows={rows:5d} experts={experts:2d} bm={r['config']['block_m']:2d} "
                f"{r['ms'] * 1e3:8.1f} us "
                f"{gbps:7.0f} GB/s {gbps / copy_gbps:5.1%} graph {r['graph_ms'] * 1e3:7.1f} us "
                f"{row['graph_fraction_of_copy_bandwidth']:5.1%} (empty launch {empty * 1e3:.1f} us, at best "
                f"{row['attainable_fraction']:5.1%})"
                + (
                    f"  naive x{row['speedup_vs_naive']:.1f} dense x{row['speedup_vs_dense_bf16']:.2f}"
                    f"  base {row['base_ms'] * 1e3:.1f} us base+delta {row['base_plus_delta_ms'] * 1e3:.1f} us"
                    if "naive_ms" in r
                    else ""
                ),
                flush=True,
            )
        del bank, naive_bank, dense, base_ws
        torch.cuda.empty_cache()
        write_report(args.out, copy_gbps, results, tflops)  # after each shape: a cut-short run keeps its rows
    print(f"wrote {args.out}")


def write_report(out: Path, copy_gbps: float, results: list[dict], gemm_tflops: float | None = None) -> None:
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "python": platform.python_version(),
        "date": dt.date.today().isoformat(),
        "command": " ".join(["python", *sys.argv]),
        "delta_config_override": os.environ.get("MESWITCH_DELTA_CONFIG") or None,  # launch fields of an A/B
        "data": "SYNTHETIC random 2-bit per-channel deltas, 1% salient columns (shapes and bytes of real experts)",
        "timing": "ms: triton.testing.do_bench median of single launches (L2 flushed, input sets rotated), host "
        "launch overhead included where it exceeds the flush; graph_ms: the same launches in one CUDA graph over "
        "the rotated sets, per launch (GPU time only); both time the delta op alone",
        "bytes_counted": "each active expert's packed codes + steps + salient idx/values once, x read, y read+write; "
        "base_plus_delta adds the bf16 base weight",
        "copy_bandwidth_gbps": round(copy_gbps, 1),
        **({"bf16_gemm_tflops": round(gemm_tflops, 1)} if gemm_tflops else {}),
        "rows": results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
