"""The inputs of the mixed-expert delta op: a bank of experts' compressed deltas for one linear,
and which expert each row of a batch uses.

A :class:`DeltaBank` stacks E experts' :class:`~meswitch.compression.delta.CompressedDelta` of one
linear on one :class:`BankGrid` (shape, bits, group size, symmetry, layout), so one kernel launch
serves them all. Sibling projections of one input (q/k/v, gate/up) can share one bank over their
concatenated outputs (:meth:`DeltaBank.concat`), so one launch serves all of them too. An
:class:`ExpertRows` groups the rows of a batch by expert (the segments of Punica's SGMV); build it
once per batch and reuse it for every linear of the forward pass.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import torch

from meswitch.compression.delta import CompressedDelta
from meswitch.compression.quantize import (
    PER_TENSOR,
    QuantSpec,
    add_salient,
    dequantize,
    pack,
    unpack,
    values_per_word,
)
from meswitch.kernels.layout import (
    LAYOUT_V1,
    LAYOUT_V2,
    pack_v2,
    repack_v1_to_v2,
    unpack_codes,
    v2_num_chunks,
    v2_supported,
)

MAX_PARTS = 3  # projections one grouped bank holds (q/k/v): the kernel tells a block's from two boundaries


@dataclass(frozen=True)
class BankGrid:
    """What every expert of a bank shares: the linear's shape ``[N=out, K=in]``, the quantization
    grid and the packed layout."""

    shape: tuple[int, int]
    bits: int
    group_size: int  # 0: per output channel; > 0: groups of this many input channels
    symmetric: bool
    layout_version: int

    def __post_init__(self) -> None:
        k = self.shape[1]
        if self.layout_version not in (LAYOUT_V1, LAYOUT_V2):
            raise ValueError(f"unknown layout_version {self.layout_version}")
        if self.group_size and k % self.group_size:
            raise ValueError(f"K={k} is not a multiple of group_size {self.group_size}")

    @property
    def groups(self) -> int:
        """Step sizes per row: 1 per channel, else K / group_size."""
        return 1 if self.group_size == 0 else self.shape[1] // self.group_size

    def packed_shape(self, num_experts: int) -> tuple[int, ...]:
        n, k = self.shape
        if self.layout_version == LAYOUT_V2:
            return (num_experts, v2_num_chunks(self.bits, k), n, 16)
        return (num_experts, n, -(-k // values_per_word(self.bits)))


@dataclass
class DeltaBank:
    """E experts' compressed deltas for one linear, stacked, on one :class:`BankGrid`.

    ``packed``: layout 1 ``int32 [E, N, W]`` or layout 2 ``int32 [E, chunks, N, 16]``;
    ``scale`` fp16 ``[E, N, G]`` (G = 1 per channel, else K / group_size); ``offset`` fp16
    ``[E, N, G]`` or None for a symmetric grid (offset = -scale * (2**bits - 1) / 2);
    ``salient_idx`` int32 ``[E, kmax]`` and ``salient_val`` fp16 ``[E, N, kmax]``, padded with
    index 0 and value 0 for experts with fewer salient columns.

    A grouped bank (:meth:`concat`) holds P sibling projections along N, ``splits`` their output
    widths; the salient input columns differ per matrix, so ``salient_idx`` is ``[E, P, kmax]``.
    Every tensor has experts first (slots are written and grown alike), and may be a view whose
    expert (and layout-2 chunk) strides are wider than its shape: :meth:`part` is one.
    """

    grid: BankGrid
    packed: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None
    salient_idx: torch.Tensor
    salient_val: torch.Tensor
    splits: tuple[int, ...] = ()  # grouped: each projection's output width (they sum to N)

    def __post_init__(self) -> None:
        grid = self.grid
        n = grid.shape[0]
        e = self.packed.shape[0]
        want = grid.packed_shape(e)
        if tuple(self.packed.shape) != want or self.packed.dtype != torch.int32:
            raise ValueError(
                f"packed must be int32 {want} for layout {grid.layout_version}, "
                f"got {self.packed.dtype} {tuple(self.packed.shape)}"
            )
        for name, t in (("scale", self.scale), ("offset", self.offset)):
            if t is not None and (tuple(t.shape) != (e, n, grid.groups) or t.dtype != torch.float16):
                raise ValueError(f"{name} must be fp16 {(e, n, grid.groups)}, got {t.dtype} {tuple(t.shape)}")
        if self.offset is None and not grid.symmetric:
            raise ValueError("an asymmetric bank needs offsets")
        if self.splits and (not 2 <= len(self.splits) <= MAX_PARTS or sum(self.splits) != n):
            raise ValueError(f"a grouped bank holds 2 to {MAX_PARTS} projections summing to N={n}, got {self.splits}")
        lead = (e, len(self.splits)) if self.splits else (e,)
        kmax = self.salient_idx.shape[-1]
        if self.salient_idx.dtype != torch.int32 or tuple(self.salient_idx.shape) != (*lead, kmax):
            want = "[E, P, kmax]" if self.splits else "[E, kmax]"
            raise ValueError(f"salient_idx must be int32 {want} with E={e}, got {tuple(self.salient_idx.shape)}")
        if self.salient_val.dtype != torch.float16 or tuple(self.salient_val.shape) != (e, n, kmax):
            raise ValueError(f"salient_val must be fp16 {(e, n, kmax)}, got {tuple(self.salient_val.shape)}")

    @property
    def num_experts(self) -> int:
        return self.packed.shape[0]

    @property
    def kmax(self) -> int:
        return self.salient_idx.shape[-1]

    @property
    def bounds(self) -> tuple[int, ...]:
        """Where each projection's outputs start along N, then N: ``(0, N)`` for one linear."""
        return tuple(itertools.accumulate(self.splits or (self.grid.shape[0],), initial=0))

    @property
    def n_axis(self) -> int:
        """The packed codes' output-channel axis (after experts; layout 2 has K chunks first)."""
        return 2 if self.grid.layout_version == LAYOUT_V2 else 1

    @property
    def device(self) -> torch.device:
        return self.packed.device

    @classmethod
    def from_compressed(
        cls,
        deltas: Sequence[CompressedDelta],
        layout_version: int | None = None,
        device: torch.device | str | None = None,
    ) -> DeltaBank:
        """Stack experts' deltas of one linear; layout 2 by default where the bits allow it.

        The deltas are in layout 1 (as the artifacts store them) and are repacked here, on
        ``device`` (default: where the first delta lives).
        """
        if not deltas:
            raise ValueError("a bank needs at least one expert")
        first = deltas[0]
        spec = first.spec
        for i, d in enumerate(deltas):
            if tuple(d.shape) != tuple(first.shape):
                raise ValueError(f"expert {i} has shape {tuple(d.shape)}, expert 0 has {tuple(first.shape)}")
            if d.spec.bits != spec.bits or d.spec.symmetric != spec.symmetric:
                raise ValueError(f"expert {i} has {d.spec}, expert 0 has {spec}: a bank holds one quantization grid")
            if _groups_of(d.spec, d.shape[1]) != _groups_of(spec, first.shape[1]):
                raise ValueError(f"expert {i} has group_size {d.spec.group_size}, expert 0 has {spec.group_size}")
        n, k = first.shape
        bits = spec.bits
        group_size = 0 if spec.group_size in (0, PER_TENSOR) else spec.group_size
        if layout_version is None:
            layout_version = LAYOUT_V2 if v2_supported(bits, group_size) else LAYOUT_V1
        if layout_version == LAYOUT_V2 and not v2_supported(bits, group_size):
            raise ValueError(f"layout 2 does not hold {bits}-bit codes with group_size {group_size}")
        device = torch.device(device) if device is not None else first.packed.device
        kmax = max(int(d.salient_idx.numel()) for d in deltas)

        packed, scales, offsets, idxs, vals = [], [], [], [], []
        for d in deltas:
            p = d.packed.to(device)
            packed.append(repack_v1_to_v2(p, bits, k) if layout_version == LAYOUT_V2 else p)
            scales.append(_per_row(d.scale.to(device), n))
            if d.offset is not None:
                offsets.append(_per_row(d.offset.to(device), n))
            ks = d.salient_idx.numel()
            idx = torch.zeros(kmax, dtype=torch.int32, device=device)
            val = torch.zeros(n, kmax, dtype=torch.float16, device=device)
            idx[:ks] = d.salient_idx.to(device, torch.int32)
            val[:, :ks] = d.salient_val.to(device, torch.float16)
            idxs.append(idx)
            vals.append(val)
        return cls(
            grid=BankGrid((n, k), bits, group_size, spec.symmetric, layout_version),
            packed=torch.stack(packed),
            scale=torch.stack(scales),
            offset=torch.stack(offsets) if offsets else None,
            salient_idx=torch.stack(idxs),
            salient_val=torch.stack(vals),
        )

    @classmethod
    def concat(cls, parts: Sequence[DeltaBank]) -> DeltaBank:
        """Sibling projections' banks (one input, one grid, one slot each expert) as one grouped bank over
        their concatenated outputs, so one kernel launch adds every projection's delta."""
        first = parts[0]
        if not 2 <= len(parts) <= MAX_PARTS:
            raise ValueError(f"a grouped bank holds 2 to {MAX_PARTS} projections, got {len(parts)}")
        shared = lambda g: replace(g, shape=(1, g.shape[1]))  # all but the output width
        for i, b in enumerate(parts):
            if b.splits:
                raise ValueError(f"projection {i} is already a grouped bank")
            if shared(b.grid) != shared(first.grid):
                raise ValueError(f"projection {i} has {b.grid}, projection 0 has {first.grid}: one input, one grid")
            if b.num_experts != first.num_experts:
                raise ValueError(f"projection {i} holds {b.num_experts} experts, projection 0 {first.num_experts}")
            if (b.offset is None) != (first.offset is None):
                raise ValueError(f"projection {i} and projection 0 differ in having offsets")
        kmax = max(b.kmax for b in parts)
        pad = lambda t: torch.nn.functional.pad(t, (0, kmax - t.shape[-1]))  # index 0, value 0
        splits = tuple(b.grid.shape[0] for b in parts)
        return cls(
            grid=replace(first.grid, shape=(sum(splits), first.grid.shape[1])),
            packed=torch.cat([b.packed for b in parts], first.n_axis),
            scale=torch.cat([b.scale for b in parts], 1),
            offset=None if first.offset is None else torch.cat([b.offset for b in parts], 1),
            salient_idx=torch.stack([pad(b.salient_idx) for b in parts], 1),
            salient_val=torch.cat([pad(b.salient_val) for b in parts], 1),
            splits=splits,
        )

    def part(self, p: int) -> DeltaBank:
        """Projection ``p`` of a grouped bank as a bank of its own: views, nothing copied."""
        a, b = self.bounds[p : p + 2]
        rows = slice(a, b)
        return DeltaBank(
            grid=replace(self.grid, shape=(b - a, self.grid.shape[1])),
            packed=self.packed.narrow(self.n_axis, a, b - a),
            scale=self.scale[:, rows],
            offset=None if self.offset is None else self.offset[:, rows],
            salient_idx=self.salient_idx[:, p],
            salient_val=self.salient_val[:, rows],
        )

    @classmethod
    def random(
        cls,
        num_experts: int,
        shape: tuple[int, int],
        bits: int = 2,
        group_size: int = 0,
        salient: int = 0,
        symmetric: bool = False,
        layout_version: int | None = None,
        device: torch.device | str = "cpu",
        generator: torch.Generator | None = None,
    ) -> DeltaBank:
        """A synthetic bank (random codes, steps and corrections) for tests and benchmarks:
        the bytes and shapes of real experts, not their values."""
        n, k = shape
        if layout_version is None:
            layout_version = LAYOUT_V2 if v2_supported(bits, group_size) else LAYOUT_V1
        grid = BankGrid((n, k), bits, group_size, symmetric, layout_version)
        gen = generator
        groups = grid.groups

        def rand(*size, dtype=torch.float32):
            return torch.rand(*size, generator=gen, device=device, dtype=dtype)

        size = grid.packed_shape(num_experts)
        packed = torch.randint(-(2**31), 2**31, size, generator=gen, device=device, dtype=torch.int64)
        packed = packed.to(torch.int32)
        if layout_version == LAYOUT_V2 and k % (32 * 16 // bits):
            # codes past K must be zero in layout 2 (padding); rebuild through the codes
            codes = [unpack_codes(p, bits, k, LAYOUT_V2) for p in packed]
            packed = torch.stack([pack_v2(c, bits) for c in codes])
        scale = (rand(num_experts, n, groups) * 2e-3 + 1e-4).half()
        offset = None
        if not symmetric:
            jitter = 0.8 + 0.4 * rand(num_experts, n, groups)
            offset = (-scale.float() * ((1 << bits) - 1) / 2 * jitter).half()
        cpu_gen = torch.Generator().manual_seed(int(torch.randint(0, 2**31, (1,), generator=gen, device=device)))
        idx = torch.stack([torch.randperm(k, generator=cpu_gen)[:salient].sort().values for _ in range(num_experts)])
        val = ((rand(num_experts, n, salient) - 0.5) * 2e-2).half()
        return cls(
            grid=grid,
            packed=packed,
            scale=scale,
            offset=offset,
            salient_idx=idx.to(device=device, dtype=torch.int32).reshape(num_experts, salient),
            salient_val=val,
        )

    def to(self, device: torch.device | str) -> DeltaBank:
        return DeltaBank(
            grid=self.grid,
            packed=self.packed.to(device),
            scale=self.scale.to(device),
            offset=None if self.offset is None else self.offset.to(device),
            salient_idx=self.salient_idx.to(device),
            salient_val=self.salient_val.to(device),
            splits=self.splits,
        )

    def with_layout(self, layout_version: int) -> DeltaBank:
        """The same bank in another packed layout."""
        grid = self.grid
        if layout_version == grid.layout_version:
            return self
        codes = [unpack_codes(p, grid.bits, grid.shape[1], grid.layout_version) for p in self.packed]
        if layout_version == LAYOUT_V2:
            packed = torch.stack([pack_v2(c, grid.bits) for c in codes])
        elif layout_version == LAYOUT_V1:
            packed = torch.stack([pack(c, grid.bits) for c in codes])
        else:
            raise ValueError(f"unknown layout_version {layout_version}")
        return replace(self, grid=replace(grid, layout_version=layout_version), packed=packed)

    def dequantize(self, expert: int) -> torch.Tensor:
        """Δ̂ (fp32 [N, K]) of one expert, computed as ``CompressedDelta.dequantize`` does (a grouped bank:
        each projection's, stacked)."""
        if self.splits:
            return torch.cat([self.part(p).dequantize(expert) for p in range(len(self.splits))])
        grid = self.grid
        codes = unpack_codes(self.packed[expert], grid.bits, grid.shape[1], grid.layout_version)
        offset = None if self.offset is None else self.offset[expert]
        w = dequantize(codes, self.scale[expert], offset, grid.bits)
        return add_salient(w, self.salient_idx[expert], self.salient_val[expert])

    def lookup(self, experts: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Rows ``rows[m]`` of ``Δ̂_{experts[m]}`` as fp32 ``[M, K]`` (layout 1): an embedding delta's
        lookup, on the device and without reading ids on the host (CUDA-graph safe)."""
        grid = self.grid
        if grid.layout_version != LAYOUT_V1 or self.splits:
            raise ValueError("row lookup reads layout 1, one matrix")
        e, r = experts.long(), rows.long()
        offset = None if self.offset is None else self.offset[e, r]
        w = dequantize(unpack(self.packed[e, r], grid.bits, grid.shape[1]), self.scale[e, r], offset, grid.bits)
        return add_salient(w, self.salient_idx[e], self.salient_val[e, r])

    def nbytes_per_expert(self) -> int:
        """Bytes one expert occupies in this bank (codes, steps, salient columns)."""
        parts = [self.packed, self.scale, self.salient_idx, self.salient_val]
        if self.offset is not None:
            parts.append(self.offset)
        return sum(t.numel() * t.element_size() for t in parts) // self.num_experts


def _groups_of(spec: QuantSpec, k: int) -> int:
    return 1 if spec.group_size in (0, PER_TENSOR) else k // spec.group_size


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    """Step sizes [Ns, G] -> fp16 [N, G]; a per-tensor grid (Ns = 1) is repeated for every row."""
    t = t.to(torch.float16)
    return t.expand(n, t.shape[1]).contiguous() if t.shape[0] == 1 else t.contiguous()


@dataclass
class ExpertRows:
    """The rows of a batch grouped by expert: rows ``order[seg_starts[s]:seg_starts[s+1]]`` use
    expert ``seg_experts[s]``. Rows that take no delta (expert -1) are in no segment.

    Segment bounds and experts live on the host (a launch needs the tile count); ``order`` lives
    wherever the batch does. Tile tables for a kernel's row block are built once and cached.
    """

    num_rows: int
    order: torch.Tensor  # int32 [R]
    seg_starts: list[int]
    seg_experts: list[int]
    _tiles: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_ids(cls, expert_ids: torch.Tensor | Sequence[int]) -> ExpertRows:
        """From a per-row expert index (-1: base only). Reads the ids on the host once."""
        ids = torch.as_tensor(expert_ids)
        if ids.dim() != 1:
            raise ValueError(f"expert ids must be 1-D [M], got shape {tuple(ids.shape)}")
        if ids.dtype.is_floating_point or ids.dtype == torch.bool:
            raise ValueError(f"expert ids must be integers, got {ids.dtype}")
        device = ids.device
        host = ids.detach().to("cpu", torch.int64)
        if host.numel() and int(host.min()) < -1:
            raise ValueError(f"expert ids must be >= -1, got {int(host.min())}")
        keep = torch.nonzero(host >= 0).flatten()
        order = keep[torch.argsort(host[keep], stable=True)]
        experts_sorted = host[order]
        uniq, counts = torch.unique_consecutive(experts_sorted, return_counts=True)
        starts = [0, *torch.cumsum(counts, 0).tolist()]
        return cls(
            num_rows=host.numel(),
            order=order.to(device=device, dtype=torch.int32),
            seg_starts=starts,
            seg_experts=uniq.tolist(),
        )

    @classmethod
    def from_segments(
        cls,
        seg_starts: Sequence[int],
        seg_experts: Sequence[int],
        num_rows: int | None = None,
        device: torch.device | str | None = None,
    ) -> ExpertRows:
        """Rows already grouped: rows ``[seg_starts[s], seg_starts[s+1])`` use ``seg_experts[s]``
        (-1: base only). ``num_rows`` defaults to the last bound."""
        starts = [int(s) for s in seg_starts]
        experts = [int(e) for e in seg_experts]
        if len(starts) != len(experts) + 1:
            raise ValueError(f"need len(seg_starts) == len(seg_experts) + 1, got {len(starts)} and {len(experts)}")
        if any(b < a for a, b in itertools.pairwise(starts)) or (starts and starts[0] < 0):
            raise ValueError(f"segment bounds must be non-negative and non-decreasing, got {starts}")
        num_rows = starts[-1] if num_rows is None else int(num_rows)
        if starts[-1] > num_rows:
            raise ValueError(f"segments end at row {starts[-1]}, past num_rows={num_rows}")
        if any(e < -1 for e in experts):
            raise ValueError(f"segment experts must be >= -1, got {experts}")
        order, out_starts, out_experts = [], [0], []
        for s, e in enumerate(experts):
            if e < 0 or starts[s + 1] == starts[s]:
                continue
            order.extend(range(starts[s], starts[s + 1]))
            out_starts.append(len(order))
            out_experts.append(e)
        return cls(
            num_rows=num_rows,
            order=torch.tensor(order, dtype=torch.int32, device=device),
            seg_starts=out_starts,
            seg_experts=out_experts,
        )

    @property
    def num_segments(self) -> int:
        return len(self.seg_experts)

    @property
    def max_segment(self) -> int:
        return max((b - a for a, b in itertools.pairwise(self.seg_starts)), default=0)

    def segments(self):
        """(expert, row indices) for each segment."""
        for s, e in enumerate(self.seg_experts):
            yield e, self.order[self.seg_starts[s] : self.seg_starts[s + 1]]

    def tiles(self, block_m: int, device: torch.device) -> torch.Tensor:
        """int32 [T, 2 + block_m]: per row tile of one expert, (expert, row count, row indices
        padded with 0). Built on the host once per block size and device, then cached."""
        key = (block_m, str(device))
        if key not in self._tiles:
            order = self.order.to("cpu", torch.int64)
            out = []
            for s, e in enumerate(self.seg_experts):
                for a in range(self.seg_starts[s], self.seg_starts[s + 1], block_m):
                    rows = order[a : min(a + block_m, self.seg_starts[s + 1])].tolist()
                    out.append([e, len(rows), *rows, *[0] * (block_m - len(rows))])
            t = torch.tensor(out, dtype=torch.int32).reshape(-1, 2 + block_m)
            self._tiles[key] = t.to(device)
        return self._tiles[key]

    def merged_tables(self, block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(``order``, each sorted row's expert, tiles ``[T, 3]``: expert, first row in sorted order, rows) on
        ``device`` for the merged prefill product (:mod:`meswitch.kernels.gluon_merged`), built once and cached."""
        key = ("merged", block_m, str(device))
        if key not in self._tiles:
            spans = list(itertools.pairwise(self.seg_starts))
            experts = [e for e, (a, b) in zip(self.seg_experts, spans, strict=True) for _ in range(b - a)]
            tiles = [(e, s, min(block_m, b - s)) for e, (a, b) in zip(self.seg_experts, spans, strict=True)
                     for s in range(a, b, block_m)]  # fmt: skip
            self._tiles[key] = (
                self.order.to(device),
                torch.tensor(experts, dtype=torch.int32, device=device),
                torch.tensor(tiles, dtype=torch.int32, device=device).reshape(-1, 3),
            )
        return self._tiles[key]


def device_tiles(slots: torch.Tensor, block_m: int) -> torch.Tensor:
    """The kernel's tile table built on the device from per-row bank indices (-1: base only).

    int32 ``[M, 2 + block_m]`` as :meth:`ExpertRows.tiles`, but of fixed shape and without a host
    read, so a CUDA graph holds it and any mix of experts replays through one capture: rows are
    sorted by expert, each expert's rows cut into tiles of ``block_m``, and tiles past the last
    (at most M: every tile holds a row) have a row count of 0, which the kernel skips.
    """
    m = slots.numel()
    big = torch.iinfo(torch.int32).max
    key = torch.where(slots >= 0, slots, big).to(torch.int32)
    sorted_key, order = torch.sort(key, stable=True)
    i = torch.arange(m, device=slots.device)
    start = torch.ones(m, dtype=torch.bool, device=slots.device)
    start[1:] = sorted_key[1:] != sorted_key[:-1]
    first = torch.where(start, i, 0).cummax(0).values
    pos = i - first
    tile = torch.cumsum(start | (pos % block_m == 0), 0) - 1
    tile = torch.where(sorted_key != big, tile, m)  # base rows go to a scratch tile, dropped below
    tiles = torch.zeros(m + 1, 2 + block_m, dtype=torch.int32, device=slots.device)
    tiles[tile, 0] = sorted_key
    tiles[:, 1].index_add_(0, tile, torch.ones(m, dtype=torch.int32, device=slots.device))
    tiles[tile, 2 + pos % block_m] = order.to(torch.int32)
    return tiles[:m]
