"""The inbox: a folder (or ``s3://bucket/prefix``) whose sub-folders are expert checkpoints to process.

    inbox/
      math-expert/            a Hugging Face folder (config.json, *.safetensors, tokenizer)
        expert.yaml           name, domain, description, examples, calibration, evaluation
        calib.jsonl eval.jsonl
      .code-expert.HOST-1234.x1y2.tmp/  hidden: still arriving (``submit`` copies, then renames)

Each entry gets a ``stamp``: a hash of its files' names, sizes and modification times (ETags on
S3). It is cheap to compute and changes whenever a file does, so the content fingerprint (a read of
every tensor) is computed once per stamp and cached.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from tqdm.auto import tqdm

from meswitch.artifacts import staging_dir
from meswitch.expert_card import CARD, NAME_RE, CardError, load_card
from meswitch.registry.uri import Location, is_s3, parse_location

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

    Downloads go to ``cache_dir/<stamp>`` through a staging folder renamed into place (``staging_dir``), so
    a failed download leaves nothing that looks complete, and one killed outright is removed by the next.
    """
    if not entry.is_s3:
        return Path(entry.uri)
    final = Path(cache_dir) / entry.stamp[:32] / entry.name
    if final.is_dir():
        return final
    store = _store(entry.uri)
    files = store.list_files(entry.uri)
    with (
        staging_dir(final, checked=False, keep_existing=True) as tmp,
        tqdm(total=sum(size for _, _, size in files), unit="B", unit_scale=True, desc=f"download {entry.name}",
             disable=None) as bar,
    ):  # fmt: skip
        for rel, _etag, _size in files:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            store.download_file(str(parse_location(entry.uri).join(rel)), target, bar.update)
    return final


class InboxError(ValueError):
    """The inbox cannot be used as asked: it is an expert folder itself, or a submitted name is unsafe or taken."""


def empty_inbox(inbox: str | Path) -> str:
    """What a scan that found nothing tells the user: normal for a scheduled scan, a likely typo for a one-off run."""
    return (
        f"no expert folders found in {inbox}: an inbox holds one sub-folder per expert, each with an {CARD} "
        f"(meswitch submit EXPERT_DIR --inbox {inbox} copies one in)"
    )


def _expert_folder_as_inbox(inbox: str | Path) -> InboxError:
    return InboxError(
        f"{inbox} is an expert folder (it holds {CARD}), not an inbox of them: pass its parent as --inbox, "
        f"or submit it with meswitch submit {inbox} --inbox INBOX"
    )


def check_entry_name(name: str) -> str:
    """``name`` when it can name an inbox entry: one visible path component, as an expert's name in its card
    (lowercase letters, digits, '.', '_', '-'), so that a submit neither escapes the inbox nor hides from scans."""
    if not NAME_RE.match(name):
        raise InboxError(
            f"inbox entry name {name!r} must be 1-63 lowercase letters, digits, '.', '_' or '-', starting with a "
            "letter or digit (no '/'); choose one with --name"
        )
    return name


def _default_name(src: Path) -> str:
    """The folder's name, or where that cannot name an entry (``Math-Expert``) the expert's name from its card."""
    folder = src.resolve().name
    if NAME_RE.match(folder):
        return folder
    with contextlib.suppress(CardError):
        card = load_card(src).name
        log.info("inbox entry %r (the expert's name in its card): the folder name %r cannot name one", card, folder)
        return card
    return folder  # refused by check_entry_name, which says what a name may hold


def submit(
    expert_dir: Path | str,
    inbox: str | Path,
    name: str | None = None,
    *,
    replace: bool = False,
    create_inbox: bool = False,
) -> str:
    """Copy an expert folder into the inbox so that it appears whole or not at all; return its inbox URI.

    The entry is named ``name``, else the folder's name, else (a folder name with capitals or spaces) the
    expert's name from its card.

    Locally the copy goes to a hidden folder that is then renamed; on S3, ``expert.yaml`` is uploaded
    last, and the scanner ignores a prefix until it has one. An entry of the same name is refused unless
    ``replace``; a local inbox that does not exist is refused (a typo would start a new one) unless
    ``create_inbox``.
    """
    src = Path(expert_dir)
    if not (src / CARD).is_file():
        raise FileNotFoundError(f"{src / CARD}: missing; every expert folder needs an expert.yaml")
    name = check_entry_name(name or _default_name(src))
    where = parse_location(inbox)
    if where.is_s3:
        return _submit_s3(src, where.join(name), replace)
    inbox = where.path
    if not inbox.is_dir():
        if not create_inbox:
            raise FileNotFoundError(f"{inbox}: no such inbox folder (pass --create-inbox to make it)")
        inbox.mkdir()  # its parent must exist: a typo one level up is still refused
        log.info("created the inbox folder %s", inbox)
    dest = inbox / name
    if dest.exists() and not replace:
        raise InboxError(f"{dest}: the inbox already holds an entry {name!r}; pass --replace to replace it")
    # hidden until renamed, so scans skip it; a copy that fails leaves nothing, a killed one's the next submit removes
    with staging_dir(dest, checked=False) as tmp:
        shutil.copytree(src, tmp, dirs_exist_ok=True)
    return str(dest)


def _submit_s3(src: Path, dest: Location, replace: bool) -> str:
    """Upload ``src`` under ``dest``, the card last; an entry there already is removed first, its card first,
    so that a scan never reads a mix of the old and the new files. An entry without a card is an upload that
    never finished (the scans skip it): it is replaced without ``replace``. An upload that fails or is
    interrupted deletes what it wrote, rather than leaving a card-less entry behind."""
    store = _store(str(dest))
    old = store.list_files(str(dest))
    if any(rel == CARD for rel, _, _ in old) and not replace:
        raise InboxError(f"{dest}: the inbox already holds this entry; pass --replace to replace it")
    if old and not replace:
        log.info("%s: replacing an upload that never finished (%d files, no %s)", dest, len(old), CARD)
    for rel, _etag, _size in sorted(old, key=lambda f: f[0] != CARD):
        store.delete_file(str(dest.join(rel)))
    files = sorted(p for p in src.rglob("*") if p.is_file())
    files.sort(key=lambda p: p.name == CARD)  # the card last: it marks the upload complete
    written: list[str] = []
    total = sum(p.stat().st_size for p in files)
    try:
        with tqdm(total=total, unit="B", unit_scale=True, desc=f"upload {src.name}", disable=None) as bar:
            for path in files:
                written.append(str(dest.join(path.relative_to(src).as_posix())))
                store.upload_file(path, written[-1], bar.update)
    except BaseException:  # Ctrl-C, SIGTERM, a lost connection: nothing half-uploaded stays
        log.warning("%s: upload stopped; deleting the %d files it wrote", dest, len(written))
        with contextlib.suppress(Exception):
            for location in written:
                store.delete_file(location)
        raise
    return str(dest)


# -- local ------------------------------------------------------------------------------------------


def _scan_local(inbox: Path) -> list[InboxEntry]:
    if not inbox.is_dir():
        raise FileNotFoundError(f"{inbox}: inbox folder not found")
    if (inbox / CARD).is_file():
        raise _expert_folder_as_inbox(inbox)
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
        if rel == CARD:
            raise _expert_folder_as_inbox(inbox)
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
