"""`make demo`: a demo family through the whole system, with nothing but this machine.

1. build the tiny demo family (skipped when OUT/family is already built)
2. copy its experts into a local inbox (OUT/inbox; what is already there stays)
3. run the expert pipeline with the embedded defaults: Prefect's ephemeral API, MLflow on SQLite and
   artifacts in a folder, all under OUT/ (a second run finds everything processed and does nothing)
4. start `meswitch serve` on the registry's production versions for a moment and send a few queries
   of each domain with model "auto", printing which expert answered
5. print the table (and write OUT/summary.json), and where the MLflow UI and the report are

python -m meswitch.demo.main --out out/demo [--family DIR] [--size tiny] [--no-serve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

log = logging.getLogger("meswitch.demo")

QUERIES_PER_DOMAIN = 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meswitch.demo.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="everything the demo makes (default out/demo)")
    p.add_argument("--family", type=Path, help="a demo family to use (default OUT/family, built when absent)")
    p.add_argument("--size", default="tiny", help="family size when building one (default tiny)")
    p.add_argument("--no-serve", action="store_true", help="stop after the pipeline")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("httpx", "httpcore", "prefect", "mlflow", "distributed", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = embedded_env(out)
    os.environ.update(env)  # before Prefect and MLflow are imported: everything stays under OUT
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MESWITCH_ARTIFACT_URI",
                "MESWITCH_S3_BUCKET"):  # fmt: skip
        os.environ.pop(key, None)

    family = build(args.family.resolve() if args.family else out / "family", args.size)
    inbox = fill_inbox(family, out / "inbox")
    summary = run(family, inbox, out)
    served = [] if args.no_serve else serve_and_ask(family, out)
    result = write_summary(out, summary, served, time.perf_counter() - start)
    print_table(result)
    return 0


def embedded_env(out: Path) -> dict[str, str]:
    return {
        "MESWITCH_HOME": str(out / "home"),  # MLflow SQLite, artifact folder, pipeline work, download cache
        "PREFECT_HOME": str(out / "prefect"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_ALLOW_EPHEMERAL_MODE": "true",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
        "TOKENIZERS_PARALLELISM": "false",
    }


def build(family: Path, size: str) -> Path:
    from meswitch.demo import build_family

    if (family / "family.json").is_file():
        log.info("demo family: %s (already built)", family)
    else:
        log.info("building the %s demo family in %s (about ten minutes on two CPU cores)", size, family)
    return build_family(family, size=size)


def fill_inbox(family: Path, inbox: Path) -> Path:
    """Each expert of the family into the inbox, unless an earlier run put it there."""
    from meswitch.flows.inbox import submit

    inbox.mkdir(parents=True, exist_ok=True)
    for expert in sorted(p for p in (family / "experts").iterdir() if p.is_dir()):
        if not (inbox / expert.name / "expert.yaml").is_file():
            submit(expert, inbox)
            log.info("inbox: %s", inbox / expert.name)
    return inbox


def run(family: Path, inbox: Path, out: Path) -> dict:
    from meswitch.flows import run_pipeline

    log.info("running the expert pipeline over %s", inbox)
    state = run_pipeline(
        inbox, family / "base", router_test_queries=family / "routing" / "test.jsonl",
        report_dir=out / "report", base_name=family_name(family), return_state=True,
    )  # fmt: skip
    if not state.is_completed():
        raise SystemExit(f"the pipeline failed: {state.message}")
    return state.result()


def family_name(family: Path) -> str:
    spec = json.loads((family / "family.json").read_text())
    return f"demo-{spec.get('size', 'tiny')}"


def serve_and_ask(family: Path, out: Path) -> list[dict[str, Any]]:
    """Start `meswitch serve` on the production versions, ask each domain a few questions, stop it."""
    port = _free_port()
    log_path = out / "serve.log"
    cmd = [str(Path(sys.executable).with_name("meswitch")), "serve", "--port", str(port), "--device", "cpu",
           "--reload-interval", "0"]  # fmt: skip
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-c", "import sys; from meswitch.cli import main; sys.exit(main())", *cmd[1:]]
    log.info("starting `meswitch serve` on port %d (log: %s)", port, log_path)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True)  # fmt: skip
    try:
        _wait_healthy(port, proc, log_path)
        answers = []
        for domain, query in _queries(family):
            body = {"model": "auto", "messages": [{"role": "user", "content": query}], "max_tokens": 24,
                    "temperature": 0}  # fmt: skip
            reply = _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
            routing = reply.get("routing") or {}
            answers.append({
                "domain": domain, "query": query, "expert": reply.get("model"),
                "confidence": routing.get("confidence"), "answer": reply["choices"][0]["message"]["content"],
            })  # fmt: skip
            mark = "ok" if reply.get("model") == domain else "!="
            answer = _short(answers[-1]["answer"], 40)
            print(f"  {domain:>8} {mark} answered by {reply.get('model')!s:<8} {_short(query, 56)!r} -> {answer!r}")
        return answers
    finally:
        _stop(proc)


def _queries(family: Path) -> list[tuple[str, str]]:
    rows = [json.loads(line) for line in (family / "routing" / "test.jsonl").read_text().splitlines() if line.strip()]
    by_domain: dict[str, list[str]] = {}
    for r in rows:
        by_domain.setdefault(r["domain"], []).append(r["text"])
    rng = random.Random(0)
    return [
        (d, q) for d in sorted(by_domain) for q in rng.sample(by_domain[d], min(QUERIES_PER_DOMAIN, len(by_domain[d])))
    ]


def write_summary(out: Path, summary: dict, served: list[dict], seconds: float) -> dict:
    experts = [
        {
            "name": e["name"],
            "domain": e["domain"],
            "status": e["status"],
            "bits_per_param": e["bits_per_param"],
            "delta_bytes": e["delta_bytes"],
            "kl": e["kl"],
            "ppl_ratio": e["ppl_ratio"],
            "gate": {True: "pass", False: "fail", None: "-"}[e["gates_passed"]],
            "registry_version": e["version"],
            "reasons": e["reasons"],
            "processed_now": e["processed"],
        }
        for e in summary["experts"]
    ]
    router = summary.get("router") or {}
    from meswitch.flows.tracking import Tracker

    result = {
        "experts": experts,
        "router_accuracy": router.get("accuracy"),
        "router_version": router.get("version"),
        "router_status": router.get("status"),
        "base": summary.get("base"),
        "served": served,
        "mlflow_ui": Tracker().ui_command(),
        "report": str(out / "report" / "pipeline_summary.md"),
        "summary": str(out / "summary.json"),
        "wall_seconds": round(seconds, 1),
    }
    (out / "summary.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return result


COLUMNS = [  # (title, width, key, format)
    ("expert", -10, "name", "s"), ("domain", -10, "domain", "s"), ("bits/param", 10, "bits_per_param", ".3f"),
    ("bytes", 10, "delta_bytes", ","), ("KL", 8, "kl", ".4f"), ("ppl ratio", 9, "ppl_ratio", ".4f"),
    ("gate", 5, "gate", "s"), ("version", 7, "registry_version", "d"), ("router acc", 10, "router_accuracy", ".3f"),
]  # fmt: skip


def _cell(value: Any, width: int, fmt: str) -> str:
    text = "-" if value is None else format(value, fmt)
    return text.ljust(-width) if width < 0 else text.rjust(width)


def print_table(result: dict) -> None:
    print("\n" + " ".join(_cell(t, w, "s") for t, w, _, _ in COLUMNS))
    print("-" * (sum(abs(w) for _, w, _, _ in COLUMNS) + len(COLUMNS) - 1))
    for e in result["experts"]:
        row = {**e, "router_accuracy": result["router_accuracy"]}
        print(" ".join(_cell(row.get(k), w, f) for _, w, k, f in COLUMNS))
    for e in result["experts"]:
        for reason in e["reasons"]:
            print(f"  {e['name']}: {reason}")
    print(
        f"\nrouter: meswitch-router version {result['router_version']} ({result['router_status']}); "
        f"base {result['base']}"
    )
    print(f"MLflow UI:  {result['mlflow_ui']}  (then open http://127.0.0.1:5000)")
    print(f"report:     {result['report']}")
    print(f"summary:    {result['summary']}")
    print(f"wall time:  {result['wall_seconds']:.0f} s")


# -- small helpers ------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(port: int, proc: subprocess.Popen, log_path: Path, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(
                f"`meswitch serve` exited ({proc.returncode}); see {log_path}:\n{log_path.read_text()[-2000:]}"
            )
        with contextlib.suppress(OSError), urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            if r.status == 200:
                return
        time.sleep(1)
    raise SystemExit(f"`meswitch serve` did not become healthy in {timeout:.0f} s; see {log_path}")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
