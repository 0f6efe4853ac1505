"""A router over domains: a backend scores the domains, the router picks one and applies the threshold.

Every backend (the MCQ LLM, the embedding classifier) only turns texts into probabilities over
the router's domains; the choice, the confidence threshold and the fallback are here, once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import torch

from meswitch.routing.dataset import DomainSpec

EMPTY_QUERY = "empty query"


class Backend(Protocol):
    kind: str

    def predict(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        """Probabilities ``[len(texts), n_domains]`` (rows sum to 1) and, per text, whether it was cut."""
        ...


@dataclass(frozen=True)
class RouteResult:
    """Where a query goes and why.

    ``domain`` is the router's top choice (None for an empty query); ``expert`` is who answers:
    that domain's expert, or on fallback the configured default expert, None meaning the base
    model. ``truncated`` says the query was longer than the router's context and only its head
    was read.
    """

    domain: str | None
    expert: str | None
    confidence: float
    fallback: bool
    truncated: bool
    reason: str | None = None
    scores: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Router:
    """Routes queries with a backend over ``domains``; below ``threshold`` confidence, falls back.

    The fallback target is ``default_expert`` (an expert name) or, when that is None, the base model.
    """

    def __init__(
        self,
        backend: Backend,
        domains: Sequence[DomainSpec],
        threshold: float = 0.5,
        default_expert: str | None = None,
        manifest: Any = None,
    ):
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        names = [d.expert for d in domains]
        if default_expert is not None and default_expert not in names:
            raise ValueError(f"default expert {default_expert!r} is not one of the router's experts {names}")
        self.backend = backend
        self.domains = list(domains)
        self.threshold = float(threshold)
        self.default_expert = default_expert
        self.manifest = manifest

    @property
    def kind(self) -> str:
        return self.backend.kind

    @property
    def domain_names(self) -> list[str]:
        return [d.domain for d in self.domains]

    @property
    def experts(self) -> dict[str, str]:
        """domain -> expert name."""
        return {d.domain: d.expert for d in self.domains}

    def route(self, text: str) -> RouteResult:
        return self.route_batch([text])[0]

    def route_batch(self, texts: Sequence[str]) -> list[RouteResult]:
        """Route many queries in one backend call; empty queries fall back without reaching the model."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"a query must be a string, got {type(t).__name__}")
        live = [i for i, t in enumerate(texts) if t.strip()]
        results: list[RouteResult | None] = [None] * len(texts)
        if live:
            probs, truncated = self.backend.predict([texts[i] for i in live])
            for row, i in enumerate(live):
                results[i] = self._decide(probs[row], truncated[row])
        for i, r in enumerate(results):
            if r is None:
                results[i] = RouteResult(None, self.default_expert, 0.0, True, False, EMPTY_QUERY)
        return results  # type: ignore[return-value]

    def _decide(self, probs: torch.Tensor, truncated: bool) -> RouteResult:
        p = probs.float().tolist()
        best = max(range(len(p)), key=p.__getitem__)
        conf = p[best]
        spec = self.domains[best]
        scores = {d.domain: round(x, 6) for d, x in zip(self.domains, p, strict=True)}
        if not math.isfinite(conf):
            return RouteResult(
                None, self.default_expert, 0.0, True, truncated, "router produced no finite score", scores
            )
        if conf < self.threshold:
            reason = f"confidence {conf:.3f} below threshold {self.threshold:.3f}"
            return RouteResult(spec.domain, self.default_expert, conf, True, truncated, reason, scores)
        return RouteResult(spec.domain, spec.expert, conf, False, truncated, None, scores)
