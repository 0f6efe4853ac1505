"""Launch parameters of the delta kernels and the checks before a launch: plain Python, no Triton.

The heuristics come from sweeps (benchmarks/kernel_sweep.py, benchmarks/NOTES-kernels.md); keeping them apart
from the kernels lets the decoder and the op size a launch where Triton cannot be imported.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, replace

import torch

from meswitch.kernels.bank import DeltaBank, ExpertRows
from meswitch.kernels.layout import E4M3_BITS, LAYOUT_V2, v2_chunk
from meswitch.kernels.row_sums import SumsPlan


@dataclass(frozen=True)
class LaunchConfig:
    """Launch parameters; :func:`choose_config` picks them, benchmarks may pass their own."""

    block_n: int = 128
    block_m: int = 16
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 4
    epilogue_scale: bool = True
    prefetch_y: bool = False
    # epilogue scaling: x's row sums from one small kernel a launch, not accumulated in every N block's loop
    x_sums: bool = False
    # registers a thread may hold (ptxas spills past them). ptxas gives the decode loop 128-143 (172 with
    # 32-row tiles), which holds an SM to 3 or 4 programs of 4 warps; at 128 4 fit, at 96 5, with no spill inside
    # the loop (Triton 3.6, sm_90, compiled here: NOTES-kernels.md); None: ptxas's choice
    maxnreg: int | None = None
    # with x_sums: two planes a dot (K = 64): the loop 367 -> 328 instructions a chunk, in 138 registers
    paired_planes: bool = False
    # 1- and 2-bit codes, epilogue scaling, 16 rows a tile or more: the planes on FP8 tensor cores, four codes a
    # register (ptx_planes.plane_e4m3) against x rounded to e4m3 per row (an error on the delta's product only; the
    # salient columns take x): half the MMAs and unpacking of the bf16 planes, x in e4m3 from a kernel of its own.
    # Opt-in until measured (MESWITCH_DELTA_CONFIG='{"fp8_planes": true}': decode and prefill, where it fits)
    fp8_planes: bool = False


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def fp8_fits(bank: DeltaBank, cfg: LaunchConfig) -> bool:
    """Whether a launch can take ``cfg.fp8_planes``: e4m3's 3 mantissa bits hold 1- and 2-bit codes; the epilogue
    applies per-channel steps; 16 rows a tile or more (Triton issues 8-row tiles' FP8 dots as converts to fp16)."""
    g = bank.grid
    return (g.layout_version == LAYOUT_V2 and g.bits in E4M3_BITS and g.group_size == 0 and cfg.epilogue_scale
            and cfg.block_m >= 16)  # fmt: skip


ROW_BLOCKS = (8, 16, 64)  # the rows a tile the decode step's launches pick from (DecoderConfig.block_m=None)
WIDE_FROM = 33  # most rows on one expert from which the step takes its widest tiles


def row_block(rows: int) -> int:
    """Rows a delta tile in the decode step for a batch whose most rows on one expert are ``rows``: 8 up to 8,
    16 up to 32, else 64. Many experts with few rows each: 8 halves the padding; up to 32, more tiles (more
    programs, each one's MMA chain shorter) match or beat larger ones; beyond, one tile streams and unpacks an
    expert's codes once for all its rows (one expert at batch 64 on the H200: 10.23 -> 9.35 ms a step;
    NOTES-kernels.md)."""
    narrow, mid, wide = ROW_BLOCKS
    return narrow if rows <= narrow else mid if rows < WIDE_FROM else wide


def row_blocks(bucket: int) -> tuple[int, ...]:
    """The row blocks a batch of up to ``bucket`` rows can pick (:func:`row_block`): the graphs to capture."""
    return tuple(sorted({row_block(r) for r in range(1, bucket + 1)}))


def segment_block(max_segment: int) -> int:
    """Rows a delta tile on the library path (:func:`choose_config`): one tile for the longest segment, 16 to 128
    (the decode step tiles by :func:`row_block` instead)."""
    for bm in (16, 32, 64):
        if max_segment <= bm:
            return bm
    return 128


def choose_config(bank: DeltaBank, rows: ExpertRows, device: torch.device) -> LaunchConfig:
    """:func:`config_for` the batch's longest segment and tile count; cached per batch and bank shape."""
    key = ("config", bank.grid, bank.splits, str(device))
    cached = rows._tiles.get(key)
    if cached is None:
        block_m = segment_block(rows.max_segment)
        tiles = sum(-(-(b - a) // block_m) for a, b in itertools.pairwise(rows.seg_starts))
        cached = rows._tiles[key] = config_for(bank, block_m, tiles, device)
    return cached


def config_for(
    bank: DeltaBank, block_m: int, tiles: int, device: torch.device, sums_given: bool = False
) -> LaunchConfig:
    """Launch parameters from the sweeps on an H100 (benchmarks/kernel_sweep.py, NOTES-kernels.md).

    Row block: the longest segment, 16 to 128. Decode (<= 64 rows per expert): 128 output channels
    per program, 4 warps, 3 stages; steps in the epilogue up to 32 rows (per-channel grids), in
    registers beyond. Prefill: 256 x 128 tiles and 8 warps, 128 x 128 when that leaves SMs idle.
    K is split 2-4 ways when the grid is under about one program per SM: each program's serial
    chain of per-plane MMAs, not bandwidth, bounds small grids; never under
    ``torch.use_deterministic_algorithms`` (split programs add into y with atomics). A grouped bank's N block is
    the widest that divides every projection boundary (:func:`block_within`). Epilogue scaling takes x's row sums
    from outside the loop (``LaunchConfig.x_sums``) where the caller gives them (``sums_given``: the kernel that
    made x computed them, :mod:`.row_sums`), and on the MLP's shapes (N·K of 48 Mi or more) with 8 or more row
    tiles, from a kernel of their own if not given; those shapes split K at least in two: there the shorter loop
    pays for the extra launch (``MESWITCH_X_SUMS=0``: no kernel of their own).
    """
    n, k = bank.grid.shape
    chunks = -(-k // v2_chunk(bank.grid.bits)) if bank.grid.layout_version == LAYOUT_V2 else 0
    sms = _sm_count(device)
    if bank.grid.layout_version != LAYOUT_V2:
        return LaunchConfig(block_n=block_within(64, bank), block_m=block_m, num_stages=2, epilogue_scale=False)
    if block_m > 64:
        block_n = block_within(256 if -(-n // 256) * tiles >= sms else 128, bank)
        programs = -(-n // block_n) * max(tiles, 1)
        split = max(1, min(4, -(-3 * sms // (2 * programs)), chunks // 4)) if programs < sms else 1
        split = 1 if torch.are_deterministic_algorithms_enabled() else split
        return _overridden(bank, LaunchConfig(block_n=block_n, block_m=block_m, split_k=split, num_warps=8,
                                              num_stages=3, epilogue_scale=False))  # fmt: skip
    block_n = block_within(128, bank)
    programs = -(-n // block_n) * max(tiles, 1)
    split = 4 if programs * 2 <= sms else 2 if programs <= 1.25 * sms else 1
    split = max(1, min(split, chunks // 4))
    epilogue = block_m <= 32 and bank.grid.group_size == 0
    # the MLP's shapes with 8 or more row tiles: x's row sums outside the loop and K split in two (with the sums
    # from their own kernel 8 and 16 experts 0.6-1.5 ms a step faster on the H200, 4 experts 0.3-0.5 ms slower:
    # NOTES-kernels.md)
    mlp = epilogue and n * k >= 48 * 2**20 and tiles >= 8 and os.environ.get("MESWITCH_X_SUMS", "1") == "1"
    split = max(split, 2) if mlp else split
    if torch.are_deterministic_algorithms_enabled():
        split = 1  # split K adds partial sums into y with atomics, in no fixed order
    x_sums = epilogue and (sums_given or (mlp and split > 1))
    # 16-row tiles with the sums outside the loop: two planes a dot in at most 128 registers (4 programs an SM where
    # ptxas gives 138: 3); in the step on the H200, 16 experts at batch 32 18.2 -> 17.7 ms, 8 and 16 at batch 64
    # 13.15 -> 12.75 and 19.30 -> 18.55 ms (NOTES-kernels.md); 32-row tiles lose with it
    paired = x_sums and block_m == 16
    cfg = LaunchConfig(block_n=block_n, block_m=block_m, split_k=split, num_warps=4, num_stages=3,
                       epilogue_scale=epilogue, x_sums=x_sums, paired_planes=paired,
                       maxnreg=128 if paired else None)  # fmt: skip
    return _overridden(bank, cfg)


def _overridden(bank: DeltaBank, cfg: LaunchConfig) -> LaunchConfig:
    """``MESWITCH_DELTA_CONFIG``: launch fields as JSON over every config :func:`config_for` makes, decode and
    prefill (an A/B in the step); FP8 planes only where they fit, with the epilogue scaling they need."""
    overrides = os.environ.get("MESWITCH_DELTA_CONFIG")
    cfg = replace(cfg, **_launch_fields(overrides)) if overrides else cfg
    if cfg.fp8_planes:
        fp8 = replace(cfg, epilogue_scale=True)  # x's sums come with x8, so any tile height scales there
        cfg = fp8 if fp8_fits(bank, fp8) else replace(cfg, fp8_planes=False)
    return cfg


def _launch_fields(text: str, cls: type = LaunchConfig, variable: str = "MESWITCH_DELTA_CONFIG") -> dict:
    """``variable`` (JSON) read as fields of ``cls``; anything else is one error naming the variable, here rather
    than as a TypeError inside a served step."""
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{variable} is not JSON ({e}): {text!r}") from None
    known = cls.__dataclass_fields__
    if not isinstance(fields, dict) or set(fields) - set(known):
        raise ValueError(f"{variable} must be a JSON object of launch fields ({', '.join(known)}): {text!r}")
    return fields


def k_splits(chunks: int, split_k: int) -> tuple[int, int]:
    """(splits, chunks per split) of a launch asking ``split_k``: no split without a chunk of its own."""
    per_split = -(-chunks // split_k)
    return -(-chunks // per_split), per_split


def sums_plan(bank: DeltaBank, block_m: int, tiles: int, device: torch.device, dtype: torch.dtype) -> SumsPlan | None:
    """The row sums a launch (:func:`config_for` with ``sums_given``) takes from the kernel that makes its x, and
    with FP8 planes x in e4m3 too (``SumsPlan.fp8``); None where it takes none (prefill tiles scale in registers)."""
    cfg = config_for(bank, block_m, tiles, device, sums_given=True)
    if not (cfg.x_sums or cfg.fp8_planes):
        return None
    splits, per_split = k_splits(bank.packed.shape[1], cfg.split_k)
    bits = bank.grid.bits
    return SumsPlan(bank.grid.shape[1], per_split * v2_chunk(bits), splits, bits, dtype == torch.bfloat16,
                    cfg.fp8_planes)  # fmt: skip


def block_within(want: int, bank: DeltaBank) -> int:
    """``want`` output channels a program, or for a grouped bank the most, down to 16 (the MMA's least), whose
    blocks never straddle two projections; ``want`` where none is (the launch then goes projection by projection)."""
    inner = bank.bounds[1:-1]
    block = want
    while block >= 16:
        if all(b % block == 0 for b in inner):
            return block
        block //= 2
    return want


@dataclass(frozen=True)
class MergedConfig:
    """Launch of the merged prefill product (:mod:`meswitch.kernels.gluon_merged`): rows and channels a program,
    slots of its rings of x, W and merged planes, the transform warp groups' registers and the kernel's cap (13 warps
    share 64K registers; the MMA warp groups get the rest). The defaults: the best of three on Mistral-7B's four
    shapes on the H100 (benchmarks/prefill_ws_merged.py, NOTES-kernels.md)."""

    block_m: int = 256
    block_n: int = 128
    # planes (32 positions of K each) the MMA warp groups take a wait: 2 measured 5-10% slower on every shape (the
    # transform warp groups spill at 64 registers; benchmarks/NOTES-kernels.md)
    planes_per_step: int = 1
    x_slots: int = 6
    w_slots: int = 6
    merged_slots: int = 4
    transform_regs: int = 64
    # the launch's registers a thread: the kernel's 13 warps run as 16 (whole warp groups) and must fit 64K; the MMA
    # warp groups then take the rest by setmaxnreg
    maxnreg: int = 96


MERGE_FROM = 256  # rows of every expert from which a prefill linear runs as one merged product (merges_prefill)


def merges_prefill(bank: DeltaBank, rows: ExpertRows, x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether ``F.linear`` plus the delta run as one product ``x · (W + Δ̂)ᵀ`` (:func:`~meswitch.kernels.ops.
    merged_linear`): on an sm_90 GPU, bf16 x and W, K a multiple of 8 (TMA's 16-byte rows), layout-2 codes with
    per-channel steps, every row on an expert and each expert's rows at least :data:`MERGE_FROM` (a prefill: there
    both products are bound by FLOPs, and one is saved; with fewer rows a tile, W's transform is paid for few).
    ``MESWITCH_MERGED_PREFILL=0`` turns it off: W + Δ̂ enters the MMA rounded to fp16, which the products apart do
    not do (README: what it costs in KL)."""
    if os.environ.get("MESWITCH_MERGED_PREFILL", "1") == "0" or not x.is_cuda:
        return False
    if torch.cuda.get_device_capability(x.device) != (9, 0):
        return False
    grid, k = bank.grid, bank.grid.shape[1]
    shortest = min((b - a for a, b in itertools.pairwise(rows.seg_starts)), default=0)
    return (
        x.dtype == weight.dtype == torch.bfloat16
        and weight.is_contiguous()
        and x.stride(-1) == 1
        and k % 8 == 0
        and grid.layout_version == LAYOUT_V2
        and grid.group_size == 0
        and grid.bits in (1, 2, 4)
        and len(rows.order) == rows.num_rows
        and shortest >= MERGE_FROM
    )


def merged_config(bank: DeltaBank) -> MergedConfig:
    """:class:`MergedConfig` with N blocks that never straddle a grouped bank's projections; ``MESWITCH_MERGED_CONFIG``
    (its fields as JSON) over it, for an A/B of a whole prefill."""
    overrides = os.environ.get("MESWITCH_MERGED_CONFIG")
    fields = _launch_fields(overrides, MergedConfig, "MESWITCH_MERGED_CONFIG") if overrides else {}
    return MergedConfig(**{"block_n": block_within(128, bank), **fields})


def check_device_inputs(x: torch.Tensor, bank: DeltaBank, y: torch.Tensor) -> None:
    if not x.is_cuda:
        raise ValueError("the Triton delta kernel needs CUDA tensors; use the reference on the CPU")
    if y.device != x.device or bank.device != x.device:
        raise ValueError(f"x ({x.device}), y ({y.device}) and the bank ({bank.device}) must be on one device")
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the Triton delta kernel takes bf16 or fp16 activations, got {x.dtype}")
    if x.stride(1) != 1 or y.stride(1) != 1:
        raise ValueError("x and y must be contiguous along their last dimension")
    codes = bank.packed[:, 0] if bank.packed.dim() == 4 else bank.packed  # layout 2: the chunk stride may widen too
    whole = all(t[0].is_contiguous() for t in (codes, bank.scale, bank.salient_idx, bank.salient_val))
    if not whole or (bank.offset is not None and bank.offset.stride() != bank.scale.stride()):
        raise ValueError("a bank's tensors may be views along experts and output channels only")
