"""Which input channels of a delta to keep in fp16.

ME-Switch scores channel i by the output error its quantization causes on calibration
inputs, ``Σ_j ||x_i Δ_ij - x_i Δ̂_ij||² = s_i · Σ_j (Δ_ij - Δ̂_ij)²`` with ``s_i = Σ_t x_{t,i}²``,
and keeps the largest. The magnitude baseline keeps the channels whose delta columns are
largest, which the paper shows is the wrong criterion.

How many channels each matrix keeps: either its own fraction (``layer``), or (``global``, the
default) the same total spread over all matrices by each channel's share of its own matrix's
error. The top 1% of a matrix's channels can hold 3% of its error or 30%; salient columns pay off
where the error is concentrated, and they cost ``N`` fp16 values each, so a 1% column of the
embedding or the LM head (N = vocabulary) is better spent on the attention projections.
"""

from __future__ import annotations

import torch

from meswitch.compression.methods import get_method
from meswitch.compression.quantize import QuantSpec, quantize


def reconstruction_scores(delta: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-input-channel output error of quantizing ``delta`` once at ``spec``: ``s_i Σ_j (Δ-Δ̂)_ij²``."""
    deq = quantize(delta, spec, weight=s).dequantize()
    return s * ((delta - deq) ** 2).sum(0)


def select_salient(
    delta: torch.Tensor,
    s: torch.Tensor,
    spec: QuantSpec,
    count: int,
    method: str,
    scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Indices (ascending, int64) of the ``count`` salient input channels under the registered ``method``.

    ``scores``: this matrix's :func:`reconstruction_scores`, when already computed (global allocation).
    """
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=delta.device)
    salience = get_method(method).salience
    if salience is None:
        raise ValueError(f"method {method!r} selects no salient channels")
    return torch.topk(salience(delta, s, spec, scores), count).indices.sort().values


def shares_of(scores: torch.Tensor) -> torch.Tensor:
    """Per-channel scores as shares of their matrix's total (sums to 1)."""
    return scores / scores.sum().clamp_min(1e-30)


def allocate_salient(scores: dict[str, torch.Tensor], total: int) -> dict[str, int]:
    """Salient channels per matrix: the ``total`` channels of largest share of their own matrix's error,
    over all matrices (``scores``: each matrix's :func:`reconstruction_scores`, or already its shares)."""
    names = list(scores)
    flat = torch.cat([shares_of(scores[n].float()).cpu() for n in names])
    owner = torch.cat([torch.full((scores[n].numel(),), i) for i, n in enumerate(names)])
    picked = owner[torch.topk(flat, min(total, flat.numel())).indices]
    counts = torch.bincount(picked, minlength=len(names))
    return {n: int(c) for n, c in zip(names, counts.tolist(), strict=True)}
