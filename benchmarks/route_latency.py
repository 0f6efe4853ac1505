"""Routing latency measured in the server: the router's own time per query, as `model: "auto"` answers report it.

    python benchmarks/route_latency.py --url http://127.0.0.1:8000 --queries FAMILY/routing/test.jsonl \\
        --out benchmarks/results/route-latency-smol-DATE.json

Sends each held-out query one at a time with ``max_tokens=1`` and reads ``routing.latency_ms`` (the time
``Router.route`` took inside the server, without queueing or generation) and the end-to-end request time;
p50/p99 of both, and the routing accuracy over the same queries.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np


def _ask(url: str, text: str) -> dict:
    body = {"model": "auto", "messages": [{"role": "user", "content": text}], "max_tokens": 1, "temperature": 0}
    req = urllib.request.Request(
        f"{url}/v1/chat/completions", json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", required=True, help="a running `meswitch serve` with a router")
    p.add_argument("--queries", type=Path, required=True, help="labelled JSONL: text, domain")
    p.add_argument("--limit", type=int, default=200, help="queries to send (default 200)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)
    rows = [json.loads(line) for line in args.queries.read_text(encoding="utf-8").splitlines() if line.strip()]
    rows = rows[: args.limit]
    for r in rows[: args.warmup]:
        _ask(args.url, r["text"])
    route, total, right = [], [], 0
    for r in rows:
        t0 = time.perf_counter()
        reply = _ask(args.url, r["text"])
        total.append((time.perf_counter() - t0) * 1000)
        routing = reply["routing"]
        route.append(routing["latency_ms"])
        right += routing["domain"] == r["domain"]

    def pct(v: list[float]) -> dict:
        return {"p50": round(float(np.percentile(v, 50)), 3), "p99": round(float(np.percentile(v, 99)), 3)}

    result = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
        },
        "queries": len(rows),
        "route_ms_in_server": pct(route),
        "request_ms_max_tokens_1": pct(total),
        "routing_accuracy": round(right / len(rows), 4),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
