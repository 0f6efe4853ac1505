"""Router accuracy and latency on a demo family: both backends, fine-tuned vs un-fine-tuned MCQ, 4 then 5 domains.

    .venv/bin/python benchmarks/router_eval.py --family out/demo-family-tiny \\
        --out benchmarks/results/router-2026-11-22.json

Trains (on the family's routing/train.jsonl lines and the experts' examples) and evaluates on the
family's held-out routing/test.jsonl:

- ``embedding``: the packaged all-MiniLM-L6-v2 + logistic regression;
- ``mcq-finetuned``: the family's base LM fine-tuned as the multiple-choice router;
- ``mcq-zero-shot``: the same base LM, not fine-tuned, on the same split (the paper's Figure 5);
- with ``--extra`` (the family has ``extra/``): both backends retrained over five domains (the MCQ
  router from the base, or with ``--warm-start`` from the four-domain router through ``init_from``).

Latency is per query (one query per call, as a serving request), p50/p99 over the test queries, on
the device given (and on the GPU too where one is present and ``--gpu`` is set). The JSON records the
device, torch threads, load average, versions and the command.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections import Counter
from pathlib import Path

import torch

from meswitch.artifacts import verify
from meswitch.routing import RouterJob, evaluate_router, load_router, read_labelled, train_router
from meswitch.routing.dataset import routing_files
from meswitch.routing.mcq import MCQConfig

log = logging.getLogger("router_eval")


def _versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    def _of(name: str) -> str | None:
        try:
            return version(name)
        except PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": _of("transformers"), "sentence_transformers": _of("sentence-transformers")}  # fmt: skip


def _queries(family: Path, out: Path) -> Path:
    out.write_text("".join(p.read_text(encoding="utf-8") for p in routing_files(family, "test")), encoding="utf-8")
    return out


def _first_per_domain(queries: list, n: int) -> list:
    """The first ``n`` held-out queries of each domain, in file order."""
    kept, count = [], Counter()
    for q in queries:
        if count[q.domain] < n:
            kept.append(q)
            count[q.domain] += 1
    return kept


def _run(
    name: str, job: RouterJob, queries: list, devices: list[str], latency_limit: int, base: Path, reuse: bool
) -> dict:
    t0 = time.perf_counter()
    reused = reuse and (job.out / "manifest.json").is_file()
    manifest = verify(job.out) if reused else train_router(job)
    wall = time.perf_counter() - t0
    entry = {
        "reused_artifact": reused,
        "backend": job.backend,
        "domains": [d["domain"] for d in manifest.metadata["domains"]],
        "train_seconds": manifest.metrics["train_seconds"],
        "train_wall_seconds": None if reused else round(wall, 2),
        "train_examples": manifest.metrics["train_examples"],
        "method": manifest.method,
        "train_metrics": {k: v for k, v in manifest.metrics.items() if k != "heldout"},
        "eval": {},
    }
    for device in devices:
        router = load_router(job.out, device=device, base_model=base)
        acc = evaluate_router(router, queries, latency=False)
        lat = evaluate_router(router, queries[:latency_limit], latency=True)
        entry["eval"][device] = {
            **{k: v for k, v in acc.to_dict().items() if k != "latency_ms"},
            "latency_ms": lat.latency_ms,
            "latency_queries": lat.n,
            "device_name": lat.device,
        }
        if job.backend == "mcq" and manifest.method.get("orders", 1) != 1:  # the same router, listed order only
            listed = evaluate_router(
                load_router(job.out, device=device, base_model=base, orders=1), queries, latency=False
            )
            entry["eval"][device]["listed_order_only"] = {"accuracy": listed.accuracy, "per_domain": listed.per_domain}
        log.info("%s on %s: accuracy %.4f, ECE %s, p50 %.2f ms, p99 %.2f ms", name, device, acc.accuracy, acc.ece,
                 lat.latency_ms["p50"], lat.latency_ms["p99"])  # fmt: skip
    return entry


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", type=Path, required=True, help="a demo family folder (build_family)")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--work", type=Path, help="where router artifacts go (default: beside --out, in .router-work)")
    p.add_argument("--epochs", type=int, default=None, help="MCQ SFT epochs (default: MCQConfig's)")
    p.add_argument("--lr", type=float, default=None)
    p.add_argument("--steps", type=int, default=None, help="MCQ SFT steps (default: MCQConfig's)")
    p.add_argument("--finetune", choices=["full", "lora"], default=None, help="MCQ SFT mode (default: MCQConfig's)")
    p.add_argument("--batch-size", type=int, default=None, help="MCQ SFT batch (default: MCQConfig's)")
    p.add_argument("--autocast", action="store_true", help="MCQ SFT forward passes in bf16 autocast")
    p.add_argument("--orders", type=int, default=None, help="MCQ option orders averaged when routing (default: all)")
    p.add_argument("--test-per-domain", type=int, default=None, help="held-out queries per domain (default: all)")
    p.add_argument(
        "--warm-start",
        action="store_true",
        help="start the 5-domain MCQ retrain from the 4-domain router (init_from) instead of the base",
    )
    p.add_argument("--retrain-steps", type=int, default=None, help="MCQ steps of the 5-domain retrain")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--gpu", action="store_true", help="also measure on cuda when present")
    p.add_argument("--device", default="cpu", help="where the routers train (cpu, cuda; default cpu)")
    p.add_argument("--extra", action="store_true", help="retrain over five domains (the family's extra/)")
    p.add_argument("--reuse", action="store_true", help="evaluate router artifacts already in --work, do not retrain")
    p.add_argument("--note", default="", help="free text recorded in the JSON")
    p.add_argument("--latency-queries", type=int, default=200, help="queries timed one by one (default 200)")
    p.add_argument(
        "--only",
        default="embedding,mcq-finetuned,mcq-zero-shot,embedding-5-domains,mcq-finetuned-5-domains",
        help="comma-separated runs (the 5-domain ones need --extra)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work or args.out.parent / ".router-work"
    work.mkdir(parents=True, exist_ok=True)
    queries = read_labelled(_queries(args.family, work / "test.jsonl"))
    if args.test_per_domain:
        queries = _first_per_domain(queries, args.test_per_domain)
    devices = ["cpu"] + (["cuda"] if args.gpu and torch.cuda.is_available() else [])
    given = {"epochs": args.epochs, "lr": args.lr, "steps": args.steps, "finetune": args.finetune,
             "batch_size": args.batch_size, "autocast": args.autocast or None, "orders": args.orders}  # fmt: skip
    sft = {k: v for k, v in given.items() if v is not None}
    runs = set(args.only.split(","))
    retrain = {"steps": args.retrain_steps} if args.retrain_steps else {}
    four = [args.family / "experts"]
    five = [*four, args.family / "extra"]
    results: dict = {}
    plan = [
        ("embedding", RouterJob(four, work / "embedding-4", backend="embedding", device=args.device)),
        ("mcq-finetuned", RouterJob(four, work / "mcq-ft-4", mcq=MCQConfig(**sft), device=args.device)),
        ("mcq-zero-shot", RouterJob(four, work / "mcq-zs-4", mcq=MCQConfig(finetune="none"), device=args.device)),
    ]
    if args.extra:
        plan += [
            ("embedding-5-domains", RouterJob(five, work / "embedding-5", backend="embedding", device=args.device)),
            (
                "mcq-finetuned-5-domains",
                RouterJob(
                    five,
                    work / "mcq-ft-5",
                    mcq=MCQConfig(**{**sft, **retrain}),
                    init_from=work / "mcq-ft-4" if args.warm_start else None,
                    device=args.device,
                ),
            ),
        ]
    for name, job in plan:
        if name not in runs:
            continue
        log.info("run %s", name)
        results[name] = _run(name, job, queries, devices, args.latency_queries, args.family / "base", args.reuse)
        _write(args, results, queries, devices)  # after every run: a run cut by a time limit keeps the finished ones
    return 0


def _write(args, results: dict, queries: list, devices: list[str]) -> None:
    family = json.loads((args.family / "family.json").read_text()) if (args.family / "family.json").is_file() else {}
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "family": {
            "path": str(args.family),
            "size": family.get("size"),
            "seed": family.get("seed"),
            "parameters": family.get("parameters"),
        },
        "test_queries": len(queries),
        "note": args.note,
        "host": {
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_at_end": os.getloadavg(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        },
        "versions": _versions(),
        "results": results,
    }
    if "mcq-finetuned" in results and "mcq-zero-shot" in results:
        report["finetuned_vs_zero_shot"] = {
            dev: {
                "finetuned": results["mcq-finetuned"]["eval"][dev]["accuracy"],
                "zero_shot": results["mcq-zero-shot"]["eval"][dev]["accuracy"],
            }
            for dev in devices
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s", args.out)


if __name__ == "__main__":
    sys.exit(main())
