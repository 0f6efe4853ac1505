"""Where each expert's delta lives: on the compute device, in (pinned) host memory, or only on disk.

Three tiers, moved by LRU under two byte budgets:

- *device*: the payload the mixed modules compute with (on CPU the dequantized matrices, the
  fast CPU path; on a GPU the same or, with the kernels, the packed tensors);
- *host*: the packed tensors as stored in the artifact, in pinned memory when a GPU is used, so a
  promotion is one copy plus a dequantization;
- *disk*: nothing in memory; the verified artifact folder is read again on promotion.

An expert that a batch needs is promoted before the forward (its *switch*, timed and reported to
the observer); the least recently used experts no batch is using are demoted to make room. A
batch that needs more than the device budget holds is still served (the budget is overshot and
the overshoot reported), so a small budget slows serving down but never blocks it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from meswitch.compression.reconstruct import DeltaReader

log = logging.getLogger(__name__)

DEVICE, HOST, DISK = "device", "host", "disk"
TIERS = (DEVICE, HOST, DISK)
_QUANT_PARTS = ("packed", "scale", "offset", "salient_idx", "salient_val")


class TierObserver(Protocol):
    def expert_switch(self, expert: str, source: str, seconds: float, nbytes: int) -> None: ...

    def tiers_changed(self, experts: dict[str, int], nbytes: dict[str, int], overshoot: int) -> None: ...


class NullObserver:
    def expert_switch(self, expert: str, source: str, seconds: float, nbytes: int) -> None:
        pass

    def tiers_changed(self, experts: dict[str, int], nbytes: dict[str, int], overshoot: int) -> None:
        pass


@dataclass(eq=False)
class ExpertSlot:
    """One loaded expert version. ``key`` is unique per engine (``name@version``)."""

    key: str
    name: str
    version: str
    index: int
    reader: DeltaReader
    vocab: int
    device_bytes_estimate: int
    domain: str | None = None
    host: dict[str, torch.Tensor] | None = None
    payload: dict[str, torch.Tensor] | None = None
    host_bytes: int = 0
    device_bytes: int = 0
    last_used: float = field(default_factory=time.monotonic)
    in_use: int = 0  # sequences in flight that use this slot
    retired: bool = False
    tokenizer: Any = None  # set by the loader; the engine never reads it

    @property
    def tier(self) -> str:
        return DEVICE if self.payload is not None else HOST if self.host is not None else DISK

    @property
    def manifest(self):
        return self.reader.manifest

    def tier_has(self, tier: str) -> bool:
        return self.payload is not None if tier == DEVICE else self.host is not None


def stored_keys(reader: DeltaReader) -> list[str]:
    """Every tensor key an artifact stores, from its manifest (public reader API only)."""
    keys = []
    for name, h in reader.manifest.tensors.items():
        parts = _QUANT_PARTS if h["kind"] == "quantized" else ("delta",)
        keys += [f"{name}.{p}" for p in parts if reader.has(f"{name}.{p}")]
        if h.get("extra_rows"):
            keys.append(f"{name}.extra_rows")
    return keys


def one_buffer(tensors: dict[str, torch.Tensor], pin: bool) -> dict[str, torch.Tensor]:
    """The tensors copied into views of one (page-locked, with ``pin``) buffer: one host allocation an
    expert instead of one for each of its thousand-odd tensors, each a driver call when pinned."""
    offsets, total = [], 0
    for t in tensors.values():
        offsets.append(total)
        total += -(-t.numel() * t.element_size() // 256) * 256  # every view aligned for any dtype
    buf = torch.empty(total, dtype=torch.uint8, pin_memory=pin)
    out = {}
    for (key, t), start in zip(tensors.items(), offsets, strict=True):
        view = buf[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        out[key] = view.copy_(t)
    return out


def nbytes(tensors: dict[str, torch.Tensor] | None) -> int:
    """Bytes held by a payload's tensors; aliases count once."""
    if not tensors:
        return 0
    seen, total = set(), 0
    for t in tensors.values():
        ptr = t.untyped_storage().data_ptr()
        if ptr not in seen:  # aliased entries (a tied lm_head) count once
            seen.add(ptr)
            total += t.untyped_storage().nbytes()
    return total


class DeltaTiers:
    """LRU placement of expert slots between the device, host memory and disk."""

    def __init__(
        self,
        build_payload: Callable[[ExpertSlot, dict[str, torch.Tensor]], tuple[dict[str, Any], int]],
        device: torch.device,
        device_budget: int | None = None,
        host_budget: int | None = None,
        observer: TierObserver | None = None,
        drop_payload: Callable[[ExpertSlot], None] | None = None,
    ):
        self.build_payload = build_payload  # -> (payload, bytes it holds on the device)
        self.drop_payload = drop_payload  # called when a payload leaves the device
        self.device = torch.device(device)
        self.device_budget = device_budget
        self.host_budget = host_budget
        self.observer = observer or NullObserver()
        self.pin = self.device.type == "cuda"
        self.slots: dict[str, ExpertSlot] = {}
        self.overshoot = 0
        self._lock = threading.RLock()

    # ---- bookkeeping -------------------------------------------------------------------------
    def used(self, tier: str) -> int:
        attr = "device_bytes" if tier == DEVICE else "host_bytes"
        return sum(getattr(s, attr) for s in self.slots.values())

    def summary(self) -> dict[str, Any]:
        with self._lock:
            counts = {t: 0 for t in TIERS}
            for s in self.slots.values():
                counts[s.tier] += 1
            return {
                "experts": counts,
                "bytes": {DEVICE: self.used(DEVICE), HOST: self.used(HOST)},
                "budget": {DEVICE: self.device_budget, HOST: self.host_budget},
                "overshoot_bytes": self.overshoot,
                "placement": {s.key: s.tier for s in self.slots.values()},
            }

    def _report(self) -> None:
        s = self.summary()
        self.observer.tiers_changed(s["experts"], s["bytes"], self.overshoot)

    # ---- placement ---------------------------------------------------------------------------
    def _read(self, slot: ExpertSlot) -> dict[str, torch.Tensor]:
        tensors = slot.reader.get_many(stored_keys(slot.reader))
        return one_buffer(tensors, pin=True) if self.pin else tensors

    def _fits(self, tier: str, extra: int) -> bool:
        budget = self.device_budget if tier == DEVICE else self.host_budget
        return budget is None or self.used(tier) + extra <= budget

    def add(self, slot: ExpertSlot) -> None:
        """Place a new slot: host copy if the host budget allows, on the device if that budget allows."""
        with self._lock:
            self.slots[slot.key] = slot
            host = self._read(slot)
            size = nbytes(host)
            if self._fits(HOST, size):
                slot.host, slot.host_bytes = host, size
            if self._fits(DEVICE, slot.device_bytes_estimate):
                self._promote(slot, host, timed=False)
            self._report()
            log.info("expert %s placed in %s", slot.key, slot.tier)

    def remove(self, slot: ExpertSlot) -> None:
        with self._lock:
            self.slots.pop(slot.key, None)
            self._drop(slot)
            slot.host, slot.host_bytes = None, 0
            self._report()

    def _drop(self, slot: ExpertSlot) -> None:
        if slot.payload is not None and self.drop_payload is not None:
            self.drop_payload(slot)
        slot.payload, slot.device_bytes = None, 0

    def _promote(self, slot: ExpertSlot, host: dict[str, torch.Tensor] | None, timed: bool = True) -> None:
        source = slot.tier
        t0 = time.perf_counter()
        if host is None:
            host = self._read(slot)
            size = nbytes(host)
            if self._fits(HOST, size) or self._evict(HOST, size, protect={slot.key}):
                slot.host, slot.host_bytes = host, size
        slot.payload, slot.device_bytes = self.build_payload(slot, host)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        seconds = time.perf_counter() - t0
        if timed:
            self.observer.expert_switch(slot.name, source, seconds, slot.device_bytes)
            log.info("expert %s: %s -> device, %.1f ms, %d bytes", slot.key, source, 1e3 * seconds, slot.device_bytes)

    def _evict(self, tier: str, need: int, protect: set[str]) -> bool:
        """Demote LRU slots out of ``tier`` (never protected or in-use ones) until ``need`` fits."""
        candidates = sorted(
            (s for s in self.slots.values() if s.key not in protect and s.in_use == 0 and s.tier_has(tier)),
            key=lambda s: s.last_used,
        )
        for s in candidates:
            if self._fits(tier, need):
                break
            if tier == DEVICE:
                self._drop(s)
                log.info("expert %s demoted to %s", s.key, s.tier)
            else:
                s.host, s.host_bytes = None, 0
        return self._fits(tier, need)

    def ensure(self, slots: Iterable[ExpertSlot]) -> float:
        """Make every slot device-resident (promoting and evicting by LRU); return the seconds spent switching."""
        slots = [s for s in dict.fromkeys(slots) if s is not None]
        with self._lock:
            now = time.monotonic()
            for s in slots:
                s.last_used = now
            missing = [s for s in slots if s.payload is None]
            if not missing:
                return 0.0
            t0 = time.perf_counter()
            protect = {s.key for s in slots}
            for s in missing:
                if not self._fits(DEVICE, s.device_bytes_estimate):
                    self._evict(DEVICE, s.device_bytes_estimate, protect)
                self._promote(s, s.host)
            budget = self.device_budget
            self.overshoot = max(0, self.used(DEVICE) - budget) if budget is not None else 0
            if self.overshoot:
                log.warning("device tier %d bytes over budget: one batch needs more experts than fit", self.overshoot)
            self._report()
            return time.perf_counter() - t0

    def fits(self, slots: Iterable[ExpertSlot]) -> bool:
        """Whether these slots could all be device-resident at once (evicting only idle slots)."""
        if self.device_budget is None:
            return True
        with self._lock:
            wanted = {s.key: s for s in slots if s is not None}
            need = sum(s.device_bytes or s.device_bytes_estimate for s in wanted.values())
            pinned = sum(
                s.device_bytes for s in self.slots.values() if s.key not in wanted and s.in_use > 0 and s.payload
            )
            return need + pinned <= self.device_budget
