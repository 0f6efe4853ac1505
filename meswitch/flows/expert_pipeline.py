"""The expert pipeline: new experts in the inbox become validated, registered artifacts.

    expert-pipeline (flow)
      fingerprint the base; scan the inbox; per entry: fetch, read expert.yaml, fingerprint,
      ask the registry whether this expert was already processed against this base (then skip it)
      run-expert.map(new entries)            one task per new expert, on the flow's task runner
        process-expert (sub-flow)            (threads by default; Dask workers with --dask)
          validate -> calibrate -> compress -> evaluate -> gates -> log to MLflow
          -> publish (candidate | rejected with reasons) -> promote to production -> mark done
      register the base as meswitch-base-<name> (production), what `meswitch serve` loads
      update-router (sub-flow)               when the production (domain -> expert) set changed:
          fetch cards -> train -> evaluate -> gate -> log -> publish -> promote
      summary (Prefect artifact + JSON/Markdown in the report folder); the run fails if an
      expert's processing failed (an outage after retries), and a re-run resumes from the cache

Wrapping the sub-flow in a task is what lets the task runner (a Dask cluster) run several experts'
sub-flows at once; every step inside is a cached, named task, committed as soon as it finishes.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prefect import flow, task, unmapped
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NONE as NO_CACHE
from prefect.logging import get_run_logger
from prefect.transactions import CommitMode, transaction

from meswitch.data.loading import fingerprint as data_fingerprint
from meswitch.flows import tasks as t
from meswitch.flows.config import BASE_PREFIX, PipelineConfig, is_registry_ref, load_config
from meswitch.flows.gates import check_expert_gates, check_router_gates, per_domain_accuracy, task_ratio
from meswitch.flows.inbox import empty_inbox
from meswitch.flows.runtime import stopped_in_one_line
from meswitch.flows.summary import FAILED, PRODUCTION, REJECTED, ExpertOutcome, PipelineSummary, RouterOutcome
from meswitch.processes import check_stop, stopping_workers, take_back_sigterm

log = logging.getLogger(__name__)

EXPERT_PREFIX = "meswitch-expert-"
ROUTER_MODEL = "meswitch-router"
EVAL_METRICS = ("kl", "ppl_base", "ppl_expert", "ppl_compressed", "ppl_ratio", "gain_retained",
                "task_score_expert", "task_score_compressed")  # fmt: skip
SIZE_METRICS = ("bits_per_param", "delta_bytes", "fp16_delta_bytes", "compress_seconds")


NO_CARD = (
    "no expert.yaml (name, domain, description, examples, calibration data); "
    "an upload still in progress is picked up by the next run"
)


class PipelineFailed(RuntimeError):
    """Some experts could not be processed (an outage after retries); a re-run resumes where this one stopped."""


@dataclass(frozen=True)
class ExpertInput:
    """A new inbox entry, ready for its sub-flow."""

    entry: str
    folder: str
    card: Any  # meswitch.expert_card.ExpertCard
    fingerprint: str

    @property
    def model(self) -> str:
        return EXPERT_PREFIX + self.card.name


def default_work_dir() -> Path:
    """``$MESWITCH_HOME/pipeline``: artifacts being made, cached task results, downloaded cards."""
    from meswitch.registry.config import RegistryConfig

    return RegistryConfig.from_env().home / "pipeline"


def default_base_name(base: str | Path) -> str:
    """A registry-safe name for a base folder: its name, or its parent's when it is called ``base``."""
    import re

    path = Path(base).resolve()
    raw = path.parent.name if path.name == "base" else path.name
    name = re.sub(r"[^a-z0-9._-]+", "-", raw.lower()).strip("-._") or "default"
    return name[:60]


def _stored(task_obj, work: Path):
    """The task with its results (and cache records) kept in the work folder, beside what they point to."""
    return task_obj.with_options(result_storage=work / "results")


# -- one expert -----------------------------------------------------------------------------------------


@flow(name="process-expert", flow_run_name="expert-{expert.card.name}", validate_parameters=False)
def process_expert(expert: ExpertInput, base_dir: str, base_fp: str, config: PipelineConfig, work_dir: str):
    """Validate, calibrate, compress, evaluate, gate, log, publish and promote one expert."""
    take_back_sigterm()
    logger = get_run_logger()
    work, card, io = Path(work_dir), expert.card, t.io_tasks(config)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    common = {
        "expert": card.name,
        "domain": card.domain,
        "base_fingerprint": base_fp,
        "source_fingerprint": expert.fingerprint,
        "inbox_entry": expert.entry,
    }
    params = {
        "expert": card.name,
        "domain": card.domain,
        "description": card.description,
        "device": config.device,
        **{f"compression.{k}": v for k, v in dataclasses.asdict(config.compression).items()},
        **{f"calibration.{k}": v for k, v in dataclasses.asdict(config.calibration).items()},
        **{f"evaluation.{k}": v for k, v in dataclasses.asdict(config.evaluation).items()},
        **{f"gates.{k}": v for k, v in config.gates.to_dict().items()},
        "base_fingerprint": base_fp,
        "source_fingerprint": expert.fingerprint,
    }

    check_stop()  # an expert queued behind one that Ctrl-C stopped does not start
    v = t.validate(base_dir, expert.folder, base_fp, expert.fingerprint, config.validation.max_relative_delta)
    if not v.ok:
        logger.warning("%s rejected: %s", card.name, v.reason)
        run_key = t.key_of("rejected-input", expert.fingerprint, base_fp, v.reason)
        run_id = io.log_expert_run(run_key, card, REJECTED, [v.reason], params, {}, common)
        outcome = ExpertOutcome(expert.entry, REJECTED, card.name, card.domain, [v.reason])
        return dataclasses.replace(outcome, fingerprint=expert.fingerprint, mlflow_run_id=run_id, worker=worker)

    calib_key, stats = None, None
    if t.needs_calibration(config):
        calib_sha = data_fingerprint(card.calibration_data)
        calib_key = t.calibration_key(expert.fingerprint, calib_sha, config)
        stats = t.calibrate(expert.folder, card.calibration_data, expert.fingerprint, calib_sha, config)
    key = t.compress_key(base_fp, expert.fingerprint, calib_key, config, card)
    out = work / "artifacts" / f"{card.name}-{key[:16]}"
    artifact = t.writing(t.compress, out)(base_dir, expert.folder, v, stats, card, config, str(out), key)
    eval_sha = data_fingerprint(card.evaluation_data)
    result = t.evaluate(base_dir, artifact, expert.folder, card.evaluation_data, expert.fingerprint, eval_sha, config)

    check_stop()  # from here on the expert is logged, published and promoted as a whole (seconds)
    report = check_expert_gates(result, config.gates)
    status = PRODUCTION if report.passed else REJECTED
    size = {k: artifact.metrics.get(k) for k in SIZE_METRICS}
    metrics = {
        **{k: result.get(k) for k in EVAL_METRICS},
        **size,
        "task_ratio": task_ratio(result),
        "gates_passed": float(report.passed),
        "max_relative_delta": v.max_relative_delta,
    }
    run_key = t.key_of("expert", artifact.content_hash, eval_sha, config.gates.to_dict())
    run_id = io.log_expert_run(
        run_key, card, status, report.reasons, params, metrics, {**common, "content_hash": artifact.content_hash},
        artifact=artifact, evaluation=result, gates=report.to_dict(),
    )  # fmt: skip
    figures = {"kl": result["kl"], "ppl_ratio": result["ppl_ratio"], "task_ratio": task_ratio(result), **size}
    tags = {
        **{k: str(x) for k, x in figures.items() if x is not None},
        "gates": json.dumps(report.to_dict(), sort_keys=True),
        "gates_passed": str(report.passed).lower(),
        "mlflow_run_id": run_id,
        "description": card.description,
        "inbox_entry": expert.entry,
    }
    rejected = "; ".join(report.reasons) if report.reasons else None
    version = io.publish(artifact, expert.model, tags, rejected)
    if report.passed:
        io.promote(expert.model, version)
        logger.info("%s: version %d is production (KL %.4g)", card.name, version, result["kl"])
    else:
        logger.warning("%s: version %d rejected: %s", card.name, version, rejected)
    io.mark_status(expert.model, version, status)
    return ExpertOutcome(
        expert.entry, status, card.name, card.domain, report.reasons, True, version, expert.fingerprint,
        size["bits_per_param"], size["delta_bytes"], result["kl"], result["ppl_ratio"], task_ratio(result),
        report.passed, run_id, worker,
    )  # fmt: skip


@task(name="run-expert", cache_policy=NO_CACHE, task_run_name="run-expert-{expert.card.name}")
def run_expert(expert: ExpertInput, base_dir: str, base_fp: str, config: PipelineConfig, work_dir: str):
    """The expert's sub-flow as a task, so the flow's task runner (threads, Dask) can run several at once.

    Inside a task, the sub-flow's tasks would join this task's transaction and commit (write their cache
    records) only if the whole sub-flow succeeds. An eager transaction commits each one as it finishes, so a
    run that fails at publishing keeps its calibration, compression and evaluation for the next run.
    """
    sub = process_expert.with_options(result_storage=Path(work_dir) / "results")
    with transaction(commit_mode=CommitMode.EAGER):
        return sub(expert, base_dir, base_fp, config, work_dir)


# -- the router -------------------------------------------------------------------------------------------


def routing_key(experts: list[dict]) -> str:
    """The production routing table, ``domain=expert`` pairs: the router is retrained when it changes."""
    return ",".join(sorted(f"{e.get('domain')}={e['model'].removeprefix(EXPERT_PREFIX)}" for e in experts))


@flow(name="update-router", validate_parameters=False)
def update_router(base_dir: str, base_fp: str, config: PipelineConfig, work_dir: str) -> RouterOutcome:
    """Retrain, evaluate, register and promote the router when the production domains changed."""
    take_back_sigterm()
    logger = get_run_logger()
    work, io = Path(work_dir), t.io_tasks(config)
    experts = io.production_experts(base_fp)
    key = routing_key(experts)
    domains = sorted(e.get("domain", "?") for e in experts)
    current = io.current_router(ROUTER_MODEL)
    if current is not None and current.get("routing_key") == key:
        acc = current.get("heldout_accuracy")
        return RouterOutcome("unchanged", int(current["version"]), domains, float(acc) if acc else None)
    if len(experts) < 2:
        reason = f"a router needs two production domains, have {domains}"
        return RouterOutcome("skipped", None, domains, reasons=[reason])
    logger.info("production domains %s differ from the router's; retraining it", key)
    cards = io.fetch_cards(experts, str(work / "cards"))
    fingerprints = [e.get("source_fingerprint") for e in experts]
    stamps = [t.folder_stamp(Path(c)) for c in cards]
    train_key = t.key_of("router", key, fingerprints, stamps, config.digest("router"))
    out = work / "routers" / f"router-{train_key[:16]}"
    artifact = t.writing(t.train_router, out)(cards, base_dir, config, str(out), train_key)
    ev = t.evaluate_router(artifact, base_dir, config.router.test_queries)
    accuracy = None if ev is None else round(float(ev["accuracy"]), 4)
    previous = json.loads(current["heldout_per_domain"]) if current and current.get("heldout_per_domain") else None
    report = check_router_gates(ev, config.gates, previous)
    status = PRODUCTION if report.passed else REJECTED
    params = {"domains": key, **{f"router.{k}": v for k, v in dataclasses.asdict(config.router).items()}}
    numbers = {k: v for k, v in artifact.metrics.items() if isinstance(v, (int, float))}
    metrics = {"heldout_accuracy": accuracy, "domains": float(len(experts)), **numbers}
    texts = {"evaluation.json": json.dumps(ev, indent=2)} if ev else {}
    run_key = t.key_of("router-run", artifact.content_hash, accuracy, config.gates.to_dict())
    run_id = io.log_router_run(run_key, status, report.reasons, params, metrics, {"routing_key": key}, artifact, texts)
    tags = {
        "routing_key": key,
        "domains": ",".join(domains),
        "mlflow_run_id": run_id,
        "base_fingerprint_served": base_fp,
        "gates": json.dumps(report.to_dict(), sort_keys=True),
        "gates_passed": str(report.passed).lower(),
    }
    if accuracy is not None:
        tags["heldout_accuracy"] = str(accuracy)
        tags["heldout_per_domain"] = json.dumps(per_domain_accuracy(ev), sort_keys=True)
    rejected = "; ".join(report.reasons) if report.reasons else None
    version = io.publish(artifact, ROUTER_MODEL, tags, rejected)
    if report.passed:
        io.promote(ROUTER_MODEL, version)
    io.mark_status(ROUTER_MODEL, version, status)
    return RouterOutcome(status, version, domains, accuracy, report.reasons, True, run_id)


# -- the whole inbox --------------------------------------------------------------------------------------


@flow(name="expert-pipeline", log_prints=True)
def expert_pipeline(
    inbox: str,
    base: str,
    config_file: str | None = None,
    gates_file: str | None = None,
    work_dir: str | None = None,
    router_test_queries: str | None = None,
    report_dir: str | None = None,
    base_name: str | None = None,
) -> dict:
    """Process every new expert in ``inbox`` against the base model folder ``base``; return the summary.

    ``config_file``/``gates_file``: YAML overriding the defaults (config.py, gates.yaml);
    ``router_test_queries``: labelled queries (JSONL of text + domain) for the router's held-out accuracy;
    ``report_dir``: where the summary's JSON and Markdown go (default: the work folder's ``reports/``);
    ``base_name``: the base is registered (and promoted) as ``meswitch-base-<base_name>`` for serving
    (default: the base folder's name, or its parent's when the folder is called ``base``).
    ``base`` may also name a registered base, ``meswitch-base-NAME@production`` (as on a Kubernetes
    work pool, where no model folder is at hand); it is then fetched from the registry, not registered again.
    """
    take_back_sigterm()
    logger = get_run_logger()
    stopped_in_one_line()
    config = load_config(config_file, gates_file)
    if router_test_queries:
        config = config.replace(router=dataclasses.replace(config.router, test_queries=str(router_test_queries)))
    work = Path(work_dir) if work_dir else default_work_dir()
    work.mkdir(parents=True, exist_ok=True)
    io = t.io_tasks(config)
    slots = t.ensure_gpu_limit(config)
    logger.info("inbox %s, base %s, work %s, GPU slots %d", inbox, base, work, slots)

    registered_base = None
    if is_registry_ref(base):  # e.g. meswitch-base-tiny@production: a verified local copy from the registry
        registered_base, base = io.resolve_base(base)
    base_print = _stored(t.fingerprint, work)(base, t.folder_stamp(Path(base)))
    if base_print.error or base_print.nonfinite:
        raise ValueError(f"base model {base} is unusable: {base_print.error or base_print.nonfinite}")
    base_fp = base_print.fingerprint

    summary = PipelineSummary(inbox=str(inbox))
    entries = io.scan_inbox(str(inbox))
    if not entries:
        summary.notes.append(empty_inbox(str(inbox)))
    readable: list[ExpertInput] = []
    for entry in entries:
        if not entry.has_card:
            summary.experts.append(ExpertOutcome(entry.name, REJECTED, reasons=[f"{entry.uri}: {NO_CARD}"]))
            continue
        folder = _stored(io.fetch_expert, work)(entry, str(work / "downloads"))
        got = t.read_card(folder)
        if got.error:
            summary.experts.append(ExpertOutcome(entry.name, REJECTED, reasons=[got.error]))
            continue
        card = got.card
        fp = _stored(t.fingerprint, work)(folder, entry.stamp)
        if fp.error:
            summary.experts.append(ExpertOutcome(entry.name, REJECTED, card.name, card.domain, [fp.error]))
            continue
        readable.append(ExpertInput(entry.name, folder, card, fp.fingerprint))

    fresh: list[ExpertInput] = []
    for expert in _one_per_name(readable, base, base_fp, config, work, summary):
        done = io.registry_lookup(expert.model, expert.fingerprint, base_fp)
        if done is not None:
            name = expert.card.name
            logger.info("%s: already processed (version %s, %s)", name, done["version"], done["pipeline.status"])
            summary.experts.append(ExpertOutcome.from_registry(expert.entry, name, done))
            continue
        fresh.append(expert)

    if fresh:
        io.mlflow_experiment()  # before the experts' sub-flows run at once
        with stopping_workers():  # Ctrl-C or SIGTERM here stops the experts in progress at their next step
            futures = run_expert.map(fresh, unmapped(base), unmapped(base_fp), unmapped(config), unmapped(str(work)))
            for expert, future in zip(fresh, futures, strict=True):
                future.wait()
                if future.state.is_completed():
                    summary.experts.append(future.result())
                    continue
                error = _error_of(future)
                logger.error("%s failed: %s", expert.card.name, error)
                outcome = ExpertOutcome(expert.entry, FAILED, expert.card.name, expert.card.domain, [error])
                summary.experts.append(dataclasses.replace(outcome, fingerprint=expert.fingerprint))

    # What serving loads: the base, then the router over the production experts (either is retried next run).
    known = None if registered_base else io.registered_base(base_fp)
    if known and base_name and known != base_name:
        logger.warning("this base is registered already as %r; --base-name %r is not used", known, base_name)
    name = known or base_name or default_base_name(base)
    if registered_base:
        summary.base = registered_base
    else:
        summary.base, summary.base_error = _register_base(io, base, base_fp, name, work)
    try:
        summary.router = update_router.with_options(result_storage=work / "results")(base, base_fp, config, str(work))
    except Exception as e:
        logger.error("router update failed: %s", e)
        summary.router = RouterOutcome(FAILED, reasons=[f"{type(e).__name__}: {e}"])

    from meswitch.flows.tracking import Tracker

    summary.mlflow = Tracker().ui_command()
    report = Path(report_dir) if report_dir else work / "reports"
    summary.report_dir = str(report)
    summary.write(report)
    create_markdown_artifact(summary.markdown(), key="expert-pipeline-summary", description="meswitch pipeline run")
    logger.info("summary\n%s", summary.markdown())
    failed = [e.entry for e in summary.failed]
    failed += ["base"] if summary.base_error else []
    failed += ["router"] if summary.router.status == FAILED else []
    if failed:
        raise PipelineFailed(f"{', '.join(failed)} failed (see the summary in {report}); run again to resume")
    return summary.to_dict()


def _one_per_name(
    experts: list[ExpertInput], base: str, base_fp: str, config: PipelineConfig, work: Path, summary: PipelineSummary
) -> list[ExpertInput]:
    """The experts to go on with, one per expert name; the other entries that share a name are rejected.

    Entries sharing a name are validated first (cached: their sub-flows reuse the result), so that a broken
    copy neither claims the name nor hides its own fault behind the clash: invalid ones go on, to be rejected
    with their reason, and the first valid one keeps the name.
    """
    by_name: dict[str, list[ExpertInput]] = {}
    for expert in experts:
        by_name.setdefault(expert.card.name, []).append(expert)
    kept = []
    for name, group in by_name.items():
        if len(group) == 1:
            kept += group
            continue
        validate = _stored(t.validate, work)
        limit = config.validation.max_relative_delta
        ok = {e.entry: validate(base, e.folder, base_fp, e.fingerprint, limit).ok for e in group}
        valid = [e for e in group if ok[e.entry]]
        kept += [e for e in group if not ok[e.entry]] + valid[:1]
        for e in valid[1:]:
            reason = f"expert name {name!r} is also used by inbox entry {valid[0].entry!r}"
            summary.experts.append(ExpertOutcome(e.entry, REJECTED, name, e.card.domain, [reason]))
    return sorted(kept, key=lambda e: e.entry)


def _register_base(io, base: str, base_fp: str, name: str, work: Path) -> tuple[str | None, str | None]:
    """Seal the base folder as a ``base`` artifact, publish and promote it: ("NAME/VERSION", None) or (None, error)."""
    try:
        out = str(work / "bases" / f"{name}-{base_fp[:16]}")
        artifact = _stored(t.writing(t.seal_base, out), work)(base, base_fp, name, out)
        version = io.publish(artifact, BASE_PREFIX + name, {"pipeline.status": PRODUCTION}, None)
        io.promote(BASE_PREFIX + name, version)
        return f"{BASE_PREFIX}{name}/{version}", None
    except Exception as e:
        get_run_logger().error("registering the base failed: %s", e)
        return None, f"{type(e).__name__}: {e}"


def _error_of(future) -> str:
    try:
        future.result()
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "unknown failure"
