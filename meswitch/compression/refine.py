"""Optional refinement of step sizes against the calibration-weighted output error.

Layer-wise distillation: with the codes fixed, the step size and offset of each row (or
group) that minimise ``Σ_i s_i (Δ_ij - (q_ij a_j + b_j))²`` over the non-salient channels
have a closed form (weighted least squares in two unknowns); then the codes are re-rounded
to the new grid and the fit repeated. Each round can only keep or lower the objective, since
a round is accepted only when it does. Off by default: the report measures whether it pays.
"""

from __future__ import annotations

import torch

from meswitch.compression.delta import CompressedDelta
from meswitch.compression.quantize import PER_TENSOR, Quantized, QuantSpec, grouped, pack, symmetric_offset


def refine_steps(delta: torch.Tensor, cd: CompressedDelta, s: torch.Tensor | None, rounds: int = 4) -> CompressedDelta:
    """A copy of ``cd`` with refitted step sizes (and re-rounded codes); salient corrections recomputed."""
    spec = cd.spec
    if spec.group_size == PER_TENSOR:
        return cd
    delta = delta.float()
    n, k = delta.shape
    w = torch.ones(k, device=delta.device) if s is None else s.float().to(delta.device)
    mask = torch.ones(k, dtype=torch.bool, device=delta.device)
    mask[cd.salient_idx.long()] = False
    cw = grouped((w * mask).expand(n, k), spec.group_size)
    wg = grouped(delta, spec.group_size)
    q = cd.quantized()
    codes = grouped(q.codes.float(), spec.group_size)
    scale, offset = q.step_params()
    best = _objective(wg, cw, codes, scale, offset)
    for _ in range(rounds):
        new_scale, new_offset = _fit(wg, cw, codes, spec)
        new_codes = torch.round((wg - new_offset.unsqueeze(-1)) / new_scale.unsqueeze(-1)).clamp_(0, spec.levels)
        err = _objective(wg, cw, new_codes, new_scale, new_offset)
        better = err < best
        if not better.any():
            break
        scale = torch.where(better, new_scale, scale)
        offset = torch.where(better, new_offset, offset)
        codes = torch.where(better.unsqueeze(-1), new_codes, codes)
        best = torch.where(better, err, best)
    refined = Quantized(
        codes.to(torch.uint8).reshape(n, k), scale.half(), None if spec.symmetric else offset.half(), spec
    )
    deq = refined.dequantize()
    idx = cd.salient_idx.long()
    return CompressedDelta(
        shape=cd.shape,
        spec=spec,
        packed=pack(refined.codes, spec.bits),
        scale=refined.scale,
        offset=refined.offset,
        salient_idx=cd.salient_idx,
        salient_val=(delta[:, idx] - deq[:, idx]).half(),
    )


def _objective(wg, cw, codes, scale, offset) -> torch.Tensor:
    return (((codes * scale.unsqueeze(-1) + offset.unsqueeze(-1)) - wg) ** 2 * cw).sum(-1)


def _fit(wg, cw, codes, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted least-squares (scale, offset) per row/group for fixed codes, rounded to fp16."""
    sw = cw.sum(-1).clamp_min(1e-30)
    if spec.symmetric:
        c = codes - spec.levels / 2  # w ≈ c * scale
        scale = (cw * c * wg).sum(-1) / (cw * c * c).sum(-1).clamp_min(1e-30)
        scale = scale.abs().clamp_min(1e-8).half().float()
        return scale, symmetric_offset(scale, spec.bits)
    mq = (cw * codes).sum(-1) / sw
    mw = (cw * wg).sum(-1) / sw
    cov = (cw * (codes - mq.unsqueeze(-1)) * (wg - mw.unsqueeze(-1))).sum(-1)
    var = (cw * (codes - mq.unsqueeze(-1)) ** 2).sum(-1)
    scale = torch.where(var > 0, cov / var.clamp_min(1e-30), torch.zeros_like(cov)).clamp_min(1e-8).half().float()
    offset = (mw - scale * mq).half().float()
    return scale, offset
