"""Decode steps on a static KV cache, captured as CUDA graphs: the host leaves the decode step.

The engine's eager forward issues some 400 kernels per decode step of a 32-layer model from Python
and waits on the host for each (benchmarks/decode_e2e.py: over 90% of a step outside the GPU's
work). Here one step of a batch is captured once per batch-size bucket and context-length bucket
and replayed: the host copies in the new tokens, positions and row slots and launches one graph.

What changes between steps lives in device tensors the graph reads: each row's token and position,
and per quantization grid each row's expert slot (:class:`~meswitch.serving.banked.BankSet`), from
which the captured step builds the delta kernel's tile table itself
(:func:`~meswitch.kernels.bank.device_tiles`). So one graph serves any mix of resident experts,
and a new expert taking a free slot needs no recapture; only reallocated tables
(``GridBanks.version``) or a wider vocabulary do. A batch of base rows only replays a graph
without the experts' work (a key of its own: the grids in use).

The layers are the engine's patched modules (mixed linears, norms, embedding, LM head) wired as a
Llama-family decoder (Llama, Mistral, Qwen2: pre-norm, rotary, grouped-query attention, gated MLP)
around a static cache: row ``r`` of the cache is row ``r`` of the batch, so the caller keeps its
running sequences in rows ``0..B-1``. Decode attention reads the cache up to a power-of-two length
bucket with a mask on each row's position. Prefill runs eagerly (right-padded, causal) into the
rows it is given.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from meswitch.kernels.bank import device_tiles
from meswitch.kernels.decode_attention import decode_attention, decode_attention_reference, decode_mask
from meswitch.kernels.launch_config import row_block, row_blocks
from meswitch.kernels.row_sums import SumsPlan, launch_inputs, sum_weights
from meswitch.serving.engine import EngineError, MixedExpertEngine
from meswitch.serving.mixed import FusedLinears, MixedLinear, rms_rows
from meswitch.serving.tiers import ExpertSlot

log = logging.getLogger(__name__)

DECODER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


@dataclass(frozen=True)
class DecoderConfig:
    max_rows: int = 64  # sequences in the cache (and the largest batch)
    max_len: int = 2048  # positions per sequence
    buckets: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)  # batch sizes captured; a batch runs in the next one up
    min_len_bucket: int = 128  # attention reads the cache up to a power of two >= the longest row, at least this
    # Rows per tile of the delta kernel in a captured step; None: 8 where no expert has more than 8 rows in the
    # batch, 16 up to 32, else 64 (launch_config.row_block, a graph per choice a bucket can make, captured by
    # warm_up). 8-row tiles halve the padding of many experts' few rows each (7B, one process: 8 experts at batch 32
    # 13.38 -> 12.80 ms on an H100, 12.81 -> 11.75 on an H200; 16 at batch 64 20.10 -> 18.75 and 19.45 -> 17.14)
    # and lose where an expert has more (1 expert at batch 32 8.97 -> 9.98 ms;
    # benchmarks/results/decode-rows8-{h100,h200}-2026-12-05.json). Up to 32 rows on one expert 16-row tiles
    # match or beat 32 and 64 (more programs, each one's chain of MMAs shorter; H200: 1 expert at batch 32 7.77 ms
    # against 7.73 and 8.49, 4 experts at batch 64 9.95 against 11.07 and 14.15); beyond, one 64-row tile unpacks
    # an expert's codes once for all its rows (1 expert at batch 64 10.23 -> 9.35 ms;
    # benchmarks/results/decode-rows-big-h200-2026-12-06.json). FP8 planes
    # (opt-in, kernels/launch_config.py) take 16 rows a tile or more: with 8 the launch keeps bf16 planes.
    block_m: int | None = None
    graphs: bool = True  # capture CUDA graphs on a GPU; False: every step eager (what graphs are tested against)
    # Fuse a decode step's small ops (RMS norms with their slot tables and the residual adds before them,
    # SwiGLU; the rotary embedding where the attention kernel is off) with torch.compile: some 20 kernels per
    # layer become 3 (a 7B step at batch 32: 8.8 -> 7.0 ms when it came,
    # benchmarks/results/decode-e2e-graph-compiled-2026-12-03.json). None: on a GPU.
    compile_glue: bool | None = None
    # One base GEMM for q/k/v and one for gate/up (their weights become blocks of one matrix, no copy
    # kept): two launches a layer instead of five.
    fuse_projections: bool = True
    # With fused projections, their expert deltas in one delta-kernel launch too (their banks held as one,
    # kernels/bank.py DeltaBank.concat): two launches a layer instead of five, and the 1,024-wide k/v of a
    # 7B model no longer a launch of 64 programs for 132 SMs. False: one launch a projection (A/B measures).
    group_deltas: bool = True
    # Decode attention by meswitch's Triton kernel, which also applies the rotary embedding and writes the new
    # token's K/V into the cache (kernels/decode_attention.py; a 7B step at batch 32: 6.1 -> 5.2 ms,
    # benchmarks/results/decode-e2e-fewer-kernels-2026-12-04.json); False: rotary, two index writes and
    # PyTorch's SDPA (cuDNN on the H200).
    attention_kernel: bool = True
    # A decode step on a GPU runs each projection's expert deltas on a second stream beside its base GEMM (into
    # a zeroed buffer, added after): the delta kernel moves some 40% of copy bandwidth, bound by instruction
    # issue, and the GEMM beside it uses the rest (7B, 8 experts at batch 32 on the H200: 14.6 -> 13.6 ms;
    # benchmarks/results/decode-e2e-overlap-2026-12-04.json). The buffers are cut from one zeroed per step, and
    # o's, gate/up's and down's deltas are added inside the residual add and SwiGLU (8 experts: 509 kernels a step,
    # fewer than before the overlap; the step's time unchanged within what machines differ by), q/k/v's inside the
    # attention kernel as it loads them (32 adds fewer a step).
    # False: one after the other, added in place (graph-serial).
    overlap_deltas: bool = True
    # The BLAS library torch's GEMMs go to on a GPU (torch.backends.cuda.preferred_blas_library, process-wide: the
    # serving process's); cuBLASLt picked faster kernels for the skinny decode GEMMs (7B on the H200, base alone at
    # batch 32: 5.02-5.07 -> 4.88 ms; 8 experts: 14.06 -> 13.43 ms; benchmarks/results/decode-e2e-blas-2026-12-04.json).
    # None: leave it as it is.
    blas: str | None = "cublaslt"
    # With compiled glue and the deltas apart, the residual add + RMS norm and SwiGLU also compute the row sums of
    # the x they make that the delta kernel's epilogue needs (kernels/row_sums.py), and for FP8 planes x in e4m3:
    # q/k/v's, gate/up's and down's launches then neither accumulate them in their loop nor launch a kernel for
    # them. False: the kernel's own.
    glue_sums: bool = True


GLUE_GRID_SETS = 16  # sets of quantization grids a batch may mix, per bucket (every subset of 4 grids)


def swiglu(gate: torch.Tensor, up: torch.Tensor, d_gate=None, d_up=None, act=F.silu) -> torch.Tensor:
    """act(gate) · up (SiLU: Llama's), with the projections' expert deltas added first where they come apart."""
    if d_gate is not None:
        gate, up = gate + d_gate, up + d_up
    return act(gate) * up


def swiglu_sums(gate: torch.Tensor, up: torch.Tensor, d_gate=None, d_up=None, sums: tuple = ()):
    """:func:`swiglu` (SiLU) and what each delta launch of ``sums`` takes of its output (:func:`launch_inputs`)."""
    act = swiglu(gate, up, d_gate, d_up)
    return act, launch_inputs(act, sums)


def residual(x: torch.Tensor, y: torch.Tensor, d=None) -> torch.Tensor:
    """The residual stream after adding ``y`` and, where they come apart, its expert deltas ``d``."""
    return x + (y if d is None else y + d)


def rms_sums(x: torch.Tensor, eps: float, weight: torch.Tensor, tables: list, sums: tuple = ()):
    """:func:`rms_rows` and what each delta launch of ``sums`` takes of its output (:func:`launch_inputs`)."""
    h = rms_rows(x, eps, weight, tables)
    return h, launch_inputs(h, sums)


def add_rms_rows(x: torch.Tensor, y: torch.Tensor, eps: float, weight: torch.Tensor, tables: list, d=None,
                 sums: tuple = ()):  # fmt: skip
    """:func:`residual`, its RMS norm (:func:`rms_rows`) and what each delta launch of ``sums`` takes of it."""
    x = residual(x, y, d)
    return x, *rms_sums(x, eps, weight, tables, sums)


def length_bucket(longest: int, config: DecoderConfig) -> int:
    """Cache positions a step's attention reads: the next power of two, within [min_len_bucket, max_len]."""
    n = config.min_len_bucket
    while n < longest:
        n *= 2
    return min(n, config.max_len)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor


class StaticDecoder:
    """Prefill and decode for the engine's model on a static KV cache; decode steps as CUDA graphs."""

    def __init__(self, engine: MixedExpertEngine, config: DecoderConfig | None = None):
        self.engine, self.config = engine, config or DecoderConfig()
        cfg = engine.model.config
        arch = type(engine.model).__name__
        if arch not in DECODER_ARCHITECTURES:
            raise EngineError(f"the static decoder serves {DECODER_ARCHITECTURES}, not {arch}")
        if engine.banks is None:
            raise EngineError("static decoding needs the packed payload (the default on a GPU; payload='packed')")
        if max(self.config.buckets) > self.config.max_rows:
            raise EngineError(f"bucket {max(self.config.buckets)} exceeds max_rows={self.config.max_rows}")
        inner = engine.model.model
        self.embed, self.layers, self.norm, self.rotary = inner.embed_tokens, inner.layers, inner.norm, inner.rotary_emb
        self.head = engine.model.lm_head
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // self.heads
        # one row more than max_rows: the padding rows of a bucket write their KV there
        shape = (self.config.max_rows + 1, self.kv_heads, self.config.max_len, self.head_dim)
        dev, dt = engine.device, engine.dtype
        self.k = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.v = [torch.zeros(shape, dtype=dt, device=dev) for _ in self.layers]
        self.use_graphs = self.config.graphs and dev.type == "cuda"
        if self.config.blas and dev.type == "cuda":
            torch.backends.cuda.preferred_blas_library(self.config.blas)
        self._graphs: dict[tuple, _Captured] = {}
        self._pool = torch.cuda.graph_pool_handle() if self.use_graphs else None
        self._static: dict[int, dict] = {}  # bucket -> its input tensors
        self._glue = None
        glue = self.config.compile_glue
        if glue if glue is not None else dev.type == "cuda":
            if getattr(cfg, "hidden_act", "silu") != "silu":
                raise EngineError(f"compile_glue fuses SwiGLU; the model's activation is {cfg.hidden_act!r}")
            fns = {"norm": rms_sums, "add_norm": add_rms_rows, "rope": apply_rotary_pos_emb, "swiglu": swiglu_sums}
            # The batch dimension turns dynamic on the second bucket (dynamo's automatic dynamic shapes), so
            # each function compiles twice (batch 1, any batch) per set of grids a batch mixes (the norm's
            # slot tables): with three functions, 8 compilations where one per bucket made 28 (CPU warm-up
            # 17.2 -> 6.2 s; the real family's 12 graphs on the H200: 25.4 -> 12.5 s). The limit still covers
            # one per bucket, past dynamo's 8 a function, where fullgraph=True fails the capture (it did on the H200).
            limit = len(self.config.buckets) * GLUE_GRID_SETS
            patch = torch._dynamo.config.patch(
                recompile_limit=max(limit, torch._dynamo.config.recompile_limit),
                accumulated_recompile_limit=max(limit * len(fns), torch._dynamo.config.accumulated_recompile_limit),
            )
            # The deltas' buffers are cut from one a step, at offsets that may equal a width by chance: duck shapes
            # would then tie the two and recompile when they part (they did, on the CPU family's SwiGLU).
            distinct = torch.fx.experimental._config.patch(use_duck_shape=False)
            # Values rounded to bf16 inside a kernel stay rounded when read again (Inductor otherwise keeps them in
            # fp32): x's row sums must be those of x as stored, or 2**7·Σx loses the delta's contribution. And each
            # function one kernel: SwiGLU's row sums over a long row would otherwise split into two on a GPU.
            inductor = torch._inductor.config.patch(emulate_precision_casts=True, split_reductions=False)
            self._glue = {
                k: distinct(patch(inductor(torch.compile(fn, dynamic=None, fullgraph=True)))) for k, fn in fns.items()
            }
        self.captures = 0
        self._side = torch.cuda.Stream(dev) if self.config.overlap_deltas and dev.type == "cuda" else None
        # a decode step's delta outputs, per row: every projection's width (cut from one zeroed buffer a step)
        self._delta_width = sum(m.base.out_features for m in engine.model.modules() if isinstance(m, MixedLinear))
        self._fused = [self._fuse(layer) for layer in self.layers] if self.config.fuse_projections else None
        self._sum_weights: dict[SumsPlan, torch.Tensor | tuple] = {}

    @staticmethod
    def _fuse(layer) -> tuple[FusedLinears, FusedLinears] | None:
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = [attn.q_proj, attn.k_proj, attn.v_proj], [mlp.gate_proj, mlp.up_proj]
        if not all(isinstance(m, MixedLinear) for m in qkv + gate_up):
            return None
        return FusedLinears.of(qkv), FusedLinears.of(gate_up)

    # ---- the step ------------------------------------------------------------------------------
    def _layers(self, x: torch.Tensor, pos: torch.Tensor, rows: torch.Tensor, span: int, decode: bool):
        """Hidden states after every layer. Decode (``x`` [B, 1, H]): batch row b reads cache rows
        0..B-1 up to ``span`` and writes its KV at ``(rows[b], pos[b])`` (a padding row: the scratch
        row). Prefill (``x`` [n, T, H]): cache rows ``rows``, positions 0..T-1 (``pos`` [n, T])."""
        b, t, _ = x.shape
        group = self.heads // self.kv_heads
        cos, sin = self.rotary(x, pos[:, None] if decode else pos)
        kernel = decode and self.config.attention_kernel
        grouped = self.config.group_deltas
        mask = decode_mask(pos, span) if decode and not kernel else None
        apart = decode and self.config.overlap_deltas  # deltas added inside the residual add and SwiGLU
        # x's row sums for the delta kernel, from the glue that makes x: q/k/v's, gate/up's, down's launches
        summed = apart and grouped and self._glue is not None and self.config.glue_sums and self._fused is not None
        h, s_qkv = self._norm(self.layers[0].input_layernorm, x, decode, self._plan(0, 0, x, summed and kernel))
        for i, layer in enumerate(self.layers):
            attn, mlp = layer.self_attn, layer.mlp
            fused = self._fused[i] if self._fused else None
            d_qkv = [None] * 3
            if fused and apart and grouped and kernel:  # their deltas added inside the attention kernel
                (q, k, v), d_qkv = fused[0].apart(h, s_qkv)
            else:
                q, k, v = fused[0](h, grouped) if fused else (attn.q_proj(h), attn.k_proj(h), attn.v_proj(h))
            if kernel:  # decode, one token a row: the rotary embedding and the cache writes too
                # grouped-query attention without repeating the cache, a KV head's query heads as its queries
                qs, ks = (b, self.kv_heads, group, self.head_dim), (b, self.kv_heads, self.head_dim)
                deltas = [None if d is None else d.view(s) for d, s in zip(d_qkv, (qs, ks, ks), strict=True)]
                o = decode_attention(q.view(qs), k.view(ks), v.view(ks), self.k[i], self.v[i], rows, pos, span,
                                     attn.scaling, cos[:, 0], sin[:, 0], *deltas)  # fmt: skip
            else:
                q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
                k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
                q, k = (self._glue["rope"] if decode and self._glue else apply_rotary_pos_emb)(q, k, cos, sin)
                if decode:
                    o = decode_attention_reference(q.reshape(b, self.kv_heads, group, self.head_dim), k[:, :, 0],
                                                   v[:, :, 0], self.k[i], self.v[i], rows, pos, span, attn.scaling,
                                                   mask=mask)  # fmt: skip
                else:
                    self.k[i][rows, :, :t] = k
                    self.v[i][rows, :, :t] = v
                    o = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=attn.scaling,
                                                       enable_gqa=group > 1)  # fmt: skip
            o = o.reshape(b, self.heads, t, self.head_dim)
            y, d = self._project(attn.o_proj, o.transpose(1, 2).reshape(b, t, -1), apart)
            x, h, s_gate_up = self._add_norm(
                x, y, layer.post_attention_layernorm, decode, d, self._plan(i, 1, x, summed)
            )
            if fused and apart and grouped:
                (gate, up), (d_gate, d_up) = fused[1].apart(h, s_gate_up)
            else:
                gate, up = fused[1](h, grouped) if fused else (mlp.gate_proj(h), mlp.up_proj(h))
                d_gate = d_up = None
            act, s_down = self._swiglu(mlp, gate, up, d_gate, d_up, decode, self._plan(i, 2, gate, summed))
            last = i + 1 == len(self.layers)
            after = self.norm if last else self.layers[i + 1].input_layernorm
            y, d = self._project(mlp.down_proj, act, apart, s_down)
            x, h, s_qkv = self._add_norm(
                x, y, after, decode, d, self._plan(i + 1, 0, x, summed and kernel and not last)
            )
        return h

    @staticmethod
    def _project(module, x: torch.Tensor, apart: bool, sums=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A projection's output and, where ``apart``, its expert deltas beside it (else None: added)."""
        return module.apart(x, sums) if apart and isinstance(module, MixedLinear) else (module(x), None)

    def _plan(self, layer: int, which: int, like: torch.Tensor, wanted: bool) -> tuple[tuple, tuple]:
        """(grids, constants): per grid of the step, the constants (:func:`~meswitch.kernels.row_sums.
        sum_weights`) that give what the launch of layer ``layer``'s q/k/v (``which`` 0), gate/up (1) or down (2)
        takes of an x shaped like ``like`` (row sums; with FP8 planes x in e4m3 too); nothing unless ``wanted``
        and planned (a GPU)."""
        fused = self._fused[layer] if wanted else None
        if fused is None:  # not every projection is a mixed linear: they run as they come
            return (), ()
        names = fused[which].names if which < 2 else self.layers[layer].mlp.down_proj.weight_name
        plans = self.engine.ctx.sums_plans(names, like)
        for plan in plans.values():
            if plan not in self._sum_weights:
                self._sum_weights[plan] = sum_weights(plan, like.device)
        return tuple(plans), tuple(self._sum_weights[p] for p in plans.values())

    def _norm(self, module, x: torch.Tensor, decode: bool, plan=((), ())) -> tuple[torch.Tensor, dict]:
        """The RMS norm and, from the compiled glue, its row sums for the next launch, per grid (:meth:`_plan`)."""
        if not (decode and self._glue):
            return module(x), {}
        grids, weights = plan
        h, sums = self._glue["norm"](x, module.eps, module.base.weight, self._tables(module), weights)
        return h, dict(zip(grids, sums, strict=True))

    def _add_norm(self, x: torch.Tensor, y: torch.Tensor, module, decode: bool, d=None, plan=((), ())):
        """The residual add and the next RMS norm: (x + y (+ deltas d), its norm, the norm's row sums per grid as
        :meth:`_norm`); one compiled kernel in a decode step."""
        if not (decode and self._glue):
            x = residual(x, y, d)
            return x, module(x), {}
        grids, weights = plan
        x, h, sums = self._glue["add_norm"](x, y, module.eps, module.base.weight, self._tables(module), d, weights)
        return x, h, dict(zip(grids, sums, strict=True))

    def _swiglu(self, mlp, gate, up, d_gate, d_up, decode: bool, plan=((), ())) -> tuple[torch.Tensor, dict]:
        """SwiGLU (deltas added where they came apart) and, from the compiled glue, its row sums per grid as
        :meth:`_norm`."""
        if not (decode and self._glue):
            return swiglu(gate, up, d_gate, d_up, mlp.act_fn), {}
        grids, weights = plan
        act, sums = self._glue["swiglu"](gate, up, d_gate, d_up, weights)
        return act, dict(zip(grids, sums, strict=True))

    def _tables(self, module) -> list:
        return [(s, t) for s, t, _ in self.engine.ctx.tables(module.name)]

    def _decode_step(self, static: dict, grids: tuple, span: int, width: int, block_m: int) -> torch.Tensor:
        slots = {g: static[("slots", g)] for g in grids}
        tiles = {g: device_tiles(s, block_m) for g, s in slots.items()}
        tokens = static["tokens"]
        scratch = None
        if self.config.overlap_deltas and slots:  # one memset a step for every projection's delta outputs
            scratch = torch.zeros(tokens.shape[0] * self._delta_width, dtype=self.engine.dtype, device=tokens.device)
        self.engine.ctx.set_slots(slots, tiles, width, self._side, scratch)
        try:
            x = self.embed(tokens[:, None])
            x = self._layers(x, static["pos"], static["rows"], span, decode=True)
            return self.head(x)[:, 0]
        finally:
            self.engine.ctx.clear()

    # ---- public --------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, rows: Sequence[int], prompts: Sequence[Sequence[int]], row_slots: Sequence[ExpertSlot | None]):
        """Write the prompts' KV into cache ``rows``; return each prompt's next-token logits [n, V] (eager)."""
        eng, n = self.engine, len(prompts)
        if not (len(rows) == n == len(row_slots)):
            raise ValueError(f"{len(rows)} rows, {n} prompts and {len(row_slots)} experts")
        lens = [len(p) for p in prompts]
        if min(lens) < 1 or max(lens) > self.config.max_len:
            raise ValueError(f"prompt lengths must be 1..{self.config.max_len}, got {min(lens)}..{max(lens)}")
        t = max(lens)
        ids = torch.zeros(n, t, dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, : len(p)] = torch.tensor(p)
        dev = eng.device
        ids, last = ids.to(dev), torch.tensor(lens, device=dev) - 1
        pos = torch.arange(t, device=dev).expand(n, -1)
        with eng.batch(row_slots):
            x = self._layers(self.embed(ids), pos, torch.tensor(list(rows), device=dev), t, decode=False)
            return self.head(x[torch.arange(n, device=dev), last][:, None])[:, 0]

    @torch.inference_mode()
    def decode(
        self, tokens: torch.Tensor, positions: Sequence[int], row_slots: Sequence[ExpertSlot | None]
    ) -> torch.Tensor:
        """One step for cache rows 0..B-1: ``tokens`` [B] (device), row b at position ``positions[b]``
        (its token's position, on the host). Returns logits [B, V]; replayed from a CUDA graph on a GPU."""
        eng, b = self.engine, len(positions)
        if tokens.shape != (b,) or len(row_slots) != b:
            raise ValueError(f"{tuple(tokens.shape)} tokens, {b} positions and {len(row_slots)} experts")
        bucket = next((s for s in self.config.buckets if s >= b), None)
        if bucket is None:
            raise ValueError(f"batch of {b} rows exceeds the largest bucket {max(self.config.buckets)}")
        if max(positions) >= self.config.max_len:
            raise ValueError(f"position {max(positions)} past the cache's max_len={self.config.max_len}")
        span = length_bucket(max(positions) + 1, self.config)
        with eng.batch(row_slots, eager=False):
            static = self._inputs(bucket)
            static["tokens"][:b].copy_(tokens)
            static["tokens"][b:].zero_()
            host = torch.zeros(2, bucket, dtype=torch.long)
            host[0, :b] = torch.tensor(list(positions))
            host[1] = torch.arange(bucket)
            host[1, b:] = self.config.max_rows  # padding rows write to the scratch row
            static["pos"].copy_(host[0])
            static["rows"].copy_(host[1])
            # Only the grids some row uses take part: a batch of base rows runs the base model alone.
            where = [None if s is None else eng.banks.index(s.key) for s in row_slots]
            grids = tuple(sorted({w[0] for w in where if w is not None}, key=repr))
            for grid in grids:
                ids = torch.full((bucket,), -1, dtype=torch.long)
                ids[:b] = torch.tensor([w[1] if w is not None and w[0] == grid else -1 for w in where])
                self._slots(static, grid).copy_(ids)
            block_m = self.config.block_m or row_block(max(Counter(w for w in where if w).values(), default=1))
            return self._step(static, grids, span, block_m)[:b].clone()

    @torch.inference_mode()
    def warm_up(self, buckets: Sequence[int] | None = None, spans: Sequence[int] | None = None) -> int:
        """Capture the decode steps before the first request, instead of on it (each capture compiles the
        kernels and the fused glue for its shapes: seconds for the first batch of every new size).

        Every bucket (default: all) and span (default: the shortest) for a batch of base rows and for a
        batch on each quantization grid the banks hold now, at each row block a batch of that size can pick; all rows
        write to the scratch row, so no cached sequence is touched. A grid that arrives later is captured on
        its first batch. Returns how many graphs were captured (none without graphs: then each step runs
        once, eagerly)."""
        eng, before = self.engine, self.captures
        grids = sorted(eng.banks.grids, key=repr)
        base = (self.config.block_m or row_block(1),)  # a batch of base rows, as decode picks it
        with eng.batch([], eager=False):
            for bucket in buckets or self.config.buckets:
                blocks = (self.config.block_m,) if self.config.block_m else row_blocks(bucket)
                static = self._inputs(bucket)
                static["tokens"].zero_()
                static["pos"].zero_()
                static["rows"].fill_(self.config.max_rows)  # the scratch row
                for used in [(), *((g,) for g in grids)]:
                    for g in used:
                        self._slots(static, g).fill_(-1)
                    for span in spans or (length_bucket(1, self.config),):
                        for block_m in blocks if used else base:
                            self._step(static, used, span, block_m, replay=False)
        return self.captures - before

    def _step(self, static: dict, grids: tuple, span: int, block_m: int, replay: bool = True) -> torch.Tensor:
        """The step's logits [bucket, V]: replayed from its graph (captured on first use), or eager."""
        eng = self.engine
        width = eng.banks.max_vocab(eng.base_vocab)
        if not self.use_graphs:
            return self._decode_step(static, grids, span, width, block_m)
        key = (static["tokens"].shape[0], span, width, block_m, tuple((g, eng.banks.grids[g].version) for g in grids))
        cap = self._graphs.get(key)
        if cap is None:
            cap = self._graphs[key] = self._capture(static, grids, span, width, block_m)
        if replay:
            cap.graph.replay()
        return cap.logits

    @torch.inference_mode()
    def move_row(self, src: int, dst: int, length: int) -> None:
        """Copy a sequence's first ``length`` cached positions from row ``src`` to row ``dst``."""
        for k, v in zip(self.k, self.v, strict=True):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]

    # ---- helpers -------------------------------------------------------------------------------
    def _inputs(self, bucket: int) -> dict:
        """The bucket's input tensors (fixed addresses: the graphs read them); per grid its row slots."""
        dev = self.engine.device
        static = self._static.setdefault(bucket, {})
        static.setdefault("tokens", torch.zeros(bucket, dtype=torch.long, device=dev))
        static.setdefault("pos", torch.zeros(bucket, dtype=torch.long, device=dev))
        static.setdefault("rows", torch.arange(bucket, device=dev))
        return static

    def _slots(self, static: dict, grid) -> torch.Tensor:
        """The bucket's row slots on ``grid`` (-1: the row uses another grid or the base)."""
        if ("slots", grid) not in static:
            static["slots", grid] = torch.full_like(static["tokens"], -1)
        return static["slots", grid]

    def _capture(self, static: dict, grids: tuple, span: int, width: int, block_m: int) -> _Captured:
        """Warm up on a side stream (Triton compiles there), then capture one step."""
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                self._decode_step(static, grids, span, width, block_m)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            logits = self._decode_step(static, grids, span, width, block_m)
        self.captures += 1
        log.info("captured decode graph: batch %d, span %d (%d graphs)", static["tokens"].shape[0], span, self.captures)
        return _Captured(graph, logits)
