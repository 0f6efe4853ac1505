"""`make demo`: a demo family through the whole system, with nothing but this machine.

1. build the demo family: by default the real one (SmolLM2-135M-Instruct and its chat experts, kept in
   ~/.cache/meswitch/families/smol so another clone reuses it); `--size tiny` for the 3M-parameter one
   (skipped when already built)
2. copy its experts into a local inbox (OUT/inbox; what is already there stays)
3. run the expert pipeline with the embedded defaults: Prefect's ephemeral API, MLflow on SQLite and
   artifacts in a folder, all under OUT/ (both started while step 1 runs; a second run finds everything
   processed and does nothing)
4. start `meswitch serve` on the registry's production versions for a moment and ask two held-out
   questions of each domain with model "auto", and the base the same questions
5. print the tables (and write OUT/summary.json and OUT/answers.md): the experts, and for each
   question the routed expert, its confidence, its answer and the base's, marked where checkable;
   then the commands that query the registry and the server again

python -m meswitch.demo.main --out out/demo [--family DIR] [--size smol|tiny] [--no-serve]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from meswitch.data.loading import load_rows
from meswitch.demo.chat_family import CHAT_SIZES
from meswitch.demo.family import SIZES
from meswitch.evaluation.metrics import FINAL_NUMBER, NEXT_LINE, task_hit
from meswitch.processes import exit_status_of, stop_group, stop_when_this_process_dies
from meswitch.routing.dataset import read_labelled

log = logging.getLogger("meswitch.demo")

QUERIES_PER_DOMAIN = 2


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m meswitch.demo.main", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("out/demo"), help="everything the demo makes (default out/demo)")
    p.add_argument(
        "--family",
        type=Path,
        help="a demo family to use (default: ~/.cache/meswitch/families/SIZE, or OUT/family for the tiny "
        "one; built when absent)",
    )
    p.add_argument(
        "--size",
        default="smol",
        choices=[*CHAT_SIZES, *SIZES],
        help="the family: smol (default; SmolLM2-135M-Instruct experts, about 10 minutes to build on 2 CPU "
        "cores, once), tiny (the 3M-parameter demo model)",
    )
    p.add_argument("--no-serve", action="store_true", help="stop after the pipeline")
    p.add_argument("--device", default="auto", help="where the server runs: auto (GPU when present), cpu, cuda")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("httpx", "httpcore", "prefect", "mlflow", "distributed", "urllib3"):
        logging.getLogger(name).setLevel(logging.WARNING)
    return exit_status_of(lambda: demo(args))  # Ctrl-C or SIGTERM: its server and pipeline stop, one line, no traceback


def demo(args: argparse.Namespace) -> int:
    """Services and family, inbox, pipeline, then the server asked each domain's questions; the summary."""
    start = time.perf_counter()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = embedded_env(out)
    os.environ.update(env)  # before Prefect and MLflow are imported: everything stays under OUT
    for key in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MESWITCH_ARTIFACT_URI",
                "MESWITCH_S3_BUCKET"):  # fmt: skip
        os.environ.pop(key, None)

    phases = {}  # wall seconds of each step, into summary.json

    def timed(name: str, fn, *a):
        t0 = time.perf_counter()
        value = fn(*a)
        phases[name] = round(time.perf_counter() - t0, 1)
        return value

    with ThreadPoolExecutor(1) as pool:  # the embedded services start while the family builds (or loads)
        services = pool.submit(timed, "services, beside the family", start_services)
        family = timed("family", build, args.family.resolve() if args.family else default_family(out, args.size),
                       args.size)  # fmt: skip
        services.result()
    inbox = fill_inbox(family, out / "inbox")
    summary = timed("pipeline", run, family, inbox, out)
    served = [] if args.no_serve else timed("serve", serve_and_ask, family, out, args.device)
    result = write_summary(out, summary, served, time.perf_counter() - start, family, phases, args.device)
    print_table(result)
    if served:
        answers = answers_markdown(result)
        (out / "answers.md").write_text(answers, encoding="utf-8")
        print("\n" + answers)
    print(again(out, result))
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


def default_family(out: Path, size: str) -> Path:
    """The real families live in the user's cache (a second clone reuses them); the tiny one under OUT."""
    from meswitch.demo import cache_dir

    return cache_dir().parent / "families" / size if size in CHAT_SIZES else out / "family"


def start_services() -> None:
    """Prefect's ephemeral API and MLflow's database, started before the pipeline needs them: on the H200 the
    first expert's work began 33 s after the pipeline did, most of it these two starting."""
    from meswitch.flows.runtime import start_ephemeral_api
    from meswitch.registry.client import open_registry

    start_ephemeral_api()
    open_registry().client.search_registered_models(max_results=1)  # creates the SQLite tables on a first run


def build(family: Path, size: str) -> Path:
    from meswitch.demo import build_family
    from meswitch.demo.chat_family import build_chat_family

    if (family / "family.json").is_file():
        log.info("demo family: %s (already built)", family)
    else:
        log.info("building the %s demo family in %s (15-22 minutes on two CPU cores, once)", size, family)
    return build_chat_family(family, size=size) if size in CHAT_SIZES else build_family(family, size=size)


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


def serve_and_ask(family: Path, out: Path, device: str = "auto") -> list[dict[str, Any]]:
    """Start `meswitch serve` on the production versions, ask each domain's questions with model "auto" and
    the base the same ones, stop it."""
    port = _free_port()
    log_path = out / "serve.log"
    cmd = [str(Path(sys.executable).with_name("meswitch")), "serve", "--port", str(port), "--device", device,
           "--reload-interval", "0"]  # fmt: skip
    if not Path(cmd[0]).exists():
        cmd = [sys.executable, "-c", "import sys; from meswitch.cli import main; sys.exit(main())", *cmd[1:]]
    log.info("starting `meswitch serve` on port %d (log: %s)", port, log_path)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=os.environ.copy(),
                                start_new_session=True)  # fmt: skip
        stop_when_this_process_dies(proc.pid)  # should the demo be killed outright
    try:
        _wait_healthy(port, proc, log_path)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=30) as r:
            models = json.loads(r.read())["data"]
        base_name = next((m["id"] for m in models if m.get("meswitch", {}).get("kind") == "base"), None)
        # every question at once, to the experts and the base: the server batches them into shared forward passes
        asked = questions(family)
        with ThreadPoolExecutor(max_workers=2 * len(asked)) as pool:
            routed = [pool.submit(_ask, port, "auto", q["question"]) for q in asked]
            based = [pool.submit(_ask, port, base_name, q["question"]) if base_name else None for q in asked]
            answers = []
            for q, fut, base_fut in tqdm(zip(asked, routed, based, strict=True), total=len(asked),
                                         desc="asking the server", unit="question"):  # fmt: skip
                reply = fut.result()
                routing = reply.get("routing") or {}
                answer = reply["choices"][0]["message"]["content"]
                row = {**q, "expert": reply.get("model"), "confidence": routing.get("confidence"),
                       "route_ms": routing.get("latency_ms"), "answer": answer}  # fmt: skip
                if base_fut is not None:
                    row["base_answer"] = base_fut.result()["choices"][0]["message"]["content"]
                if q.get("expected") is not None:
                    row["right"] = task_hit(q["metric"], row["answer"], q["expected"])
                    row["base_right"] = task_hit(q["metric"], row.get("base_answer", ""), q["expected"])
                answers.append(row)
        return answers
    finally:
        stop_group(proc, timeout=20)


MAX_TOKENS = 64  # enough for a worked answer to an arithmetic problem
# greedy: what each expert itself says (a frequency penalty of 0.3 barely curbed the short Chinese expert's
# repetition and turned a right sum wrong)
DECODING = {"temperature": 0}


def _ask(port: int, model: str, question: str) -> dict:
    """The server's answer; an HTTP error becomes an answer that says what went wrong (the table shows it)."""
    body = {"model": model, "messages": [{"role": "user", "content": question}], "max_tokens": MAX_TOKENS,
            **DECODING}  # fmt: skip
    try:
        return _post(f"http://127.0.0.1:{port}/v1/chat/completions", body)
    except urllib.error.HTTPError as e:
        try:
            why = json.loads(e.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            why = str(e)
        log.warning("%s for model %r: %s", e.code, model, why)
        return {"model": None, "choices": [{"message": {"content": f"(HTTP {e.code}: {why})"}}]}


_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", re.S)  # SmolLM2's chat template (ChatML)


def questions(family: Path) -> list[dict[str, Any]]:
    """Two held-out questions per domain: the user turns of its evaluation conversations (with their answer
    where the domain has a checkable one), or, for a family without chat data, its routing test queries."""
    rng = random.Random(0)
    out = []
    for expert in sorted(p for p in (family / "experts").iterdir() if p.is_dir()):
        rows = load_rows(expert / "eval.jsonl", optional=("prompt", "answer", "metric"))
        asked = []
        for r in rows:
            turn = _USER_TURN.search(r.get("prompt") or r["text"])
            if turn and (r.get("metric") != NEXT_LINE):  # a cut-off function is a completion, not a question
                checkable = r.get("metric") == FINAL_NUMBER
                asked.append({"domain": expert.name, "question": turn.group(1).strip(),
                              "expected": r["answer"] if checkable else None, "metric": r.get("metric")})  # fmt: skip
        out += rng.sample(asked, min(QUERIES_PER_DOMAIN, len(asked)))
    if not out:  # the tiny family: plain text, no conversations
        by_domain: dict[str, list[str]] = {}
        for ex in read_labelled(family / "routing" / "test.jsonl"):
            by_domain.setdefault(ex.domain, []).append(ex.text)
        for d in sorted(by_domain):
            for q in rng.sample(by_domain[d], min(QUERIES_PER_DOMAIN, len(by_domain[d]))):
                out.append({"domain": d, "question": q, "expected": None, "metric": None})
    return out


def family_scores(family: Path) -> dict[str, dict]:
    """Per expert, what family.json measured on its held-out data: perplexity and task score, expert against base."""
    doc = json.loads((family / "family.json").read_text())
    out = {}
    for name, e in doc.get("experts", {}).items():
        task = e.get("task")
        if not isinstance(task, dict):  # the tiny family: the metric's name, its scores under task_scores
            task = doc.get("task_scores", {}).get(name) or {}
        out[name] = {"ppl": e.get("ppl_own_domain"), "base_ppl": e.get("base_ppl_own_domain"),
                     "task_metric": task.get("metric"), "task_prompts": task.get("prompts"),
                     "task_score": task.get("expert"), "base_task_score": task.get("base"),
                     "token_accuracy": task.get("token_accuracy")}  # fmt: skip
    return out


def write_summary(
    out: Path, summary: dict, served: list[dict], seconds: float, family: Path, phases: dict, device: str
) -> dict:
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
        "family": str(family),
        "family_scores": family_scores(family),
        "home": os.environ.get("MESWITCH_HOME"),
        "mlflow_ui": Tracker().ui_command(),
        "report": str(out / "report" / "pipeline_summary.md"),
        "summary": str(out / "summary.json"),
        "wall_seconds": round(seconds, 1),
        "phase_seconds": phases,
        "serve_device": device,
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
    steps = ", ".join(f"{k} {v:.0f} s" for k, v in result.get("phase_seconds", {}).items())
    print(f"wall time:  {result['wall_seconds']:.0f} s ({steps})")


def answers_markdown(result: dict) -> str:
    """The questions table: routed expert and confidence, its answer and the base's, right or wrong where checkable."""

    def cell(text: str | None, right: bool | None) -> str:
        mark = {True: "✅ ", False: "❌ ", None: ""}[right]
        return mark + _short(text or "", 90).replace("|", "\\|")

    lines = [
        f"Greedy answers ({', '.join(f'{k} {v}' for k, v in DECODING.items())}, at most {MAX_TOKENS} tokens), "
        "two held-out questions per domain:\n",
        "| domain | question | routed to (confidence) | compressed expert's answer | base's answer |",
        "|---|---|---|---|---|",
    ]
    for a in result["served"]:
        conf = "-" if a.get("confidence") is None else f"{a['confidence']:.2f}"
        lines.append(
            f"| {a['domain']} | {_short(a['question'], 70).replace('|', '/')} | {a['expert']} ({conf}) | "
            f"{cell(a['answer'], a.get('right'))} | {cell(a.get('base_answer'), a.get('base_right'))} |"
        )
    scored = [a for a in result["served"] if a.get("right") is not None]
    if scored:
        lines.append(
            f"\nCheckable answers right: experts {sum(a['right'] for a in scored)}/{len(scored)}, "
            f"base {sum(a['base_right'] for a in scored)}/{len(scored)}."
        )
    route = sorted(a["route_ms"] for a in result["served"] if a.get("route_ms") is not None)
    if route:
        lines.append(f"Routing in the server: median {route[len(route) // 2]:.1f} ms a question ({len(route)} asked).")
    tasks = {n: s for n, s in result.get("family_scores", {}).items() if s.get("task_score") is not None}
    for name, s in sorted(tasks.items()):
        lines.append(
            f"Held-out task ({s.get('task_metric')}, {s.get('task_prompts', '?')} problems, full expert): "
            f"{name} {s['task_score']:.3f} against the base's {s['base_task_score']:.3f}."
        )
        if a := s.get("token_accuracy"):
            lines.append(
                f"Held-out next-line token accuracy ({a['prompts']} functions, full expert): {name} {a['expert']:.3f} "
                f"against the base's {a['base']:.3f} (x{a['expert_over_base']:.3f}, 95% CI {a['ci95'][0]:.3f}-"
                f"{a['ci95'][1]:.3f})."
            )
    return "\n".join(lines) + "\n"


def again(out: Path, result: dict) -> str:
    """The commands that reach this run's registry and a server on it again."""
    home = result.get("home") or str(out / "home")
    return (
        "\nquery it again (the registry lives in MESWITCH_HOME):\n"
        f"  export MESWITCH_HOME={home} PREFECT_HOME={out / 'prefect'}\n"
        "  .venv/bin/meswitch registry list\n"
        f"  .venv/bin/meswitch serve --port 8000 --device {result.get('serve_device', 'auto')} &\n"
        "  curl -s http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' \\\n"
        '    -d \'{"model": "auto", "messages": [{"role": "user", "content": "What is 17 plus 25?"}]}\'\n'
    )


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


def _short(text: str, n: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[: n - 1] + "…"


if __name__ == "__main__":
    sys.exit(main())
