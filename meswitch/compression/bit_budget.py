"""Bit widths per matrix under one budget of bytes for the whole expert (mixed precision by sensitivity).

With one width for every matrix, a matrix whose error costs little gets as many bits as the one whose error
costs most. As Delta-CoMe does, a budget gives each matrix a width near the average: every matrix starts at
the budget's floor width, then, while bytes are left, the upgrade (a matrix to a wider grid) that removes
the most activation-weighted error per extra byte is taken. The error of a matrix at a width is its
reconstruction scores (salience.reconstruction_scores: ``s_i Σ_j (Δ-Δ̂)_ij²``, the calibration inputs' output
error) summed over the channels it does not keep in fp16, so the plan and the salient selection read the
same statistics. Pure functions of numbers: compression/expert.py measures, this module decides.
"""

from __future__ import annotations

import math

import torch

from meswitch.compression.config import BUDGET_BITS


def floor_width(budget: float) -> int:
    """The widest width at most ``budget``: every matrix's width unless the budget buys it one more bit."""
    low = max((b for b in BUDGET_BITS if b <= budget), default=None)
    if low is None:
        raise ValueError(f"bit budget {budget} is below the smallest width, {BUDGET_BITS[0]} bit per parameter")
    return low


def candidate_widths(budget: float) -> tuple[int, ...]:
    """The widths a matrix may get under ``budget`` bits per parameter: its floor and one more (1.1 -> {1, 2},
    2.3 -> {2, 3}). Never one less: on SmolLM2's chinese expert, letting matrices drop to 1 bit at 2.3 (to pay
    for 3 bits elsewhere) raised KL 2.6x above uniform 2 bits, and a floor + 2 option changed nothing."""
    low = floor_width(budget)
    return tuple(b for b in BUDGET_BITS if low <= b <= low + 1)


def residual_error(scores: torch.Tensor, salient: int) -> float:
    """A matrix's weighted error once its ``salient`` channels of largest score are stored exactly."""
    kept = torch.topk(scores.float(), salient).values.sum() if salient else 0.0
    return float(scores.float().sum() - kept)


def allocate_bits(errors: dict[str, dict[int, float]], costs: dict[str, dict[int, int]], budget: int) -> dict[str, int]:
    """Per matrix, a width of its ``errors``' keys whose ``costs`` (bytes) sum to at most ``budget`` bytes.

    Greedy by error removed per extra byte over every (matrix, wider width) pair, each step re-measured from
    the matrix's current width (so 1 -> 3 competes with 1 -> 2); ties go to the earlier matrix and the
    narrower width, so the plan is deterministic. Raises ValueError when the narrowest widths do not fit.
    """
    widths = {m: min(e) for m, e in errors.items()}
    left = budget - sum(costs[m][b] for m, b in widths.items())
    if left < 0:
        raise ValueError(f"the narrowest widths need {-left} bytes more than the budget's {budget}")
    while True:
        best: tuple[float, str, int] | None = None
        for m, e in errors.items():
            b0 = widths[m]
            for b in sorted(e):
                extra = costs[m][b] - costs[m][b0]
                gain = e[b0] - e[b]
                if b <= b0 or extra > left or gain <= 0:
                    continue
                ratio = gain / max(extra, 1)
                if best is None or ratio > best[0]:
                    best = (ratio, m, b)
        if best is None:
            return widths
        _, m, b = best
        left -= costs[m][b] - costs[m][widths[m]]
        widths[m] = b


def budget_bytes(budget: float, num_params: int) -> int:
    """The bytes ``budget`` bits per parameter allow ``num_params`` parameters (the manifest's bits_per_param)."""
    return math.floor(budget * num_params / 8)
