"""How well a router routes: accuracy, per-domain accuracy, confusion matrix, latency per query."""

from __future__ import annotations

import logging
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from meswitch.routing.dataset import Example
from meswitch.routing.router import Router

log = logging.getLogger(__name__)


@dataclass
class RouterEval:
    """``confusion[i][j]``: queries of ``labels[i]`` routed to ``labels[j]`` (top choice, before fallback)."""

    n: int
    accuracy: float
    per_domain: dict[str, dict[str, float]]
    labels: list[str]
    confusion: list[list[int]]
    fallback_rate: float
    truncated: int
    skipped_unknown_domain: int
    latency_ms: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def device_name(device: torch.device | str) -> str:
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def _backend_device(router: Router) -> torch.device:
    for owner in (
        getattr(router.backend, "model", None),
        getattr(getattr(router.backend, "encoder", None), "model", None),
    ):
        if owner is not None:
            return next(owner.parameters()).device
    return torch.device("cpu")


def evaluate_router(
    router: Router, examples: Sequence[Example], latency: bool = True, warmup: int = 3, batch_size: int = 32
) -> RouterEval:
    """Route every example; with ``latency``, one query per call, each timed (what a serving request costs).

    Examples of domains the router does not know are left out and counted.
    """
    known = set(router.domain_names)
    rows = [ex for ex in examples if ex.domain in known]
    skipped = len(examples) - len(rows)
    if skipped:
        log.warning("%d queries of domains the router does not know were left out", skipped)
    if not rows:
        raise ValueError(f"no queries of the router's domains {sorted(known)}")
    times: list[float] = []
    if latency:
        for ex in rows[:warmup]:
            router.route(ex.text)
        results = []
        for ex in rows:
            t0 = time.perf_counter()
            results.append(router.route(ex.text))
            times.append((time.perf_counter() - t0) * 1000)
    else:
        results = []
        for i in range(0, len(rows), batch_size):
            results.extend(router.route_batch([ex.text for ex in rows[i : i + batch_size]]))
    labels = router.domain_names
    idx = {d: i for i, d in enumerate(labels)}
    conf = np.zeros((len(labels), len(labels)), dtype=int)
    for ex, r in zip(rows, results, strict=True):
        if r.domain is not None:
            conf[idx[ex.domain], idx[r.domain]] += 1
    correct = int(np.trace(conf))
    per_domain = {}
    for d, i in idx.items():
        total = int((np.array([ex.domain for ex in rows]) == d).sum())
        per_domain[d] = {"n": total, "accuracy": round(float(conf[i, i] / total), 4) if total else float("nan")}
    lat = {}
    if times:
        arr = np.array(times)
        lat = {
            "p50": round(float(np.percentile(arr, 50)), 3),
            "p99": round(float(np.percentile(arr, 99)), 3),
            "mean": round(float(arr.mean()), 3),
        }
    return RouterEval(
        n=len(rows),
        accuracy=round(correct / len(rows), 4),
        per_domain=per_domain,
        labels=labels,
        confusion=conf.tolist(),
        fallback_rate=round(sum(r.fallback for r in results) / len(rows), 4),
        truncated=sum(r.truncated for r in results),
        skipped_unknown_domain=skipped,
        latency_ms=lat,
        device=device_name(_backend_device(router)),
    )


def format_confusion(ev: RouterEval) -> str:
    """The confusion matrix as a text table (rows: true domain, columns: routed to)."""
    w = max(8, *(len(x) for x in ev.labels)) + 1
    lines = ["true \\ routed".ljust(w) + "".join(x[: w - 1].rjust(w) for x in ev.labels)]
    for lab, row in zip(ev.labels, ev.confusion, strict=True):
        lines.append(lab.ljust(w) + "".join(str(v).rjust(w) for v in row))
    return "\n".join(lines)
