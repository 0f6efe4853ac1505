"""The base model's modules made mixed-expert: each row of a batch gets its own expert's delta.

Every patched module computes the base output once for the whole batch and then adds, for each
group of rows that share an expert, that expert's delta: ``y = x·W_bᵀ + x_e·Δ̂_eᵀ`` for linears,
a per-row lookup for the embedding, a mixed linear with extra-vocabulary columns for the LM head,
and per-row weights for RMS norms. Which rows belong to which expert is set on the shared
:class:`BatchExperts` for the duration of one forward, so the stock transformers model code (its
attention, rotary embeddings, masks and KV cache) runs unchanged.

Only torch is needed here: the GPU benchmark imports this without fastapi or mlflow.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from meswitch.checkpoints import ArchSpec

# Norm classes whose forward MixedRMSNorm reproduces exactly (fp32 variance, cast, then weight *).
RMS_NORMS = ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm")
EXTRA = "#extra_rows"  # payload key suffix: an LM head's added rows, kept dense beside a banked delta


@dataclass
class RowGroup:
    """Rows ``rows`` (a slice when contiguous, else an index tensor) served by one expert's payload."""

    payload: Mapping[str, torch.Tensor]
    rows: slice | torch.Tensor
    vocab: int  # the expert's vocabulary size (base rows plus its extra rows)
    full: bool = False  # the group is the whole batch


@dataclass
class BatchExperts:
    """The experts of the rows in the current forward; shared by every mixed module of one model.

    ``groups`` drive the dense path (one matmul per expert group). The packed path reads the
    :class:`~meswitch.serving.banked.BankSet`'s slot tables through ``slots``: per grid, each row's
    slot as a device tensor (-1: the row's expert is not in that grid, or it has none). Eagerly,
    :meth:`set` also groups the rows on the host for the kernel's tightest launch; a captured decode
    step sets device-built ``tiles`` instead (:meth:`set_slots`), so nothing is read on the host.
    """

    groups: list[RowGroup] = field(default_factory=list)
    batch: int = 0
    base_vocab: int = 0
    banks: Any = None  # meswitch.serving.banked.BankSet when the packed payload is used
    slots: dict = field(default_factory=dict)  # Grid -> int64 [B] on the device
    tiles: dict = field(default_factory=dict)  # Grid -> device tile table (graph mode)
    width: int = 0  # logits width in graph mode (fixed by the capture); 0: the rows' widest vocabulary
    side: Any = None  # a CUDA stream: banked deltas run there beside the base GEMM (DecoderConfig.overlap_deltas)
    scratch: Any = None  # a zeroed flat buffer a decode step's delta outputs are cut from: one memset a step
    _cut: int = 0
    _host: dict = field(default_factory=dict)  # Grid -> per-row slot list (eager)
    _rows: dict = field(default_factory=dict)  # (Grid, tokens) -> ExpertRows (eager)

    def set(self, groups: list[RowGroup], batch: int, row_banks: list | None = None, device=None) -> None:
        """Eager forward: ``row_banks`` per row (grid, slot) or None, read on the host once."""
        self.clear()
        self.groups, self.batch = groups, batch
        for grid in {rb[0] for rb in row_banks or [] if rb is not None}:
            ids = [rb[1] if rb is not None and rb[0] == grid else -1 for rb in row_banks]
            self._host[grid] = ids
            self.slots[grid] = torch.tensor(ids, dtype=torch.int64, device=device)

    def set_slots(self, slots: dict, tiles: dict, width: int, side=None, scratch=None) -> None:
        """Graph mode: per grid, each row's slot and the tile table built from it, both on the device; ``side``: a
        CUDA stream for the deltas beside the base GEMMs (:meth:`linear`); ``scratch``: a zeroed flat buffer their
        outputs are cut from."""
        self.clear()
        self.batch = next(iter(slots.values())).shape[0] if slots else 0
        self.slots, self.tiles, self.width, self.side, self.scratch = slots, tiles, width, side, scratch

    def clear(self) -> None:
        self.groups, self.batch, self.slots, self.tiles, self.width, self._host, self._rows = [], 0, {}, {}, 0, {}, {}
        self.side, self.scratch, self._cut = None, None, 0

    def linear(
        self,
        name: str | tuple[str, ...],
        x: torch.Tensor,
        weight: torch.Tensor,
        bias,
        apart: bool = False,
        sums: Mapping | None = None,
    ):
        """``F.linear(x, weight, bias)`` plus the banked deltas of ``name`` (:meth:`banked`, with x's row ``sums``).
        With a ``side`` stream the delta kernel runs there into a zeroed buffer while the GEMM runs here: the delta
        kernel is bound by instruction issue and leaves most of the memory bandwidth to a GEMM beside it.
        ``apart``: return ``(y, deltas)`` with the deltas not added (None when there are none), for the caller to
        add inside a kernel it runs anyway (the residual add, SwiGLU); else ``y`` with them."""
        if not self.slots or (self.side is None and not apart):
            merged = None if apart else self._merged(name, x, weight, bias)
            if merged is not None:
                return merged
            y = F.linear(x, weight, bias)
            self.banked(name, x, y, sums)
            return (y, None) if apart else y
        deltas = self._zeros((*x.shape[:-1], weight.shape[0]), x)
        if self.side is None:
            self.banked(name, x, deltas, sums)
            y = F.linear(x, weight, bias)
        else:
            main = torch.cuda.current_stream(x.device)
            self.side.wait_stream(main)
            with torch.cuda.stream(self.side):
                self.banked(name, x, deltas, sums)
            y = F.linear(x, weight, bias)
            main.wait_stream(self.side)
        return (y, deltas) if apart else y.add_(deltas)

    def _zeros(self, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """Zeros of ``shape``: the next piece of ``scratch`` while it lasts, else a new tensor."""
        n = math.prod(shape)
        if self.scratch is None or self._cut + n > self.scratch.numel():
            return torch.zeros(shape, dtype=like.dtype, device=like.device)
        self._cut += n
        return self.scratch[self._cut - n : self._cut].view(shape)

    def banked(self, name: str | tuple[str, ...], x: torch.Tensor, y: torch.Tensor, sums: Mapping | None = None):
        """``y += x·Δ̂ᵀ`` in place for every row whose expert is banked (``x`` [B, T, K], ``y`` [B, T, N]);
        ``name`` a tensor, or fused projections (:meth:`~meswitch.serving.banked.BankSet.fuse`) whose outputs
        ``y`` concatenates: one launch adds all their deltas. ``sums``: per grid, x's row sums as
        :meth:`sums_plans` planned them (graph mode)."""
        if not self.slots:
            return
        from meswitch.kernels import mixed_delta
        from meswitch.kernels.ops import mixed_delta_tiles
        from meswitch.kernels.row_sums import launch_args

        tokens = x.shape[1] if x.dim() == 3 else 1
        x2, y2 = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for grid in self.slots:
            bank = self.banks.grids[grid].bank(name)
            if bank is None:
                continue
            if grid in self.tiles:
                given = launch_args((sums or {}).get(grid), x2.shape[0])  # from the glue, read per row
                mixed_delta_tiles(x2, bank, self.tiles[grid], y2, **given)
                continue
            mixed_delta(x2, bank, self._expert_rows(grid, tokens), y2)

    def _expert_rows(self, grid, tokens: int):
        """Eager: the batch's rows on ``grid``'s experts, each batch row's ``tokens`` rows in a row (cached)."""
        from meswitch.kernels import ExpertRows

        rows = self._rows.get((grid, tokens))
        if rows is None:
            ids = torch.tensor(self._host[grid]).repeat_interleave(tokens)
            rows = self._rows[(grid, tokens)] = ExpertRows.from_ids(ids)
        return rows

    def _merged(self, name: str | tuple[str, ...], x: torch.Tensor, weight: torch.Tensor, bias):
        """Eager, every row on one grid's experts: the linear as one product ``x · (W + Δ̂)ᵀ`` where
        :func:`~meswitch.kernels.launch_config.merges_prefill` holds (a prefill's long prompts on an sm_90 GPU);
        None elsewhere."""
        if self.tiles or len(self.slots) != 1:
            return None
        from meswitch.kernels.ops import merged_product

        grid = next(iter(self.slots))
        bank = self.banks.grids[grid].bank(name)
        if bank is None:
            return None
        rows = self._expert_rows(grid, x.shape[1] if x.dim() == 3 else 1)
        y = merged_product(x.reshape(-1, x.shape[-1]), weight, bias, bank, rows)
        return None if y is None else y.view(*x.shape[:-1], -1)

    def sums_plans(self, name: str | tuple[str, ...], x: torch.Tensor) -> dict:
        """Graph mode where the Triton kernel runs: per grid of the step, the row sums of ``x`` [..., K] its launch
        for ``name`` takes from the kernel that makes x (:func:`~meswitch.kernels.launch_config.sums_plan`); empty
        elsewhere (the reference needs none)."""
        from meswitch.kernels.launch_config import sums_plan
        from meswitch.kernels.ops import launch_tiles, triton_available

        if not (self.tiles and triton_available()):
            return {}
        rows, plans = x.numel() // x.shape[-1], {}
        for grid, tiles in self.tiles.items():
            bank = self.banks.grids[grid].bank(name)
            if bank is None:
                continue
            plan = sums_plan(bank, tiles.shape[1] - 2, launch_tiles(rows, bank), x.device, x.dtype)
            if plan is not None:
                plans[grid] = plan
        return plans

    def tables(self, name: str, kind: str = "dense"):
        """(row slots [B], the grid's table of ``name``, its vocabulary per slot) for each grid in the
        batch that has one; ``kind`` "dense" (norms, biases, added rows) or "lookups" (embedding banks)."""
        for grid, s in self.slots.items():
            gb = self.banks.grids[grid]
            table = getattr(gb, kind).get(name)
            if table is not None:
                yield s, table, gb.vocab

    @property
    def vocab(self) -> int:
        """Width of the logits: the largest vocabulary among the rows (never below the base's)."""
        return self.width or max([self.base_vocab, *(g.vocab for g in self.groups)])


def _rows_of(s: torch.Tensor, table: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's entry of a slot table, shaped to broadcast against ``like`` ``[B, ..., D]``, and
    whether the row has one (slot >= 0), shaped ``[B, 1, ..., 1]``."""
    shape = (s.shape[0], *([1] * (like.dim() - 2)), -1)
    return table[s.clamp(min=0)].view(shape), (s >= 0).view((*shape[:-1], 1))


def row_groups(row_keys: Sequence[object], payloads: Mapping[object, Mapping[str, torch.Tensor]], vocabs, device):
    """Group batch rows by expert key (``None``: the base model, no delta)."""
    where: dict[object, list[int]] = {}
    for i, key in enumerate(row_keys):
        if key is not None:
            where.setdefault(key, []).append(i)
    groups = []
    for key, rows in where.items():
        contiguous = rows == list(range(rows[0], rows[0] + len(rows)))
        sel = slice(rows[0], rows[-1] + 1) if contiguous else torch.tensor(rows, device=device)
        groups.append(RowGroup(payloads[key], sel, vocabs[key], full=len(rows) == len(row_keys)))
    return groups


def _add_rows(y: torch.Tensor, rows, value: torch.Tensor) -> None:
    if isinstance(rows, slice):
        y[rows] += value
    else:
        y.index_add_(0, rows, value)


def _take(x: torch.Tensor, rows) -> torch.Tensor:
    return x[rows] if isinstance(rows, slice) else x.index_select(0, rows)


class MixedLinear(nn.Module):
    """``y = base(x) + x_e·Δ̂_eᵀ (+ δb_e)`` per group of rows; the payload holds Δ̂ in the compute dtype."""

    def __init__(self, base: nn.Linear, weight_name: str, bias_name: str | None, ctx: BatchExperts):
        super().__init__()
        self.base = base
        self.weight_name, self.bias_name = weight_name, bias_name
        self.ctx = ctx
        self.fused: FusedLinears | None = None  # set when its base weight became a block of a fused GEMM

    @property
    def weight(self) -> torch.Tensor:  # transformers reads .weight.dtype/.device in places
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_delta(x, self.ctx.linear(self.weight_name, x, self.base.weight, self.base.bias), banked=False)

    def apart(self, x: torch.Tensor, sums: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``forward`` with the banked deltas returned beside the output, not added (:meth:`BatchExperts.linear`)."""
        y, deltas = self.ctx.linear(self.weight_name, x, self.base.weight, self.base.bias, apart=True, sums=sums)
        return self.add_delta(x, y, banked=False), deltas

    def add_delta(self, x: torch.Tensor, y: torch.Tensor, banked: bool = True) -> torch.Tensor:
        """``y`` (the base's output for ``x``, possibly a block of a fused output) plus each row's delta:
        the banked kernels add in place (unless ``banked`` is False: a grouped launch added them), the dense
        path into a new tensor; returns the result."""
        if banked:
            self.ctx.banked(self.weight_name, x, y)
        if self.bias_name:
            for s, table, _ in self.ctx.tables(self.bias_name):  # bias deltas [slots, N]
                rows, has = _rows_of(s, table, y)
                y = y + rows * has
        for g in self.ctx.groups:
            d = g.payload.get(self.weight_name)
            b = g.payload.get(self.bias_name) if self.bias_name else None
            if d is None and b is None:
                continue
            if g.full:
                if d is not None:
                    y = y + F.linear(x, d)
                if b is not None:
                    y = y + b
                continue
            part = F.linear(_take(x, g.rows), d) if d is not None else torch.zeros_like(_take(y, g.rows))
            if b is not None:
                part = part + b
            _add_rows(y, g.rows, part)
        return y


class FusedLinears:
    """Sibling projections of one input (q/k/v, gate/up) as one base GEMM and one delta launch.

    Their base weights become row blocks of one matrix (views: nothing is kept twice), so a decode step
    reads them in one launch rather than a small, poorly parallel one each (a 1024-wide k or v at batch
    32). Their banked deltas are likewise held together (:meth:`~meswitch.serving.banked.BankSet.fuse`), so
    one kernel launch adds every projection's deltas on the whole output and gives the narrow ones the
    whole GPU; the dense payload, biases and per-projection launches (``grouped=False``) work per block.
    """

    @classmethod
    def of(cls, linears: list[MixedLinear]) -> FusedLinears:
        """The fusion of ``linears``, made once (a second decoder on the same model shares it)."""
        have = linears[0].fused
        return have if have is not None and have.linears == linears else cls(linears)

    def __init__(self, linears: list[MixedLinear]):
        bases = [m.base for m in linears]
        first = bases[0].weight
        if any(b.in_features != bases[0].in_features or b.weight.dtype != first.dtype for b in bases):
            raise ValueError("fused projections need one input width and one dtype")
        if len({b.bias is None for b in bases}) != 1:
            raise ValueError("fused projections need a bias on all of them or on none")
        self.linears, self.sizes = linears, [b.out_features for b in bases]
        self.names, self.ctx = tuple(m.weight_name for m in linears), linears[0].ctx
        self.weight = torch.cat([b.weight.detach() for b in bases])
        self.bias = None if bases[0].bias is None else torch.cat([b.bias.detach() for b in bases])
        blocks = self.weight.split(self.sizes)
        bias_blocks = self.bias.split(self.sizes) if self.bias is not None else [None] * len(bases)
        for m, w, bias in zip(linears, blocks, bias_blocks, strict=True):  # each module works on its block
            m.base.weight = nn.Parameter(w, requires_grad=False)  # (the eager, transformers path)
            if bias is not None:
                m.base.bias = nn.Parameter(bias, requires_grad=False)
            m.fused = self
        if self.ctx.banks is not None:
            self.ctx.banks.fuse(self.names, tuple(self.sizes))

    def __call__(self, x: torch.Tensor, grouped: bool = True) -> list[torch.Tensor]:
        """Each projection's output: one GEMM, the banked deltas in one launch (``grouped``) or one each."""
        y = self.ctx.linear(self.names, x, self.weight, self.bias) if grouped else F.linear(x, self.weight, self.bias)
        parts = y.split(self.sizes, -1)
        return [m.add_delta(x, part, banked=not grouped) for m, part in zip(self.linears, parts, strict=True)]

    def apart(
        self, x: torch.Tensor, sums: Mapping | None = None
    ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Each projection's output and, apart, its banked deltas (grouped: one launch; None when there are none)."""
        y, deltas = self.ctx.linear(self.names, x, self.weight, self.bias, apart=True, sums=sums)
        parts = [m.add_delta(x, p, banked=False) for m, p in zip(self.linears, y.split(self.sizes, -1), strict=True)]
        return parts, list(deltas.split(self.sizes, -1)) if deltas is not None else [None] * len(parts)


class MixedEmbedding(nn.Module):
    """Per-row lookup: base row plus the expert's delta row; ids past the base vocabulary take the expert's row."""

    def __init__(self, base: nn.Embedding, name: str, ctx: BatchExperts):
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.base_vocab = base.num_embeddings

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        inside = ids < self.base_vocab
        y = self.base(ids.clamp(max=self.base_vocab - 1))
        if self.ctx.vocab > self.base_vocab:  # an expert with added tokens is in play: no host read of the ids
            y = y * inside.unsqueeze(-1).to(y.dtype)
        for s, bank, _ in self.ctx.tables(self.name, "lookups"):  # packed deltas: dequantize the looked-up rows only
            rows = s.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
            take = (rows >= 0) & inside
            part = bank.lookup(rows.clamp(min=0).reshape(-1), ids.clamp(max=self.base_vocab - 1).reshape(-1))
            y = y + (part.view(*ids.shape, -1) * take.unsqueeze(-1)).to(y.dtype)
        for s, extra, _ in self.ctx.tables(self.name + EXTRA):  # added rows [slots, X, H], whole
            rows = s.view(-1, *([1] * (ids.dim() - 1))).expand_as(ids)
            at = (ids - self.base_vocab).clamp(min=0, max=extra.shape[1] - 1)
            y = torch.where(((rows >= 0) & ~inside).unsqueeze(-1), extra[rows.clamp(min=0), at], y)
        for g in self.ctx.groups:
            table = g.payload.get(self.name)  # [base_vocab + extra, H]: Δ̂ rows, then the added rows whole
            if table is None:
                continue
            rows = _take(ids, g.rows)
            part = F.embedding(rows, table) if isinstance(table, torch.Tensor) else table.lookup(rows)
            if g.full:
                y = y + part
            else:
                _add_rows(y, g.rows, part)
        return y


class MixedLMHead(nn.Module):
    """Logits over the widest vocabulary in the batch; columns an expert lacks are -inf for its rows."""

    def __init__(self, base: nn.Linear, name: str, ctx: BatchExperts):
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.base_vocab = base.out_features

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        y = self.base(h)
        self.ctx.banked(self.name, h, y)
        width = self.ctx.vocab
        if width > self.base_vocab:
            pad = torch.full((*y.shape[:-1], width - self.base_vocab), float("-inf"), dtype=y.dtype, device=y.device)
            for s, extra, vocab in self.ctx.tables(self.name + EXTRA):  # added rows [slots, X, H]
                n = min(extra.shape[1], pad.shape[-1])
                slot = s.clamp(min=0)
                cols = torch.einsum("b...h,bxh->b...x", h, extra[slot, :n])
                # a row's own added columns only: its slot's vocabulary, and none for rows of other grids
                own = (self.base_vocab + torch.arange(n, device=y.device) < vocab[slot][:, None]) & (s >= 0)[:, None]
                own = own.view(own.shape[0], *([1] * (y.dim() - 2)), n)
                pad[..., :n] = torch.where(own, cols.to(y.dtype), pad[..., :n])
            y = torch.cat([y, pad], dim=-1)
        for g in self.ctx.groups:
            table = g.payload.get(self.name)  # [base_vocab + extra, H]
            if table is None:
                extra = g.payload.get(self.name + EXTRA)  # banked experts: only their added rows are dense
                if extra is not None:
                    n = self.base_vocab + extra.shape[0]
                    cols = F.linear(_take(h, g.rows), extra)
                    if isinstance(g.rows, slice):
                        y[g.rows, ..., self.base_vocab : n] = cols
                    else:
                        cur = y.index_select(0, g.rows)
                        cur[..., self.base_vocab : n] = cols
                        y.index_copy_(0, g.rows, cur)
                continue
            n = table.shape[0]
            part = F.linear(_take(h, g.rows), table)
            if isinstance(g.rows, slice):
                if n > self.base_vocab:
                    y[g.rows, ..., self.base_vocab : n] = 0
                y[g.rows, ..., :n] += part
            else:
                if n > self.base_vocab:
                    y[g.rows, ..., self.base_vocab : n] = 0
                cur = y.index_select(0, g.rows)
                cur[..., :n] += part
                y.index_copy_(0, g.rows, cur)
        return y


def rms_rows(x: torch.Tensor, eps: float, weight: torch.Tensor, tables: list) -> torch.Tensor:
    """HF's RMS norm (fp32, rounded, times the weight) with each row's weight from its grid's slot table
    (``tables``: (row slots, table) pairs), else ``weight``: the packed path, eager or captured."""
    h = x.float()
    h = (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    w = weight
    for s, table in tables:
        rows, has = _rows_of(s, table, h)
        w = torch.where(has, rows, w)
    return w * h


class MixedRMSNorm(nn.Module):
    """RMS norm with a per-row weight: the base weight, or the expert's full weight (base + δ)."""

    def __init__(self, base: nn.Module, name: str, ctx: BatchExperts):
        super().__init__()
        self.base = base
        self.name = name
        self.ctx = ctx
        self.eps = base.variance_epsilon

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tables = [(s, table) for s, table, _ in self.ctx.tables(self.name)]  # the experts' full weights [slots, H]
        if tables:
            return rms_rows(x, self.eps, self.base.weight, tables)
        dtype = x.dtype
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        h = h.to(dtype)
        groups = [g for g in self.ctx.groups if self.name in g.payload]
        if not groups:
            return self.base.weight * h
        if len(groups) == 1 and groups[0].full:
            return groups[0].payload[self.name] * h
        w = self.base.weight.expand(x.shape[0], -1).clone()
        for g in groups:
            if isinstance(g.rows, slice):
                w[g.rows] = g.payload[self.name]
            else:
                w.index_copy_(0, g.rows, g.payload[self.name].expand(len(g.rows), -1))
        return w.view(x.shape[0], *([1] * (x.dim() - 2)), -1) * h


@dataclass
class Patched:
    """What patching found: tensor name -> role, so an expert's manifest can be checked against it."""

    roles: dict[str, str]  # "linear" | "bias" | "embed" | "lm_head" | "norm"
    base_vocab: int
    lm_head: str
    embed: str
    tied: bool


def patch_model(model: nn.Module, spec: ArchSpec, ctx: BatchExperts) -> Patched:
    """Replace the modules of ``model`` whose tensors experts may change by their mixed versions, in place."""
    roles: dict[str, str] = {}
    decoder_linears = set(spec.linears)
    embed_module = spec.embed.removesuffix(".weight")
    head_module = spec.lm_head.removesuffix(".weight")
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    replacements: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if name == embed_module and isinstance(module, nn.Embedding):
            replacements.append((name, MixedEmbedding(module, spec.embed, ctx)))
            roles[spec.embed] = "embed"
        elif name == head_module and isinstance(module, nn.Linear):
            replacements.append((name, MixedLMHead(module, spec.lm_head, ctx)))
            roles[spec.lm_head] = "lm_head"
        elif isinstance(module, nn.Linear) and name.startswith(spec.layers + "."):
            rel = name[len(spec.layers) + 1 :].partition(".")[2]
            if rel in decoder_linears:
                bias = f"{name}.bias" if module.bias is not None else None
                replacements.append((name, MixedLinear(module, f"{name}.weight", bias, ctx)))
                roles[f"{name}.weight"] = "linear"
                if bias:
                    roles[bias] = "bias"
        elif type(module).__name__ in RMS_NORMS:
            replacements.append((name, MixedRMSNorm(module, f"{name}.weight", ctx)))
            roles[f"{name}.weight"] = "norm"
    for name, new in replacements:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    base_vocab = model.get_input_embeddings().base_vocab
    ctx.base_vocab = base_vocab
    return Patched(roles=roles, base_vocab=base_vocab, lm_head=spec.lm_head, embed=spec.embed, tied=tied)
