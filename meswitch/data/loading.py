"""Loading a set of texts (calibration, evaluation, routing queries): the one way, through Hugging Face ``datasets``.

A set is named by a :class:`DataSource`: a local file (.jsonl, .json, .txt, .csv, .tsv, .parquet, .arrow, also
compressed), a local folder (of data files, or a dataset saved with ``save_to_disk``), or a dataset id (on the Hub, or
already in the local cache), with a split, the field that holds the text, and optionally streaming and a row limit.
``datasets`` reads them all and caches what it prepared by fingerprint, in its own cache (``HF_DATASETS_CACHE``),
where a user's downloaded datasets already are. Without ``datasets`` (the GPU worker has only torch and
transformers), local .jsonl, .json and .txt files are read by a small built-in reader that returns the same rows;
anything else asks for ``pip install 'meswitch[data]'``.

Rows of a text file are its non-blank lines. Every row must hold the text field as a string; errors name the source,
and for a local JSON or text file the line, whichever reader read it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TEXT = "text"
# file suffix -> the `datasets` builder that reads it; any other suffix is read as text, one row a line
BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".txt": "text",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
    ".arrow": "arrow",
}
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")  # `datasets` decompresses these on the fly; the built-in reader does not
BUILTIN = ("json", "text")  # what the built-in reader can read (uncompressed)
BATCH = 1024  # rows per batch when iterating a `datasets` set
DATASET_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "name" or "namespace/name"
NEEDS_DATASETS = "needs the `datasets` library (pip install 'meswitch[data]')"


class DataError(ValueError):
    """A data set cannot be read: malformed, lacking a field, empty; the message names it (and the line or row)."""


class DataNotFound(DataError, FileNotFoundError):
    """A data set does not exist: no such file or folder, no such dataset in the cache or on the Hub."""


@dataclass(frozen=True)
class DataSource:
    """Where a set of rows comes from, and which of them to read.

    ``location`` is a local path, or a dataset id when ``by_id``; ``split`` names the split (a single file holds one,
    ``train``); ``field`` the column holding the text; ``config`` a dataset's configuration (``name`` in
    ``datasets.load_dataset``); ``streaming`` reads rows as they come instead of preparing the whole set first
    (for large sets, with ``limit``); ``limit`` keeps the first rows only. ``origin`` says who named the source (an
    expert folder's card, say) for error messages.
    """

    location: str
    split: str = "train"
    field: str = TEXT
    config: str | None = None
    streaming: bool = False
    limit: int | None = None
    by_id: bool = False
    origin: str = dataclasses.field(default="", compare=False)  # `field` is taken

    @classmethod
    def of(cls, source: DataSource | str | Path) -> DataSource:
        """A source as given: a DataSource, a path, or a dataset id (no such path exists and it looks like an id)."""
        if isinstance(source, DataSource):
            return source
        if source is None or not str(source):
            raise DataError("no data set named")
        path = Path(source).expanduser()
        by_id = (
            not path.exists()
            and not path.is_absolute()
            and suffix_of(path) not in BUILDERS
            and bool(DATASET_ID.match(str(source)))
        )
        return cls(str(source) if by_id else str(path), by_id=by_id)

    @property
    def path(self) -> Path | None:
        """The local file or folder; None for a dataset id."""
        return None if self.by_id else Path(self.location)

    @property
    def name(self) -> str:
        """How errors name the source: who named it, else where it is."""
        return self.origin or self.location


def suffix_of(path: Path) -> str:
    """The suffix that says a file's format (``.jsonl`` for ``x.jsonl.gz``), lowercase."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def load_rows(
    source: DataSource | str | Path,
    required: Sequence[str] = (),
    optional: Sequence[str] = (),
    convert: Callable[[dict[str, Any]], Any] | None = None,
    every_field: bool = False,
) -> list:
    """The rows of a set: each a dict of its text (under ``"text"``, whatever the source's field is called), the
    ``required`` fields (strings in every row) and the ``optional`` ones (None where a row lacks them; with
    ``every_field``, all the row's other fields that are not null), passed through ``convert`` when given (a
    ValueError, TypeError or KeyError there names the row).

    Read by ``datasets`` when it is installed, else by the built-in reader (local .jsonl/.json/.txt files only).
    An empty set is an error.
    """
    src = DataSource.of(source)
    shape = _Shape(src, tuple(required), tuple(optional), convert, every_field)
    try:
        import datasets
    except ImportError:
        return shape.collect(_builtin_rows(src))
    columns = None if every_field else (src.field, *required, *optional)
    try:
        return shape.collect(_dataset_rows(datasets, src, columns))
    except DataNotFound:
        raise
    except Exception as e:
        if not _builtin_readable(src):
            if isinstance(e, DataError):
                raise
            raise DataError(f"{src.name}: `datasets` could not read it ({type(e).__name__}: {e})") from e
        rows = shape.collect(_builtin_rows(src))  # a bad line of a local file: the built-in reader names it
        if isinstance(e, DataError):
            raise
        # Every line is good, and `datasets` failed anyway: its JSON reader trips on blank lines in a file whose
        # fields change type between rows (datasets 5.2). The rows are those it would have returned.
        log.warning("%s: read by the built-in reader; `datasets` could not (%s: %s)", src.name, type(e).__name__, e)
        return rows


def load_texts(source: DataSource | str | Path) -> list[str]:
    """The texts of a set (its ``field``, ``text`` by default; blank lines of a text file skipped)."""
    return [row[TEXT] for row in load_rows(source)]


def fingerprint(source: DataSource | str | Path) -> str:
    """sha256 naming what a set holds: of the file's bytes for a local file read whole with the default options (as
    earlier runs keyed it), else of the source's options and every row read, all its fields."""
    src = DataSource.of(source)
    h = hashlib.sha256()
    if src == DataSource(src.location) and src.path is not None and src.path.is_file():
        with open(src.path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
        return h.hexdigest()
    h.update(json.dumps([src.location, src.by_id, src.split, src.field, src.config, src.limit]).encode())
    for row in load_rows(src, every_field=True):
        h.update(json.dumps(row, sort_keys=True, ensure_ascii=False, default=str).encode())
    return h.hexdigest()


# -- reading --------------------------------------------------------------------------------------------------


class _Unparsed(str):
    """A line that is not valid JSON (the parser's message)."""


@dataclass(frozen=True)
class _Shape:
    """What a good row is and what is kept of it: the one check, whichever reader read the rows."""

    src: DataSource
    required: tuple[str, ...]
    optional: tuple[str, ...]
    convert: Callable[[dict[str, Any]], Any] | None
    every_field: bool

    def collect(self, rows: Iterable[tuple[str, Any]]) -> list:
        """The shaped rows of ``(where, row)`` pairs, up to the source's limit."""
        src, out = self.src, []
        wanted = (src.field, *self.required)
        json_rows = src.path is not None and _builder(src.path) == "json"
        for where, row in rows:
            if src.limit is not None and len(out) >= src.limit:
                break
            missing = [k for k in wanted if not isinstance(row, dict) or row.get(k) is None]
            if missing:
                what = f"a {missing[0]!r} field" if len(missing) == 1 else f"{' and '.join(map(repr, missing))} fields"
                detail = f" ({row})" if isinstance(row, _Unparsed) else ""
                raise DataError(f"{where}: expected {'a JSON object with ' if json_rows else ''}{what}{detail}")
            for k in wanted:
                if not isinstance(row[k], str):
                    raise DataError(f"{where}: field {k!r} must be a string, not {type(row[k]).__name__}")
            shaped = {TEXT: row[src.field], **{k: row[k] for k in self.required}}
            shaped |= {k: row.get(k) for k in self.optional}
            if self.every_field:
                shaped |= {k: v for k, v in row.items() if k not in (*wanted, TEXT) and v is not None}
            if self.convert is not None:
                try:
                    shaped = self.convert(shaped)
                except (ValueError, TypeError, KeyError) as e:
                    raise DataError(f"{where}: {e}") from e
            out.append(shaped)
        if not out:
            raise DataError(f"{src.name}: no texts")
        return out


def _builtin_readable(src: DataSource) -> bool:
    path = src.path
    return path is not None and path.is_file() and _builder(path) in BUILTIN and path.suffix.lower() not in COMPRESSED


def _builder(path: Path) -> str:
    return BUILDERS.get(suffix_of(path), "text")


def _local(src: DataSource) -> Path:
    """The source's path, which must exist; a single file holds one split, ``train``."""
    path = Path(src.location)
    if not path.exists():
        raise DataNotFound(f"{src.name}: not found ({path})" if src.origin else f"{path}: not found")
    if path.is_file() and src.split != "train":
        raise DataError(f"{src.name}: a single file holds one split, 'train', not {src.split!r}")
    return path


def _builtin_rows(src: DataSource) -> Iterator[tuple[str, Any]]:
    """Rows of a local .jsonl/.json (JSON lines, or one array) or text file, read without ``datasets``."""
    if src.by_id:
        raise DataError(f"{src.name}: dataset id {src.location!r} {NEEDS_DATASETS}")
    path = _local(src)
    if not _builtin_readable(src):
        raise DataError(f"{src.name}: {'a folder' if path.is_dir() else 'this kind of file'} {NEEDS_DATASETS}")
    try:
        if _builder(path) == "text":
            with open(path, encoding="utf-8") as f:
                for n, line in enumerate(f, 1):
                    if line.strip():
                        yield f"{path}:{n}", {TEXT: line.rstrip("\n")}
            return
        with open(path, encoding="utf-8-sig") as f:
            head = f.read(1 << 16)
            if head.lstrip().startswith("["):
                try:
                    items = json.loads(head + f.read())
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}: not valid JSON ({e})") from e
                for n, item in enumerate(items, 1):
                    yield f"{path}: item {n}", {TEXT: item} if isinstance(item, str) else item
                return
            f.seek(0)
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{n}", json.loads(line)
                except json.JSONDecodeError as e:
                    yield f"{path}:{n}", _Unparsed(str(e))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from e


def _dataset_rows(datasets, src: DataSource, columns: Sequence[str] | None) -> Iterator[tuple[str, Any]]:
    """Rows of any source, read by ``datasets`` (which prepares and caches it first unless streaming); only
    ``columns`` of them (all when None)."""
    ds = _open(datasets, src)
    names = ds.column_names
    if names is not None:
        if src.field not in names:
            raise DataError(f"{src.name}: no field {src.field!r}; its fields: {', '.join(names)}")
        if columns is not None:
            ds = ds.select_columns([c for c in dict.fromkeys(columns) if c in names])
    blank_lines = src.path is not None and src.path.is_file() and _builder(src.path) == "text"
    n = 0
    for batch in ds.iter(batch_size=BATCH):
        keys = list(batch)
        for i in range(len(batch[keys[0]]) if keys else 0):
            n += 1
            row = {k: batch[k][i] for k in keys}
            if blank_lines and not str(row.get(TEXT) or "").strip():
                continue
            yield f"{src.name}: row {n}", row


def _open(datasets, src: DataSource):
    """A ``datasets.Dataset`` (or ``IterableDataset`` when streaming) of the source's split."""
    if src.by_id:
        if os.path.exists(src.location):  # load_dataset would read that path instead of the dataset
            raise DataError(
                f"{src.name}: dataset id {src.location!r} is also a path in the working directory ({Path.cwd()}); "
                "name it by its path instead"
            )
        try:
            return datasets.load_dataset(src.location, src.config, split=src.split, streaming=src.streaming)
        except (ConnectionError, FileNotFoundError) as e:
            raise DataNotFound(
                f"{src.name}: not a local file or folder, and no dataset {src.location!r} in the "
                f"Hugging Face cache ({datasets.config.HF_DATASETS_CACHE}) or on the Hub ({type(e).__name__}: {e})"
            ) from e
        except ValueError as e:  # an unknown split or configuration
            raise DataError(f"{src.name}: {e}") from e
    path = _local(src)
    if path.is_file():
        builder = _builder(path)
        options = {"sep": "\t"} if suffix_of(path) == ".tsv" else {}
        return datasets.load_dataset(builder, data_files=str(path), split="train", streaming=src.streaming, **options)
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():  # saved with save_to_disk
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if src.split not in ds:
                raise DataError(f"{src.name}: no split {src.split!r}; its splits: {', '.join(ds)}")
            ds = ds[src.split]
        return ds.to_iterable_dataset() if src.streaming else ds
    try:
        return datasets.load_dataset(str(path), src.config, split=src.split, streaming=src.streaming)
    except ValueError as e:
        raise DataError(f"{src.name}: {e}") from e
