"""x's row sums that the decode kernel's epilogue needs, computed by whichever kernel makes x.

With per-channel steps applied in the epilogue (``LaunchConfig.epilogue_scale``), the delta kernel's MMA runs on
``bias + code`` and the epilogue finishes each row with ``s·(acc − Σ bias·x) + o·Σx`` over its K split: it needs
``Σx`` and ``Σ bias·x`` per row and split, ``bias`` being each position's plane bias
(:func:`~meswitch.kernels.layout.position_biases`). Accumulated in every N block's loop they cost instructions
the loop is bound by; from a kernel of their own (``_x_sums_kernel``) they cost a launch ahead of the delta's.
The kernel that makes x already holds each row whole (the decoder's compiled residual add and RMS norm, SwiGLU),
so there they are a few more reductions: :func:`row_sums` writes each as a full-row reduction against a constant
weight vector (:func:`sum_weights`), the shape a compiler fuses with the norm's own reduction.

Plain torch: the decoder plans and computes them where Triton may not be importable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from meswitch.kernels.layout import position_biases


@dataclass(frozen=True)
class SumsPlan:
    """The row sums one delta launch takes: ``splits`` K splits of ``span`` positions (the last may be shorter)
    of a row of ``k``, with ``bits``-bit codes' plane biases in bf16 or fp16. The launch reads them as fp32
    ``[M, splits, 2]``: per split ``(Σx, Σ bias·x)``."""

    k: int
    span: int
    splits: int
    bits: int
    is_bf16: bool

    @property
    def width(self) -> int:
        """Sums per row."""
        return 2 * self.splits


def sum_weights(plan: SumsPlan, device: torch.device | str | None = None) -> torch.Tensor:
    """fp32 ``[2·splits, k]``: per split, its positions' indicator and their plane biases, in the launch's order."""
    at = torch.arange(plan.k)
    bias = position_biases(plan.k, plan.bits, plan.is_bf16)
    rows = []
    for s in range(plan.splits):
        inside = ((at >= s * plan.span) & (at < (s + 1) * plan.span)).float()
        rows += [inside, inside * bias]
    return torch.stack(rows).to(device)


def row_sums(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per weight matrix ``[J, K]``, x's sums against its rows: fp32 ``[..., J]``, from x as stored (rounded to its
    dtype). Each is ``J`` full-row reductions, not a matmul: a compiler fuses those with the reduction that made x
    (the RMS norm's), where a matmul would be a kernel of its own."""
    xf = x.float()
    return [torch.stack([(xf * w).sum(-1) for w in ws.unbind(0)], -1) for ws in weights]
