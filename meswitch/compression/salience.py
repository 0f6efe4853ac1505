"""Which input channels of a delta to keep in fp16.

ME-Switch scores channel i by the output error its quantization causes on calibration
inputs, ``Σ_j ||x_i Δ_ij - x_i Δ̂_ij||² = s_i · Σ_j (Δ_ij - Δ̂_ij)²`` with ``s_i = Σ_t x_{t,i}²``,
and keeps the largest. The magnitude baseline keeps the channels whose delta columns are
largest, which the paper shows is the wrong criterion.
"""

from __future__ import annotations

import torch

from meswitch.compression.quantize import QuantSpec, quantize


def reconstruction_scores(delta: torch.Tensor, s: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Per-input-channel output error of quantizing ``delta`` once at ``spec``: ``s_i Σ_j (Δ-Δ̂)_ij²``."""
    deq = quantize(delta, spec, weight=s).dequantize()
    return s * ((delta - deq) ** 2).sum(0)


def magnitude_scores(delta: torch.Tensor) -> torch.Tensor:
    """Column L2 norms of the delta: the magnitude baseline."""
    return delta.norm(dim=0)


def select_salient(delta: torch.Tensor, s: torch.Tensor, spec: QuantSpec, count: int, method: str) -> torch.Tensor:
    """Indices (ascending, int64) of the ``count`` salient input channels under ``method``."""
    if count == 0:
        return torch.empty(0, dtype=torch.long, device=delta.device)
    if method == "meswitch":
        scores = reconstruction_scores(delta, s, spec)
    elif method == "magnitude":
        scores = magnitude_scores(delta)
    else:
        raise ValueError(f"method {method!r} selects no salient channels")
    return torch.topk(scores, count).indices.sort().values
