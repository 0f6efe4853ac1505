"""How fast can a kernel merely *read* the delta kernel's codes, in its grid and access pattern? (GPU)

The decode kernel (in Triton, or as it was in Gluon) reached 42-47% of copy bandwidth on the large shapes with
8-16 experts however its loop is written (benchmarks/NOTES-kernels.md). This kernel keeps only the loads: each program
streams one expert's ``[BLOCK_N, 16]`` int32 code tile per chunk, exactly as the delta kernel does, and
folds the words with xor (so the loads cannot be dropped); no activations, no MMA, no epilogue. ``DEPTH``
chunks' loads are issued before any is used (the bytes in flight per program, as a cp.async ring's depth).
If it stops near the same fraction, the limit is the access pattern and the bytes in flight, not the
arithmetic.

SYNTHETIC codes with the shapes of Mistral-7B experts at 2 bits.

    python benchmarks/read_floor.py --out read_floor.json
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.testing import do_bench

sys.path.insert(0, str(Path(__file__).resolve().parent))

from kernel_roofline import copy_bandwidth, graph_ms

SHAPES = {"q/o 4096x4096": (4096, 4096), "k/v 1024x4096": (1024, 4096), "gate/up 14336x4096": (14336, 4096),
          "down 4096x14336": (4096, 14336)}  # fmt: skip


@triton.jit
def _read_codes(w_ptr, out_ptr, N, n_chunks, chunks_per_split, BLOCK_N: tl.constexpr, DEPTH: tl.constexpr):
    """Program (n block, expert, K split): xor of its code words, chunk by chunk."""
    e = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_t = tl.arange(0, 16)
    tile = w_ptr + e * n_chunks * N * 16 + offs_n[:, None] * 16 + offs_t[None, :]
    acc = tl.zeros([BLOCK_N, 16], dtype=tl.int32)
    c0 = tl.program_id(2) * chunks_per_split
    c_end = tl.minimum(c0 + chunks_per_split, n_chunks)
    for c in range(c0, c_end, DEPTH):  # DEPTH chunks' loads issued before any is used: the bytes in flight
        for u in tl.static_range(DEPTH):
            acc ^= tl.load(tile + (c + u) * N * 16, mask=(offs_n < N)[:, None] & (c + u < c_end), other=0)
    flat = tl.program_id(0) + tl.num_programs(0) * (tl.program_id(1) + tl.num_programs(1) * tl.program_id(2))
    # (one value per program, so nothing is optimised away)
    tl.store(out_ptr + flat, tl.xor_sum(tl.xor_sum(acc, axis=1), axis=0))


def _launch(w, *, grid, out, n, chunks, split, block_n, warps, depth):
    _read_codes[grid](w, out, n, chunks, -(-chunks // split), BLOCK_N=block_n, DEPTH=depth, num_warps=warps)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experts", type=int, nargs="*", default=[1, 16])
    args = ap.parse_args(argv)
    copy_gbps = copy_bandwidth()
    rows = []
    for (name, (n, k)), experts in itertools.product(SHAPES.items(), args.experts):
        chunks = k // 256
        pool = max(experts, -(-2 * 2**30 // (chunks * n * 64)))  # rotate past the 60 MB L2: several expert sets
        codes = torch.randint(-(2**31), 2**31 - 1, (pool, chunks, n, 16), dtype=torch.int32, device="cuda")
        nbytes = experts * chunks * n * 64
        for block_n, warps, depth, split in itertools.product((128, 256), (4, 8), (2, 4, 8), (1, 4)):
            grid = (triton.cdiv(n, block_n), experts, split)
            out = torch.empty(grid[0] * grid[1] * grid[2], dtype=torch.int32, device="cuda")
            sets = [codes[i * experts : (i + 1) * experts] for i in range(pool // experts)]

            launch = functools.partial(_launch, grid=grid, out=out, n=n, chunks=chunks, split=split, block_n=block_n,
                                       warps=warps, depth=depth)  # fmt: skip
            ms = do_bench(functools.partial(launch, sets[0]), warmup=10, rep=50, return_mode="median")
            gms = graph_ms(launch, sets)
            row = {"shape": name, "experts": experts, "block_n": block_n, "num_warps": warps, "depth": depth,
                   "split_k": split, "bytes": nbytes, "graph_us": round(gms * 1e3, 2),
                   "fraction_of_copy_bandwidth": round(nbytes / gms / 1e6 / copy_gbps, 3),
                   "do_bench_fraction": round(nbytes / ms / 1e6 / copy_gbps, 3)}  # fmt: skip
            rows.append(row)
            print(name, experts, block_n, warps, depth, split, row["graph_us"], row["fraction_of_copy_bandwidth"],
                  flush=True)  # fmt: skip
        del codes
        torch.cuda.empty_cache()
        report = {"device": torch.cuda.get_device_name(), "copy_bandwidth_gbps": copy_gbps,
                  "note": "SYNTHETIC codes; loads only (the delta kernel's access pattern)",
                  "command": " ".join(["python", *sys.argv]), "rows": rows}  # fmt: skip
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
