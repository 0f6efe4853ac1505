"""What to serve and swapping it live: model sources, deployments, hot reload.

A :class:`ModelSource` says which base, experts and router are current (a registry's
``production`` aliases, or plain local folders) as verified local folders with a version each.
The :class:`ModelManager` turns a resolution into a :class:`Deployment` (engine + scheduler +
tokenizers + router) and, when the versions move, builds the next deployment beside the current
one and swaps a single reference: requests hold the deployment they started with until they end,
and a new version that fails to load (bad checksum, another base, a load error) is refused while
the old one keeps serving.

Imports no FastAPI; the registry (MLflow) is imported only by :class:`RegistrySource`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from meswitch.artifacts import MANIFEST, ArtifactError, Manifest, read_manifest
from meswitch.checkpoints import CONFIG
from meswitch.compression.expert import SOURCE_DIR
from meswitch.expert_card import CARD
from meswitch.serving.batching import Scheduler, SchedulerConfig, StepObserver
from meswitch.serving.engine import EngineConfig, MixedExpertEngine
from meswitch.serving.tiers import ExpertSlot, TierObserver

log = logging.getLogger(__name__)

EXPERT_PREFIX, BASE_PREFIX, ROUTER_NAME = "meswitch-expert-", "meswitch-base-", "meswitch-router"
COMPRESS_FIRST = "run meswitch compress first (--base BASE --expert DIR --out ARTIFACT)"


class LoadError(Exception):
    """The base (or the whole resolution) cannot be served; the current deployment, if any, stays."""


@dataclass(frozen=True)
class ArtifactRef:
    """One resolved model: its serving name, a version that changes whenever its content does, a local folder."""

    name: str
    version: str
    path: Path


@dataclass(frozen=True)
class Resolution:
    base: ArtifactRef
    experts: dict[str, ArtifactRef]
    router: ArtifactRef | None = None
    errors: dict[str, str] = field(default_factory=dict)  # names that could not be resolved, and why

    def versions(self) -> dict[str, Any]:
        return {
            "base": (self.base.name, self.base.version),
            "experts": {n: r.version for n, r in sorted(self.experts.items())},
            "router": None if self.router is None else self.router.version,
            "errors": dict(sorted(self.errors.items())),
        }


class ModelSource(Protocol):
    """Where the served versions come from. ``resolve`` is called at start and at every poll."""

    def resolve(self) -> Resolution: ...

    def describe(self) -> str: ...


def folder_version(folder: Path) -> str:
    """A local folder's version: its manifest's sha256 (an artifact), else its config and weight files' stat."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if manifest.is_file():
        return hashlib.sha256(manifest.read_bytes()).hexdigest()[:16]
    h = hashlib.sha256((folder / CONFIG).read_bytes() if (folder / CONFIG).is_file() else b"")
    for p in sorted(folder.glob("*.safetensors")):
        st = p.stat()
        h.update(f"{p.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


class LocalSource:
    """A base folder, expert artifact folders (or folders of them) and an optional router artifact folder.

    Versions are content hashes of the manifests, so replacing a folder (atomically, as the
    artifact writers do) is noticed by the next poll.
    """

    def __init__(self, base: Path, experts: list[Path], router: Path | None = None, base_name: str = "base"):
        self.base, self.router, self.base_name = Path(base), router and Path(router), base_name
        self.expert_paths = [Path(p) for p in experts]

    def describe(self) -> str:
        return f"local folders (base {self.base})"

    def _expert_artifacts(self, path: Path, errors: dict[str, str]) -> list[tuple[Path, Manifest]]:
        """The expert artifacts ``path`` names: itself, or the artifact folders directly inside it.

        A path that can serve no expert goes into ``errors`` with what to do (a typo, an uncompressed expert
        folder, another kind of artifact); a folder with nothing in it yet is no error: artifacts put there
        later are served from the next poll.
        """
        if not path.is_dir():
            errors[str(path)] = f"{path}: {'not a folder' if path.exists() else 'not found'}"
            return []
        if (path / MANIFEST).is_file():
            m = _manifest(path, errors)
            if m is not None and m.kind != "expert-delta":
                errors[str(path)] = f"{path}: an artifact of kind {m.kind!r}, not a compressed expert"
                return []
            return [] if m is None else [(path, m)]
        if _is_model_folder(path):
            errors[str(path)] = f"{path}: an expert folder, not a compressed artifact: {COMPRESS_FIRST}"
            return []
        inside = sorted(q for q in path.iterdir() if (q / MANIFEST).is_file() and not q.name.startswith("."))
        if not inside and any(_is_model_folder(q) for q in path.iterdir()):
            errors[str(path)] = f"{path}: holds expert folders but no compressed artifact: {COMPRESS_FIRST}"
        found = [(q, _manifest(q, errors)) for q in inside]
        return [(q, m) for q, m in found if m is not None and m.kind == "expert-delta"]

    def _router_ref(self, errors: dict[str, str]) -> ArtifactRef | None:
        """The router folder when it is a router artifact; else None, and why in ``errors``."""
        if self.router is None:
            return None
        try:
            kind = read_manifest(self.router).kind
        except ArtifactError as e:
            errors["router"] = str(e) if self.router.is_dir() else f"{self.router}: router not found"
            return None
        if kind != "router":
            errors["router"] = (
                f"{self.router}: an artifact of kind {kind!r}, not a router (meswitch router train writes one)"
            )
            return None
        return ArtifactRef(ROUTER_NAME, folder_version(self.router), self.router)

    def resolve(self) -> Resolution:
        if not (self.base / CONFIG).is_file():
            raise LoadError(f"{self.base}: not a model folder (no {CONFIG})")
        experts, errors = {}, {}
        for path in self.expert_paths:
            for folder, m in self._expert_artifacts(path, errors):
                if m.name in experts:
                    errors[m.name] = f"two artifacts name expert {m.name!r}: {experts[m.name].path} and {folder}"
                    continue
                experts[m.name] = ArtifactRef(m.name, folder_version(folder), folder)
        router = self._router_ref(errors)
        base = ArtifactRef(self.base_name, folder_version(self.base), self.base)
        return Resolution(base, experts, router, errors)

    def check(self) -> None:
        """Raise LoadError naming every folder given that cannot be served, and why.

        For start-up: a path typed on the command line must serve or say so; a later poll that meets a
        bad folder refuses it and keeps serving the rest.
        """
        errors = self.resolve().errors
        if errors:
            raise LoadError("; ".join(errors.values()))


def _manifest(folder: Path, errors: dict[str, str]) -> Manifest | None:
    """The artifact's manifest, or None with the reason in ``errors`` (under the folder's name)."""
    try:
        return read_manifest(folder)
    except ArtifactError as e:
        errors[folder.name] = str(e)
        return None


def _is_model_folder(folder: Path) -> bool:
    """A Hugging Face model or expert folder (not yet compressed into an artifact)."""
    return folder.is_dir() and ((folder / CONFIG).is_file() or (folder / CARD).is_file())


class RegistrySource:
    """The registry's ``alias`` (``production``) versions of the base, every expert and the router.

    Each is fetched into the registry's verified local cache (checksums checked there, and again by
    the engine before any tensor is used). With several registered bases, ``base`` names the one.
    """

    def __init__(self, registry=None, alias: str = "production", base: str | None = None, router: str = ROUTER_NAME):
        if registry is None:
            from meswitch.registry import open_registry

            registry = open_registry()
        self.registry, self.alias, self.base_name, self.router_name = registry, alias, base, router

    def describe(self) -> str:
        return f"registry @{self.alias}"

    def _bases_of_experts(self, bases: list[str], live: dict) -> list[str]:
        """Of ``bases``, those whose fingerprint the live experts' versions were made against."""

        def version(m):
            return next((v for v in m.versions if v.version == m.aliases[self.alias]), None)

        wanted = {
            v.tags.get("base_fingerprint") for n, m in live.items() if n.startswith(EXPERT_PREFIX) and (v := version(m))
        }
        return [b for b in bases if (v := version(live[b])) and
                {v.tags.get("base_fingerprint"), v.tags.get("source_fingerprint")} & (wanted - {None})]  # fmt: skip

    def resolve(self) -> Resolution:
        models = {m.name: m for m in self.registry.list_models()}
        live = {n: m for n, m in models.items() if self.alias in m.aliases}
        bases = sorted(n for n in live if n.startswith(BASE_PREFIX))
        if self.base_name:
            wanted = self.base_name if self.base_name.startswith(BASE_PREFIX) else BASE_PREFIX + self.base_name
            bases = [b for b in bases if b == wanted]
        elif len(bases) > 1:  # the base the production experts were made from, when that tells them apart
            bases = self._bases_of_experts(bases, live) or bases
        if len(bases) != 1:
            names = [b.removeprefix(BASE_PREFIX) for b in bases]
            if names:
                hint = "" if self.base_name else " (choose one with --base-name NAME)"
            else:
                hint = (
                    f" in the registry at {self.registry.config.describe()['tracking_uri']}: fill it with "
                    "`meswitch pipeline run --inbox DIR --base DIR`, or serve local folders with "
                    "`meswitch serve --base DIR --experts ARTIFACT...`"
                )
            raise LoadError(f"need exactly one base model with alias {self.alias!r}, found {names or 'none'}{hint}")
        base_res = self.registry.resolve(bases[0], self.alias)
        base = ArtifactRef(bases[0].removeprefix(BASE_PREFIX), str(base_res.version), base_res.path)
        fingerprint = base_res.manifest.base_fingerprint or base_res.manifest.source_fingerprint
        experts, errors = {}, {}
        for name in sorted(n for n in live if n.startswith(EXPERT_PREFIX)):
            try:
                r = self.registry.resolve(name, self.alias, base_fingerprint=fingerprint)
            except Exception as e:  # an expert that cannot be fetched or verified is refused, not fatal
                errors[name.removeprefix(EXPERT_PREFIX)] = f"{type(e).__name__}: {e}"
                continue
            served = r.manifest.name or name.removeprefix(EXPERT_PREFIX)
            experts[served] = ArtifactRef(served, str(r.version), r.path)
        router = None
        if self.router_name in live:
            try:
                r = self.registry.resolve(self.router_name, self.alias)
                router = ArtifactRef(self.router_name, str(r.version), r.path)
            except Exception as e:
                errors["router"] = f"{type(e).__name__}: {e}"
        return Resolution(base, experts, router, errors)


@dataclass(eq=False)
class ModelEntry:
    """A servable model: an expert (its slot) or the base itself (slot None)."""

    name: str
    version: str
    kind: str  # "expert" | "base"
    slot: ExpertSlot | None
    tokenizer: Any
    stop_ids: frozenset[int]
    domain: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))


@dataclass(eq=False)
class Deployment:
    """One consistent set of versions being served. Replaced whole on reload, never changed in place."""

    generation: int
    engine: MixedExpertEngine
    scheduler: Scheduler
    base: ModelEntry
    experts: dict[str, ModelEntry]
    router: Any
    router_ref: ArtifactRef | None
    resolution: Resolution
    refused: dict[str, str]
    active: int = 0
    retired: bool = False

    def model(self, name: str) -> ModelEntry | None:
        if name in self.experts:
            return self.experts[name]
        return self.base if name == self.base.name else None

    def describe(self) -> dict[str, Any]:
        tiers = self.engine.tiers.summary()
        return {
            "generation": self.generation,
            "base": {"name": self.base.name, "version": self.base.version, "fingerprint": self.engine.fingerprint},
            "experts": {
                n: {"version": e.version, "domain": e.domain, "tier": e.slot.tier if e.slot else None}
                for n, e in sorted(self.experts.items())
            },
            "router": None if self.router_ref is None else {"version": self.router_ref.version},
            "refused": dict(sorted(self.refused.items())),
            "tiers": {k: tiers[k] for k in ("experts", "bytes", "budget", "overshoot_bytes")},
            "scheduler": self.scheduler.load,
        }


def stop_ids_of(tokenizer, model_config) -> frozenset[int]:
    """End-of-sequence ids: the tokenizer's eos and the model config's eos (one id or a list)."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(model_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list | tuple):
            ids.update(v for v in value if isinstance(v, int))
    return frozenset(ids)


@dataclass
class ReloadReport:
    changed: bool
    generation: int
    loaded: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    seconds: float = 0.0
    error: str | None = None


class ModelManager:
    """Holds the current deployment; reloads on demand or by polling; hands deployments to requests."""

    def __init__(
        self,
        source: ModelSource,
        engine_config: EngineConfig | None = None,
        scheduler_config: SchedulerConfig | None = None,
        router_device: str = "cpu",
        observer: Any = None,
    ):
        self.source = source
        self.engine_config = engine_config or EngineConfig()
        self.scheduler_config = scheduler_config or SchedulerConfig()
        self.router_device = router_device
        self.observer = observer  # TierObserver + StepObserver + reload(result)
        self.current: Deployment | None = None
        self.last_report: ReloadReport | None = None
        self._lock = threading.Lock()  # guards current and the active counts
        self._reload_lock = threading.Lock()  # one reload at a time
        self._generation = 0
        self._refused_versions: dict[str, Any] | None = None  # a resolution whose deployment failed to build
        self._poller: threading.Thread | None = None
        self._stop = threading.Event()

    # ---- requests ----------------------------------------------------------------------------
    @contextlib.contextmanager
    def acquire(self) -> Iterator[Deployment]:
        """The current deployment, kept alive (its engine, slots and router) until the block exits."""
        with self._lock:
            dep = self.current
            if dep is None:
                raise LoadError("no model is loaded yet")
            dep.active += 1
        try:
            yield dep
        finally:
            with self._lock:
                dep.active -= 1
                done = dep.retired and dep.active == 0
            if done:
                self._release(dep)

    # ---- loading -----------------------------------------------------------------------------
    def start(self) -> ReloadReport:
        """Load the first deployment; raises LoadError if the base cannot be served."""
        report = self.reload()
        if self.current is None:
            raise LoadError(report.error or "nothing could be loaded")
        return report

    def reload(self) -> ReloadReport:
        """Resolve the source; if any version moved, build the next deployment and swap it in atomically."""
        with self._reload_lock:
            t0 = time.perf_counter()
            prev = self.current
            try:
                res = self.source.resolve()
            except Exception as e:
                report = ReloadReport(False, prev.generation if prev else 0, error=f"resolve failed: {e}")
                return self._done(report, "error")
            seen = res.versions()
            if prev is not None and seen in (prev.resolution.versions(), self._refused_versions):
                return self._done(ReloadReport(False, prev.generation, refused=dict(prev.refused)), "unchanged")
            try:
                dep, report = self._build(res, prev)
            except Exception as e:
                log.exception("reload refused")
                self._refused_versions = seen
                report = ReloadReport(False, prev.generation if prev else 0, error=f"{type(e).__name__}: {e}")
                return self._done(report, "refused")
            with self._lock:
                self.current = dep
                if prev is not None:
                    prev.retired = True
                    release = prev.active == 0
            if prev is not None and release:
                self._release(prev)
            report.seconds = round(time.perf_counter() - t0, 3)
            log.info(
                "deployment %d live: loaded %s, kept %s, removed %s, refused %s",
                dep.generation,
                report.loaded,
                report.kept,
                report.removed,
                list(report.refused),
            )
            return self._done(report, "loaded" if not report.refused else "partial")

    def _done(self, report: ReloadReport, result: str) -> ReloadReport:
        self.last_report = report
        if self.observer is not None and hasattr(self.observer, "reload"):
            self.observer.reload(result)
        if report.error:
            log.warning("reload: %s", report.error)
        return report

    def _build(self, res: Resolution, prev: Deployment | None) -> tuple[Deployment, ReloadReport]:
        report = ReloadReport(True, self._generation + 1, refused=dict(res.errors))
        same_base = prev is not None and prev.resolution.base.version == res.base.version
        if same_base:
            engine, scheduler, base = prev.engine, prev.scheduler, prev.base
        else:
            engine, scheduler = self._engine(res.base), None
            tok = _tokenizer(res.base.path)
            base = ModelEntry(res.base.name, res.base.version, "base", None, tok, stop_ids_of(tok, engine.model.config))
            report.loaded.append(f"base {res.base.name}@{res.base.version}")
        experts: dict[str, ModelEntry] = {}
        for name, ref in sorted(res.experts.items()):
            old = prev.experts.get(name) if same_base else None
            if old is not None and old.version == ref.version:
                experts[name] = old
                report.kept.append(name)
                continue
            try:
                experts[name] = self._expert(engine, name, ref)
                report.loaded.append(f"{name}@{ref.version}")
            except Exception as e:
                log.warning("expert %s@%s refused: %s", name, ref.version, e)
                report.refused[name] = f"version {ref.version} refused: {type(e).__name__}: {e}"
                if old is not None:
                    experts[name] = old  # the old version keeps serving
                    report.kept.append(name)
        if prev is not None:
            report.removed = sorted(set(prev.experts) - set(experts))
            if not same_base and prev.experts and not experts:
                raise LoadError(
                    f"new base {res.base.name}@{res.base.version} has no expert that loads "
                    f"({'; '.join(f'{k}: {v}' for k, v in sorted(report.refused.items())) or 'none registered'}); "
                    f"keeping base {prev.base.name}@{prev.base.version} and its experts"
                )
        router, router_ref = None, None
        if res.router is not None:
            old_ok = same_base and prev.router_ref is not None
            if old_ok and prev.router_ref.version == res.router.version:
                router, router_ref = prev.router, prev.router_ref
            else:
                try:
                    router, router_ref = self._router(res.router, engine), res.router
                    report.loaded.append(f"router@{res.router.version}")
                except Exception as e:
                    log.warning("router %s refused: %s", res.router.version, e)
                    report.refused["router"] = f"version {res.router.version} refused: {type(e).__name__}: {e}"
                    if old_ok:
                        router, router_ref = prev.router, prev.router_ref
        if router is not None and (unserved := _unserved_domains(router, experts)):
            log.warning("router domains %s have no loaded expert: the base answers their queries", unserved)
        if scheduler is None:
            scheduler = Scheduler(engine, self.scheduler_config, observer=self._step_observer()).start()
        # The resolution is recorded as seen (refused versions included), so a refused version is
        # not retried at every poll, only when its alias moves again.
        self._generation += 1
        dep = Deployment(
            generation=self._generation,
            engine=engine,
            scheduler=scheduler,
            base=base,
            experts=experts,
            router=router,
            router_ref=router_ref,
            resolution=res,
            refused=report.refused,
        )
        return dep, report

    def _engine(self, ref: ArtifactRef) -> MixedExpertEngine:
        expected = None
        if (ref.path / MANIFEST).is_file():
            m = read_manifest(ref.path)
            if m.kind != "base":
                raise LoadError(f"{ref.path}: a {m.kind!r} artifact, not a base")
            expected = m.base_fingerprint or m.source_fingerprint
        observer: TierObserver | None = self.observer if hasattr(self.observer, "expert_switch") else None
        engine = MixedExpertEngine(ref.path, self.engine_config, observer=observer)
        if expected and engine.fingerprint != expected:
            raise LoadError(
                f"{ref.path}: its weights hash to {engine.fingerprint[:16]}…, the manifest says {expected[:16]}…"
            )
        return engine

    def _step_observer(self) -> StepObserver | None:
        return self.observer if self.observer is not None and hasattr(self.observer, "step") else None

    def _expert(self, engine: MixedExpertEngine, name: str, ref: ArtifactRef) -> ModelEntry:
        tok = _tokenizer(ref.path / SOURCE_DIR if (ref.path / SOURCE_DIR).is_dir() else engine.base_dir)
        slot = engine.add_expert(ref.path, name=name, version=ref.version)
        slot.tokenizer = tok
        vocab = len(tok)
        if vocab > slot.vocab:
            engine.remove_expert(slot)
            raise ArtifactError(f"{ref.path}: its tokenizer has {vocab} tokens, its model {slot.vocab} rows")
        stops = stop_ids_of(tok, engine.model.config)
        return ModelEntry(name, ref.version, "expert", slot, tok, stops, domain=slot.domain)

    def _router(self, ref: ArtifactRef, engine: MixedExpertEngine):
        from meswitch.routing import load_router

        return load_router(ref.path, base_model=engine.base_dir, device=self.router_device)

    def _release(self, old: Deployment) -> None:
        """A retired deployment has no request left: free what the current one does not share."""
        cur = self.current
        if cur is None or cur.engine is not old.engine:
            old.scheduler.stop(wait=False)
            for e in old.experts.values():
                if e.slot is not None:
                    old.engine.remove_expert(e.slot)
            log.info("deployment %d released with its base", old.generation)
            return
        live = {id(e.slot) for e in cur.experts.values()}
        for e in old.experts.values():
            if e.slot is not None and id(e.slot) not in live:
                old.scheduler.retire(e.slot)
        log.info("deployment %d released", old.generation)

    # ---- polling -----------------------------------------------------------------------------
    def start_polling(self, interval_s: float) -> None:
        if interval_s <= 0 or self._poller is not None:
            return

        def loop() -> None:
            while not self._stop.wait(interval_s):
                try:
                    self.reload()
                except Exception:  # never let the poller die
                    log.exception("poll failed")

        self._poller = threading.Thread(target=loop, name="meswitch-reload-poller", daemon=True)
        self._poller.start()

    def close(self) -> None:
        self._stop.set()
        if self._poller is not None:
            self._poller.join(5)
        dep = self.current
        if dep is not None:
            dep.scheduler.stop()


def _unserved_domains(router, experts: dict[str, ModelEntry]) -> list[str]:
    """The router's domains whose expert is not loaded: ``auto`` sends their queries to the base, silently
    for the client, so the operator is told when the deployment goes live."""
    return sorted(domain for domain, expert in router.experts.items() if expert not in experts)


def _tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder, local_files_only=True)
