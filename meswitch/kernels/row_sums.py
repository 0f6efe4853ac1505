"""What the decode kernel's epilogue needs of x, computed by whichever kernel makes x.

With per-channel steps applied in the epilogue (``LaunchConfig.epilogue_scale``), the delta kernel's MMA runs on
``bias + code`` and the epilogue finishes each row with ``s·(acc − Σ bias·x) + o·Σx`` over its K split: it needs
``Σx`` and ``Σ bias·x`` per row and split, ``bias`` being each position's plane bias
(:func:`~meswitch.kernels.layout.position_biases`). Accumulated in every N block's loop they cost instructions
the loop is bound by; from a kernel of their own (``_x_sums_kernel``) they cost a launch ahead of the delta's.
The kernel that makes x already holds each row whole (the decoder's compiled residual add and RMS norm, SwiGLU),
so there they are a few more reductions: :func:`row_sums` writes each as a full-row reduction against a constant
weight vector (:func:`sum_weights`), the shape a compiler fuses with the norm's own reduction.

FP8 planes (``LaunchConfig.fp8_planes``) meet x rounded to e4m3 per row, in their K order, with the same sums of
that rounded x: from a kernel of their own (``_x_e4m3_kernel``) a launch ahead of every delta launch; here
(:func:`e4m3_inputs`) a gather, a row maximum and the same reductions, for the compiler to fuse likewise.

Plain torch: the decoder plans and computes them where Triton may not be importable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from meswitch.kernels.layout import E4M3_BIAS, e4m3_positions, position_biases, v2_chunk

E4M3_MAX = 448.0  # e4m3's largest finite value: each row is scaled so that its largest |x| lands there


@dataclass(frozen=True)
class SumsPlan:
    """The row sums one delta launch takes: ``splits`` K splits of ``span`` positions (the last may be shorter)
    of a row of ``k``, with ``bits``-bit codes' plane biases in bf16 or fp16. The launch reads them as fp32
    ``[M, splits, 2]``: per split ``(Σx, Σ bias·x)``. ``fp8``: the launch's planes are FP8 (:func:`e4m3_inputs`):
    it also takes x in e4m3 in the planes' K order and each row's scale."""

    k: int
    span: int
    splits: int
    bits: int
    is_bf16: bool
    fp8: bool = False

    @property
    def width(self) -> int:
        """Sums per row."""
        return 2 * self.splits

    @property
    def padded(self) -> int:
        """Positions of x in whole chunks (the FP8 planes' x8 is this wide, zeros past ``k``)."""
        chunk = v2_chunk(self.bits)
        return -(-self.k // chunk) * chunk


def sum_weights(plan: SumsPlan, device: torch.device | str | None = None) -> torch.Tensor | tuple:
    """The constants the launch's sums are reductions against. bf16 planes: fp32 ``[2·splits, k]``, per split its
    positions' indicator and their plane biases. FP8 planes: ``(positions, weights)``, for each position of x8 the
    position of x it holds (``k``: padding), and per split its x8 positions' indicator (a K split is whole chunks,
    and the planes' order permutes positions within a chunk; ``Σ bias·x`` is :data:`E4M3_BIAS` times the sum)."""
    at = torch.arange(plan.padded if plan.fp8 else plan.k)
    inside = [((at >= s * plan.span) & (at < (s + 1) * plan.span)).float() for s in range(plan.splits)]
    if plan.fp8:
        chunk = v2_chunk(plan.bits)
        positions = (at // chunk) * chunk + e4m3_positions(plan.bits).repeat(plan.padded // chunk)
        return positions.clamp(max=plan.k).to(device), torch.stack(inside).to(device)
    bias = position_biases(plan.k, plan.bits, plan.is_bf16)
    return torch.stack([w for i in inside for w in (i, i * bias)]).to(device)


def row_sums(x: torch.Tensor, weights: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per weight matrix ``[J, K]``, x's sums against its rows: fp32 ``[..., J]``, from x as stored (rounded to its
    dtype). Each is ``J`` full-row reductions, not a matmul: a compiler fuses those with the reduction that made x
    (the RMS norm's), where a matmul would be a kernel of its own."""
    xf = x.float()
    return [torch.stack([(xf * w).sum(-1) for w in ws.unbind(0)], -1) for ws in weights]


def e4m3_inputs(
    x: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """What FP8 planes take of x (``sum_weights`` of an FP8 plan): ``x8``, e4m3 ``[..., padded]``, each row
    scaled by ``r = max|x| / 448`` and rounded, in the planes' K order; ``r``, fp32 ``[...]``; the sums, fp32
    ``[..., 2·splits]``, of ``r·x8`` as the bf16 planes' (``Σx``, ``Σ bias·x``). As ``_x_e4m3_kernel`` computes
    them (the kernel's reference, and the decoder's glue, which computes them with x)."""
    xf = x.float()
    r = e4m3_scale(xf)
    x8 = to_e4m3(F.pad(xf, (0, 1))[..., positions], r)
    q = x8.float()
    sums = [(q * w).sum(-1, keepdim=True) * r for w in weights.unbind(0)]  # Σx a split; Σ bias·x is 8 times it
    return x8, r.squeeze(-1), torch.cat([t for s in sums for t in (s, s * E4M3_BIAS)], -1)


def e4m3_scale(x: torch.Tensor) -> torch.Tensor:
    """Each row's (last dimension's) scale for FP8 planes: ``max|x| / 448``, so its largest value lands on e4m3's."""
    return x.abs().amax(-1, keepdim=True).clamp_min(1e-30) / E4M3_MAX


def to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x / scale`` rounded to e4m3 (to nearest even, within ±448)."""
    return (x / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def launch_inputs(x: torch.Tensor, constants: Sequence) -> list:
    """Per launch's :func:`sum_weights`, what it takes of x: its row sums (bf16 planes) or ``(x8, r, sums)``
    (FP8 planes, :func:`e4m3_inputs`)."""
    out = []
    for c in constants:
        out.append(e4m3_inputs(x, *c) if isinstance(c, tuple) else row_sums(x, [c])[0])
    return out


def launch_args(given, rows: int) -> dict:
    """:func:`launch_inputs`' entry for one launch as the delta op's keyword arguments, over ``rows`` rows of x
    (any leading shape flattened): ``sums`` ``[rows, splits, 2]``, and with FP8 planes ``x8`` and ``r``."""
    if given is None:
        return {}
    if isinstance(given, tuple):
        x8, r, sums = given
        return {"sums": sums.reshape(rows, -1, 2), "x8": x8.reshape(rows, -1), "r": r.reshape(rows)}
    return {"sums": given.reshape(rows, -1, 2)}
