"""The packed (GPU) payload: device-resident experts stacked in slot tables, one per tensor and grid.

Instead of dequantizing each expert once (the dense CPU path), the device keeps the packed codes:
for every quantized linear, one :class:`~meswitch.kernels.DeltaBank` per quantization grid stacks
the resident experts, so one kernel launch per linear serves every expert in the batch. What an
expert changes besides its linears sits in tables indexed by the same slot: norm weights, bias
deltas, added vocabulary rows, and the packed embedding delta (dequantized only for the rows a batch
looks up). A batch names each row's slot in a device tensor, so the mixed modules read nothing on
the host and one captured CUDA graph serves any mix of resident experts.

An expert keeps its slot while resident; a new expert takes a free slot in place (the tensors, and
so any captured graph, stay valid) and only when every slot is taken do the tables grow, which
bumps :attr:`GridBanks.version` (graphs captured before must be captured again). ``capacity``
reserves slots up front so that adding experts never reallocates.

Sibling projections whose base weights are one GEMM (:class:`~meswitch.serving.mixed.FusedLinears`) are
banked together once declared (:meth:`BankSet.fuse`): one grouped bank over their concatenated outputs, so
one kernel launch adds all their deltas; each projection's own bank is a view of it (codes are held once).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from meswitch.compression.delta import CompressedDelta
from meswitch.kernels import BankGrid, DeltaBank
from meswitch.kernels.bank import MAX_PARTS
from meswitch.kernels.layout import LAYOUT_V1


@dataclass(frozen=True)
class Grid:
    """Experts share a bank when their codes share bits, step-size groups and symmetry."""

    bits: int
    group_size: int
    symmetric: bool

    @classmethod
    def of(cls, cd: CompressedDelta) -> Grid:
        return cls(cd.spec.bits, cd.spec.group_size, cd.spec.symmetric)


BANK_FIELDS = ("packed", "scale", "offset", "salient_idx", "salient_val")


def bank_nbytes(bank: DeltaBank) -> int:
    parts = [getattr(bank, f) for f in BANK_FIELDS]
    return sum(t.numel() * t.element_size() for t in parts if t is not None)


def _resized(bank: DeltaBank, slots: int, kmax: int) -> DeltaBank:
    """``bank`` with room for ``slots`` experts and ``kmax`` salient columns; new room is zero (no delta)."""
    if bank.num_experts == slots and bank.kmax == kmax:
        return bank

    def grow(t: torch.Tensor | None, salient_dim: int | None) -> torch.Tensor | None:
        if t is None:
            return None
        shape = list(t.shape)
        shape[0] = slots
        if salient_dim is not None:
            shape[salient_dim] = kmax
        out = torch.zeros(shape, dtype=t.dtype, device=t.device)
        index = [slice(0, t.shape[0])] + [slice(0, s) for s in t.shape[1:]]
        out[tuple(index)] = t
        return out

    return DeltaBank(
        bank.grid,
        grow(bank.packed, None),
        grow(bank.scale, None),
        grow(bank.offset, None),
        grow(bank.salient_idx, -1),
        grow(bank.salient_val, -1),
        bank.splits,
    )


def _put(bank: DeltaBank, slot: int, one: DeltaBank) -> None:
    """Write a one-expert bank into ``slot`` in place (its salient columns padded to the bank's)."""
    k = one.kmax
    bank.packed[slot] = one.packed[0]
    bank.scale[slot] = one.scale[0]
    if bank.offset is not None:
        bank.offset[slot] = one.offset[0]
    bank.salient_idx[slot].zero_()
    bank.salient_val[slot].zero_()
    bank.salient_idx[slot, :k] = one.salient_idx[0]
    bank.salient_val[slot, :, :k] = one.salient_val[0]


@dataclass
class GridBanks:
    """The resident experts of one grid: slot -> expert key, and every table indexed by slot."""

    slots: list[str | None] = field(default_factory=list)  # None: a free slot
    banks: dict[str, DeltaBank] = field(default_factory=dict)  # linears, LM head: the kernel's layout
    lookups: dict[str, DeltaBank] = field(default_factory=dict)  # embedding deltas, layout 1, per-row lookup
    dense: dict[str, torch.Tensor] = field(default_factory=dict)  # [slots, ...]: norms, biases, added rows
    vocab: torch.Tensor | None = None  # int64 [slots]: each slot's vocabulary (base plus added rows)
    version: int = 0  # bumped whenever a table is created or reallocated: captured graphs are stale
    # sibling projections banked together (BankSet.fuse): their entries in `banks` are views of these
    groups: dict[tuple[str, ...], DeltaBank] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return len(self.slots)

    def set_group(self, names: tuple[str, ...], bank: DeltaBank) -> None:
        """Hold ``bank`` for the projections ``names``, each projection's bank a view of it."""
        self.groups[names] = bank
        for p, name in enumerate(names):
            self.banks[name] = bank.part(p)

    def grouped(self) -> set[str]:
        """The projections whose bank is a view of a group's."""
        return {name for names in self.groups for name in names}

    def bank(self, name: str | tuple[str, ...]) -> DeltaBank | None:
        """The bank of a tensor, or of sibling projections held as one (a tuple of their names); None if absent."""
        return self.groups.get(name) if isinstance(name, tuple) else self.banks.get(name)


@dataclass
class ExpertTables:
    """What one expert puts in its grid's tables (built by the engine from its artifact)."""

    banked: dict[str, CompressedDelta]  # quantized linears and LM head
    lookups: dict[str, CompressedDelta]  # quantized embedding
    dense: dict[str, torch.Tensor]  # full norm weights, bias deltas, added vocabulary rows [X, H]
    vocab: int


class BankSet:
    """Every grid's slot tables; experts enter and leave all of their tables together."""

    def __init__(self, default: Callable[[str, torch.Tensor], torch.Tensor], capacity: int = 0) -> None:
        # default(name, like) -> what a slot without that tensor holds, shaped like `like`: a norm's base weight, else 0
        self.default = default
        self.reserve = capacity
        self.grids: dict[Grid, GridBanks] = {}
        self.where: dict[str, tuple[Grid, int]] = {}  # expert key -> (grid, slot)
        self.fused: dict[tuple[str, ...], tuple[int, ...]] = {}  # projections banked together -> output widths

    def fuse(self, names: tuple[str, ...], widths: tuple[int, ...]) -> None:
        """Bank the deltas of sibling projections (one input; outputs ``widths`` wide, concatenated in this
        order) together from now on, in every grid: one kernel launch then serves all of them."""
        names, widths = tuple(names), tuple(widths)
        if self.fused.get(names) == widths:
            return  # a second decoder on the same model
        if not 2 <= len(names) == len(widths) <= MAX_PARTS or any(self._group_of(n) for n in names):
            raise ValueError(f"cannot fuse {names} ({widths} wide): 2 to {MAX_PARTS} projections, each in one group")
        self.fused[names] = widths
        for gb in self.grids.values():
            self._join(gb)

    def _group_of(self, name: str) -> tuple[str, ...] | None:
        """The fused projections ``name`` is banked with, if any."""
        return next((names for names in self.fused if name in names), None)

    def add(self, key: str, tables: ExpertTables) -> int:
        """Place one expert (all its quantized tensors on one grid) in a slot; return the bytes it holds."""
        grids = {Grid.of(cd) for cd in (*tables.banked.values(), *tables.lookups.values())}
        if len(grids) != 1:
            raise ValueError(f"expert {key} mixes quantization grids {sorted(map(str, grids))}; bank it per grid")
        grid = grids.pop()
        device = next(iter((*tables.banked.values(), *tables.lookups.values()))).packed.device
        gb = self.grids.setdefault(grid, GridBanks())
        slot = next((i for i, k in enumerate(gb.slots) if k is None), None)
        if slot is None:
            slot = gb.capacity
            self._grow(gb, max(slot + 1, self.reserve), device)
        added = 0
        for store, deltas, layout in ((gb.banks, tables.banked, None), (gb.lookups, tables.lookups, LAYOUT_V1)):
            for name, cd in deltas.items():
                one = DeltaBank.from_compressed([cd], layout_version=layout, device=cd.packed.device)
                added += bank_nbytes(one)
                bank = store.get(name)
                group = self._group_of(name)
                if bank is None:  # the first expert with this tensor: the other slots hold no delta
                    store[name] = _zeros(one.grid, gb.capacity, one.kmax, one)
                    gb.version += 1
                elif bank.kmax < one.kmax and group in gb.groups:  # every projection of the group widens
                    gb.set_group(group, _resized(gb.groups[group], gb.capacity, one.kmax))
                    gb.version += 1
                elif bank.kmax < one.kmax:
                    store[name] = _resized(bank, gb.capacity, one.kmax)
                    gb.version += 1
                _put(store[name], slot, one)
        for name, value in tables.dense.items():
            table = gb.dense.get(name)
            if table is not None and table.shape[1:] != value.shape:  # added rows of another count
                width = max(table.shape[1], value.shape[0])
                grown = torch.zeros((gb.capacity, width, *table.shape[2:]), dtype=table.dtype, device=table.device)
                grown[:, : table.shape[1]] = table
                table, gb.version = grown, gb.version + 1
            if table is None:
                table = self.default(name, value).expand(gb.capacity, *value.shape).clone()
                gb.version += 1
            table[slot].copy_(self.default(name, table[slot]))
            table[slot, : value.shape[0]] = value
            gb.dense[name] = table
            added += value.numel() * value.element_size()
        for name, table in gb.dense.items():  # tensors this expert leaves as the base has them
            if name not in tables.dense:
                table[slot].copy_(self.default(name, table[slot]))
        for store in (gb.banks, gb.lookups):
            for name, bank in store.items():
                if name not in tables.banked and name not in tables.lookups:
                    _put(bank, slot, _zero_one(bank))
        gb.vocab[slot] = tables.vocab
        gb.slots[slot] = key
        self.where[key] = (grid, slot)
        self._join(gb)
        return added

    def _join(self, gb: GridBanks) -> None:
        """Bank each fused group together where a projection of it has a bank and the group none yet (a
        projection without one holds no delta: zeros); the projections' own banks are then dropped."""
        for names, widths in self.fused.items():
            have = [gb.banks.get(n) for n in names]
            if names in gb.groups or not any(have):
                continue
            like = next(b for b in have if b is not None)
            kmax = max(b.kmax for b in have if b is not None)
            parts = [
                _zeros(replace(like.grid, shape=(w, like.grid.shape[1])), gb.capacity, kmax, like)
                if b is None else _resized(b, gb.capacity, kmax)
                for b, w in zip(have, widths, strict=True)
            ]  # fmt: skip
            gb.set_group(names, DeltaBank.concat(parts))
            gb.version += 1

    def _grow(self, gb: GridBanks, slots: int, device: torch.device) -> None:
        gb.slots.extend([None] * (slots - gb.capacity))
        views = gb.grouped()
        for store in (gb.banks, gb.lookups):
            for name, bank in store.items():
                if name not in views:
                    store[name] = _resized(bank, slots, bank.kmax)
        for names, bank in list(gb.groups.items()):
            gb.set_group(names, _resized(bank, slots, bank.kmax))
        for name, table in gb.dense.items():
            grown = torch.zeros((slots, *table.shape[1:]), dtype=table.dtype, device=table.device)
            grown[: table.shape[0]] = table
            gb.dense[name] = grown
        vocab = torch.zeros(slots, dtype=torch.int64, device=device)
        if gb.vocab is not None:
            vocab[: gb.vocab.shape[0]] = gb.vocab
        gb.vocab = vocab
        gb.version += 1

    def remove(self, key: str) -> None:
        """Free the expert's slot (its rows stay until a new expert overwrites them)."""
        where = self.where.pop(key, None)
        if where is not None:
            grid, slot = where
            self.grids[grid].slots[slot] = None

    def index(self, key: str) -> tuple[Grid, int] | None:
        return self.where.get(key)

    def max_vocab(self, base_vocab: int) -> int:
        """The widest vocabulary among resident experts (never below the base's)."""
        widths = [int(gb.vocab[i]) for gb in self.grids.values() for i, k in enumerate(gb.slots) if k is not None]
        return max([base_vocab, *widths])


def _zero_one(bank: DeltaBank) -> DeltaBank:
    """A one-expert bank of zero delta (codes, steps and corrections 0) in ``bank``'s shape and grid."""
    return _zeros(bank.grid, 1, bank.kmax, bank)


def _zeros(grid: BankGrid, experts: int, kmax: int, like: DeltaBank) -> DeltaBank:
    """A bank of zero delta on ``grid``, with offsets where ``like`` has them, on its device."""
    n, dev = grid.shape[0], like.device
    steps = lambda: torch.zeros(experts, n, grid.groups, dtype=torch.float16, device=dev)
    return DeltaBank(
        grid,
        torch.zeros(grid.packed_shape(experts), dtype=torch.int32, device=dev),
        steps(),
        None if like.offset is None else steps(),
        torch.zeros(experts, kmax, dtype=torch.int32, device=dev),
        torch.zeros(experts, n, kmax, dtype=torch.float16, device=dev),
    )
