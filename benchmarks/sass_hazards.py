"""Register operands of a wgmma written while it runs: a scan of sm_90 SASS, and the merged prefill kernel compiled
ahead of time to scan it.

``wgmma`` with A in registers reads them while it runs; writing one before the ``wgmma.wait_group`` that retires the
MMA is undefined (PTX ISA). Triton keeps the operand's 16-bit values alive to the wait, not the packed registers the
MMA reads, so ptxas may reuse those for the next operand (benchmarks/NOTES-kernels.md, seventh session). This scan
follows the SASS from each ``HGMMA`` (round its loop's back edge): its A registers (its second operand, four) must
not be the destination of an instruction before a ``WARPGROUP.DEPBAR.LE gsb0, n`` that leaves at most n groups issued
after its own. Needs Triton only to compile (``compile_register_a``):

    PYTHONPATH=/tmp/tri36 python benchmarks/sass_hazards.py   # Triton 3.6, the GPU machine's version
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

_WRITES_NOTHING = ("HGMMA", "ST", "BAR", "SYNCS", "BRA", "WARPGROUP", "EXIT", "RED", "ATOM", "NOP")


def _destinations(instruction: str) -> set[int]:
    """The registers ``instruction`` writes (its first operand; 4 for ldmatrix x4 and 128-bit loads)."""
    text = re.sub(r"^@!?U?P\w+\s+", "", instruction.strip())
    op, _, rest = text.partition(" ")
    m = re.match(r"\s*R(\d+)\b", rest)
    if not m or op.startswith(_WRITES_NOTHING):
        return set()
    width = 4 if ".128" in op or op.startswith("LDSM.16.M88.4") else 2 if ".64" in op else 1
    return set(range(int(m.group(1)), int(m.group(1)) + width))


def _loop_spans(instructions: list[str], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(first, last) index of every loop: a label and a branch back to it."""
    spans = []
    for i, ins in enumerate(instructions):
        m = re.search(r"BRA\s.*?\.(L_x_\d+)", ins)
        if m and labels.get(m.group(1), i + 1) <= i:
            spans.append((labels[m.group(1)], i))
    return spans


def operand_hazards(instructions: list[str], labels: dict[str, int]) -> list[tuple[int, int]]:
    """(HGMMA's index, the writing instruction's index) for each register operand written while its MMA may run.
    From an HGMMA inside a loop the scan goes to the loop's end and round its back edge; elsewhere to the end."""
    lines = [s.strip() for s in instructions]
    spans = _loop_spans(lines, labels)
    found = []
    for i, line in enumerate(lines):
        m = re.match(r"HGMMA\S*\s+R\d+,\s+R(\d+)", line)
        if not m:
            continue
        regs = set(range(int(m.group(1)), int(m.group(1)) + 4))
        inner = min((sp for sp in spans if sp[0] <= i <= sp[1]), key=lambda sp: sp[1] - sp[0], default=None)
        order = [*range(i + 1, inner[1] + 1), *range(inner[0], i)] if inner else range(i + 1, len(lines))
        closed, after = "gsb0" in line, 0  # whether this MMA's group has closed; groups closed after it
        for j in order:
            s = lines[j]
            if s.startswith("HGMMA") and "gsb0" in s:
                after, closed = (after + 1, closed) if closed else (after, True)
            wait = re.match(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x([0-9a-f]+)", s)
            if wait and closed and int(wait.group(1), 16) <= after:
                break
            if _destinations(s) & regs:
                found.append((i, j))
                break
    return found


def compile_register_a(bits: int, block_n: int, symmetric: bool) -> tuple[list[str], dict[str, int], int]:
    """The register-operand merged kernel (``gluon_merged._merged_rs_kernel``) compiled for sm_90 as a launch on
    Mistral-7B's gate/up shape would be (divisibility hints included): its SASS instructions and labels, and the
    registers its launch asks of the SM (warps, padded to warp groups, x 32 x the launch's register cap)."""
    import torch
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource
    from triton.runtime.jit import mangle_type

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from sass_loop import sass_lines

    from meswitch.kernels import gluon_merged as gm
    from meswitch.kernels.launch_config import MergedConfig

    cfg = MergedConfig(block_n=block_n, register_a=True, w_slots=8)
    x16 = torch.zeros(2048, 4096, dtype=torch.float16)
    descs = {"x_desc": (x16, cfg.block_m), "xs_desc": (torch.zeros(2048, 64, dtype=torch.float16), cfg.block_m),
             "w_desc": (torch.zeros(28672, 4096, dtype=torch.bfloat16), block_n)}  # fmt: skip
    pointers = {"y_ptr": "*bf16", "order_ptr": "*i32", "rs_ptr": "*fp32", "tiles_ptr": "*i32", "codes_ptr": "*i16",
                "scale_ptr": "*fp16", "offset_ptr": "*fp16", "sval_ptr": "*fp16"}  # fmt: skip
    consts = {"BITS": bits, "SYMMETRIC": symmetric, "BLOCK_M": cfg.block_m, "BLOCK_N": block_n, "XS": cfg.x_slots,
              "WS": cfg.w_slots, "num_warps": block_n // 16}  # fmt: skip
    names = gm._merged_rs_kernel.arg_names
    types = {**{a: mangle_type(gm._descriptor(*d)) for a, d in descs.items()}, **pointers}
    signature = {a: "constexpr" if a in consts else types.get(a, "i32") for a in names}
    aligned = {*pointers, "N", "K", "R", "stride_y", "stride_we", "stride_wc", "stride_se", "stride_ve", "stride_vn"}
    src = GluonASTSource(
        fn=gm._merged_rs_kernel, signature=signature, constexprs={(i,): consts[a] for i, a in enumerate(names)
                                                                  if a in consts},
        attrs={(i,): [["tt.divisibility", 16]] for i, a in enumerate(names) if a in aligned},
    )  # fmt: skip
    options = {"num_warps": block_n // 16, "maxnreg": cfg.launch_maxnreg}
    kernel = triton.compile(src, target=GPUTarget("cuda", 90, 128), options=options)
    return (*sass_lines(kernel.asm["cubin"]), kernel.metadata.num_warps * 32 * cfg.launch_maxnreg)


def main() -> None:
    for bits, block_n, symmetric in ((1, 128, False), (2, 128, False), (4, 128, True), (2, 64, False)):
        sass, labels, registers = compile_register_a(bits, block_n, symmetric)
        hgmma = sum(s.startswith("HGMMA") for s in sass)
        print(f"{bits}-bit, {block_n} channels, symmetric {symmetric}: {hgmma} HGMMA, "
              f"hazards {operand_hazards(sass, labels)}, {registers} registers a block (64K on sm_90)")  # fmt: skip


if __name__ == "__main__":
    main()
