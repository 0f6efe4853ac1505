"""The mixed-expert delta op in plain PyTorch: what every kernel is checked against.

For each row m of a batch with expert e(m) (or -1: base only)::

    y[m] += x[m] · Δ̂_e(m)ᵀ,   Δ̂_e = dequant(codes_e) + scatter(salient corrections_e)

computed in fp32 from the exact reconstruction (:meth:`DeltaBank.dequantize`) and rounded once
to y's dtype. Runs anywhere (CPU CI runs this path).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meswitch.kernels.bank import DeltaBank, ExpertRows
from meswitch.kernels.row_sums import e4m3_scale, to_e4m3


def as_expert_rows(experts: ExpertRows | torch.Tensor | Sequence[int]) -> ExpertRows:
    """Per-row expert ids (-1: base only) or an :class:`ExpertRows` -> :class:`ExpertRows`."""
    return experts if isinstance(experts, ExpertRows) else ExpertRows.from_ids(experts)


def check_inputs(x: torch.Tensor, bank: DeltaBank, rows: ExpertRows, y: torch.Tensor) -> None:
    """Shapes, dtypes and expert ids, with errors that say what is wrong."""
    n, k = bank.grid.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x must be [M, K={k}], got shape {tuple(x.shape)}")
    if y.dim() != 2 or tuple(y.shape) != (x.shape[0], n):
        raise ValueError(f"y must be [M={x.shape[0]}, N={n}], got shape {tuple(y.shape)}")
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"x must be bf16, fp16 or fp32, got {x.dtype}")
    if y.dtype != x.dtype:
        raise ValueError(f"y must have x's dtype {x.dtype}, got {y.dtype}")
    if rows.num_rows != x.shape[0]:
        raise ValueError(f"expert rows describe {rows.num_rows} rows, x has {x.shape[0]}")
    if rows.seg_experts and max(rows.seg_experts) >= bank.num_experts:
        raise ValueError(f"expert id {max(rows.seg_experts)} is out of range for a bank of {bank.num_experts}")


def mixed_delta_reference(
    x: torch.Tensor,
    bank: DeltaBank,
    experts: ExpertRows | torch.Tensor | Sequence[int],
    y: torch.Tensor,
) -> torch.Tensor:
    """Add each row's expert delta to ``y`` in place and return ``y``."""
    rows = as_expert_rows(experts)
    check_inputs(x, bank, rows, y)
    for e, idx in rows.segments():
        idx = idx.to(x.device).long()
        w = bank.dequantize(e).to(x.device)
        y[idx] = (y[idx].float() + x[idx].float() @ w.T).to(y.dtype)
    return y


# What a kernel's delta may differ from this reference by, relative to the delta: bf16 rounding (~4e-3 measured);
# FP8 planes, which round x itself (2.5-2.8% measured on random x; the tests, the benchmarks' checks and the KL
# benchmark's figures say how much it moves a model).
BF16_ERROR = 1e-2
FP8_PLANES_ERROR = 0.06


def error_bound(fp8_planes: bool) -> float:
    """The bound a check of a launch against this reference holds it to (:data:`BF16_ERROR`,
    :data:`FP8_PLANES_ERROR`)."""
    return FP8_PLANES_ERROR if fp8_planes else BF16_ERROR


def e4m3_rows(x: torch.Tensor) -> torch.Tensor:
    """x as ``LaunchConfig.fp8_planes`` meets it: each row (last dimension) scaled by ``r = max|x| / 448``, rounded
    to e4m3, scaled back, in float32 (float64 stays float64). The FP8 planes' reference is the op above on this x
    (the salient columns keep x itself)."""
    xf = x if x.dtype == torch.float64 else x.float()
    r = e4m3_scale(xf)
    return to_e4m3(xf, r).to(xf.dtype) * r
