"""Prefect tasks: each a few lines calling the library, named, cached by content, retried on I/O.

Cache keys are built from content fingerprints, never from paths or times:

    fingerprint   the folder's stamp (file names, sizes, mtimes / ETags)  -> sha256 over the tensors
    validate      base fingerprint + expert fingerprint + validation settings
    calibrate     expert fingerprint + sha256 of the calibration file + calibration settings + device kind
    compress      base + expert fingerprints + calibration key + compression settings + card
    evaluate      artifact content hash + expert fingerprint + sha256 of the evaluation file + settings
    train_router  the production (domain, expert, fingerprint) set + card contents + router settings

so a re-run over the same inbox recomputes nothing. Tasks that write a folder (compress,
train_router, seal_base) refresh their cache when that folder is gone (``writing``) and
short-circuit when it already holds their result, so deleting work files never yields a cached
path to nothing. Registry and MLflow
tasks are not cached: they are idempotent by content hash in the registry itself, so a re-run
registers no duplicate, and a registry wiped between runs is noticed rather than remembered.
GPU tasks take a slot of the global concurrency limit ``meswitch-gpu`` (one per GPU by default).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from prefect import task
from prefect.cache_policies import NONE as NO_CACHE
from prefect.context import TaskRunContext

from meswitch.data.loading import DataSource
from meswitch.flows.config import GPU_LIMIT, PipelineConfig

log = logging.getLogger(__name__)

CACHE_VERSION = "1"  # bump to invalidate every cached result of the pipeline


# -- results passed between tasks -------------------------------------------------------------------


@dataclass(frozen=True)
class Fingerprint:
    fingerprint: str | None
    nonfinite: tuple[str, ...] = ()
    num_params: int = 0
    error: str | None = None  # the checkpoint could not be read (a corrupt shard, no weights, pickle only)


@dataclass(frozen=True)
class CardResult:
    card: Any = None  # meswitch.expert_card.ExpertCard
    error: str | None = None


@dataclass(frozen=True)
class Validation:
    ok: bool
    reason: str | None = None
    pairing: Any = None  # meswitch.checkpoints.Pairing
    max_relative_delta: float | None = None


@dataclass(frozen=True)
class ArtifactRef:
    path: str
    content_hash: str
    metrics: dict[str, Any] = field(default_factory=dict)


# -- helpers ----------------------------------------------------------------------------------------


def sha256_of(path: Path | str | None) -> str:
    if path is None:
        return "none"
    from meswitch.artifacts import sha256_file

    return sha256_file(Path(path))


def key_of(*parts: Any) -> str:
    text = json.dumps([CACHE_VERSION, *parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def retry_on_io(task, task_run, state) -> bool:
    """Prefect ``retry_condition_fn``: retry only transient I/O failures (``registry.errors.is_transient``)."""
    from meswitch.registry.errors import is_transient

    try:
        exc = state.result(raise_on_failure=False)
    except Exception as e:  # the result itself could not be read
        exc = e
    return isinstance(exc, BaseException) and is_transient(exc)


@contextlib.contextmanager
def gpu_slot(config: PipelineConfig):
    """Hold one slot of the ``meswitch-gpu`` global concurrency limit while computing.

    By default the limit has one slot per visible GPU, and none (no limit) on a machine without one;
    ``gpu_slots: N`` in the config sets it explicitly (``0`` turns it off).
    """
    if config.resolved_gpu_slots() <= 0:
        yield
        return
    from prefect.concurrency.sync import concurrency

    with concurrency(GPU_LIMIT, occupy=1, strict=True):
        yield


def ensure_gpu_limit(config: PipelineConfig) -> int:
    """Create (or resize) the global concurrency limit GPU tasks take slots from; return its size."""
    slots = config.resolved_gpu_slots()
    if slots > 0:
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            client.upsert_global_concurrency_limit_by_name(GPU_LIMIT, slots)
    return slots


def writing(task_obj, out: Path | str):
    """A task that writes the folder ``out``, set to recompute (and re-cache) when ``out`` is gone.

    Its cache record is only as good as the folder it points to: while ``out`` holds a finished
    artifact the cached result is used; when it does not, the cache is refreshed instead of read.
    """
    return task_obj.with_options(refresh_cache=not (Path(out) / "manifest.json").is_file())


def artifact_ref(path: Path) -> ArtifactRef:
    from meswitch.artifacts import verify
    from meswitch.registry.store import content_hash

    manifest = verify(path)
    return ArtifactRef(str(path), content_hash(path), dict(manifest.metrics))


# -- inbox ------------------------------------------------------------------------------------------


# Flow steps that talk to MLflow or the object store are retried by Prefect, as ``PipelineConfig`` says
# (``io_tasks``); the worst case of all retry layers together is in ``registry.retry``.
IO_RETRY = dict(
    retries=PipelineConfig.io_retries,
    retry_delay_seconds=PipelineConfig.io_retry_delay_s,
    retry_condition_fn=retry_on_io,
)
IO = dict(cache_policy=NO_CACHE, **IO_RETRY)


@task(name="scan-inbox", **IO)
def scan_inbox(inbox: str) -> list:
    from meswitch.flows.inbox import scan_inbox as scan

    return scan(inbox)


def _fetch_key(ctx: TaskRunContext, args: dict[str, Any]) -> str | None:
    entry = args["entry"]
    if not entry.is_s3:
        return None
    return key_of("fetch", entry.uri, entry.stamp, str(args["cache_dir"]))


@task(name="fetch-expert", cache_key_fn=_fetch_key, **IO_RETRY)
def fetch_expert(entry, cache_dir: str) -> str:
    from meswitch.flows.inbox import fetch_entry

    return str(fetch_entry(entry, Path(cache_dir)))


MIN_CALIBRATION_CHARS = 256  # below this (some dozens of tokens) the salience statistics are noise


@task(name="read-card", cache_policy=NO_CACHE)
def read_card(folder: str) -> CardResult:
    from meswitch.compression.calibration import read_texts
    from meswitch.evaluation.metrics import EvalData
    from meswitch.expert_card import CardError, load_card

    try:
        card = load_card(Path(folder))
    except CardError as e:
        return CardResult(None, str(e))
    # the data the expert is calibrated and judged on: checked here, so that a folder without it is rejected once,
    # with a reason naming the file or data set, before any model is read
    for what, source, read in (("calibration", card.calibration_data, read_texts),
                               ("evaluation", card.evaluation_data, EvalData.load)):  # fmt: skip
        if not source.origin and not source.path.is_file():  # a file name in the card (datasets say so themselves)
            return CardResult(None, f"{source.path}: missing; expert.yaml names it as the {what} data ('{what}:' "
                                    f"key; '{what}: default' takes the generic default corpus)")  # fmt: skip
        try:
            data = read(source)
        except (ValueError, OSError) as e:
            return CardResult(None, f"{what} data: {e}")
        if what == "calibration" and sum(map(len, data)) < MIN_CALIBRATION_CHARS:
            return CardResult(None, f"{source.name}: too little calibration text ({sum(map(len, data))} characters "
                                    f"in {len(data)} texts; at least {MIN_CALIBRATION_CHARS}, ideally 64 texts of 256 "
                                    "tokens or more)")  # fmt: skip
    return CardResult(card)


# -- checkpoints ------------------------------------------------------------------------------------


def folder_stamp(folder: Path) -> str:
    """Names, sizes and mtimes of a folder's files: changes whenever a file does, costs no read."""
    h = hashlib.sha256()
    for path in sorted(p for p in Path(folder).rglob("*") if p.is_file()):
        st = path.stat()
        h.update(f"{path.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@task(name="fingerprint", cache_key_fn=lambda ctx, a: key_of("fingerprint", a["stamp"]), persist_result=True)
def fingerprint(folder: str, stamp: str) -> Fingerprint:
    """sha256 over config and tensors (one read of every tensor); an unreadable checkpoint is a result."""
    from meswitch.checkpoints import Checkpoint, CheckpointError, scan

    try:
        s = scan(Checkpoint(folder))
    except CheckpointError as e:
        return Fingerprint(None, error=str(e))
    return Fingerprint(s.fingerprint, s.nonfinite, s.num_params)


def _validate_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return key_of("validate", a["base_fp"], a["expert_fp"], a["max_relative_delta"])


@task(name="validate", cache_key_fn=_validate_key, persist_result=True)
def validate(base_dir: str, expert_dir: str, base_fp: str, expert_fp: str, max_relative_delta: float) -> Validation:
    """Refuse an expert that is not a fine-tune of this base; bad input is a result here, not a failure."""
    from meswitch.checkpoints import Checkpoint, CheckpointError, check_expert

    base, expert = Checkpoint(base_dir), Checkpoint(expert_dir)
    try:
        pairing = check_expert(base, expert, max_relative_delta=max_relative_delta)
    except CheckpointError as e:
        return Validation(False, str(e))
    return Validation(True, None, pairing, round(pairing.relative_delta, 5))


def _base_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return key_of("base", a["base_fp"], a["name"], a["out"])


@task(name="seal-base", cache_key_fn=_base_key, persist_result=True)
def seal_base(base_dir: str, base_fp: str, name: str, out: str) -> ArtifactRef:
    """The base model folder as a ``kind="base"`` artifact (``artifacts.seal_base``), once per fingerprint."""
    from meswitch.artifacts import ArtifactError, read_manifest
    from meswitch.artifacts import seal_base as seal_base_folder

    with contextlib.suppress(ArtifactError):  # sealed by an earlier run: the same artifact, not a new one
        m = read_manifest(Path(out))
        if m.kind == "base" and m.base_fingerprint == base_fp and m.name == name:
            return artifact_ref(Path(out))
    seal_base_folder(Path(base_dir), Path(out), name, base_fp)
    return artifact_ref(Path(out))


# -- compute (GPU when present) -------------------------------------------------------------------------


def needs_calibration(config: PipelineConfig) -> bool:
    """As in ``compression.api.run_compress``: methods that weigh channels by activations."""
    return config.compression.uses_calibration


def calibration_key(expert_fp: str, calib_sha: str, config: PipelineConfig) -> str:
    from meswitch.compression.config import calibration_for
    from meswitch.devices import resolve_device

    device = resolve_device(config.device).type  # bf16 on a GPU, fp32 on the CPU: not the same statistics
    calib = asdict(calibration_for(config.compression, config.calibration))  # as calibrate runs it
    return key_of("calibrate", expert_fp, calib_sha, calib, device)


def _calibrate_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return calibration_key(a["expert_fp"], a["calib_sha"], a["config"])


@task(name="calibrate", cache_key_fn=_calibrate_key, persist_result=True)
def calibrate(expert_dir: str, calib: DataSource, expert_fp: str, calib_sha: str, config: PipelineConfig) -> dict:
    from meswitch.checkpoints import Checkpoint
    from meswitch.compression.calibration import calibrate as run_calibration
    from meswitch.compression.calibration import read_texts
    from meswitch.compression.config import calibration_for

    settings = calibration_for(config.compression, config.calibration)  # with the Hessians GPTQ rounds through
    with gpu_slot(config):
        return run_calibration(Checkpoint(expert_dir), read_texts(calib), settings, config.device)


def compress_key(base_fp: str, expert_fp: str, calib_key: str | None, config: PipelineConfig, card) -> str:
    return key_of(
        "compress",
        base_fp,
        expert_fp,
        calib_key,
        config.digest("compression"),
        card.name,
        card.domain,
        card.description,
    )


def _compress_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return key_of(a["key"], a["out"])


@task(name="compress", cache_key_fn=_compress_key, persist_result=True)
def compress(
    base_dir: str,
    expert_dir: str,
    validation: Validation,
    stats: dict | None,
    card,
    config: PipelineConfig,
    out: str,
    key: str,
) -> ArtifactRef:
    """Write the artifact to ``out`` (atomically); a finished artifact of the same expert there is reused."""
    from meswitch.artifacts import ArtifactError, read_manifest
    from meswitch.checkpoints import Checkpoint
    from meswitch.compression.expert import ExpertInfo, compress_expert
    from meswitch.devices import resolve_device

    out_path = Path(out)  # named after ``key``: a finished artifact there was made from the same inputs
    with contextlib.suppress(ArtifactError):
        if read_manifest(out_path).source_fingerprint == validation.pairing.expert_fingerprint:
            return artifact_ref(out_path)
    info = ExpertInfo(card.name, card.domain, card.description)
    base, expert, delta = Checkpoint(base_dir), Checkpoint(expert_dir), config.compression
    with gpu_slot(config):
        device = resolve_device(config.device)
        compress_expert(base, expert, validation.pairing, stats, delta, out_path, info, device)
    return artifact_ref(out_path)


def _evaluate_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    cfg: PipelineConfig = a["config"]
    return key_of("evaluate", a["artifact"].content_hash, a["expert_fp"], a["eval_sha"], cfg.digest("evaluation"))


@task(name="evaluate", cache_key_fn=_evaluate_key, persist_result=True)
def evaluate(
    base_dir: str,
    artifact: ArtifactRef,
    expert_dir: str,
    eval_data: DataSource,
    expert_fp: str,
    eval_sha: str,
    config: PipelineConfig,
) -> dict:
    """KL, perplexity ratio and task scores of the compressed expert against the full one."""
    from meswitch.devices import resolve_device
    from meswitch.evaluation.evaluate import evaluate_artifact
    from meswitch.evaluation.metrics import EvalData

    data = EvalData.load(eval_data, limit=config.evaluation.limit)
    device = resolve_device(config.device)
    with gpu_slot(config):
        result = evaluate_artifact(
            Path(base_dir), Path(artifact.path), Path(expert_dir), data, device, config.evaluation.max_len
        )
    return result.to_dict()


# -- MLflow and the registry (I/O: retried, idempotent, not cached) -------------------------------------


@task(name="log-expert-run", **IO)
def log_expert_run(
    run_key: str, card, status: str, reasons: list[str], params: dict, metrics: dict, tags: dict,
    artifact: ArtifactRef | None = None, evaluation: dict | None = None, gates: dict | None = None,
) -> str:  # fmt: skip
    """One MLflow run per expert outcome: parameters, metrics, quality table, plot, manifest, card."""
    from meswitch.flows.tracking import CARD_DIR, Tracker

    texts = {"outcome.json": json.dumps({"status": status, "reasons": reasons, "gates": gates}, indent=2)}
    figures = {}
    files: list[tuple[str, Path]] = []
    if evaluation is not None:
        from meswitch.evaluation.report import markdown_table, plot_quality_vs_size

        texts["quality.md"] = markdown_table([evaluation])
        texts["quality.json"] = json.dumps(evaluation, indent=2)
        figures["quality_vs_size.png"] = lambda path: plot_quality_vs_size([evaluation], path)
    if artifact is not None:
        files.append(("artifact", Path(artifact.path) / "manifest.json"))
    if card is not None:
        from meswitch.expert_card import CARD

        files.append((CARD_DIR, card.folder / CARD))
        calib = card.calibration_path
        if calib is not None and calib.is_file():
            parent = calib.relative_to(card.folder).parent.as_posix() if calib.is_relative_to(card.folder) else ""
            files.append((CARD_DIR if parent in ("", ".") else f"{CARD_DIR}/{parent}", calib))
    name = card.name if card is not None else tags.get("inbox_entry", "expert")
    return Tracker().log_run(
        run_key,
        f"{name}-{status}",
        params=params,
        metrics=metrics,
        tags={**tags, "status": status},
        texts=texts,
        files=files,
        figures=figures,
    )


@task(name="log-router-run", **IO)
def log_router_run(
    run_key: str,
    status: str,
    reasons: list[str],
    params: dict,
    metrics: dict,
    tags: dict,
    artifact: ArtifactRef,
    texts: dict[str, str],
) -> str:
    from meswitch.flows.tracking import Tracker

    texts = {**texts, "outcome.json": json.dumps({"status": status, "reasons": reasons}, indent=2)}
    return Tracker().log_run(
        run_key,
        f"router-{status}",
        params=params,
        metrics=metrics,
        tags={**tags, "status": status},
        texts=texts,
        files=[("artifact", Path(artifact.path) / "manifest.json")],
    )


@task(name="mlflow-experiment", **IO)
def mlflow_experiment() -> str:
    """The pipeline's MLflow experiment, made once before experts are processed in parallel."""
    from meswitch.flows.tracking import Tracker

    return Tracker().experiment_id


@task(name="registry-lookup", **IO)
def registry_lookup(model: str, expert_fp: str, base_fp: str) -> dict | None:
    """The version of ``model`` already made from this expert and base by the pipeline, if any."""
    from meswitch.registry import NotFound, open_registry

    try:
        info = open_registry().get_model(model)
    except NotFound:
        return None
    for v in info.versions:
        t = v.tags
        same = t.get("source_fingerprint") == expert_fp and t.get("base_fingerprint") == base_fp
        if same and t.get("pipeline.status") in ("production", "rejected"):
            return {"version": v.version, "aliases": v.aliases, **t}
    return None


@task(name="resolve-base", **IO)
def resolve_base(ref: str) -> tuple[str, str]:
    """A registered base (``meswitch-base-NAME@ALIAS`` or ``/VERSION``) as a verified local folder."""
    from meswitch.registry import open_registry, parse_ref

    r = parse_ref(ref)
    got = open_registry().resolve(r.name, r.alias, version=r.version)
    return f"{got.name}/{got.version}", str(got.path)


@task(name="publish", **IO)
def publish(artifact: ArtifactRef, model: str, tags: dict, rejected: str | None) -> int:
    """Store and register the artifact (``candidate`` unless rejected); the same content gives the same version."""
    from meswitch.registry import open_registry

    return open_registry().publish(
        artifact.path, model, alias=None if rejected else "candidate", tags=tags, rejected=rejected
    )


@task(name="promote", **IO)
def promote(model: str, version: int) -> None:
    from meswitch.registry import open_registry

    open_registry().promote(model, version, "production")


@task(name="mark-status", **IO)
def mark_status(model: str, version: int, status: str) -> None:
    """The last step for a version: the pipeline is done with it (re-runs skip its expert)."""
    from meswitch.registry import open_registry

    open_registry().tag_version(model, version, "pipeline.status", status)


@task(name="production-experts", **IO)
def production_experts(base_fp: str) -> list[dict]:
    """The production version of every ``meswitch-expert-*`` model that the pipeline made for this base."""
    from meswitch.registry import open_registry

    out = []
    for m in open_registry().list_models():
        if not m.name.startswith("meswitch-expert-") or "production" not in m.aliases:
            continue
        v = next(v for v in m.versions if v.version == m.aliases["production"])
        if v.tags.get("base_fingerprint") == base_fp and v.tags.get("mlflow_run_id"):
            out.append({"model": m.name, "version": v.version, **v.tags})
    return sorted(out, key=lambda r: r.get("domain", ""))


@task(name="registered-base", **IO)
def registered_base(base_fp: str) -> str | None:
    """The registered name (without ``meswitch-base-``) of a base with this content fingerprint, if any: one base is
    one registered base, whatever folder or name it arrives under."""
    from meswitch.registry import open_registry

    for m in open_registry().list_models():
        if m.name.startswith("meswitch-base-") and any(
            base_fp in (v.tags.get("base_fingerprint"), v.tags.get("source_fingerprint")) for v in m.versions
        ):
            return m.name.removeprefix("meswitch-base-")
    return None


@task(name="current-router", **IO)
def current_router(model: str) -> dict | None:
    from meswitch.registry import NotFound, open_registry

    try:
        v = open_registry().get_version(model, alias="production")
    except NotFound:
        return None
    return {"version": v.version, **v.tags}


@task(name="fetch-cards", **IO)
def fetch_cards(experts: list[dict], dest: str) -> list[str]:
    """Each production expert's card (``expert.yaml`` + calibration texts) from its MLflow run."""
    from meswitch.flows.tracking import CARD_DIR, Tracker

    tracker = Tracker()
    folders = []
    for e in experts:
        run_id = e.get("mlflow_run_id")
        if not run_id:
            raise ValueError(f"{e['model']}/{e['version']} has no mlflow_run_id tag: its card cannot be found")
        # <dest>/<model>-<fingerprint>/card/: two levels below ``dest``, which holds no routing/ or data/
        # folder, so the router's data builder never mistakes it for a demo family.
        target = Path(dest) / f"{e['model']}-{e['source_fingerprint'][:12]}"
        if not (target / CARD_DIR / "expert.yaml").is_file():
            tracker.download(run_id, CARD_DIR, target)
        folders.append(str(target / CARD_DIR))
    return folders


IO_TASKS = (
    "scan_inbox", "fetch_expert", "log_expert_run", "log_router_run", "registry_lookup", "publish", "promote",
    "mark_status", "production_experts", "current_router", "fetch_cards", "resolve_base", "mlflow_experiment",
    "registered_base",
)  # fmt: skip


def io_tasks(config: PipelineConfig) -> SimpleNamespace:
    """The tasks that talk to MLflow or the object store, retried as ``config`` says (the only retries of a step)."""
    opts = dict(retries=config.io_retries, retry_delay_seconds=config.io_retry_delay_s)
    return SimpleNamespace(**{name: globals()[name].with_options(**opts) for name in IO_TASKS})


def _router_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return key_of(a["key"], a["out"])


@task(name="train-router", cache_key_fn=_router_key, persist_result=True)
def train_router(card_dirs: list[str], base_dir: str, config: PipelineConfig, out: str, key: str) -> ArtifactRef:
    from meswitch.artifacts import ArtifactError, read_manifest
    from meswitch.devices import resolve_device
    from meswitch.routing import RouterJob
    from meswitch.routing import train_router as run_training

    out_path = Path(out)
    with contextlib.suppress(ArtifactError):
        if read_manifest(out_path).kind == "router":
            return artifact_ref(out_path)
    r = config.router
    job = RouterJob(
        experts=[Path(d) for d in card_dirs],
        out=out_path,
        backend=r.backend,
        base_model=Path(base_dir),
        threshold=r.threshold,
        max_per_domain=r.max_per_domain,
        seed=r.seed,
        name="router",
        device=str(resolve_device(config.device)),
        evaluate=False,
    )
    with gpu_slot(config):
        run_training(job)
    return artifact_ref(out_path)


def _eval_router_key(ctx: TaskRunContext, a: dict[str, Any]) -> str:
    return key_of("evaluate-router", a["artifact"].content_hash, sha256_of(a["test_queries"]))


@task(name="evaluate-router", cache_key_fn=_eval_router_key, persist_result=True)
def evaluate_router(artifact: ArtifactRef, base_dir: str, test_queries: str | None) -> dict | None:
    """Held-out accuracy over the router's domains, or None without labelled queries."""
    if not test_queries:
        return None
    from meswitch.routing import evaluate_router as run_eval
    from meswitch.routing import load_router, read_labelled

    router = load_router(Path(artifact.path), base_model=Path(base_dir))
    known = set(router.domain_names)
    examples = [ex for ex in read_labelled(Path(test_queries)) if ex.domain in known]
    if not examples:
        return None
    return run_eval(router, examples, latency=False).to_dict()
