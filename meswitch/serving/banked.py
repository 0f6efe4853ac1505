"""The packed (GPU) payload: device-resident experts' deltas stacked per linear for ``meswitch.kernels.mixed_delta``.

Instead of dequantizing each expert once (the dense CPU path), the device keeps the packed codes:
for every quantized linear, one :class:`~meswitch.kernels.DeltaBank` per quantization grid stacks
the resident experts, so one kernel launch per linear serves every expert in the batch. Adding an
expert repacks only its own codes and appends them; evicting one drops its index from every bank.
The embedding stays packed too and is dequantized only for the rows a batch looks up.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from meswitch.compression.delta import CompressedDelta
from meswitch.compression.quantize import unpack
from meswitch.kernels import DeltaBank


@dataclass(frozen=True)
class Grid:
    """Experts share a bank when their codes share bits, step-size groups and symmetry."""

    bits: int
    group_size: int
    symmetric: bool

    @classmethod
    def of(cls, cd: CompressedDelta) -> Grid:
        return cls(cd.spec.bits, cd.spec.group_size, cd.spec.symmetric)


def _pad_salient(bank: DeltaBank, kmax: int) -> DeltaBank:
    k = bank.kmax
    if k == kmax:
        return bank
    e, n = bank.num_experts, bank.shape[0]
    idx = torch.zeros(e, kmax, dtype=torch.int32, device=bank.device)
    val = torch.zeros(e, n, kmax, dtype=torch.float16, device=bank.device)
    idx[:, :k], val[:, :, :k] = bank.salient_idx, bank.salient_val
    return DeltaBank(bank.shape, bank.bits, bank.group_size, bank.symmetric, bank.layout_version,
                     bank.packed, bank.scale, bank.offset, idx, val)  # fmt: skip


def concat_banks(a: DeltaBank, b: DeltaBank) -> DeltaBank:
    """The experts of ``a`` then those of ``b`` (same grid and layout)."""
    kmax = max(a.kmax, b.kmax)
    a, b = _pad_salient(a, kmax), _pad_salient(b, kmax)
    cat = lambda x, y: None if x is None else torch.cat([x, y])
    return DeltaBank(a.shape, a.bits, a.group_size, a.symmetric, a.layout_version, cat(a.packed, b.packed),
                     cat(a.scale, b.scale), cat(a.offset, b.offset), cat(a.salient_idx, b.salient_idx),
                     cat(a.salient_val, b.salient_val))  # fmt: skip


def select_banks(bank: DeltaBank, keep: list[int]) -> DeltaBank:
    t = torch.tensor(keep, device=bank.device)
    sel = lambda x: None if x is None else x.index_select(0, t)
    return DeltaBank(bank.shape, bank.bits, bank.group_size, bank.symmetric, bank.layout_version, sel(bank.packed),
                     sel(bank.scale), sel(bank.offset), sel(bank.salient_idx), sel(bank.salient_val))  # fmt: skip


def bank_nbytes(bank: DeltaBank) -> int:
    parts = [bank.packed, bank.scale, bank.offset, bank.salient_idx, bank.salient_val]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


@dataclass
class GridBanks:
    """The resident experts of one grid, in bank order, and their bank per tensor name."""

    order: list[str] = field(default_factory=list)
    banks: dict[str, DeltaBank] = field(default_factory=dict)


class BankSet:
    """Every banked tensor's banks, per grid; experts enter and leave all of an expert's banks together."""

    def __init__(self) -> None:
        self.grids: dict[Grid, GridBanks] = {}
        self.where: dict[str, Grid] = {}  # slot key -> its grid

    def add(self, key: str, deltas: dict[str, CompressedDelta]) -> int:
        """Append one expert (all its banked tensors on one grid); return the bytes it added."""
        grids = {Grid.of(cd) for cd in deltas.values()}
        if len(grids) != 1:
            raise ValueError(f"expert {key} mixes quantization grids {sorted(map(str, grids))}; bank it per grid")
        grid = grids.pop()
        gb = self.grids.setdefault(grid, GridBanks())
        added = 0
        for name, cd in deltas.items():
            one = DeltaBank.from_compressed([cd], device=cd.packed.device)
            added += bank_nbytes(one)
            gb.banks[name] = one if name not in gb.banks else concat_banks(gb.banks[name], one)
        gb.order.append(key)
        self.where[key] = grid
        return added

    def remove(self, key: str) -> None:
        grid = self.where.pop(key, None)
        if grid is None:
            return
        gb = self.grids[grid]
        i = gb.order.index(key)
        keep = [j for j in range(len(gb.order)) if j != i]
        gb.order.pop(i)
        if not keep:
            del self.grids[grid]
            return
        gb.banks = {name: select_banks(b, keep) for name, b in gb.banks.items()}

    def index(self, key: str) -> tuple[Grid, int] | None:
        grid = self.where.get(key)
        return None if grid is None else (grid, self.grids[grid].order.index(key))


class RowTable:
    """A packed embedding delta (plus added rows) that dequantizes only the rows looked up."""

    def __init__(self, cd: CompressedDelta, extra: torch.Tensor | None, dtype: torch.dtype):
        self.cd, self.extra, self.dtype = cd, extra, dtype
        self.rows = cd.shape[0] + (0 if extra is None else extra.shape[0])

    def tensors(self) -> list[torch.Tensor]:
        cd = self.cd
        parts = [cd.packed, cd.scale, cd.offset, cd.salient_idx, cd.salient_val, self.extra]
        return [t for t in parts if t is not None]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows ``ids`` (any shape) of ``[Δ̂; extra rows]``, as ``[*ids.shape, K]`` in the compute dtype."""
        cd = self.cd
        n_base, k = cd.shape
        flat = ids.reshape(-1)
        inside = flat < n_base
        safe = torch.where(inside, flat, torch.zeros_like(flat))
        codes = unpack(cd.packed.index_select(0, safe), cd.spec.bits, k).float()
        scale = (
            cd.scale.index_select(0, safe).float() if cd.scale.shape[0] > 1 else cd.scale.float().expand(len(flat), -1)
        )
        if cd.offset is not None:
            off = (
                cd.offset.index_select(0, safe).float()
                if cd.offset.shape[0] > 1
                else cd.offset.float().expand(len(flat), -1)
            )
        else:
            off = -scale * (((1 << cd.spec.bits) - 1) / 2)
        g = scale.shape[1]
        w = (codes.view(len(flat), g, k // g) * scale.unsqueeze(-1) + off.unsqueeze(-1)).reshape(len(flat), k)
        if cd.salient_idx.numel():
            w[:, cd.salient_idx.long()] += cd.salient_val.index_select(0, safe).float()
        if self.extra is not None and not bool(inside.all()):
            rows = (flat - n_base).clamp(min=0, max=self.extra.shape[0] - 1)
            w = torch.where(inside.unsqueeze(-1), w, F.embedding(rows, self.extra.float()))
        return w.to(self.dtype).view(*ids.shape, k)
