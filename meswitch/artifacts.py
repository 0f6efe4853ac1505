"""The one artifact format: a folder with ``manifest.json`` beside the files it lists by sha256.

Compressed experts, routers and registered bases all use it. A folder is written under a
temporary name and renamed into place, so a crash never leaves a half-written artifact that
looks whole; loading verifies every checksum (and the base fingerprint, when given) before
any tensor is used.
"""

from __future__ import annotations

import dataclasses
import errno
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meswitch.processes import pid_alive

SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
KINDS = ("expert-delta", "router", "base")


class ArtifactError(Exception):
    """An artifact folder is missing, malformed, tampered with, or for another base."""


@dataclass
class LayerRecord:
    """Per-matrix figures of a compressed delta."""

    name: str
    shape: list[int]
    bits: int
    salient: int
    bits_per_param: float
    rel_error: float  # ||Δ - Δ̂||_F / ||Δ||_F
    act_rel_error: float | None = None  # same, weighted by calibration second moments


@dataclass
class Manifest:
    """What an artifact is, how it was made and how to check it. Written as ``manifest.json``."""

    kind: str
    name: str
    domain: str | None = None
    description: str | None = None
    base_fingerprint: str | None = None
    source_fingerprint: str | None = None
    method: dict[str, Any] = field(default_factory=dict)
    layers: list[LayerRecord] = field(default_factory=list)
    tensors: dict[str, Any] = field(default_factory=dict)  # handling of everything that is not a linear
    metrics: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)  # relative path -> sha256
    layout_version: int = 1
    schema_version: int = SCHEMA_VERSION
    created_at: str = field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "manifest") -> Manifest:
        if not isinstance(data, dict):
            raise ArtifactError(f"{source}: expected a JSON object")
        version = data.get("schema_version")
        if version != SCHEMA_VERSION:
            raise ArtifactError(f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
        if data.get("kind") not in KINDS:
            raise ArtifactError(f"{source}: kind {data.get('kind')!r} is not one of {KINDS}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ArtifactError(f"{source}: unknown fields {sorted(unknown)}")
        data = dict(data)
        data["layers"] = [LayerRecord(**rec) for rec in data.get("layers", [])]
        return cls(**data)

    @property
    def total_bytes(self) -> int:
        return int(self.metrics.get("delta_bytes", 0))


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _listed_files(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


# What a folder that is no artifact holds, as far as replacing it goes (``folder_kind``)
MODEL_FOLDER = "model"  # a Hugging Face model folder
EXPERT_FOLDER = "expert"  # a model folder with its expert.yaml (an inbox folder)
RECONSTRUCTED = "reconstructed"  # a model folder `meswitch reconstruct` wrote: it holds RECONSTRUCTED_MARK
RECONSTRUCTED_MARK = "reconstructed.json"
_DESCRIBED = {MODEL_FOLDER: "a model folder", EXPERT_FOLDER: "an expert folder",
              RECONSTRUCTED: "a reconstructed model folder"}  # fmt: skip


def folder_kind(folder: Path) -> str | None:
    """What ``folder`` holds: its manifest's kind; for a model folder ``expert`` (with an expert.yaml),
    ``reconstructed`` (marked by `meswitch reconstruct`) or ``model``; None for anything else. Read from the
    manifest's raw JSON, so a damaged artifact still tells."""
    folder = Path(folder)
    try:
        kind = json.loads((folder / MANIFEST).read_text()).get("kind")
    except (OSError, ValueError, AttributeError):
        kind = None
    if isinstance(kind, str):
        return kind
    if (folder / "config.json").is_file():
        if (folder / "expert.yaml").is_file():
            return EXPERT_FOLDER
        return RECONSTRUCTED if (folder / RECONSTRUCTED_MARK).is_file() else MODEL_FOLDER
    return None


def _described(kind: str) -> str:
    return _DESCRIBED.get(kind) or f"{'an' if kind[0] in 'aeiou' else 'a'} {kind} artifact"


def check_out(out: Path, kinds: str | tuple[str, ...], inputs: Iterable[Path | None] = ()) -> Path:
    """``out`` as an absolute path, when writing a folder of one of ``kinds`` there loses nothing; else ArtifactError.

    The atomic replace deletes whatever was at ``out``. Replacing a folder of the same kind is how a re-run updates
    its output; a user's folder, a file, another kind of folder, or an ``out`` that is, holds or sits inside one of
    the ``inputs`` would be lost, so commands call this before any work, and ``staging_dir`` before it replaces.
    """
    kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
    out = Path(os.path.abspath(out))  # "." has no name to stage a sibling by; its absolute path has
    if not out.name:
        raise ArtifactError(f"{out}: not a folder that can be replaced; choose another --out")
    for given in inputs:
        if given is not None and Path(given).exists() and (relation := _overlap(out, Path(given))):
            raise ArtifactError(f"{out} {relation} the input {given}; choose another --out, apart from the inputs")
    if not out.exists():
        return out
    if not out.is_dir():
        raise ArtifactError(f"{out} is a file, not a folder; choose another --out or remove it first")
    have = folder_kind(out)
    if have not in kinds and any(out.iterdir()):
        want = " or ".join(_described(k) for k in kinds) or "an empty folder"
        names = sorted(p.name for p in out.iterdir())
        held = _described(have) if have else f"other files ({', '.join(names[:3])}{', …' if len(names) > 3 else ''})"
        raise ArtifactError(
            f"{out} exists and holds {held}, not {want}; writing there would delete it: "
            "choose another --out or remove it first"
        )
    return out


def _overlap(out: Path, source: Path) -> str | None:
    """How ``out`` and an input overlap (links followed): it ``is`` the input, ``holds`` it, ``is inside`` it."""
    out, source = out.resolve(), source.resolve()
    if out == source:
        return "is"
    if source.is_relative_to(out):
        return "holds"
    if out.is_relative_to(source):
        return "is inside"
    return None


@contextmanager
def staging_dir(out: Path, checked: bool = True, keep_existing: bool = False) -> Iterator[Path]:
    """Yield a temporary sibling of ``out``; on success it replaces ``out``, on failure it is removed.

    The rename is atomic on one filesystem, so readers see the old folder or the new one, never
    a partial write. What is staged replaces ``out`` only when ``out`` is absent, empty or of the
    same kind (``check_out``): a user's folder is never deleted for it (``checked=False``: the caller
    has decided that ``out`` goes, whatever it holds, as ``submit --replace`` does). ``keep_existing``:
    ``out`` is named by its content (a cache by hash, a stored artifact), so one already there, put by a
    concurrent writer, is kept and the staged copy dropped. A writer killed before its rename leaves its
    hidden sibling behind: the next writer of ``out`` removes it (:func:`abandoned`), so a killed run costs
    no disk for good. A full disk is raised as an ``OSError`` that names the errno and ``out``, whichever
    writer hit it.
    """
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in abandoned(out.parent, out.name):
        shutil.rmtree(stale, ignore_errors=True)
    writer = _writer(out)
    tmp = Path(tempfile.mkdtemp(prefix=writer, suffix=".tmp", dir=out.parent))
    try:
        yield tmp
        if keep_existing:
            try:
                tmp.rename(out)
            except OSError:
                if not out.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # the same content, put there first by another writer
            return
        if checked:
            check_out(out, folder_kind(tmp) or ())
        if out.exists():
            old = out.with_name(f"{writer}old.tmp")
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            tmp.rename(out)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if code := _disk_full(e):
            raise OSError(code, f"{os.strerror(code)} while writing {out}; nothing of it was kept") from e
        raise


def _disk_full(e: BaseException) -> int | None:
    """ENOSPC or EDQUOT, from Python's I/O or from safetensors' writer (a Rust error that reads "(os error 28)")."""
    for code in (errno.ENOSPC, errno.EDQUOT):
        if (isinstance(e, OSError) and e.errno == code) or f"(os error {code})" in str(e):
            return code
    return None


def _writer(out: Path) -> str:
    """The prefix of this process's staging folders for ``out``: ``.NAME.HOST-PID.`` (then a tag and ``.tmp``)."""
    return f".{out.name}.{socket.gethostname()}-{os.getpid()}."


def remove_aside(folder: Path, why: str) -> None:
    """Rename ``folder`` aside (atomic: readers see it whole or gone), then delete it. The aside name is a staging
    folder's (tagged ``why``), so one left by a kill is swept as :func:`abandoned`."""
    aside = folder.with_name(f"{_writer(folder)}{why}.tmp")
    folder.rename(aside)
    shutil.rmtree(aside, ignore_errors=True)


def abandoned(parent: Path, name: str | None = None) -> list[Path]:
    """Staging folders in ``parent`` (of ``name``, or of any) left by writers on this host that no longer run:
    :func:`staging_dir`'s ``.NAME.HOST-PID.*.tmp``. Another host's or a live writer's are never listed."""
    stem = re.escape(name) if name else ".+"
    pattern = re.compile(rf"\.{stem}\.{re.escape(socket.gethostname())}-(?P<pid>\d+)\.[^.]+\.tmp")
    found = []
    for path in Path(parent).glob(f".{glob.escape(name) if name else '*'}.*.tmp"):
        m = pattern.fullmatch(path.name)
        if m and path.is_dir() and not pid_alive(int(m["pid"])):
            found.append(path)
    return found


def seal(folder: Path, manifest: Manifest) -> Manifest:
    """Hash every file in ``folder`` into the manifest and write ``manifest.json``."""
    folder = Path(folder)
    manifest.files = {rel: sha256_file(folder / rel) for rel in _listed_files(folder)}
    (folder / MANIFEST).write_text(manifest.to_json() + "\n")
    return manifest


def seal_base(base_dir: Path, out: Path, name: str, fingerprint: str) -> Manifest:
    """The base model folder as a ``kind="base"`` artifact at ``out`` (what serving loads from a registry).

    Its files are hard-linked where the file system allows (a base can be many GB) and copied
    otherwise; ``fingerprint`` is the base's (``checkpoints.scan``), which the engine re-checks at load.
    """
    with staging_dir(Path(out)) as tmp:
        for f in sorted(Path(base_dir).iterdir()):
            if f.is_file():
                try:
                    os.link(f, tmp / f.name)
                except OSError:
                    shutil.copy2(f, tmp / f.name)
        return seal(tmp, Manifest(kind="base", name=name, base_fingerprint=fingerprint, source_fingerprint=fingerprint))


def manifest_path(folder: Path) -> Path:
    """``folder``'s manifest file, or an error that says what the path is instead (missing, a file, no manifest)."""
    folder = Path(folder)
    if not folder.exists():
        raise ArtifactError(f"{folder}: no such artifact folder")
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: a file, not an artifact folder")
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: no {MANIFEST}; not a meswitch artifact")
    return path


def read_manifest(folder: Path) -> Manifest:
    """Parse ``manifest.json`` without checking files (cheap; for listings)."""
    path = manifest_path(folder)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON ({e})") from e
    return Manifest.from_dict(data, source=str(path))


def verify(folder: Path, base_fingerprint: str | None = None) -> Manifest:
    """Read the manifest and check every file's sha256, and the base fingerprint when given.

    Raises ArtifactError naming the first file that is missing, extra or altered.
    """
    folder = Path(folder)
    manifest = read_manifest(folder)
    present = set(_listed_files(folder))
    listed = set(manifest.files)
    if missing := sorted(listed - present):
        raise ArtifactError(f"{folder}: files listed in the manifest are missing: {missing}")
    if extra := sorted(present - listed):
        raise ArtifactError(f"{folder}: files not listed in the manifest: {extra}")
    for rel, digest in sorted(manifest.files.items()):
        actual = sha256_file(folder / rel)
        if actual != digest:
            raise ArtifactError(f"{folder / rel}: sha256 {actual[:12]}… does not match the manifest's {digest[:12]}…")
    if base_fingerprint is not None and manifest.base_fingerprint != base_fingerprint:
        raise ArtifactError(
            f"{folder}: made for base {str(manifest.base_fingerprint)[:16]}…, "
            f"but the base given is {base_fingerprint[:16]}…"
        )
    check_records(folder, manifest)
    return manifest


def check_records(folder: Path, manifest: Manifest) -> None:
    """Refuse an expert-delta manifest whose tensor records disagree with the tensors stored (from the files'
    headers, no tensor read): the checksums cover the files the manifest lists, not the manifest itself, so an
    edited bit width or shape would otherwise surface as a shape error deep in decoding, naming neither."""
    if manifest.kind != "expert-delta" or not manifest.tensors:
        return
    from safetensors import safe_open

    stored: dict[str, list[int]] = {}
    for rel in manifest.files:
        if rel.endswith(".safetensors") and "/" not in rel:
            with safe_open(Path(folder) / rel, framework="pt") as f:
                stored.update((key, list(f.get_slice(key).get_shape())) for key in f.keys())
    table = {r.name: (r.bits, r.shape) for r in manifest.layers}
    for name, record in manifest.tensors.items():
        try:
            expected = _record_shapes(name, record)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{folder}: the manifest's record of tensor {name!r} is malformed ({e})") from e
        for key, shape in expected.items():
            if stored.get(key) != shape:
                raise ArtifactError(
                    f"{folder}: tensor {name!r}: the manifest's record ({_record_text(record)}) calls for {key} of "
                    f"shape {shape}, the artifact holds {stored.get(key, 'none')}; the manifest was edited or does "
                    "not belong to these files: compress the expert again"
                )
        if name in table and table[name] != (record.get("bits"), record["shape"]):
            raise ArtifactError(
                f"{folder}: tensor {name!r}: the manifest's layer table says {table[name][0]} bits and shape "
                f"{table[name][1]}, its tensor record {record.get('bits')} bits and shape {record['shape']}; the "
                "manifest was edited: compress the expert again"
            )


def _record_shapes(name: str, record: dict[str, Any]) -> dict[str, list[int]]:
    """The stored tensors a manifest record calls for, by key, and their shapes (layout version 1)."""
    shape = [int(d) for d in record["shape"]]
    if record["kind"] == "quantized":
        from meswitch.compression.config import SUPPORTED_BITS
        from meswitch.compression.quantize import values_per_word

        if record["bits"] not in SUPPORTED_BITS:
            raise ValueError(f"bits {record['bits']!r} is not one of {SUPPORTED_BITS}")
        n, k = shape
        out = {f"{name}.packed": [n, -(-k // values_per_word(record["bits"]))]}
    elif record["kind"] == "fp16_delta":
        out = {f"{name}.delta": shape}
    else:
        raise ValueError(f"unknown kind {record['kind']!r}")
    if record.get("extra_rows"):
        out[f"{name}.extra_rows"] = [int(record["extra_rows"]), *shape[1:]]
    return out


def _record_text(record: dict[str, Any]) -> str:
    return ", ".join(f"{k} {record[k]}" for k in ("kind", "shape", "bits") if k in record)
