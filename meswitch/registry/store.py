"""Object storage for artifact folders: a local folder, or any S3-compatible server through boto3.

Artifacts are stored by content: ``<root>/<model name>/<content hash>/<files>``. Writing the same
artifact twice writes the same keys, so a retried upload completes the first instead of
duplicating it, and a model version is only created once every stored checksum has been checked.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path, PurePosixPath

from meswitch.artifacts import MANIFEST, ArtifactError, Manifest, manifest_path, sha256_file, staging_dir, verify
from meswitch.registry.config import RegistryConfig
from meswitch.registry.errors import (
    AccessDenied,
    IntegrityError,
    NotFound,
    RegistryError,
    Unavailable,
    chain,
    is_transient,
    s3_error_code,
)
from meswitch.registry.retry import short
from meswitch.registry.uri import Location, parse_location

log = logging.getLogger(__name__)
Progress = Callable[[int], None]


def content_hash_of_manifest(manifest_bytes: bytes) -> str:
    """The artifact's identity: sha256 over ``"<sha256>  <path>\\n"`` lines, sorted by path, of every
    file in the folder, ``manifest.json`` included (its own sha256 over its bytes).

    The manifest lists every other file's sha256, so this covers every byte of the artifact.
    """
    try:
        files = dict(json.loads(manifest_bytes)["files"])
    except (ValueError, KeyError, TypeError) as e:
        raise ArtifactError(f"{MANIFEST}: cannot read its file list ({e})") from e
    files[MANIFEST] = hashlib.sha256(manifest_bytes).hexdigest()
    listing = "".join(f"{digest}  {path}\n" for path, digest in sorted(files.items()))
    return hashlib.sha256(listing.encode()).hexdigest()


def content_hash(folder: Path) -> str:
    """Content hash of an artifact folder (from its manifest; ``verify`` checks the files themselves)."""
    return content_hash_of_manifest(manifest_path(folder).read_bytes())


def artifact_files(manifest: Manifest) -> list[str]:
    """Relative paths of an artifact's files, manifest last, each checked to stay inside the folder."""
    for rel in manifest.files:
        p = PurePosixPath(rel)
        if not rel or p.is_absolute() or ".." in p.parts or "\\" in rel or rel == MANIFEST:
            raise IntegrityError(f"{MANIFEST} lists an unsafe file path {rel!r}")
    return [*sorted(manifest.files), MANIFEST]


def _manifest_from_bytes(data: bytes, source: str) -> Manifest:
    try:
        return Manifest.from_dict(json.loads(data), source=source)
    except ValueError as e:
        raise IntegrityError(f"{source}: invalid JSON ({e})") from e


class ObjectStore:
    """Where artifact folders live. ``location`` URIs are what model versions record as ``source``."""

    uri: str

    def location(self, name: str, digest: str) -> str:
        raise NotImplementedError

    def put(self, folder: Path, location: str, progress: Progress | None = None, force: bool = False) -> None:
        """Store the files of ``folder`` (already verified locally) at ``location``.

        Files already stored with the right size and checksum are skipped unless ``force``.
        """
        raise NotImplementedError

    def check(self, location: str, digest: str) -> Manifest:
        """Read back every stored file and compare its sha256 with the manifest; return the manifest."""
        raise NotImplementedError

    def fetch(self, location: str, dest: Path) -> None:
        """Copy the stored artifact into the empty folder ``dest`` (the caller verifies it)."""
        raise NotImplementedError


class LocalStore(ObjectStore):
    """A folder on this machine (or a shared mount). The embedded default: ``$MESWITCH_HOME/artifacts``."""

    def __init__(self, root: Path):
        self.root = Path(root).expanduser().resolve()
        self.uri = self.root.as_uri()

    def location(self, name: str, digest: str) -> str:
        return (self.root / name / digest).as_uri()

    @staticmethod
    def path(location: str) -> Path:
        return parse_location(location).path

    def put(self, folder: Path, location: str, progress: Progress | None = None, force: bool = False) -> None:
        dest = self.path(location)
        if dest.is_dir():
            try:
                if force:
                    raise ArtifactError(f"{dest}: rewriting on request")
                verify(dest)
                return
            except ArtifactError as e:
                log.warning("replacing a stored copy: %s", e)
                aside = dest.with_name(f".{dest.name}.damaged-{os.getpid()}")
                dest.rename(aside)
                shutil.rmtree(aside, ignore_errors=True)
        with staging_dir(dest, checked=False, keep_existing=True) as tmp:  # by content: a copy there stays
            manifest = _manifest_from_bytes((Path(folder) / MANIFEST).read_bytes(), str(folder))
            for rel in artifact_files(manifest):
                target = tmp / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(Path(folder) / rel, target)
                if progress:
                    progress(target.stat().st_size)

    def check(self, location: str, digest: str) -> Manifest:
        dest = self.path(location)
        if not dest.is_dir():
            raise NotFound(f"{location}: the stored artifact is missing")
        try:
            manifest = verify(dest)
        except ArtifactError as e:
            raise IntegrityError(f"stored artifact failed verification: {e}") from e
        if content_hash(dest) != digest:
            raise IntegrityError(f"{location}: content hash differs from {digest[:16]}…")
        return manifest

    def fetch(self, location: str, dest: Path) -> None:
        src = self.path(location)
        if not (src / MANIFEST).is_file():
            raise NotFound(f"{location}: the stored artifact is missing (no {MANIFEST})")
        manifest = _manifest_from_bytes((src / MANIFEST).read_bytes(), location)
        for rel in artifact_files(manifest):
            if not (src / rel).is_file():
                raise NotFound(f"{location}: stored file {rel} is missing")
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src / rel, target)


# Error codes an S3 server returns for refused credentials and for missing things.
_DENIED = {
    "403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken",
    "AuthorizationHeaderMalformed", "InvalidClientTokenId", "AllAccessDisabled",
}  # fmt: skip
_MISSING = {"404", "NoSuchKey", "NoSuchBucket", "NotFound", "NoSuchUpload"}


class S3Store(ObjectStore):
    """An S3 bucket (AWS or any S3-compatible server such as SeaweedFS or MinIO) through boto3."""

    def __init__(self, uri: str | Location, config: RegistryConfig):
        root = parse_location(uri)
        if root.bucket is None:
            raise RegistryError(f"{uri}: expected s3://bucket[/prefix]")
        self.bucket, self.prefix, self.uri = root.bucket, root.key, str(root)
        self.config = config
        self._client = None
        self._transfer = None

    # -- boto3 -------------------------------------------------------------------------------
    @property
    def client(self):
        if self._client is None:
            import boto3
            from botocore.config import Config

            cfg = self.config
            session = boto3.session.Session(
                aws_access_key_id=cfg.aws_access_key_id,
                aws_secret_access_key=cfg.aws_secret_access_key,
                aws_session_token=cfg.aws_session_token,
                region_name=cfg.aws_region,
            )
            self._client = session.client(
                "s3",
                endpoint_url=cfg.s3_endpoint_url,
                config=Config(
                    s3={"addressing_style": "path" if cfg.s3_endpoint_url else "auto"},
                    retries={"mode": "standard", "total_max_attempts": cfg.attempts},  # the only retries of S3 requests
                    connect_timeout=5,
                    read_timeout=60,
                    max_pool_connections=max(10, 2 * cfg.s3_concurrency),
                ),
            )
        return self._client

    @property
    def transfer(self):
        if self._transfer is None:
            from boto3.s3.transfer import TransferConfig

            part = self.config.s3_part_bytes
            self._transfer = TransferConfig(
                multipart_threshold=part,
                multipart_chunksize=part,
                max_concurrency=self.config.s3_concurrency,
                num_download_attempts=1,  # botocore retries the request; no second layer around it
            )
        return self._transfer

    def where(self) -> str:
        return f"{self.uri} at {self.config.s3_endpoint_url or 'AWS S3'}"

    def _translate(self, exc: BaseException, what: str) -> BaseException:
        """Turn a refused or missing credential, a missing object, or a server that still did not answer after
        botocore's retries into this module's errors; else keep it."""
        from botocore.exceptions import NoCredentialsError, PartialCredentialsError

        if any(isinstance(e, (NoCredentialsError, PartialCredentialsError)) for e in chain(exc)):
            return AccessDenied(
                f"{what}: no credentials for the object store {self.where()} ({exc}). Set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), or set MESWITCH_ARTIFACT_URI to a folder for a local store."
            )
        code = s3_error_code(exc)
        if code in _DENIED:
            key = self.config.aws_access_key_id or "(from the default credential chain)"
            return AccessDenied(
                f"{what}: the object store {self.where()} refused the credentials ({code}; access key "
                f"{key[:6]}…). Check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY and the bucket's permissions."
            )
        if code in _MISSING:
            return NotFound(f"{what}: not found in {self.where()} ({code})")
        if is_transient(exc):
            return Unavailable(
                f"{what}: the object store {self.where()} is unavailable (botocore tries a request "
                f"{self.config.attempts} times): {short(exc)}"
            )
        return exc

    def _split(self, location: str) -> tuple[str, str]:
        loc = parse_location(location)
        if loc.bucket is None:
            raise RegistryError(f"{location}: not an s3:// location")
        return loc.bucket, loc.key

    # -- ObjectStore ---------------------------------------------------------------------------
    def location(self, name: str, digest: str) -> str:
        return f"{self.uri}/{name}/{digest}"

    def ping(self) -> None:
        """Check that the bucket exists and the credentials are accepted."""
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except Exception as e:
            raise self._translate(e, f"bucket {self.bucket}") from e

    def put(self, folder: Path, location: str, progress: Progress | None = None, force: bool = False) -> None:
        self.ping()
        bucket, prefix = self._split(location)
        folder = Path(folder)
        manifest = _manifest_from_bytes((folder / MANIFEST).read_bytes(), str(folder))
        for rel in artifact_files(manifest):  # manifest.json goes last
            path = folder / rel
            digest = manifest.files.get(rel) or sha256_file(path)
            key = f"{prefix}/{rel}"
            size = path.stat().st_size
            if not force and self._stored(bucket, key, size, digest):
                log.debug("s3://%s/%s is already stored", bucket, key)
                continue
            try:
                self.client.upload_file(
                    str(path), bucket, key,
                    ExtraArgs={"Metadata": {"sha256": digest}},
                    Config=self.transfer,
                    Callback=progress,
                )  # fmt: skip
            except Exception as e:
                raise self._translate(e, f"upload of s3://{bucket}/{key}") from e

    def _stored(self, bucket: str, key: str, size: int, digest: str) -> bool:
        try:
            head = self.client.head_object(Bucket=bucket, Key=key)
        except Exception as e:
            if s3_error_code(e) in _MISSING:
                return False
            raise self._translate(e, f"s3://{bucket}/{key}") from e
        return head.get("ContentLength") == size and head.get("Metadata", {}).get("sha256") == digest

    def _read(self, bucket: str, key: str) -> bytes:
        try:
            return self.client.get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as e:
            raise self._translate(e, f"s3://{bucket}/{key}") from e

    def check(self, location: str, digest: str) -> Manifest:
        bucket, prefix = self._split(location)
        manifest_bytes = self._read(bucket, f"{prefix}/{MANIFEST}")
        if content_hash_of_manifest(manifest_bytes) != digest:
            raise IntegrityError(f"{location}/{MANIFEST}: content hash differs from {digest[:16]}…")
        manifest = _manifest_from_bytes(manifest_bytes, f"{location}/{MANIFEST}")
        for rel in artifact_files(manifest)[:-1]:
            key = f"{prefix}/{rel}"
            h = hashlib.sha256()
            try:
                body = self.client.get_object(Bucket=bucket, Key=key)["Body"]
                for block in body.iter_chunks(1 << 20):
                    h.update(block)
            except Exception as e:
                raise self._translate(e, f"s3://{bucket}/{key}") from e
            if h.hexdigest() != manifest.files[rel]:
                raise IntegrityError(
                    f"s3://{bucket}/{key}: stored bytes have sha256 {h.hexdigest()[:12]}…, "
                    f"the manifest says {manifest.files[rel][:12]}…"
                )
        return manifest

    def fetch(self, location: str, dest: Path) -> None:
        bucket, prefix = self._split(location)
        manifest_bytes = self._read(bucket, f"{prefix}/{MANIFEST}")
        manifest = _manifest_from_bytes(manifest_bytes, f"{location}/{MANIFEST}")
        for rel in artifact_files(manifest)[:-1]:
            target = Path(dest) / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            try:
                self.client.download_file(bucket, f"{prefix}/{rel}", str(target), Config=self.transfer)
            except Exception as e:
                raise self._translate(e, f"s3://{bucket}/{prefix}/{rel}") from e
        (Path(dest) / MANIFEST).write_bytes(manifest_bytes)

    # -- plain folders (the pipeline's inbox), with the same client and errors --------------------------
    def list_files(self, location: str) -> list[tuple[str, str, int]]:
        """``(path below location, ETag, size)`` of every object under the folder ``location``, sorted."""
        bucket, prefix = self._split(location)
        base = f"{prefix}/" if prefix else ""
        try:
            pages = list(self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=base))
        except Exception as e:
            raise self._translate(e, f"list s3://{bucket}/{base}") from e
        found = [(o["Key"][len(base) :], o.get("ETag", ""), o["Size"]) for p in pages for o in p.get("Contents", [])]
        return sorted(found)

    def download_file(self, location: str, dest: Path, progress: Progress | None = None) -> None:
        bucket, key = self._split(location)
        try:
            self.client.download_file(bucket, key, str(dest), Config=self.transfer, Callback=progress)
        except Exception as e:
            raise self._translate(e, f"download {location}") from e

    def upload_file(self, path: Path, location: str, progress: Progress | None = None) -> None:
        bucket, key = self._split(location)
        try:
            self.client.upload_file(str(path), bucket, key, Config=self.transfer, Callback=progress)
        except Exception as e:
            raise self._translate(e, f"upload {location}") from e

    def delete_file(self, location: str) -> None:
        bucket, key = self._split(location)
        try:
            self.client.delete_object(Bucket=bucket, Key=key)
        except Exception as e:
            raise self._translate(e, f"delete {location}") from e


def open_store(uri: str | Path | Location, config: RegistryConfig) -> ObjectStore:
    """The one way a store is made: ``s3://bucket[/prefix]`` (with ``config``'s endpoint and credentials) or a
    local folder (a path or ``file://``). ``Registry.store_for`` keeps the ones it makes."""
    root = parse_location(uri)
    return S3Store(root, config) if root.is_s3 else LocalStore(root.path)
