"""Bounded load test of `meswitch serve` on loopback: concurrent OpenAI clients against a demo family on CPU.

Builds (or reuses) the demo family, compresses its experts and trains an embedding router (both
reused when present), starts `meswitch serve` as a subprocess on a free loopback port, runs
``--clients`` concurrent clients for ``--seconds`` (a mix of every pinned expert and ``auto``,
chat and text completions, streamed and not), then writes latencies (p50/p90/p99), time to first
token, throughput and failures as JSON.

    .venv/bin/python benchmarks/load_test.py --family out/demo-tiny --size tiny \
        --clients 32 --seconds 30 --out benchmarks/results/serving-load-2026-11-22.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import random
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx


def prepare(family: Path, size: str, work: Path) -> tuple[Path, list[Path], Path, list[str]]:
    """The family, its compressed experts and a router; returns (base, artifacts, router, prompts)."""
    from meswitch.artifacts import ArtifactError, verify
    from meswitch.compression.api import CompressJob, run_compress
    from meswitch.compression.calibration import CalibConfig
    from meswitch.compression.expert import ExpertInfo
    from meswitch.demo import build_family
    from meswitch.expert_card import load_card
    from meswitch.routing import RouterJob, train_router

    root = build_family(family, size=size, seed=0)
    artifacts = []
    for folder in sorted((root / "experts").iterdir()):
        card = load_card(folder)
        out = work / "artifacts" / card.name
        try:
            verify(out)
        except ArtifactError:
            run_compress(CompressJob(base=root / "base", expert=folder, calib=card.calibration_data, out=out,
                                     info=ExpertInfo(card.name, card.domain), calib_cfg=CalibConfig(samples=32),
                                     device="cpu"))  # fmt: skip
        artifacts.append(out)
    router = work / "router"
    try:
        verify(router)
    except ArtifactError:
        experts = sorted((root / "experts").iterdir())
        train_router(RouterJob(experts=experts, out=router, backend="embedding", device="cpu"))
    prompts = [json.loads(line)["text"] for line in (root / "routing" / "test.jsonl").read_text().splitlines()]
    return root / "base", artifacts, router, prompts


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(base: Path, artifacts: list[Path], router: Path, port: int, threads: int, log: Path):
    cmd = [sys.executable, "-c", "import sys; from meswitch.cli import main; sys.exit(main())", "serve",
           "--base", str(base), "--experts", *map(str, artifacts), "--router", str(router),
           "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", "--threads", str(threads),
           "--reload-interval", "0", "--max-concurrent", "128", "--max-batch", "32"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}; see {log}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url, cmd
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise RuntimeError(f"server did not become healthy; see {log}")


async def client_loop(
    i: int, http: httpx.AsyncClient, url: str, models: list[str], prompts: list[str], deadline: float, records: list
) -> None:
    """One closed-loop client: sends a request, reads the whole answer (parsing every SSE chunk), sends the next.

    Plain httpx rather than the openai client: on a 2-core machine the client's own parsing would
    otherwise be what limits the load (the API tests use the openai client).
    """
    rng = random.Random(i)
    k = 0
    while time.time() < deadline:
        model = models[(i + k) % len(models)]
        k += 1
        chat, stream = rng.random() < 0.5, rng.random() < 0.5
        text = rng.choice(prompts)
        max_tokens = rng.randint(8, 32)
        rec = {"client": i, "model": model, "chat": chat, "stream": stream, "max_tokens": max_tokens}
        body = {"model": model, "max_tokens": max_tokens, "temperature": 0.7, "seed": rng.randrange(1 << 30),
                "stream": stream}  # fmt: skip
        if chat:
            body["messages"] = [{"role": "user", "content": text}]
        else:
            body["prompt"] = text
        path = "/v1/chat/completions" if chat else "/v1/completions"
        rec["start"] = time.time()
        t0 = time.perf_counter()
        try:
            if stream:
                first, n, answered, finish = None, 0, None, None
                async with http.stream("POST", url + path, json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            raise RuntimeError(chunk["error"]["message"])
                        answered = chunk["model"]
                        c = chunk["choices"][0]
                        piece = c["delta"].get("content") if chat else c["text"]
                        if piece:
                            first = first if first is not None else time.perf_counter() - t0
                            n += 1
                        finish = c["finish_reason"] or finish
                if finish is None:
                    raise RuntimeError("stream ended without a finish_reason")
                rec.update(ttft_s=first, chunks=n, answered=answered)
            else:
                r = await http.post(url + path, json=body)
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:200]}")
                data = r.json()
                rec.update(completion_tokens=data["usage"]["completion_tokens"], answered=data["model"])
            rec["ok"] = True
        except Exception as e:  # every failure is recorded, none stops the test
            rec.update(ok=False, error=f"{type(e).__name__}: {e}"[:300])
        rec["latency_s"] = time.perf_counter() - t0
        records.append(rec)


async def run_clients(url: str, first: int, n: int, models: list[str], prompts: list[str], deadline: float) -> list:
    records: list[dict] = []
    limits = httpx.Limits(max_connections=n + 8, max_keepalive_connections=n + 8)
    async with httpx.AsyncClient(limits=limits, timeout=120) as http:
        await asyncio.gather(*(client_loop(first + i, http, url, models, prompts, deadline, records)
                               for i in range(n)))  # fmt: skip
    return records


def worker(job: tuple) -> list:
    """One client process: its share of the clients, on its own event loop."""
    return asyncio.run(run_clients(*job))


def pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))], 4)


def scrape(metrics: str, name: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", type=Path, default=Path("out/demo-tiny"))
    p.add_argument("--size", default="tiny")
    p.add_argument("--work", type=Path, default=None, help="artifacts and router (default: FAMILY-serving)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--seconds", type=float, default=30.0)
    p.add_argument("--threads", type=int, default=1, help="server torch threads")
    p.add_argument("--procs", type=int, default=2, help="client processes the clients are spread over")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/serving-load-2026-11-22.json"))
    args = p.parse_args(argv)
    work = args.work or args.family.with_name(args.family.name + "-serving")
    base, artifacts, router, prompts = prepare(args.family, args.size, work)
    port = free_port()
    proc, url, cmd = start_server(base, artifacts, router, port, args.threads, work / "server.log")
    try:
        models = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"] if m["id"] != "base"]
        load_before = os.getloadavg()
        records: list[dict] = []
        deadline = time.time() + args.seconds + 3  # the client processes take a moment to start

        per = [args.clients // args.procs + (p < args.clients % args.procs) for p in range(args.procs)]
        starts = [sum(per[:p]) for p in range(args.procs)]
        jobs = [(url, starts[p], per[p], models, prompts, deadline) for p in range(args.procs)]
        with multiprocessing.get_context("spawn").Pool(args.procs) as pool:
            for part in pool.map(worker, jobs):
                records.extend(part)
        # The load window: from the first request sent to the last answer received.
        wall = max(r["start"] + r["latency_s"] for r in records) - min(r["start"] for r in records)
        load_after = os.getloadavg()
        metrics = httpx.get(f"{url}/metrics").text
        health = httpx.get(f"{url}/healthz").json()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    ok = [r for r in records if r["ok"]]
    failed = [r for r in records if not r["ok"]]
    lat = [r["latency_s"] for r in ok]
    ttft = [r["ttft_s"] for r in ok if r.get("ttft_s") is not None]
    tokens = scrape(metrics, "meswitch_completion_tokens_total")
    steps = scrape(metrics, "meswitch_batch_rows_count")
    rows = scrape(metrics, "meswitch_batch_rows_sum")
    import torch
    import transformers

    rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "what": "bounded load test of meswitch serve on loopback (CPU), demo family",
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "server_command": " ".join(cmd[3:]),
        "machine": {
            "device": "cpu",
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "note": "a shared machine: the load average counts other users' processes too",
        },
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "meswitch_git": rev},
        "config": {
            "family": str(args.family),
            "size": args.size,
            "clients": args.clients,
            "seconds": args.seconds,
            "server_threads": args.threads,
            "models": models,
            "max_tokens": "uniform 8..32",
            "temperature": 0.7,
            "mix": "50% chat / 50% completions, 50% streamed; models round-robin incl. auto",
        },
        "results": {
            "requests": len(records),
            "failed": len(failed),
            "errors": sorted({r["error"] for r in failed})[:10],
            "wall_seconds": round(wall, 2),
            "requests_per_second": round(len(ok) / wall, 3),
            "completion_tokens": int(tokens),
            "completion_tokens_per_second": round(tokens / wall, 2),
            "latency_seconds": {
                "p50": pct(lat, 50),
                "p90": pct(lat, 90),
                "p99": pct(lat, 99),
                "mean": round(statistics.mean(lat), 4) if lat else None,
                "max": pct(lat, 100),
            },
            "time_to_first_token_seconds": {"p50": pct(ttft, 50), "p90": pct(ttft, 90), "p99": pct(ttft, 99)},
            "forward_passes": int(steps),
            "mean_forward_ms": {
                kind: round(
                    1e3
                    * scrape(metrics, f'meswitch_batch_step_seconds_sum{{kind="{kind}"}}')
                    / max(1.0, scrape(metrics, f'meswitch_batch_step_seconds_count{{kind="{kind}"}}')),
                    2,
                )
                for kind in ("prefill", "decode")
            },
            "mean_sequences_per_forward": round(rows / steps, 2) if steps else None,
            "by_model": {m: sum(1 for r in ok if r["model"] == m) for m in models},
            "expert_switches": int(scrape(metrics, "meswitch_expert_switches_total")),
            "resident": health["tiers"]["experts"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["results"], indent=2))
    print(f"wrote {args.out}")
    return 0 if not failed else 1


if __name__ == "__main__":
    sys.exit(main())
