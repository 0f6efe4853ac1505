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
    # expected calibration error of the top choice's confidence, and the bins it is made of
    ece: float | None = None
    reliability: list[dict[str, float]] = field(default_factory=list)

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


def calibration(confidence: Sequence[float], correct: Sequence[bool], bins: int = 10) -> tuple[float, list[dict]]:
    """(expected calibration error, per-bin ``{lo, hi, n, confidence, accuracy}``) over equal-width bins.

    ECE is the mean over queries of |accuracy - confidence| within each query's bin: 0 when a confidence
    of 0.8 means right four times in five.
    """
    conf = np.asarray(confidence, dtype=float)
    hit = np.asarray(correct, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece, table = 0.0, []
    for b in range(bins):
        sel = which == b
        if not sel.any():
            continue
        c, a = float(conf[sel].mean()), float(hit[sel].mean())
        ece += sel.sum() / len(conf) * abs(a - c)
        table.append({"lo": round(edges[b], 2), "hi": round(edges[b + 1], 2), "n": int(sel.sum()),
                      "confidence": round(c, 4), "accuracy": round(a, 4)})  # fmt: skip
    return round(float(ece), 4), table


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
    ece, reliability = calibration(
        [r.confidence for r in results], [r.domain == ex.domain for ex, r in zip(rows, results, strict=True)]
    )
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
        ece=ece,
        reliability=reliability,
    )


def format_confusion(ev: RouterEval) -> str:
    """The confusion matrix as a text table (rows: true domain, columns: routed to)."""
    w = max(8, *(len(x) for x in ev.labels)) + 1
    lines = ["true \\ routed".ljust(w) + "".join(x[: w - 1].rjust(w) for x in ev.labels)]
    for lab, row in zip(ev.labels, ev.confusion, strict=True):
        lines.append(lab.ljust(w) + "".join(str(v).rjust(w) for v in row))
    return "\n".join(lines)
