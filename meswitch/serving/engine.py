"""The mixed-expert engine: one base model, many compressed experts, one forward for a mixed batch.

The base model is the stock transformers model (its attention, masks and KV cache untouched)
with its linears, embedding, LM head and norms replaced by the mixed modules of
:mod:`meswitch.serving.mixed`. Experts are added from verified artifact folders (checksums and
base fingerprint checked by :func:`open_artifact`) into :class:`DeltaTiers`, which keeps their
payloads on the device, in host memory or on disk.

Imports torch, transformers and the core library only, so GPU benchmarks can use it alone.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from meswitch import devices
from meswitch.artifacts import ArtifactError
from meswitch.checkpoints import Checkpoint, scan
from meswitch.compression.delta import CompressedDelta
from meswitch.compression.quantize import QuantSpec
from meswitch.compression.reconstruct import open_artifact
from meswitch.serving.banked import ExpertTables
from meswitch.serving.mixed import EXTRA, BatchExperts, Patched, patch_model, row_groups
from meswitch.serving.tiers import DeltaTiers, ExpertSlot, TierObserver, nbytes, stored_keys

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineError(Exception):
    """An expert or base the engine cannot serve; the message says which tensor or file and why."""


@dataclass(frozen=True)
class EngineConfig:
    device: str = "auto"  # auto: the GPU when present
    dtype: str = "auto"  # auto: float32 on CPU (exact), bfloat16 on a GPU
    device_budget_bytes: int | None = None  # device tier; None: unlimited
    host_budget_bytes: int | None = None  # host tier; None: unlimited
    # How resident deltas are held and applied: "dense" dequantizes each expert once (the fast CPU
    # path); "packed" keeps the codes and calls meswitch.kernels.mixed_delta (Triton on a GPU, its
    # PyTorch reference elsewhere); "auto": packed on CUDA, dense on CPU.
    payload: str = "auto"
    # Packed payload: expert slots reserved per quantization grid up front (0: as experts arrive), so
    # that adding an expert never reallocates the banks (nor stales captured CUDA graphs).
    bank_capacity: int = 0


def resolve_device(device: str) -> torch.device:
    try:
        return devices.resolve_device(device)
    except ValueError as exc:
        raise EngineError(str(exc)) from None


def resolve_payload(kind: str, device: torch.device) -> str:
    if kind == "auto":
        return "packed" if device.type == "cuda" else "dense"
    if kind not in ("dense", "packed"):
        raise EngineError(f"payload must be auto, dense or packed, got {kind!r}")
    return kind


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float32 if device.type == "cpu" else torch.bfloat16
    if dtype not in DTYPES:
        raise EngineError(f"dtype must be auto or one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class MixedExpertEngine:
    """The base model loaded once, patched so each batch row computes with its own expert's delta."""

    def __init__(
        self,
        base_dir: str | Path,
        config: EngineConfig | None = None,
        base_fingerprint: str | None = None,
        observer: TierObserver | None = None,
    ):
        from transformers import AutoModelForCausalLM

        self.config = config or EngineConfig()
        self.device = resolve_device(self.config.device)
        self.dtype = resolve_dtype(self.config.dtype, self.device)
        self.base_dir = Path(base_dir)
        self.base = Checkpoint(self.base_dir)
        self.spec = self.base.spec
        self.fingerprint = base_fingerprint or scan(self.base).fingerprint
        model = AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=self.dtype, attn_implementation="sdpa")
        self._attach(model, observer)
        log.info("base %s on %s as %s (fingerprint %s…)", self.base_dir, self.device, self.dtype, self.fingerprint[:12])

    def _attach(self, model, observer: TierObserver | None) -> None:
        """Put ``model`` on the device, patch its mixed modules and set up the delta tiers.

        Needs ``config``, ``device`` and ``spec``; a subclass serving a model built in memory
        (benchmarks/decode_e2e.py) sets those and calls this instead of loading a folder.
        """
        self.model = model.to(self.device).eval()
        self.ctx = BatchExperts()
        self.patched: Patched = patch_model(self.model, self.spec, self.ctx)
        self.payload_kind = resolve_payload(self.config.payload, self.device)
        self.banks = None
        if self.payload_kind == "packed":
            from meswitch.serving.banked import BankSet

            self.banks = self.ctx.banks = BankSet(self._table_default, capacity=self.config.bank_capacity)
        self.tiers = DeltaTiers(
            self._build_payload,
            self.device,
            device_budget=self.config.device_budget_bytes,
            host_budget=self.config.host_budget_bytes,
            observer=observer,
            drop_payload=self._drop_payload,
        )
        self._forward_lock = threading.Lock()
        self._index = itertools.count()

    @property
    def base_vocab(self) -> int:
        return self.patched.base_vocab

    @property
    def max_positions(self) -> int:
        return int(getattr(self.model.config, "max_position_embeddings", 2048))

    # ---- experts -----------------------------------------------------------------------------
    def add_expert(self, folder: str | Path, name: str | None = None, version: str = "local") -> ExpertSlot:
        """Verify an artifact against the loaded base and place its deltas in the tiers.

        Refuses (ArtifactError/EngineError) an artifact with a bad checksum, made for another base,
        or changing a tensor the engine has no mixed module for.
        """
        reader = open_artifact(Path(folder), self.base, self.fingerprint)
        m = reader.manifest
        if m.kind != "expert-delta":
            raise ArtifactError(f"{folder}: artifact kind is {m.kind!r}, expected 'expert-delta'")
        arch = m.metadata.get("architecture")
        if arch and arch != self.base.architecture:
            raise EngineError(f"{folder}: made for architecture {arch!r}, the base is {self.base.architecture!r}")
        self._check_tensors(Path(folder), reader)
        name = name or m.name
        key = f"{name}@{version}"
        if key in self.tiers.slots:
            raise EngineError(f"expert {key} is already loaded")
        vocab = int(m.metadata.get("expert_vocab") or self.base_vocab)
        slot = ExpertSlot(
            key=key,
            name=name,
            version=str(version),
            index=next(self._index),
            reader=reader,
            vocab=vocab,
            device_bytes_estimate=self._estimate_bytes(reader),
            domain=m.domain,
        )
        self.tiers.add(slot)
        return slot

    def remove_expert(self, slot: ExpertSlot) -> None:
        self.tiers.remove(slot)

    def _check_tensors(self, folder: Path, reader) -> None:
        roles = self.patched.roles
        for name, h in reader.manifest.tensors.items():
            if name in roles:
                if h.get("extra_rows") and roles[name] not in ("embed", "lm_head"):
                    raise EngineError(f"{folder}: tensor {name!r} has extra rows; only vocabulary tensors may")
                continue
            if h["kind"] == "fp16_delta" and not bool(reader.get(f"{name}.delta").any()):
                continue  # a zero delta changes nothing
            raise EngineError(
                f"{folder}: the expert changes tensor {name!r}, which the serving engine cannot apply per row"
            )
        head = self.patched.lm_head
        if head not in reader.manifest.tensors and not reader.manifest.metadata.get("tied_embeddings"):
            raise EngineError(f"{folder}: no delta for {head!r} and the expert does not tie it to the embedding")

    def _estimate_bytes(self, reader) -> int:
        """Device bytes an expert's payload will take (before building it, to evict ahead of time)."""
        if self.payload_kind == "packed":
            return reader.nbytes(stored_keys(reader))
        per = torch.finfo(self.dtype).bits // 8
        total = 0
        for h in reader.manifest.tensors.values():
            rows, *rest = h["shape"]
            cols = rest[0] if rest else 1
            total += (rows + int(h.get("extra_rows", 0))) * cols * per
        return total

    def _build_payload(self, slot: ExpertSlot, host: dict[str, torch.Tensor]) -> tuple[dict[str, Any], int]:
        """The compute-ready deltas of one expert on the device, and the bytes they hold there.

        Dense: Δ̂ dequantized once in the model dtype, in the slot's payload. Packed: the quantized
        linears' codes join the banks ``mixed_delta`` reads, the embedding stays packed for per-row
        lookup, and norms, biases and added vocabulary rows join the grid's slot tables
        (:class:`~meswitch.serving.banked.BankSet`); the payload then holds nothing.
        """
        dev, dt = self.device, self.dtype
        roles = self.patched.roles
        head = self.patched.lm_head
        out: dict[str, Any] = {}
        tables = ExpertTables(banked={}, lookups={}, dense={}, vocab=slot.vocab)
        for name, h in slot.manifest.tensors.items():
            role = roles.get(name)
            if role is None:
                continue  # checked at load: a zero delta
            extra = host[f"{name}.extra_rows"].to(dev, dt) if h.get("extra_rows") else None
            if h["kind"] == "quantized":
                spec = QuantSpec(bits=h["bits"], symmetric=h["symmetric"], group_size=h["group_size"])
                parts = {k: v.to(dev, non_blocking=True) for k, v in host.items() if k.startswith(name + ".")}
                cd = CompressedDelta.from_tensors(parts, name, h["shape"], spec)
                if self.banks is not None and role in ("linear", "lm_head", "embed"):
                    names = [name]
                    if role == "embed":
                        tables.lookups[name] = cd
                        if head not in slot.manifest.tensors:  # tied: the LM head is this delta
                            tables.banked[head] = cd
                            names.append(head)
                    else:
                        tables.banked[name] = cd
                    if extra is not None:
                        tables.dense.update({n + EXTRA: extra for n in names})
                    continue
                delta = cd.dequantize()
            else:
                delta = host[f"{name}.delta"].to(dev, non_blocking=True).float()
            if role == "norm":
                # The expert's own weight, rounded as the reconstructed checkpoint rounds it.
                b = self.base.get(name, dev)
                out[name] = (b.float() + delta).to(b.dtype).to(dt)
                continue
            if extra is not None:
                delta = torch.cat([delta, extra.float()])
            out[name] = delta.to(dt).contiguous()
        if self.banks is not None and (tables.banked or tables.lookups):
            for name in [n for n in out if roles[n] in ("norm", "bias")]:
                tables.dense[name] = out.pop(name)
            return out, nbytes(out) + self.banks.add(slot.key, tables)
        embed = self.patched.embed
        if head not in out and embed in out:
            out[head] = out[embed]  # tied (dense): the LM head is the embedding's table
        return out, nbytes(out)

    def _table_default(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """What a slot table holds for an expert without ``name``: a norm's base weight, else no delta."""
        if self.patched.roles.get(name) == "norm":
            return self.model.get_submodule(name.removesuffix(".weight")).weight.expand_as(like)
        return torch.zeros_like(like)

    def _drop_payload(self, slot: ExpertSlot) -> None:
        if self.banks is not None:
            self.banks.remove(slot.key)

    # ---- compute -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def hold(self):
        """Hold every forward pass until the block exits (maintenance, and tests that need a request mid-way)."""
        with self._forward_lock:
            yield

    def groups(self, row_slots: Sequence[ExpertSlot | None]):
        slots = {s.key: s for s in row_slots if s is not None}
        payloads = {k: s.payload for k, s in slots.items()}
        vocabs = {k: s.vocab for k, s in slots.items()}
        return row_groups([s.key if s is not None else None for s in row_slots], payloads, vocabs, self.device)

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        row_slots: Sequence[ExpertSlot | None],
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        logits_to_keep: int = 0,
    ) -> torch.Tensor:
        """Logits ``[B, T or logits_to_keep, V]`` where row i uses ``row_slots[i]`` (None: the base model).

        V is the widest vocabulary among the rows; a row's columns past its expert's vocabulary are -inf.
        """
        if len(row_slots) != input_ids.shape[0]:
            raise ValueError(f"{len(row_slots)} row experts for a batch of {input_ids.shape[0]} rows")
        with self.batch(row_slots):
            out = self.model(
                input_ids=input_ids.to(self.device),
                attention_mask=None if attention_mask is None else attention_mask.to(self.device),
                position_ids=None if position_ids is None else position_ids.to(self.device),
                **{_cache_kwarg(type(self.model)): cache},
                use_cache=cache is not None,
                logits_to_keep=logits_to_keep,
            )
        return out.logits

    @contextlib.contextmanager
    def batch(self, row_slots: Sequence[ExpertSlot | None], eager: bool = True):
        """Hold the model for one forward of rows using ``row_slots``: their experts on the device and,
        when ``eager``, the mixed modules told which rows use which (a captured step sets its own)."""
        with self._forward_lock:
            self.tiers.ensure(row_slots)
            if not eager:
                yield
                return
            row_banks = None
            if self.banks is not None:
                row_banks = [None if s is None else self.banks.index(s.key) for s in row_slots]
            self.ctx.set(self.groups(row_slots), len(row_slots), row_banks, self.device)
            try:
                yield
            finally:
                self.ctx.clear()


@functools.cache
def _cache_kwarg(model_class: type) -> str:
    """The forward argument that takes the KV cache: ``cache`` from transformers 5.2x on (``past_key_values``
    is deprecated there and goes in 5.40), ``past_key_values`` before (the GPU machine has 5.17)."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
