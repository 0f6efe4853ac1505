"""``mixed_delta``: the Triton kernel on CUDA, the PyTorch reference everywhere else."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from meswitch.kernels.bank import BankGrid, DeltaBank, ExpertRows
from meswitch.kernels.reference import as_expert_rows, check_inputs, mixed_delta_reference

BACKENDS = ("auto", "triton", "reference")


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def mixed_delta(
    x: torch.Tensor,
    bank: DeltaBank,
    experts: ExpertRows | torch.Tensor | Sequence[int],
    y: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Add each row's expert delta to the base output ``y`` in place; return ``y``.

    ``x`` [M, K] bf16/fp16, ``y`` [M, N] of x's dtype (a grouped bank's N: every projection's outputs,
    concatenated), ``experts`` a per-row expert index
    (-1: base only) or an :class:`ExpertRows` built once per batch (cheaper: ids are read on the
    host once). ``backend="auto"`` runs the Triton kernel for bf16/fp16 CUDA tensors and the
    reference otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    rows = as_expert_rows(experts)
    check_inputs(x, bank, rows, y)
    if backend == "auto":
        fast = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_available()
        backend = "triton" if fast else "reference"
    if backend == "triton":
        from meswitch.kernels.triton_delta import mixed_delta_triton

        return mixed_delta_triton(x, bank, rows, y)
    return mixed_delta_reference(x, bank, rows, y)


def merged_product(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bank: DeltaBank, rows: ExpertRows
) -> torch.Tensor | None:
    """``x · (W + Δ̂)ᵀ + b`` as one launch (:mod:`meswitch.kernels.gluon_merged`) where
    :func:`~meswitch.kernels.launch_config.merges_prefill` holds (a prefill's long segments on an sm_90 GPU), a new
    tensor; None elsewhere, for the caller to run the base GEMM and :func:`mixed_delta`."""
    from meswitch.kernels.launch_config import merged_config, merges_prefill

    if not (merges_prefill(bank, rows, x, weight) and triton_available()):
        return None
    from meswitch.kernels.gluon_merged import merged_linear_gluon

    y = torch.empty((x.shape[0], bank.grid.shape[0]), dtype=x.dtype, device=x.device)
    check_inputs(x, bank, rows, y)
    merged_linear_gluon(x, weight, bank, rows, y, merged_config(bank))
    return y if bias is None else y.add_(bias)


def merged_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, bank: DeltaBank, rows: ExpertRows
) -> torch.Tensor:
    """``x[m] · (W + Δ̂_{e(m)})ᵀ + b`` for each row m of ``x`` [M, K] (expert -1: the base alone), a new tensor:
    one product where :func:`merged_product` runs (the base GEMM plus :func:`mixed_delta` run the FLOPs twice),
    elsewhere those two, which it equals to fp16 rounding."""
    y = merged_product(x, weight, bias, bank, rows)
    return mixed_delta(x, bank, rows, torch.nn.functional.linear(x, weight, bias)) if y is None else y


# ---- the device-tile op: what CUDA graphs and torch.compile hold -------------------------------


@torch.library.custom_op("meswitch::mixed_delta_tiles", mutates_args=("y",))
def _mixed_delta_tiles(
    x: torch.Tensor,
    y: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    salient_idx: torch.Tensor,
    salient_val: torch.Tensor,
    tiles: torch.Tensor,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    layout_version: int,
    symmetric: bool,
    splits: list[int],
    block_m: int,
    expected_tiles: int,
    sums: torch.Tensor | None = None,
    x8: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> None:
    grid = BankGrid((n, k), bits, group_size, symmetric, layout_version)
    bank = DeltaBank(grid, packed, scale, offset, salient_idx, salient_val, tuple(splits))
    if x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_available():
        from meswitch.kernels.launch_config import check_device_inputs, config_for
        from meswitch.kernels.triton_delta import launch

        check_device_inputs(x, bank, y)
        launch(x, bank, tiles, y, config_for(bank, block_m, expected_tiles, x.device, sums is not None), sums, x8, r)
        return
    mixed_delta_reference(x, bank, tile_rows(tiles), y)


@_mixed_delta_tiles.register_fake
def _(x, y, packed, scale, offset, salient_idx, salient_val, tiles, n, k, bits, group_size, layout_version,
      symmetric, splits, block_m, expected_tiles, sums=None, x8=None, r=None) -> None:  # fmt: skip
    return None


def tile_rows(tiles: torch.Tensor) -> ExpertRows:
    """The :class:`ExpertRows` a tile table describes (read on the host: the reference path)."""
    host = tiles.cpu()
    ids = torch.full((host.shape[0],), -1, dtype=torch.int64)
    for e, count, *rows in host.tolist():
        ids[rows[:count]] = e
    return ExpertRows.from_ids(ids)


def launch_tiles(m: int, bank: DeltaBank, expected_tiles: int | None = None) -> int:
    """Row tiles a launch over ``m`` rows is sized for: ``expected_tiles``, else one per row, at most one per
    expert."""
    return expected_tiles or min(m, bank.num_experts)


def mixed_delta_tiles(
    x: torch.Tensor,
    bank: DeltaBank,
    tiles: torch.Tensor,
    y: torch.Tensor,
    *,
    expected_tiles: int | None = None,
    sums: torch.Tensor | None = None,
    x8: torch.Tensor | None = None,
    r: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mixed_delta`` over a device-built tile table (:func:`~meswitch.kernels.bank.device_tiles`).

    The registered op ``torch.ops.meswitch.mixed_delta_tiles``: nothing is read on the host, so a
    CUDA graph or ``torch.compile`` can hold it and replay any mix of the bank's experts. A grouped bank
    (:meth:`~meswitch.kernels.bank.DeltaBank.concat`) adds every projection's delta to ``y`` (their outputs,
    concatenated) in one launch. ``expected_tiles`` (default: :func:`launch_tiles`) sizes the launch heuristics.
    ``sums``: x's row sums as :func:`~meswitch.kernels.launch_config.sums_plan` plans them for this launch, from
    the kernel that made x (the Triton kernel then neither accumulates them nor launches a kernel for them; the
    reference ignores them); with FP8 planes also x in e4m3 and its row scales, ``x8`` and ``r``
    (:func:`~meswitch.kernels.row_sums.e4m3_inputs`).
    """
    m = x.shape[0]
    if tiles.dim() != 2 or tiles.shape[0] != m:
        raise ValueError(f"tiles must be [M={m}, 2 + block_m], got {tuple(tiles.shape)}")
    grid = bank.grid
    n, k = grid.shape
    if x.dim() != 2 or x.shape[1] != k or tuple(y.shape) != (m, n):
        raise ValueError(f"x must be [M, {k}] and y [M, {n}], got {tuple(x.shape)} and {tuple(y.shape)}")
    torch.ops.meswitch.mixed_delta_tiles(
        x, y, bank.packed, bank.scale, bank.offset, bank.salient_idx, bank.salient_val, tiles,
        n, k, grid.bits, grid.group_size, grid.layout_version, grid.symmetric, list(bank.splits),
        tiles.shape[1] - 2, launch_tiles(m, bank, expected_tiles), sums, x8, r,
    )  # fmt: skip
    return y
