"""The inbox: a folder (or ``s3://bucket/prefix``) whose sub-folders are expert checkpoints to process.

    inbox/
      math-expert/            a Hugging Face folder (config.json, *.safetensors, tokenizer)
        expert.yaml           name, domain, description, examples, calibration, evaluation
        calib.jsonl eval.jsonl
      .code-expert.part-1234/ hidden: still arriving (``submit`` copies, then renames)

Each entry gets a ``stamp``: a hash of its files' names, sizes and modification times (ETags on
S3). It is cheap to compute and changes whenever a file does, so the content fingerprint (a read of
every tensor) is computed once per stamp and cached.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from meswitch.expert_card import CARD

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InboxEntry:
    """One sub-folder of the inbox."""

    name: str  # the folder's name in the inbox
    uri: str  # a local path or s3://bucket/prefix/name
    has_card: bool
    stamp: str

    @property
    def is_s3(self) -> bool:
        return self.uri.startswith("s3://")


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def scan_inbox(inbox: str | Path) -> list[InboxEntry]:
    """Every complete (not hidden) sub-folder of the inbox, sorted by name."""
    return _scan_s3(str(inbox)) if is_s3(str(inbox)) else _scan_local(Path(inbox))


def fetch_entry(entry: InboxEntry, cache_dir: Path) -> Path:
    """A local folder with the entry's files: the folder itself, or a verified download of an S3 prefix.

    Downloads go to ``cache_dir/<stamp>`` through a temporary folder renamed into place, so a
    failed download leaves nothing that looks complete.
    """
    if not entry.is_s3:
        return Path(entry.uri)
    final = Path(cache_dir) / entry.stamp[:32] / entry.name
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", suffix=".part", dir=final.parent))
    try:
        store, bucket, prefix = _s3(entry.uri)
        for key, _etag, _size in _list_files(store, bucket, prefix):
            target = tmp / key[len(prefix) + 1 :]
            target.parent.mkdir(parents=True, exist_ok=True)
            download = store.client.download_file
            _s3_call(store, f"download s3://{bucket}/{key}", download, bucket, key, str(target), Config=store.transfer)
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def submit(expert_dir: Path | str, inbox: str | Path, name: str | None = None) -> str:
    """Copy an expert folder into the inbox so that it appears whole or not at all; return its inbox URI.

    Locally the copy goes to a hidden folder that is then renamed; on S3, ``expert.yaml`` is uploaded
    last, and the scanner ignores a prefix until it has one.
    """
    src = Path(expert_dir)
    if not (src / CARD).is_file():
        raise FileNotFoundError(f"{src / CARD}: missing; every expert folder needs an expert.yaml")
    name = name or src.resolve().name
    if is_s3(str(inbox)):
        store, bucket, prefix = _s3(f"{str(inbox).rstrip('/')}/{name}")
        files = sorted(p for p in src.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == CARD)  # the card last: it marks the upload complete
        for path in files:
            key = f"{prefix}/{path.relative_to(src).as_posix()}"
            upload = store.client.upload_file
            _s3_call(store, f"upload s3://{bucket}/{key}", upload, str(path), bucket, key, Config=store.transfer)
        return f"s3://{bucket}/{prefix}"
    inbox = Path(inbox)
    inbox.mkdir(parents=True, exist_ok=True)
    dest = inbox / name
    tmp = inbox / f".{name}.part-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    if dest.exists():
        old = inbox / f".{name}.old-{os.getpid()}"
        dest.rename(old)
        tmp.rename(dest)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(dest)
    return str(dest)


# -- local ------------------------------------------------------------------------------------------


def _scan_local(inbox: Path) -> list[InboxEntry]:
    if not inbox.is_dir():
        raise FileNotFoundError(f"{inbox}: inbox folder not found")
    entries = []
    for folder in sorted(p for p in inbox.iterdir() if p.is_dir() and not p.name.startswith(".")):
        h = hashlib.sha256()
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.relative_to(folder).as_posix()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        entries.append(InboxEntry(folder.name, str(folder.resolve()), (folder / CARD).is_file(), h.hexdigest()))
    return entries


# -- S3 ---------------------------------------------------------------------------------------------


def _s3(uri: str):
    """The registry's S3 client for ``uri`` (same endpoint and credentials), its bucket and key prefix."""
    from meswitch.registry.config import RegistryConfig
    from meswitch.registry.store import S3Store

    parsed = urllib.parse.urlparse(uri)
    store = S3Store(f"s3://{parsed.netloc}", RegistryConfig.from_env())
    return store, parsed.netloc, parsed.path.strip("/")


def _s3_call(store, what: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` (botocore retries its requests), its failure in the registry's errors."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:
        raise store._translate(e, what) from e


def _list_files(store, bucket: str, prefix: str) -> list[tuple[str, str, int]]:
    out = []
    paginator = store.client.get_paginator("list_objects_v2")

    def pages():
        return list(paginator.paginate(Bucket=bucket, Prefix=f"{prefix}/"))

    for page in _s3_call(store, f"list s3://{bucket}/{prefix}/", pages):
        out.extend((o["Key"], o.get("ETag", ""), o["Size"]) for o in page.get("Contents", []))
    return sorted(out)


def _scan_s3(inbox: str) -> list[InboxEntry]:
    store, bucket, prefix = _s3(inbox)
    prefix = prefix.rstrip("/")
    base = f"{prefix}/" if prefix else ""
    groups: dict[str, list[tuple[str, str, int]]] = {}
    paginator = store.client.get_paginator("list_objects_v2")

    def pages():
        return list(paginator.paginate(Bucket=bucket, Prefix=base))

    for page in _s3_call(store, f"list {inbox}", pages):
        for o in page.get("Contents", []):
            rel = o["Key"][len(base) :]
            if "/" not in rel:
                continue  # a file directly in the inbox, not an expert folder
            folder, rest = rel.split("/", 1)
            groups.setdefault(folder, []).append((rest, o.get("ETag", ""), o["Size"]))
    entries = []
    for folder in sorted(groups):
        if folder.startswith("."):
            continue
        files = sorted(groups[folder])
        has_card = any(rest == CARD for rest, _, _ in files)
        h = hashlib.sha256()
        for rest, etag, size in files:
            h.update(f"{rest}|{size}|{etag}\n".encode())
        entries.append(InboxEntry(folder, f"s3://{bucket}/{base}{folder}", has_card, h.hexdigest()))
    return entries
