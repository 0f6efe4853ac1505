"""Error-compensating rounding of a delta (GPTQ), with the salient channels last.

Nearest rounding quantizes every input channel of ``Δ`` on its own. GPTQ (Frantar et al., 2022; DeltaZip
applies it to deltas) rounds one channel at a time and moves its output error onto the channels not yet
rounded, through the inverse of the calibration Hessian ``H = Σ_t x_t x_tᵀ``: the result minimises
``||X (Δ - Δ̂)ᵀ||²`` far better than rounding each channel alone. ME-Switch's salient channels are
stored exactly (an fp16 correction on top of their codes), so they go last: they absorb the error the
rounding of every other channel leaves, at no cost, and store their compensated values exactly.

The grid (step sizes and offsets) is fitted first, as for nearest rounding, and held fixed.
"""

from __future__ import annotations

import torch

from meswitch.compression.quantize import PER_TENSOR, Quantized

BLOCK = 128  # columns updated together (GPTQ's lazy batch)


def _column_grid(q: Quantized, n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element (scale, offset) [N, K] of a grid with one step per row, group or tensor."""
    scale, offset = q.step_params()
    if q.spec.group_size == PER_TENSOR:
        return scale.reshape(1, 1).expand(n, k), offset.reshape(1, 1).expand(n, k)
    reps = k // scale.shape[1]
    return scale.repeat_interleave(reps, dim=1), offset.repeat_interleave(reps, dim=1)


def gptq_round(
    delta: torch.Tensor,
    hessian: torch.Tensor,
    grid: Quantized,
    salient_idx: torch.Tensor,
    damp: float = 0.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes uint8 [N, K] on ``grid``, the salient columns' compensated values fp32 [N, k]).

    ``hessian`` [K, K]: the calibration inputs' ``Σ x xᵀ``; ``damp`` adds that share of its mean diagonal
    to the diagonal, as GPTQ does, so the inverse exists. Non-salient channels are rounded in order of
    decreasing activation energy (GPTQ's act-order), the salient ones last.
    """
    w = delta.float().clone()
    n, k = w.shape
    h = hessian.float().to(w.device).clone()
    diag = torch.diagonal(h)
    dead = diag <= 0
    h[dead, dead] = 1.0
    diag.add_(damp * diag.mean())
    salient = torch.zeros(k, dtype=torch.bool, device=w.device)
    salient[salient_idx.long().to(w.device)] = True
    # the most energetic channels first (GPTQ's act-order), the salient ones last
    order = torch.argsort(torch.diagonal(h), descending=True)
    perm = torch.cat([order[~salient[order]], order[salient[order]]])
    inv = torch.argsort(perm)
    scale, offset = _column_grid(grid, n, k)
    w, h = w[:, perm], h[perm][:, perm]
    scale, offset = scale[:, perm].float(), offset[:, perm].float()
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    levels = grid.spec.levels
    codes = torch.zeros(n, k, dtype=torch.uint8, device=w.device)
    rounded = k - int(salient.sum())  # the salient columns (last) are stored exactly: no error to spread
    for i1 in range(0, rounded, BLOCK):
        i2 = min(i1 + BLOCK, rounded)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col, s, o = w1[:, i], scale[:, i1 + i], offset[:, i1 + i]
            c = torch.round((col - o) / s).clamp_(0, levels)
            codes[:, i1 + i] = c.to(torch.uint8)
            e = (col - (c * s + o)) / h1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * h1[i, i:].unsqueeze(0)
            err1[:, i] = e
        w[:, i1:i2] = w1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    tail = torch.round((w[:, rounded:] - offset[:, rounded:]) / scale[:, rounded:]).clamp_(0, levels)
    codes[:, rounded:] = tail.to(torch.uint8)
    codes = codes[:, inv]
    exact = w[:, inv][:, salient_idx.long().to(w.device)]
    return codes, exact
