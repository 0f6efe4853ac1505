"""The model registry: MLflow registered models and versions over artifact folders in an object store.

A version is created only after its files are stored and every stored checksum has been read back
and checked, so no version ever points at missing or partial files. Publishing is idempotent by the
artifact's content hash: a retry, or a second publisher of the same bytes, gets the same version.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from meswitch.artifacts import (
    ArtifactError,
    Manifest,
    abandoned,
    read_manifest,
    remove_aside,
    staging_dir,
    verify,
)
from meswitch.registry.config import RegistryConfig
from meswitch.registry.errors import IntegrityError, InvalidName, NotFound, RegistryError
from meswitch.registry.names import (
    PREFIX,
    Ref,
    check_kind,
    parse_ref,
    validate_alias,
    validate_name,
    validate_version,
)
from meswitch.registry.retry import with_retries
from meswitch.registry.store import ObjectStore, S3Store, content_hash, open_store
from meswitch.registry.uri import Location, parse_location

# MLflow reports anonymous usage over the network unless told not to; a registry client on a GPU
# worker or in CI should not. Set MLFLOW_DISABLE_TELEMETRY=false to opt back in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

log = logging.getLogger(__name__)

TAG_CONTENT_HASH = "content_hash"
TAG_REJECTED = "rejected"
RESERVED_TAGS = frozenset({TAG_CONTENT_HASH})
HISTORY_TAG = "meswitch.alias_history.{alias}"
HISTORY_KEEP = 50
MAX_TAG_CHARS = 5000


@dataclass
class VersionInfo:
    """One registered version: where its files are, what its manifest says (as tags), its aliases."""

    name: str
    version: int
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)
    created_ms: int = 0
    description: str = ""

    @property
    def content_hash(self) -> str | None:
        return self.tags.get(TAG_CONTENT_HASH)

    @property
    def rejected(self) -> str | None:
        """The reasons the version was rejected, or None."""
        return self.tags.get(TAG_REJECTED) or None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ModelInfo:
    name: str
    aliases: dict[str, int] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    versions: list[VersionInfo] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "aliases": dict(sorted(self.aliases.items())),
            "tags": self.tags,
            "versions": [v.to_dict() for v in self.versions],
        }


@dataclass
class CachePrune:
    """What :meth:`Registry.prune_cache` removed from the download cache (or would, with ``dry_run``)."""

    kept: dict[str, list[str]]  # content hash -> the aliases that need it ("NAME@ALIAS", "NAME@ALIAS rollback")
    removed: list[str]  # content hashes of versions no alias needs (fetched again if asked for)
    abandoned: list[str]  # staging folders of downloads killed on this host
    freed_bytes: int
    dry_run: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


DIGEST = re.compile(r"[0-9a-f]{64}")  # a cached version's folder: its content hash


@dataclass
class Resolved:
    """A version resolved to a local folder whose checksums (and base fingerprint, if asked) were verified."""

    name: str
    version: int
    path: Path
    manifest: Manifest
    content_hash: str
    alias: str | None = None


def manifest_tags(manifest: Manifest, digest: str) -> dict[str, str]:
    """The tags every version carries, taken from its manifest (DESIGN.md, "Registry conventions")."""
    tags = {
        TAG_CONTENT_HASH: digest,
        "kind": manifest.kind,
        "artifact_name": manifest.name,
        "schema_version": str(manifest.schema_version),
    }
    if manifest.domain:
        tags["domain"] = manifest.domain
    if manifest.base_fingerprint:
        tags["base_fingerprint"] = manifest.base_fingerprint
    if manifest.source_fingerprint:
        tags["source_fingerprint"] = manifest.source_fingerprint
    if (bpp := manifest.metrics.get("bits_per_param")) is not None:
        tags["bits_per_param"] = str(bpp)
    if (gates := manifest.metrics.get("gates")) is not None:
        tags["gates"] = json.dumps(gates, sort_keys=True)[:MAX_TAG_CHARS]
    passed = manifest.metrics.get("gates_passed", _gates_passed(gates))
    if passed is not None:
        tags["gates_passed"] = "true" if passed else "false"
    return tags


def _gates_passed(gates: Any) -> bool | None:
    """``{"passed": bool}``, ``{gate: bool}`` or ``{gate: {"passed": bool, ...}}``; else unknown."""
    if not isinstance(gates, dict) or not gates:
        return None
    if isinstance(gates.get("passed"), bool):
        return gates["passed"]
    values = list(gates.values())
    if all(isinstance(v, bool) for v in values):
        return all(values)
    if all(isinstance(v, dict) and isinstance(v.get("passed"), bool) for v in values):
        return all(v["passed"] for v in values)
    return None


def _history(tags: dict[str, str], alias: str) -> list[int]:
    raw = tags.get(HISTORY_TAG.format(alias=alias), "")
    return [int(v) for v in raw.split(",") if v.strip().isdigit()]


def _rollback_target(history: list[int], current: int, usable: Callable[[int], bool]) -> int | None:
    """What ``rollback`` points an alias back at: the last version of its history, other than ``current``, that
    ``usable`` accepts (registered, not rejected); asked from the end, so no more often than it must be."""
    return next((v for v in reversed(history) if v != current and usable(v)), None)


class Registry:
    """Publish, version, alias, resolve and roll back meswitch artifacts in MLflow + an object store.

    The one way the package reaches MLflow (``client``, also for the pipeline's runs) and S3 (``store``,
    ``store_for``). Flows, serving and the CLI take a shared one from ``open_registry``.
    """

    def __init__(self, config: RegistryConfig | None = None):
        self.config = config or RegistryConfig.from_env()
        if self.config.is_remote_tracking:
            # MLflow calls are retried once, by ``_call`` (registry.retry), with a clear final error;
            # MLflow's default (7 retries, backoff up to 2 minutes, per request) would hide an outage for minutes.
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
            os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")
        self._client: MlflowClient | None = None
        self._store: ObjectStore | None = None
        self._buckets: dict[str, ObjectStore] = {}
        self._lock = threading.Lock()

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            for uri in (self.config.tracking_uri, self.config.registry_uri):
                if uri.startswith("sqlite:///"):  # the embedded default: create $MESWITCH_HOME on first use
                    Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            self._client = MlflowClient(tracking_uri=self.config.tracking_uri, registry_uri=self.config.registry_uri)
        return self._client

    @property
    def store(self) -> ObjectStore:
        if self._store is None:
            self._store = open_store(self.config.artifact_uri, self.config)
        return self._store

    def store_for(self, location: str) -> ObjectStore:
        """The store holding ``location``: a version's ``source`` (which may predate today's artifact root)
        or a folder such as the pipeline's inbox. One S3 client per bucket, with this configuration's
        endpoint and credentials."""
        loc = parse_location(location)
        if loc.bucket is None:
            return open_store(loc.path.parent, self.config)
        if isinstance(self.store, S3Store) and self.store.bucket == loc.bucket:
            return self.store
        with self._lock:
            if loc.bucket not in self._buckets:
                self._buckets[loc.bucket] = open_store(Location(loc.bucket, ""), self.config)
            return self._buckets[loc.bucket]

    # -- MLflow calls, with retries and clear errors -------------------------------------------------
    def _call(self, what: str, fn: Callable[..., Any], *args: Any, passthrough: tuple[str, ...] = (), **kw: Any):
        where = self.config.describe()["registry_uri"]
        try:
            return with_retries(
                lambda: fn(*args, **kw),
                what=f"MLflow registry at {where}: {what}",
                retries=self.config.retries,
                backoff_s=self.config.backoff_s,
            )
        except MlflowException as e:
            if e.error_code in passthrough:
                raise
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" or (
                e.error_code == "INVALID_PARAMETER_VALUE" and "not found" in str(e.message)
            ):
                raise NotFound(f"{what}: {e.message}") from e
            raise RegistryError(f"MLflow registry at {where}: {what} failed: {e.message}") from e

    def _paged(self, what: str, fn: Callable[..., Any], **kw: Any) -> list[Any]:
        items: list[Any] = []
        token = None
        while True:
            page = self._call(what, fn, page_token=token, **kw)
            items.extend(page)
            token = getattr(page, "token", None)
            if not token:
                return items

    # -- reading --------------------------------------------------------------------------------------
    def aliases(self, name: str) -> dict[str, int]:
        """``{alias: version}`` of one model in one cheap call; serving polls this to notice changes."""
        rm = self._call(f"get model {name}", self.client.get_registered_model, validate_name(name))
        return {a: int(v) for a, v in rm.aliases.items()}

    def get_version(self, name: str, version: int | None = None, alias: str | None = None) -> VersionInfo:
        """One version, by number or by alias."""
        validate_name(name)
        if (version is None) == (alias is None):
            raise InvalidName("give exactly one of a version or an alias")
        if alias is not None:
            validate_alias(alias)
            mv = self._call(f"get {name}@{alias}", self.client.get_model_version_by_alias, name, alias)
        else:
            version = validate_version(version)
            mv = self._call(f"get {name}/{version}", self.client.get_model_version, name, str(version))
        rm = self._call(f"get model {name}", self.client.get_registered_model, name)
        return self._info(mv, {a: int(v) for a, v in rm.aliases.items()})

    def get(self, ref: str | Ref) -> VersionInfo | ModelInfo:
        """``NAME@ALIAS`` or ``NAME/VERSION``: that version; ``NAME``: the model with all its versions."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if ref.alias or ref.version:
            return self.get_version(ref.name, version=ref.version, alias=ref.alias)
        return self.get_model(ref.name)

    def get_model(self, name: str) -> ModelInfo:
        rm = self._call(f"get model {name}", self.client.get_registered_model, validate_name(name))
        return self._model_info(rm)

    def list_models(self) -> list[ModelInfo]:
        """Every meswitch model (name starting ``meswitch-``) with its versions and aliases."""
        models = self._paged(
            "list models",
            self.client.search_registered_models,
            filter_string=f"name LIKE '{PREFIX}%'",
            max_results=200,
        )
        return [self._model_info(rm) for rm in sorted(models, key=lambda m: m.name)]

    def _model_info(self, rm: Any) -> ModelInfo:
        aliases = {a: int(v) for a, v in rm.aliases.items()}
        versions = self._paged(
            f"list versions of {rm.name}",
            self.client.search_model_versions,
            filter_string=f"name = '{rm.name}'",
            max_results=1000,
        )
        infos = sorted((self._info(mv, aliases) for mv in versions), key=lambda v: v.version)
        return ModelInfo(name=rm.name, aliases=aliases, tags=dict(rm.tags), versions=infos)

    @staticmethod
    def _info(mv: Any, aliases: dict[str, int]) -> VersionInfo:
        version = int(mv.version)
        return VersionInfo(
            name=mv.name,
            version=version,
            source=mv.source,
            tags=dict(mv.tags),
            aliases=sorted(a for a, v in aliases.items() if v == version),
            created_ms=int(mv.creation_timestamp or 0),
            description=mv.description or "",
        )

    def _find(self, name: str, digest: str) -> list[int]:
        """Versions of ``name`` holding exactly this content, oldest first."""
        found = self._paged(
            f"find {name} by content hash",
            self.client.search_model_versions,
            filter_string=f"name = '{name}' and tags.{TAG_CONTENT_HASH} = '{digest}'",
        )
        return sorted(int(mv.version) for mv in found)

    # -- publishing -----------------------------------------------------------------------------------
    def publish(
        self,
        folder: Path | str,
        name: str,
        *,
        alias: str | None = None,
        tags: dict[str, Any] | None = None,
        rejected: str | None = None,
        progress: Callable[[int], None] | None = None,
    ) -> int:
        """Store a sealed artifact folder and register it as a version of ``name``; return the version.

        The files are uploaded under their content hash, read back and checked, and only then is the
        version created, with the manifest's tags (kind, domain, base fingerprint, bits per parameter,
        gates) plus ``tags``. Publishing content that is already registered returns that version
        (adding any new tags). ``rejected`` records why the artifact failed its gates; a rejected
        version never takes an alias. ``progress`` is called with byte counts as files are stored.
        """
        validate_name(name)
        if alias is not None:
            validate_alias(alias)
            if rejected:
                raise RegistryError("a rejected version cannot take an alias; publish it without one")
        extra = {str(k): str(v) for k, v in (tags or {}).items()}
        if bad := RESERVED_TAGS & set(extra):
            raise InvalidName(f"tags {sorted(bad)} are set by the registry itself")
        folder = Path(folder)
        manifest = verify(folder)  # ArtifactError if the folder is damaged: nothing is written
        check_kind(name, manifest.kind)
        digest = content_hash(folder)
        version_tags = {**manifest_tags(manifest, digest), **extra}
        if rejected:
            version_tags[TAG_REJECTED] = rejected[:MAX_TAG_CHARS]

        existing = self._find(name, digest)
        if existing:
            version = existing[0]
            current = self.get_version(name, version=version)
            # Cheap repair: re-store any file that went missing (one HEAD per file on S3).
            self._store_verified(folder, current.source, digest, progress, check=False)
            for key, value in version_tags.items():
                if current.tags.get(key) != value:
                    self._call(
                        f"tag {name}/{version}", self.client.set_model_version_tag, name, str(version), key, value
                    )
            if current.rejected and not rejected:  # judged again (new gates, say) and passed: no longer rejected
                self._call(
                    f"untag {name}/{version}", self.client.delete_model_version_tag, name, str(version), TAG_REJECTED
                )
                log.info("%s/%d: passed its gates this time; the rejection is lifted", name, version)
            log.info("%s: content %s… is already version %d", name, digest[:12], version)
        else:
            location = self.store.location(name, digest)
            self._store_verified(folder, location, digest, progress)
            self._ensure_model(name, manifest)
            mv = self._call(
                f"create a version of {name}",
                self.client.create_model_version,
                name=name,
                source=location,
                tags=version_tags,
                description=f"{manifest.kind} {manifest.name}" + (f" ({manifest.domain})" if manifest.domain else ""),
            )
            version = self._dedupe(name, digest, int(mv.version))
            log.info("%s: published version %d from %s (%s…)", name, version, folder, digest[:12])
        if alias is not None:
            self.set_alias(name, alias, version)
        return version

    def _ensure_model(self, name: str, manifest: Manifest) -> None:
        try:
            self._call(f"get model {name}", self.client.get_registered_model, name)
            return
        except NotFound:
            pass
        with contextlib.suppress(MlflowException):  # RESOURCE_ALREADY_EXISTS: a concurrent publisher made it
            self._call(
                f"create model {name}",
                self.client.create_registered_model,
                name,
                tags={"kind": manifest.kind},
                description=f"meswitch {manifest.kind} artifacts",
                passthrough=("RESOURCE_ALREADY_EXISTS",),
            )

    def _store_verified(self, folder: Path, location: str, digest: str, progress, check: bool = True) -> None:
        """Upload, then read every stored file back and check it (botocore retries each S3 request).

        Any failure is raised saying that nothing was registered (no version is created before this returns).
        """
        store = self.store_for(location)
        try:
            store.put(folder, location, progress)
            if not check:
                return
            try:
                store.check(location, digest)
            except IntegrityError as e:
                # A stored object that claims the right checksum but holds other bytes: rewrite it.
                log.warning("stored copy failed its check (%s); uploading it again", e)
                store.put(folder, location, progress, force=True)
                store.check(location, digest)
        except RegistryError as e:
            raise type(e)(f"publish failed, nothing was registered: {e}") from e

    def _dedupe(self, name: str, digest: str, mine: int) -> int:
        """Two publishers of the same content may both create a version: the oldest one wins."""
        versions = self._find(name, digest) or [mine]
        winner = versions[0]
        if winner != mine:
            log.info("%s: version %d duplicates version %d (same content); removing it", name, mine, winner)
            with contextlib.suppress(NotFound):  # a retried delete finds it gone
                self._call(f"delete duplicate {name}/{mine}", self.client.delete_model_version, name, str(mine))
        return winner

    def reject(self, name: str, version: int, reasons: str) -> None:
        """Mark a version rejected (it then cannot take an alias); ``reasons`` says why, for people."""
        info = self.get_version(name, version=version)
        if not reasons or not reasons.strip():
            raise InvalidName("give the reasons for rejecting a version")
        self._call(
            f"reject {name}/{version}", self.client.set_model_version_tag, name, str(version), TAG_REJECTED, reasons
        )
        if info.aliases:
            log.warning("%s/%d is rejected but still holds %s; roll back to move them", name, version, info.aliases)

    def tag_version(self, name: str, version: int, key: str, value: str) -> None:
        """Set one tag of a version (the pipeline's ``pipeline.status``, say); the registry's own are refused."""
        if key in RESERVED_TAGS:
            raise InvalidName(f"tag {key!r} is set by the registry itself")
        name, version = validate_name(name), validate_version(version)
        self._call(f"tag {name}/{version}", self.client.set_model_version_tag, name, str(version), key, value)

    # -- aliases ---------------------------------------------------------------------------------------
    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``name@alias`` at ``version`` and remember the previous holder for ``rollback``."""
        validate_alias(alias)
        info = self.get_version(name, version=validate_version(version))
        if info.rejected:
            raise RegistryError(f"{name}/{version} is rejected ({info.rejected}); it cannot become {alias!r}")
        rm = self._call(f"get model {name}", self.client.get_registered_model, name)
        history = _history(dict(rm.tags), alias)
        current = rm.aliases.get(alias)
        if current is not None and (not history or history[-1] != int(current)):
            history.append(int(current))  # set outside meswitch: remember it anyway
        if not history or history[-1] != info.version:
            history.append(info.version)
        self._call(f"set {name}@{alias}", self.client.set_registered_model_alias, name, alias, str(info.version))
        self._write_history(name, alias, history)
        log.info("%s@%s -> version %d", name, alias, info.version)

    def promote(self, name: str, version: int, alias: str = "production") -> None:
        """Move ``alias`` (``production`` by default) to ``version``."""
        self.set_alias(name, alias, version)

    def rollback(self, name: str, alias: str = "production") -> int:
        """Point ``name@alias`` back at the version it held before; return that version."""
        validate_alias(alias)
        rm = self._call(f"get model {validate_name(name)}", self.client.get_registered_model, name)
        current = rm.aliases.get(alias)
        if current is None:
            raise NotFound(f"{name}@{alias} is not set; nothing to roll back")
        current = int(current)
        history = _history(dict(rm.tags), alias)

        def usable(version: int) -> bool:
            try:
                return not self.get_version(name, version=version).rejected
            except NotFound:
                return False

        target = _rollback_target(history, current, usable)
        if target is None:
            raise RegistryError(f"{name}@{alias} is version {current} and has no earlier version to roll back to")
        history = history[: len(history) - history[::-1].index(target)]  # what came after it is dropped
        self._call(f"set {name}@{alias}", self.client.set_registered_model_alias, name, alias, str(target))
        self._write_history(name, alias, history)
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        self._call(
            f"tag {name}/{current}",
            self.client.set_model_version_tag,
            name,
            str(current),
            f"rolled_back.{alias}",
            stamp,
        )
        log.info("%s@%s rolled back from version %d to %d", name, alias, current, target)
        return target

    def _write_history(self, name: str, alias: str, history: list[int]) -> None:
        value = ",".join(str(v) for v in history[-HISTORY_KEEP:])
        key = HISTORY_TAG.format(alias=alias)
        self._call(f"record {name}@{alias} history", self.client.set_registered_model_tag, name, key, value)

    # -- fetching --------------------------------------------------------------------------------------
    def resolve(
        self,
        name: str,
        alias: str | None = "production",
        *,
        version: int | None = None,
        base_fingerprint: str | None = None,
        verify_cached: bool = True,
    ) -> Resolved:
        """``name@alias`` (or ``name/version``) as a verified local folder in the cache.

        Downloads go to a temporary folder, are checked (content hash, every file's sha256, base
        fingerprint) and only then renamed into ``$cache/<content hash>``: a failed download never
        leaves anything in the cache. A cached copy is re-verified unless ``verify_cached`` is False.
        """
        info = self.get_version(name, version=version) if version is not None else self.get_version(name, alias=alias)
        digest = info.content_hash
        if not digest:
            raise RegistryError(f"{name}/{info.version} has no {TAG_CONTENT_HASH} tag: not published by meswitch")
        tagged_base = info.tags.get("base_fingerprint")
        if base_fingerprint is not None and tagged_base is not None and tagged_base != base_fingerprint:
            raise IntegrityError(
                f"{name}/{info.version} was made for base {tagged_base[:16]}…, not {base_fingerprint[:16]}…"
            )
        path = self._cached(info, digest, verify_cached)
        manifest = verify(path) if verify_cached else read_manifest(path)
        if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
            raise IntegrityError(
                f"{name}/{info.version} was made for base {str(manifest.base_fingerprint)[:16]}…, "
                f"not {base_fingerprint[:16]}…"
            )
        return Resolved(name, info.version, path, manifest, digest, alias if version is None else None)

    def needed(self) -> dict[str, list[str]]:
        """Content hash -> the aliases that need it: every alias's version, and the version ``rollback`` would
        point it back at (so a rollback finds its files in the cache)."""
        needed: dict[str, list[str]] = {}
        for model in self.list_models():
            digests = {v.version: v.content_hash for v in model.versions}
            usable = {v.version for v in model.versions if not v.rejected}
            for alias, current in model.aliases.items():
                back = _rollback_target(_history(model.tags, alias), current, usable.__contains__)
                for version, label in ((current, ""), (back, " rollback")):
                    if digests.get(version):
                        needed.setdefault(digests[version], []).append(f"{model.name}@{alias}{label}")
        return needed

    def prune_cache(self, dry_run: bool = False) -> CachePrune:
        """Free the download cache of what no alias needs (:meth:`needed`): other versions' folders, and the
        staging folders of downloads killed on this host. Everything removed is in the object store and is
        fetched (and verified) again if resolved. Folders that are no cached version are left alone; a folder
        goes by a rename first, so a concurrent resolver sees it whole or not at all."""
        cache = self.config.cache_dir
        if not cache.is_dir():
            return CachePrune({}, [], [], 0, dry_run)
        needed = self.needed()
        kept, removed, freed = {}, [], 0
        for path in sorted(cache.iterdir()):
            if not (path.is_dir() and DIGEST.fullmatch(path.name)):
                continue
            if path.name in needed:
                kept[path.name] = needed[path.name]
                continue
            removed.append(path.name)
            freed += _bytes(path)
            if not dry_run:
                remove_aside(path, "pruned")
        stale = abandoned(cache)
        for path in stale:
            freed += _bytes(path)
            if not dry_run:
                shutil.rmtree(path, ignore_errors=True)
        if not dry_run:
            log.info("cache %s: removed %d versions and %d abandoned downloads, %d bytes", cache, len(removed),
                     len(stale), freed)  # fmt: skip
        return CachePrune(kept, removed, [p.name for p in stale], freed, dry_run)

    def _cached(self, info: VersionInfo, digest: str, verify_cached: bool) -> Path:
        cache = self.config.cache_dir
        final = cache / digest
        if final.is_dir():
            try:
                if verify_cached:
                    verify(final)
                if content_hash(final) != digest:
                    raise ArtifactError(f"{final}: content hash differs from its folder name")
                return final
            except ArtifactError as e:
                log.warning("cached copy is damaged (%s); fetching it again", e)
                with contextlib.suppress(OSError):  # another process may be replacing it too
                    remove_aside(final, "damaged")
        store = self.store_for(info.source)
        what = f"{info.name}/{info.version} from {info.source}"
        with staging_dir(final, checked=False, keep_existing=True) as tmp:  # a concurrent resolver's copy stays
            try:
                store.fetch(info.source, tmp)  # botocore retries each S3 request
                got = content_hash(tmp)
                if got != digest:
                    raise IntegrityError(f"content hash {got[:16]}… is not the registered {digest[:16]}…")
                verify(tmp)
            except ArtifactError as e:
                raise IntegrityError(f"download of {what} failed verification; nothing was cached: {e}") from e
            except RegistryError as e:
                raise type(e)(f"download of {what} failed; nothing was cached: {e}") from e
        return final

    def pull(self, ref: str | Ref, out: Path | str, *, base_fingerprint: str | None = None) -> Resolved:
        """Resolve ``NAME@ALIAS`` or ``NAME/VERSION`` and copy the verified folder to ``out`` (atomically)."""
        ref = parse_ref(ref) if isinstance(ref, str) else ref
        if not (ref.alias or ref.version):
            raise InvalidName(f"{ref}: say which version, as NAME@ALIAS or NAME/VERSION")
        resolved = self.resolve(ref.name, ref.alias, version=ref.version, base_fingerprint=base_fingerprint)
        out = Path(out)
        with staging_dir(out) as tmp:
            shutil.copytree(resolved.path, tmp, dirs_exist_ok=True)
            manifest = verify(tmp)
        return Resolved(resolved.name, resolved.version, out, manifest, resolved.content_hash, resolved.alias)


def _bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


@functools.lru_cache(maxsize=8)
def _shared(config: RegistryConfig) -> Registry:
    return Registry(config)


def open_registry(config: RegistryConfig | None = None) -> Registry:
    """The registry for ``config`` (default: the environment's now), made once per configuration and shared,
    so that flows, serving and the CLI use one MLflow client and one S3 client per bucket."""
    return _shared(config or RegistryConfig.from_env())
