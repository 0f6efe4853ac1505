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
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from meswitch.expert_card import CARD
from meswitch.registry.uri import is_s3, parse_location

if TYPE_CHECKING:
    from meswitch.registry.store import S3Store

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
        return is_s3(self.uri)


def scan_inbox(inbox: str | Path) -> list[InboxEntry]:
    """Every complete (not hidden) sub-folder of the inbox, sorted by name."""
    where = parse_location(inbox)
    return _scan_s3(str(where)) if where.is_s3 else _scan_local(where.path)


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
        store = _store(entry.uri)
        for rel, _etag, _size in store.list_files(entry.uri):
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(str(parse_location(entry.uri).join(rel)), target)
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
    where = parse_location(inbox)
    if where.is_s3:
        dest = where.join(name)
        store = _store(str(dest))
        files = sorted(p for p in src.rglob("*") if p.is_file())
        files.sort(key=lambda p: p.name == CARD)  # the card last: it marks the upload complete
        for path in files:
            store.upload_file(path, str(dest.join(path.relative_to(src).as_posix())))
        return str(dest)
    inbox = where.path
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


def _store(uri: str) -> S3Store:
    """The registry's store for ``uri``'s bucket: its endpoint, credentials and S3 client."""
    from meswitch.registry.client import open_registry

    return open_registry().store_for(uri)


def _scan_s3(inbox: str) -> list[InboxEntry]:
    root = parse_location(inbox)
    groups: dict[str, list[tuple[str, str, int]]] = {}
    for rel, etag, size in _store(inbox).list_files(inbox):
        if "/" not in rel:
            continue  # a file directly in the inbox, not an expert folder
        folder, rest = rel.split("/", 1)
        groups.setdefault(folder, []).append((rest, etag, size))
    entries = []
    for folder in sorted(groups):
        if folder.startswith("."):
            continue
        files = sorted(groups[folder])
        has_card = any(rest == CARD for rest, _, _ in files)
        h = hashlib.sha256()
        for rest, etag, size in files:
            h.update(f"{rest}|{size}|{etag}\n".encode())
        entries.append(InboxEntry(folder, str(root.join(folder)), has_card, h.hexdigest()))
    return entries
