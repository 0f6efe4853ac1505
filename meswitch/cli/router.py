"""`meswitch router train | eval` and `meswitch route`: model-level routing from the command line."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from meswitch.cli import CommandError
from meswitch.cli.compress import count_arg
from meswitch.devices import DEVICE_HELP, device_arg

# Flags that only the MCQ backend reads; given with the embedding backend they are refused, not ignored
MCQ_ONLY = {
    "init_from": "--init-from",
    "steps": "--steps",
    "epochs": "--epochs",
    "lr": "--lr",
    "batch_size": "--batch-size",
}
ORDERS_HELP = "MCQ: override how many option orders are averaged, 0 (all) to the router's number of domains"


def register(sub) -> None:
    from meswitch.routing.mcq import MCQConfig

    p = sub.add_parser(
        "router",
        help="train or evaluate a router that sends each query to the expert of its domain",
        description="Model-level routing: an MCQ LLM router (the paper's) or a sentence-embedding classifier.",
    )
    rsub = p.add_subparsers(dest="router_command", required=True, metavar="ACTION")

    t = rsub.add_parser(
        "train",
        help="train a router over the domains of the given experts; write a router artifact",
        description="Build the training set from each expert's expert.yaml (examples) and its domain's queries "
        "(the family's routing/train.jsonl lines of that domain, topped up to --max-per-domain with snippets of "
        "the family's data/<domain>/train.jsonl, or of the expert's calibration texts outside a family), "
        "train the backend, evaluate on the family's routing/test.jsonl when present, and write a sealed "
        "artifact folder. Retrain with a new expert added to route over the expanded domain set.",
    )
    t.add_argument(
        "--experts",
        type=Path,
        nargs="+",
        required=True,
        metavar="DIR",
        help="expert folders (each with expert.yaml), or folders of expert folders (e.g. FAMILY/experts)",
    )
    t.add_argument(
        "--out",
        type=Path,
        required=True,
        help="router artifact folder to write: new, empty, or an earlier router (replaced atomically)",
    )
    t.add_argument(
        "--backend",
        choices=["embedding", "mcq"],
        default="embedding",
        help="embedding (default): a classifier on sentence embeddings, trained in seconds; mcq: the paper's LLM "
        "router, fine-tuned for 1600 steps by default (minutes on a GPU, several on CPU even for the micro family)",
    )
    t.add_argument(
        "--base-model",
        type=Path,
        help="local HF causal LM for the MCQ router (default: the experts' family base/); for the embedding "
        "backend, the model to mean-pool when no sentence encoder is installed",
    )
    t.add_argument(
        "--init-from",
        type=Path,
        metavar="ROUTER",
        help="MCQ: continue from an earlier router of the same base (e.g. the production one, when a domain is added)",
    )
    t.add_argument("--finetune", choices=["full", "lora", "none"], default="full", help="MCQ: SFT mode (default full)")
    t.add_argument("--steps", type=int, help="MCQ: optimizer steps (default 1600; 800 for a warm start is plenty)")
    t.add_argument("--epochs", type=int, help="MCQ: passes over the training queries (instead of --steps)")
    t.add_argument(
        "--lr", type=float, help="MCQ: peak learning rate (default by model size: 1e-3 under 100M parameters)"
    )
    t.add_argument("--batch-size", type=int, help=f"MCQ: queries per step (default {MCQConfig.batch_size})")
    t.add_argument("--lora-r", type=int, default=8, help="MCQ LoRA rank (default 8)")
    t.add_argument("--max-length", type=int, default=512, help="router context in tokens (default 512)")
    t.add_argument(
        "--orders",
        type=count_arg,
        default=0,
        help="MCQ: option orders averaged per query when routing (default 0: every cyclic shift; 1: listed order)",
    )
    t.add_argument("--encoder", default="auto", help="embedding: auto, packaged, or a model folder (default auto)")
    t.add_argument(
        "--threshold", type=float, default=0.5, help="confidence below which queries fall back (default 0.5)"
    )
    t.add_argument("--default-expert", help="expert that gets fallback queries (default: the base model)")
    t.add_argument("--max-per-domain", type=int, default=256, help="training queries per domain (default 256)")
    t.add_argument("--name", default="router", help="name recorded in the manifest")
    t.add_argument("--seed", type=int, default=0, help="seed of data sampling and training (default 0)")
    t.add_argument("--threads", type=int, help="MCQ: torch threads while fine-tuning (default: torch's)")
    t.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    t.add_argument("--json", action="store_true", help="print the manifest's metrics as JSON")
    t.set_defaults(func=_train)

    e = rsub.add_parser("eval", help="accuracy, confusion matrix and latency of a router on labelled queries")
    e.add_argument("router", type=Path, help="router artifact folder")
    e.add_argument("--data", type=Path, required=True, help="JSONL with 'text' and 'domain' per line")
    e.add_argument("--limit", type=count_arg, default=0, help="evaluate at most this many lines (default 0: all)")
    e.add_argument("--base-model", type=Path, help="base model for a LoRA / un-fine-tuned MCQ router, if moved")
    e.add_argument("--threshold", type=float, help="override the artifact's confidence threshold")
    e.add_argument("--orders", type=count_arg, help=ORDERS_HELP)
    e.add_argument("--no-latency", action="store_true", help="route in batches; skip per-query timing")
    e.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.set_defaults(func=_eval)

    r = sub.add_parser(
        "route",
        help="route queries with a router artifact: domain, expert, confidence",
        description="Route QUERY, or with --file every line of a file (- for stdin: one query per line, or "
        "JSONL with a 'text' field), loading the router once; one result per line, with its latency.",
    )
    r.add_argument("router", type=Path, help="router artifact folder")
    r.add_argument("query", nargs="?", help="the query text (or use --file)")
    r.add_argument("--file", help="queries, one per line (.jsonl: a 'text' field per line); - reads stdin")
    r.add_argument("--base-model", type=Path, help="base model for a LoRA / un-fine-tuned MCQ router, if moved")
    r.add_argument("--threshold", type=float, help="override the artifact's confidence threshold")
    r.add_argument("--orders", type=count_arg, help=ORDERS_HELP)
    r.add_argument("--device", type=device_arg, default="auto", help=f"{DEVICE_HELP} (default auto)")
    r.add_argument("--json", action="store_true", help="print the result as JSON")
    r.set_defaults(func=_route)


def _load(args):
    from meswitch.devices import resolve_device
    from meswitch.routing import load_router

    _check_orders(args.router, args.orders)
    try:
        device = str(resolve_device(args.device))
        return load_router(
            args.router, base_model=args.base_model, device=device, threshold=args.threshold, orders=args.orders
        )
    except ValueError as e:
        raise CommandError(str(e)) from e


def _check_orders(router: Path, orders: int | None) -> None:
    """Refuse an --orders the router cannot use, from its manifest, before its model is loaded: only an MCQ router
    averages option orders, and it has one order per domain (the backend would quietly use fewer)."""
    if orders is None:
        return
    from meswitch.artifacts import read_manifest

    manifest = read_manifest(router)
    backend = manifest.method.get("backend")
    if backend != "mcq":
        raise CommandError(f"--orders applies to MCQ routers; {router} is a {backend} router")
    domains = len(manifest.metadata.get("domains", []))
    if orders > domains:
        raise CommandError(f"--orders {orders}: {router} routes over {domains} domains, so 0 (all) to {domains}")


def _train(args) -> int:
    from meswitch.artifacts import check_out
    from meswitch.devices import resolve_device
    from meswitch.routing import RouterJob, train_router
    from meswitch.routing.embedding import EmbeddingConfig
    from meswitch.routing.mcq import MCQConfig

    if args.backend != "mcq" and (given := [flag for key, flag in MCQ_ONLY.items() if getattr(args, key) is not None]):
        raise CommandError(f"{', '.join(given)} apply only to --backend mcq (the default backend is embedding)")
    out = check_out(args.out, "router", inputs=[*args.experts, args.base_model, args.init_from])
    mcq_overrides = {
        k: v
        for k, v in {"steps": args.steps, "epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size}.items()
        if v is not None
    }
    try:
        job = RouterJob(
            experts=args.experts,
            out=out,
            backend=args.backend,
            base_model=args.base_model,
            mcq=MCQConfig(
                finetune=args.finetune,
                lora_r=args.lora_r,
                max_length=args.max_length,
                orders=args.orders,
                seed=args.seed,
                threads=args.threads,
                **mcq_overrides,
            ),
            embedding=EmbeddingConfig(encoder=args.encoder, seed=args.seed),
            threshold=args.threshold,
            default_expert=args.default_expert,
            max_per_domain=args.max_per_domain,
            seed=args.seed,
            name=args.name,
            device=str(resolve_device(args.device)),
            init_from=args.init_from,
        )
        manifest = train_router(job)
    except ValueError as e:  # CardError and RoutingDataError are ValueErrors
        raise CommandError(str(e)) from e
    m = manifest.metrics
    if args.json:
        print(json.dumps(m, indent=2))
        return 0
    domains = ", ".join(f"{d['domain']}->{d['expert']}" for d in manifest.metadata["domains"])
    held = f", held-out accuracy {m['heldout_accuracy']:.4f}" if "heldout_accuracy" in m else ""
    print(f"{args.out}: {args.backend} router over {domains}; trained in {m['train_seconds']:.1f} s{held}")
    return 0


def _eval(args) -> int:
    from meswitch.routing import evaluate_router, read_labelled
    from meswitch.routing.evaluate import format_confusion

    try:
        rows = read_labelled(args.data)
    except ValueError as e:
        raise CommandError(str(e)) from e
    if args.limit:  # 0: every row
        rows = rows[: args.limit]
    router = _load(args)
    try:
        ev = evaluate_router(router, rows, latency=not args.no_latency)
    except ValueError as e:
        raise CommandError(str(e)) from e
    if args.json:
        print(json.dumps({"router": str(args.router), "backend": router.kind, **ev.to_dict()}))
        return 0
    print(f"{args.router}: {router.kind} router, {ev.n} queries, accuracy {ev.accuracy:.4f}")
    for d, s in ev.per_domain.items():
        print(f"  {d:<16} n={s['n']:<5} accuracy {s['accuracy']:.4f}")
    print(format_confusion(ev))
    if ev.latency_ms:
        print(f"latency per query: p50 {ev.latency_ms['p50']:.2f} ms, p99 {ev.latency_ms['p99']:.2f} ms on {ev.device}")
    print(
        f"fallback rate {ev.fallback_rate:.4f}; truncated {ev.truncated}; left out (unknown domain) "
        f"{ev.skipped_unknown_domain}"
    )
    return 0


def _route(args) -> int:
    if (args.query is None) == (args.file is None):
        raise CommandError("give one QUERY, or --file with many (- for stdin)")
    router = _load(args)
    queries = [args.query] if args.file is None else _read_queries(args.file)  # lazily: stdin streams
    for query in queries:
        t0 = time.perf_counter()
        result = router.route(query)
        ms = (time.perf_counter() - t0) * 1000
        if args.json:
            print(json.dumps({**result.to_dict(), "latency_ms": round(ms, 3)}, ensure_ascii=False), flush=True)
            continue
        target = result.expert or "the base model"
        line = f"{target} (domain {result.domain}, confidence {result.confidence:.3f}, {ms:.1f} ms)"
        if result.fallback:
            line += f"; fallback: {result.reason}"
        if result.truncated:
            line += "; the query was longer than the router's context and was truncated"
        print(line, flush=True)
    return 0


def _read_queries(source: str):
    """Queries from a data file (meswitch.data.loading: .jsonl with a 'text' field, or plain lines) or from stdin as
    it streams (JSONL lines or plain ones); blank lines skipped."""
    if source != "-":
        from meswitch.data.loading import DataError, load_texts

        if not Path(source).is_file():
            raise CommandError(f"{source}: no such file")
        try:
            yield from load_texts(Path(source))
        except DataError as e:
            raise CommandError(str(e)) from e
        return
    for n, line in enumerate(sys.stdin, 1):
        line = line.rstrip("\n")
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise CommandError(f"{source}:{n}: expected a JSON object with a 'text' field ({e})") from e
        else:
            yield line
