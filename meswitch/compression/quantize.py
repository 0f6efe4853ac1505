"""Low-bit quantization of a matrix with step sizes per output channel (or per group along K).

Pure tensor functions: weights in, codes and step sizes out. Every code dequantizes as
``w = code * scale + offset`` (one FMA in a kernel); a symmetric grid fixes
``offset = -scale * (2**bits - 1) / 2`` and stores no offset. Step sizes are rounded to fp16
*before* the codes are computed, so the stored artifact dequantizes exactly to what was
measured.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from meswitch.compression.config import PER_TENSOR, SUPPORTED_BITS


@dataclass(frozen=True)
class QuantSpec:
    """How the non-salient part is quantized."""

    bits: int = 2
    symmetric: bool = False
    group_size: int = 0  # 0: per output channel; >0: groups of this many input channels; -1: per tensor
    clip_search: bool = True  # search a clipping ratio per row that minimises the (weighted) error

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group_size < PER_TENSOR:
            raise ValueError(f"group_size must be -1 (per tensor), 0 (per channel) or positive, got {self.group_size}")

    @property
    def levels(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class Quantized:
    """Codes ``[N, K]`` (uint8) and step sizes ``[Ns, G]`` with Ns in {N, 1} and G groups along K."""

    codes: torch.Tensor
    scale: torch.Tensor  # fp16
    offset: torch.Tensor | None  # fp16; None for a symmetric grid
    spec: QuantSpec

    def step_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scale, offset) as fp32, offset derived for a symmetric grid."""
        return step_params(self.scale, self.offset, self.spec.bits)

    def dequantize(self) -> torch.Tensor:
        return dequantize(self.codes, self.scale, self.offset, self.spec.bits)


def symmetric_offset(scale: torch.Tensor, bits: int) -> torch.Tensor:
    """The offset a symmetric grid implies and does not store: ``-scale * (2**bits - 1) / 2``."""
    return -scale * (((1 << bits) - 1) / 2)


def step_params(scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, offset) as fp32, the offset derived for a symmetric grid (``offset`` None)."""
    scale = scale.float()
    return scale, symmetric_offset(scale, bits) if offset is None else offset.float()


def dequantize(codes: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor | None, bits: int) -> torch.Tensor:
    """fp32 weights ``code * scale + offset`` of codes ``[R, K]`` and step sizes ``[R or 1, G]``.

    The one reconstruction every path uses (artifacts, banks, kernel references), so they agree
    to the bit.
    """
    r, k = codes.shape
    scale, offset = step_params(scale, offset, bits)
    g = scale.shape[1]
    w = codes.float().view(r, g, k // g) * scale.unsqueeze(-1) + offset.unsqueeze(-1)
    return w.reshape(r, k)


def add_salient(w: torch.Tensor, idx: torch.Tensor, val: torch.Tensor) -> torch.Tensor:
    """Add the salient corrections ``val`` ``[R, k]`` to ``w`` ``[R, K]`` in place, at columns ``idx``
    (``[k]`` for every row or ``[R, k]`` per row; padding is index 0 with value 0); return ``w``."""
    return w.scatter_add_(1, idx.long().expand_as(val), val.float())


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """View [N, K] as [N', G, K/G]: per-tensor folds everything into one row and one group."""
    n, k = w.shape
    if group_size == PER_TENSOR:
        return w.reshape(1, 1, n * k)
    if group_size == 0:
        return w.reshape(n, 1, k)
    if k % group_size:
        raise ValueError(f"input dimension {k} is not a multiple of group_size {group_size}")
    return w.reshape(n, k // group_size, group_size)


_CLIP_RATIOS = tuple(1.0 - 0.05 * i for i in range(20))  # 1.0 down to 0.05


def quantize(
    w: torch.Tensor,
    spec: QuantSpec,
    weight: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> Quantized:
    """Quantize ``w`` [N, K] to ``spec.bits`` with step sizes fitted to the masked-in columns.

    ``weight`` [K] (calibration second moments) makes the clip search minimise the
    activation-weighted error; ``mask`` [K] (bool) leaves columns out of the fit (salient
    columns, which are stored separately), though they still get codes.
    """
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(w.shape)}")
    w = w.float()
    n, k = w.shape
    col_w = torch.ones(k, device=w.device) if weight is None else weight.float().clamp_min(0).to(w.device)
    if mask is not None:
        col_w = col_w * mask.to(w.device).float()
    wg = grouped(w, spec.group_size)
    cw = grouped(col_w.expand(n, k), spec.group_size)
    fit = cw > 0
    big = torch.finfo(torch.float32).max
    if spec.symmetric:
        if spec.bits == 1:
            # Levels ±c: the weighted least-squares c is the weighted mean of |w| (BitDelta's scale).
            c = (wg.abs() * cw).sum(-1) / cw.sum(-1).clamp_min(1e-12)
            candidates = [c]
        else:
            amax = torch.where(fit, wg.abs(), torch.zeros_like(wg)).amax(-1)
            candidates = [amax * r for r in (_CLIP_RATIOS if spec.clip_search else (1.0,))]
        steps = [(2 * half_range / spec.levels).clamp_min(1e-8).half().float() for half_range in candidates]
        scale, offset = _search(wg, cw, [(s, symmetric_offset(s, spec.bits)) for s in steps], spec.levels)
        return Quantized(_codes(wg, scale, offset, spec.levels, w.shape), scale.half(), None, spec)
    lo = torch.where(fit, wg, torch.full_like(wg, big)).amin(-1)
    hi = torch.where(fit, wg, torch.full_like(wg, -big)).amax(-1)
    empty = ~fit.any(-1)
    lo = torch.where(empty, torch.zeros_like(lo), lo)
    hi = torch.where(empty, torch.zeros_like(hi), hi)
    candidates = []
    for r in _CLIP_RATIOS if spec.clip_search else (1.0,):
        scale = ((hi - lo) * r / spec.levels).clamp_min(1e-8).half().float()
        candidates.append((scale, ((hi + lo) / 2 - scale * spec.levels / 2).half().float()))
    scale, offset = _search(wg, cw, candidates, spec.levels)
    return Quantized(_codes(wg, scale, offset, spec.levels, w.shape), scale.half(), offset.half(), spec)


def _codes(wg, scale, offset, levels, shape) -> torch.Tensor:
    q = torch.round((wg - offset.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, levels)
    return q.to(torch.uint8).reshape(shape)


def _error(wg, cw, scale, offset, levels) -> torch.Tensor:
    """Weighted squared error of the round trip per row/group: q·s + o - w = s·(q - x) with x = (w - o) / s, so
    the search (20 candidates a matrix) takes two temporaries and works in place on them."""
    x = (wg - offset.unsqueeze(-1)).div_(scale.unsqueeze(-1))
    d = torch.round(x).clamp_(0, levels).sub_(x)
    return d.square_().mul_(cw).sum(-1).mul_(scale * scale)


# Elements of the row block the clip search takes at a time on a CPU: its temporaries (~2 MB each) stay in cache
# and reuse the allocator's memory, where passes over a whole matrix stream every temporary through DRAM and fault
# fresh pages in (1.5-3x slower on a 2-core host; the embedding of a 49k vocabulary 2.8 -> 0.9 s)
_CPU_BLOCK = 1 << 19


def _search(wg, cw, candidates: list[tuple[torch.Tensor, torch.Tensor]], levels) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row/group, the (scale, offset) candidate with the lowest :func:`_error`, the first of equals. On a CPU a
    block of rows at a time, every candidate on a block before the next (the same arithmetic per row)."""
    n = wg.shape[0]
    step = n if wg.device.type != "cpu" else max(1, _CPU_BLOCK // max(wg[0].numel(), 1))
    picked = []
    for i in range(0, n, step):
        rows = slice(i, i + step)
        best = None
        for scale, offset in candidates:
            s, o = scale[rows], offset[rows]
            err = _error(wg[rows], cw[rows], s, o, levels)
            if best is None:
                best = err, s, o
                continue
            better = err < best[0]
            best = torch.where(better, err, best[0]), torch.where(better, s, best[1]), torch.where(better, o, best[2])
        picked.append(best[1:])
    return torch.cat([s for s, _ in picked]), torch.cat([o for _, o in picked])


def values_per_word(bits: int) -> int:
    """Codes per int32 word: 32, 16, 10, 8, 4 for 1, 2, 3, 4, 8 bits (3-bit words waste 2 bits)."""
    return 32 // bits


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack uint8 codes [N, K] along K into int32 words [N, ceil(K / vpw)], little end first.

    Code j of a word sits at bits ``[j*bits, (j+1)*bits)``. This is layout version 1.
    """
    n, k = codes.shape
    vpw = values_per_word(bits)
    words = -(-k // vpw)
    padded = torch.zeros(n, words * vpw, dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    shifts = torch.arange(vpw, device=codes.device, dtype=torch.int64) * bits
    packed = (padded.view(n, words, vpw) << shifts).sum(-1)
    # Reinterpret the low 32 bits as int32 (two's complement).
    packed = torch.where(packed >= 2**31, packed - 2**32, packed)
    return packed.to(torch.int32)


def unpack(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack`: int32 [N, W] -> uint8 codes [N, K]."""
    n, words = packed.shape
    vpw = values_per_word(bits)
    if words * vpw < k:
        raise ValueError(f"{words} words of {bits}-bit codes hold {words * vpw} values, fewer than K={k}")
    shifts = torch.arange(vpw, device=packed.device, dtype=torch.int64) * bits
    vals = (packed.to(torch.int64).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return vals.reshape(n, words * vpw)[:, :k].to(torch.uint8)
