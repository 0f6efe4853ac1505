"""Compress one delta matrix: choose salient input channels, quantize the rest, pack.

Layout (version 1), chosen so the serving kernel reads K contiguously with no gather of x
for the bulk part: *every* input channel gets low-bit codes, with step sizes fitted to the
non-salient channels only; the salient channels additionally carry an fp16 *correction*
``C = Δ[:, S] - Δ̂[:, S]``, so ``Δ̂ + scatter(C) == Δ`` on them up to fp16 rounding and

    delta(x) = x · dequant(codes)ᵀ + x[:, S] · Cᵀ.

The codes of the salient channels cost ``bits · k · N`` extra bits, under 0.03 bits per
parameter at 1% salient and 2 bits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meswitch.compression.config import DeltaConfig
from meswitch.compression.gptq import gptq_round
from meswitch.compression.quantize import (
    PER_TENSOR,
    Quantized,
    QuantSpec,
    add_salient,
    pack,
    quantize,
    unpack,
    values_per_word,
)
from meswitch.compression.salience import select_salient


@dataclass
class CompressedDelta:
    """One packed delta matrix. Tensor names are the suffixes used in the artifact's safetensors."""

    shape: tuple[int, int]
    spec: QuantSpec
    packed: torch.Tensor  # int32 [N, W]
    scale: torch.Tensor  # fp16 [Ns, G]
    offset: torch.Tensor | None  # fp16 [Ns, G]
    salient_idx: torch.Tensor  # int32 [k], ascending
    salient_val: torch.Tensor  # fp16 [N, k]: corrections on the salient columns

    def quantized(self) -> Quantized:
        return Quantized(unpack(self.packed, self.spec.bits, self.shape[1]), self.scale, self.offset, self.spec)

    def dequantize(self) -> torch.Tensor:
        """The exact reference reconstruction Δ̂ (fp32) that the kernels are checked against."""
        return add_salient(self.quantized().dequantize(), self.salient_idx, self.salient_val)

    def nbytes(self) -> int:
        """Every stored byte: codes, step sizes, offsets, indices and salient columns."""
        parts = [self.packed, self.scale, self.salient_idx, self.salient_val]
        if self.offset is not None:
            parts.append(self.offset)
        return sum(t.numel() * t.element_size() for t in parts)

    def bits_per_param(self) -> float:
        return 8 * self.nbytes() / (self.shape[0] * self.shape[1])

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {
            f"{prefix}.packed": self.packed,
            f"{prefix}.scale": self.scale,
            f"{prefix}.salient_idx": self.salient_idx,
            f"{prefix}.salient_val": self.salient_val,
        }
        if self.offset is not None:
            out[f"{prefix}.offset"] = self.offset
        return {k: v.contiguous().cpu() for k, v in out.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], prefix: str, shape, spec: QuantSpec) -> CompressedDelta:
        return cls(
            shape=tuple(shape),
            spec=spec,
            packed=tensors[f"{prefix}.packed"],
            scale=tensors[f"{prefix}.scale"],
            offset=tensors.get(f"{prefix}.offset"),
            salient_idx=tensors[f"{prefix}.salient_idx"],
            salient_val=tensors[f"{prefix}.salient_val"],
        )


def delta_nbytes(shape: tuple[int, int], spec: QuantSpec, salient: int) -> int:
    """The bytes :meth:`CompressedDelta.nbytes` will count for an [N, K] delta at ``spec`` with ``salient``
    channels, known before compressing it (what a bit budget plans with)."""
    n, k = shape
    words = -(-k // values_per_word(spec.bits))
    steps = 1 if spec.group_size == PER_TENSOR else n * (k // spec.group_size if spec.group_size else 1)
    return 4 * n * words + 2 * steps * (1 if spec.symmetric else 2) + 4 * salient + 2 * n * salient


def channel_weights(second_moment: torch.Tensor | None, k: int, device: torch.device | str) -> torch.Tensor:
    """The per-input-channel weights of the error: the calibration second moments, or all ones without them."""
    return torch.ones(k, device=device) if second_moment is None else second_moment.float().to(device)


def compress_delta(
    delta: torch.Tensor,
    second_moment: torch.Tensor | None,
    config: DeltaConfig,
    scores: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> CompressedDelta:
    """Compress ``delta`` [N, K] given the per-input-channel second moments ``s`` [K] of its inputs.

    Without ``s`` (no calibration), channels are weighted equally: salience falls back to the
    plain weight error. With ``hessian`` (``Σ x xᵀ``) and ``config.rounding == "gptq"`` the codes are
    rounded with error compensation on the grid nearest rounding fits.
    """
    delta = delta.float()
    n, k = delta.shape
    spec = config.quant_spec()
    s = channel_weights(second_moment, k, delta.device)
    count = config.salient_count(k)
    idx = select_salient(delta, s, spec, count, config.method, scores)
    mask = torch.ones(k, dtype=torch.bool, device=delta.device)
    mask[idx] = False
    q = quantize(delta, spec, weight=s, mask=mask)
    exact = delta[:, idx]
    if hessian is not None and config.rounding == "gptq":
        codes, exact = gptq_round(delta, hessian, q, idx)
        q = Quantized(codes, q.scale, q.offset, spec)
    deq = q.dequantize()
    correction = (exact - deq[:, idx]).half()
    return CompressedDelta(
        shape=(n, k),
        spec=spec,
        packed=pack(q.codes, spec.bits),
        scale=q.scale,
        offset=q.offset,
        salient_idx=idx.to(torch.int32),
        salient_val=correction,
    )


def relative_errors(delta: torch.Tensor, approx: torch.Tensor, s: torch.Tensor | None) -> tuple[float, float | None]:
    """(||Δ-Δ̂||/||Δ||, and the same weighted by input second moments s)."""
    delta = delta.float()
    err = (delta - approx.to(delta.device)) ** 2
    denom = (delta**2).sum().clamp_min(1e-30)
    rel = float((err.sum() / denom).sqrt())
    if s is None:
        return rel, None
    s = s.float().to(delta.device)
    return rel, float(((err * s).sum() / (delta**2 * s).sum().clamp_min(1e-30)).sqrt())
