"""Prometheus metrics of the server: requests, tokens, latencies, expert switches, resident experts.

Each server gets its own ``CollectorRegistry`` (so several servers in one process, as in tests,
never collide). The object is also the engine's tier observer and the scheduler's step observer.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

disable_created_metrics()  # no *_created series: they double the exposition and nobody graphs them

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
SWITCH_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "meswitch_requests",
            "HTTP API requests by endpoint, answering model and status",
            ["endpoint", "model", "status"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "meswitch_request_seconds",
            "Request latency, arrival to last byte",
            ["endpoint"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.first_token_seconds = Histogram(
            "meswitch_time_to_first_token_seconds",
            "Arrival to first generated token",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("meswitch_prompt_tokens", "Prompt tokens processed", ["model"], registry=r)
        self.completion_tokens = Counter("meswitch_completion_tokens", "Tokens generated", ["model"], registry=r)
        self.inflight = Gauge("meswitch_inflight_requests", "Generation requests in flight", registry=r)
        self.switches = Counter(
            "meswitch_expert_switches", "Experts promoted to the device tier, by source tier", ["source"], registry=r
        )
        self.switch_seconds = Histogram(
            "meswitch_expert_switch_seconds",
            "Time to promote an expert to the device tier",
            ["source"],
            buckets=SWITCH_BUCKETS,
            registry=r,
        )
        self.resident = Gauge("meswitch_resident_experts", "Experts per memory tier", ["tier"], registry=r)
        self.resident_bytes = Gauge("meswitch_resident_bytes", "Delta bytes held per memory tier", ["tier"], registry=r)
        self.overshoot = Gauge("meswitch_device_budget_overshoot_bytes", "Bytes over the device budget", registry=r)
        self.steps = Counter("meswitch_batch_steps", "Forward passes by kind", ["kind"], registry=r)
        self.step_seconds = Histogram(
            "meswitch_batch_step_seconds", "Forward pass time by kind", ["kind"], buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "meswitch_batch_rows", "Sequences per forward pass", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=r
        )
        self.routed = Counter(
            "meswitch_routed_requests", "Requests routed with model=auto", ["expert", "fallback"], registry=r
        )
        self.route_seconds = Histogram(
            "meswitch_route_seconds",
            "Time the router takes for one query (model=auto), in the server",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
            registry=r,
        )
        self.reloads = Counter("meswitch_reloads", "Reload attempts by result", ["result"], registry=r)

    # -- observer hooks (called from the engine and scheduler threads) ----------------------------
    def expert_switch(self, expert: str, source: str, seconds: float, nbytes: int) -> None:
        self.switches.labels(source).inc()
        self.switch_seconds.labels(source).observe(seconds)

    def tiers_changed(self, experts: dict[str, int], nbytes: dict[str, int], overshoot: int) -> None:
        for tier, n in experts.items():
            self.resident.labels(tier).set(n)
        for tier, n in nbytes.items():
            self.resident_bytes.labels(tier).set(n)
        self.overshoot.set(overshoot)

    def step(self, kind: str, rows: int, tokens: int, seconds: float) -> None:
        self.steps.labels(kind).inc()
        self.step_seconds.labels(kind).observe(seconds)
        self.batch_rows.observe(rows)

    def reload(self, result: str) -> None:
        self.reloads.labels(result).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
