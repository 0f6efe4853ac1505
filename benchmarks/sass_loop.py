"""The decode delta kernel's main loop as ptxas compiles it for sm_90, without a GPU: instructions a chunk,
registers, spills and shared memory, per launch configuration.

Compiles ``_delta_v2_kernel`` ahead of time for Hopper (Triton's own ptxas and nvdisasm, with the divisibility
hints a real launch gets), finds the loop over K chunks in the SASS (the innermost backward branch holding the
wgmma instructions) and counts it. Registers bound how many programs share an SM (65,536 / (threads x
registers)), which Nsight Compute named as the decode kernel's limit with instruction issue. Needs Triton
importable, e.g. the GPU machine's version beside this checkout's venv:

    pip install --target /tmp/tri36 triton==3.6.0
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_loop.py --out benchmarks/results/sass-loop-DATE.json
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from meswitch.kernels.launch_config import LaunchConfig
from meswitch.kernels.triton_delta import SALIENT_BLOCK, _delta_v2_kernel

POINTERS = {"x_ptr": "*bf16", "y_ptr": "*bf16", "w_ptr": "*i16", "scale_ptr": "*fp16", "offset_ptr": "*fp16",
            "sidx_ptr": "*i32", "sval_ptr": "*fp16", "tiles_ptr": "*i32", "sums_ptr": "*fp32", "x8_ptr": "*fp8e4nv",
            "r_ptr": "*fp32"}  # fmt: skip
ALIGNED = {"N", "K", "stride_xm", "stride_ym", "stride_x8m", "stride_we", "stride_wc", "B1", "B2"}  # multiples of 16
REGISTERS_PER_SM = 65536
PREFILL = {"block_n": 256, "block_m": 128, "num_warps": 8}
# (label, LaunchConfig fields, K splits): the decode cases of NOTES-kernels.md, then prefill tiles
CASES = [
    ("sums in the loop", {}, 2),
    ("sums in the loop, capped at 128", {"maxnreg": 128}, 2),
    ("sums given, K split in 2", {"x_sums": True}, 2),
    ("sums given, K unsplit", {"x_sums": True}, 1),
    ("sums given, K unsplit, capped at 128", {"x_sums": True, "maxnreg": 128}, 1),
    ("sums given, capped at 96", {"x_sums": True, "maxnreg": 96}, 2),
    ("sums given, 32-row tiles", {"x_sums": True, "block_m": 32}, 2),
    ("sums given, 32-row tiles, capped at 128", {"x_sums": True, "block_m": 32, "maxnreg": 128}, 2),
    ("sums given, two planes a dot", {"x_sums": True, "paired_planes": True}, 2),
    ("sums given, two planes a dot, capped at 128", {"x_sums": True, "paired_planes": True, "maxnreg": 128}, 2),
    ("sums given, 8-row tiles", {"x_sums": True, "block_m": 8}, 2),
    ("FP8 planes (e4m3), K split in 2", {"fp8_planes": True}, 2),
    ("FP8 planes (e4m3), K unsplit", {"fp8_planes": True}, 1),
    ("FP8 planes (e4m3), capped at 128", {"fp8_planes": True, "maxnreg": 128}, 2),
    ("FP8 planes (e4m3), capped at 96", {"fp8_planes": True, "maxnreg": 96}, 2),
    ("FP8 planes (e4m3), 32-row tiles", {"fp8_planes": True, "block_m": 32}, 2),
    # prefill tiles as config_for makes them (256 channels x 128 rows, 8 warps)
    ("prefill, steps in registers (the default)", {**PREFILL, "epilogue_scale": False}, 1),
    ("prefill, steps in the epilogue, sums given", {**PREFILL, "x_sums": True}, 1),
    ("prefill, FP8 planes (e4m3)", {**PREFILL, "fp8_planes": True}, 1),
]


def compile_loop(cfg: LaunchConfig, splits: int, bits: int = 2):
    """The compiled kernel for ``cfg`` (per-channel steps in the epilogue, bf16 activations, K a whole number of
    chunks)."""
    consts = dict(BITS=bits, GROUP=0, SYMMETRIC=False, EPILOGUE_SCALE=cfg.epilogue_scale, EVEN_K=True, SPLIT_K=splits,
                  BLOCK_N=cfg.block_n, BLOCK_M=cfg.block_m, SAL_BLOCK=SALIENT_BLOCK, PREFETCH_Y=cfg.prefetch_y,
                  X_SUMS=cfg.x_sums or cfg.fp8_planes, PAIRED=cfg.x_sums and cfg.paired_planes,
                  FP8=cfg.fp8_planes)  # fmt: skip
    names = _delta_v2_kernel.arg_names
    pointers = {**POINTERS, "w_ptr": "*i8"} if cfg.fp8_planes else POINTERS
    signature = {n: "constexpr" if n in consts else pointers.get(n, "i32") for n in names}
    constexprs = {(i,): consts[n] for i, n in enumerate(names) if n in consts}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS or n in ALIGNED}
    options = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        options["maxnreg"] = cfg.maxnreg
    src = ASTSource(fn=_delta_v2_kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)


def registers(cubin: bytes) -> int:
    """EIATTR_REGCOUNT of the cubin's one kernel (its ``.nv.info`` section; a minimal ELF64 reader)."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    size, count, names_at = struct.unpack_from("<HHH", cubin, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", cubin, shoff + i * size) for i in range(count)]
    strtab = sections[names_at][4]
    for name, _, _, _, offset, length in sections:
        if cubin[strtab + name : cubin.index(b"\0", strtab + name)] != b".nv.info":
            continue
        at = offset
        while at < offset + length:
            fmt, attr = cubin[at], cubin[at + 1]
            if fmt == 4:  # a sized value: (symbol, value) for the register count
                n = struct.unpack_from("<H", cubin, at + 2)[0]
                if attr == 0x2F:
                    return struct.unpack_from("<II", cubin, at + 4)[1]
                at += 4 + n
            else:
                at += 4 if fmt == 3 else 2
    raise ValueError("no register count in the cubin")


def sass_lines(cubin: bytes) -> tuple[list[str], dict[str, int]]:
    """(instructions in order, label -> index) from nvdisasm."""
    nvdisasm = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "nvdisasm"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([str(nvdisasm), "-c", f.name], capture_output=True, text=True, check=True).stdout
    instructions, labels = [], {}
    for line in text.splitlines():
        if m := re.match(r"^\s*\.(L_x_\d+):", line):
            labels[m.group(1)] = len(instructions)
        elif m := re.match(r"^\s*/\*[0-9a-f]{4,}\*/\s+(.*?);", line):
            instructions.append(m.group(1))
    return instructions, labels


def opcode(instruction: str) -> str:
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def backward_loops(instructions: list[str], labels: dict[str, int]) -> list[list[str]]:
    """Every loop's body: the instructions from a label to a branch back to it."""
    loops = []
    for i, ins in enumerate(instructions):
        m = re.search(r"BRA\s.*?\.(L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            loops.append(instructions[labels[m.group(1)] : i + 1])
    return loops


def innermost(loops: list[list[str]], holds) -> list[str]:
    """The shortest loop with an instruction for which ``holds`` is true."""
    return min((body for body in loops if any(holds(i) for i in body)), key=len)


def main_loop(instructions: list[str], labels: dict[str, int]) -> list[str]:
    """The loop over K chunks: the innermost holding the codes' 16-bit or FP8 MMAs (the salient columns' loop has
    tf32 ones)."""
    is_codes_mma = lambda i: (
        (opcode(i) in ("HGMMA", "HMMA") and bool(re.search(r"\.B?F16\b", i))) or (opcode(i) == "QGMMA")
    )
    return innermost(backward_loops(instructions, labels), is_codes_mma)


def measure(label: str, fields: dict, splits: int) -> dict:
    cfg = LaunchConfig(**{"num_stages": 3, **fields})
    kernel = compile_loop(cfg, splits)
    cubin = kernel.asm["cubin"]
    regs = registers(cubin)
    instructions, labels = sass_lines(cubin)
    loop = main_loop(instructions, labels)
    spills = [i for i in instructions if opcode(i) in ("LDL", "STL")]
    # registers are allocated 8 a thread at a time; each program also reserves 1 KiB of the SM's 228 KiB
    per_sm = min(
        REGISTERS_PER_SM // (32 * cfg.num_warps * -(-regs // 8) * 8), 228 * 1024 // (kernel.metadata.shared + 1024)
    )
    return {"case": label, "config": fields, "k_splits": splits, "loop_instructions": len(loop),
            "loop_opcodes": dict(collections.Counter(opcode(i) for i in loop).most_common(8)),
            "registers": regs, "spills_in_loop": sum(opcode(i) in ("LDL", "STL") for i in loop),
            "spills": len(spills), "shared_bytes": kernel.metadata.shared, "programs_per_sm": per_sm}  # fmt: skip


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, help="JSON of every case")
    args = ap.parse_args(argv)
    rows = []
    for label, fields, splits in CASES:
        row = measure(label, fields, splits)
        rows.append(row)
        print(f"{label:45s} loop {row['loop_instructions']:4d} instructions, {row['registers']:3d} registers "
              f"({row['programs_per_sm']} programs an SM), spills {row['spills_in_loop']} in the loop / "
              f"{row['spills']}, shared {row['shared_bytes'] // 1024} KiB", flush=True)  # fmt: skip
    if args.out:
        report = {"date": dt.date.today().isoformat(), "device": "none (ahead-of-time compile for sm_90)",
                  "versions": {"triton": triton.__version__}, "command": " ".join(["python", *sys.argv]),
                  "kernel": "_delta_v2_kernel: decode 128 output channels x 16 rows a program, 4 warps, prefill 256 x "
                            "128, 8 warps; 3 stages, 2-bit codes, bf16 activations", "rows": rows}  # fmt: skip
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
