"""`expert.yaml`: what an expert folder says about itself (name, domain, examples, data).

Its calibration and evaluation data are each named one of three ways: a file in the folder (``calib.jsonl``, the
default; .jsonl with a ``text`` field per line, or .txt with a text per line), ``default`` (the generic corpus in
meswitch/data), or a data set for ``datasets``::

    calibration: {dataset: <a file or folder in the expert folder, or a dataset id>, split: train, field: text}

with optional ``config`` (a dataset's configuration), ``streaming: true`` and ``limit: <rows>`` for large sets
(see meswitch.data.loading).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from meswitch.data import DEFAULT, DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from meswitch.data.loading import BUILDERS, DATASET_ID, DataSource, suffix_of
from meswitch.settings import read_yaml_mapping

log = logging.getLogger(__name__)

CARD = "expert.yaml"
MAX_DATA_BYTES = 256 << 20  # the most a calibration or evaluation file may hold: they are read whole
DEFAULTS = {"calibration": DEFAULT_CALIBRATION, "evaluation": DEFAULT_EVALUATION}  # `calibration: default`, ...
DATASET_KEYS = {"dataset": str, "split": str, "field": str, "config": str, "streaming": bool, "limit": int}
NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


class CardError(ValueError):
    """An expert folder's expert.yaml is missing or malformed."""


@dataclass(frozen=True)
class ExpertCard:
    folder: Path
    name: str
    domain: str
    description: str
    examples: list[str] = field(default_factory=list)
    # as written: a file name in the folder, "default", or a DataSource for a `{dataset: ...}` mapping
    calibration: str | DataSource = "calib.jsonl"
    evaluation: str | DataSource = "eval.jsonl"
    task: str | None = None

    @property
    def calibration_data(self) -> DataSource:
        """What the expert is calibrated on: a file in the folder, the generic default corpus, or a data set."""
        return _resolve(self.folder, "calibration", self.calibration)

    @property
    def evaluation_data(self) -> DataSource:
        """What the expert is judged on, as :attr:`calibration_data`."""
        return _resolve(self.folder, "evaluation", self.evaluation)

    @property
    def calibration_path(self) -> Path | None:
        """The calibration file (or dataset folder); None when the card names a dataset id."""
        return self.calibration_data.path

    @property
    def evaluation_path(self) -> Path | None:
        return self.evaluation_data.path


def load_card(folder: Path) -> ExpertCard:
    """Parse and check ``folder/expert.yaml``; every problem is a CardError naming the file."""
    folder = Path(folder)
    path = folder / CARD
    if not path.is_file():
        raise CardError(f"{path}: missing; every expert folder needs an expert.yaml (name, domain, description)")
    data = read_yaml_mapping(path, error=CardError)
    missing = [k for k in ("name", "domain", "description") if not data.get(k)]
    if missing:
        raise CardError(f"{path}: missing fields {missing}")
    for key in ("name", "domain"):
        if not isinstance(data[key], str) or not NAME_RE.match(data[key]):
            raise CardError(f"{path}: {key} {data[key]!r} must be lowercase letters, digits, '.', '_' or '-'")
    examples = data.get("examples") or []
    if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
        raise CardError(f"{path}: examples must be a list of strings")
    for what in ("calibration", "evaluation"):
        if isinstance(data.get(what), dict):
            data[what] = _dataset_entry(path, what, data[what])
        elif what in data and data[what] is not None and not isinstance(data[what], str):
            raise CardError(
                f"{path}: {what} must be a file name, 'default', or {{dataset: ..., split: ..., field: ...}}"
            )
    known = {"name", "domain", "description", "examples", "calibration", "evaluation", "task"}
    card = ExpertCard(folder=folder, **{k: v for k, v in data.items() if k in known and v is not None})
    for what, entry in (("calibration", card.calibration), ("evaluation", card.evaluation)):
        if entry == DEFAULT:
            log.warning("%s: %s on the generic default corpus (meswitch/data): its figures say little about "
                        "the expert's own domain; name a file of the expert's data instead", path, what)  # fmt: skip
            continue
        rel = entry.location if isinstance(entry, DataSource) else entry
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CardError(f"{path}: data file {rel!r} must be a relative path inside the expert folder")
        if _resolve(folder, what, entry).by_id:
            continue
        if isinstance(entry, DataSource) and (folder / rel).is_dir():
            check_data_folder(folder, rel)
        elif not (isinstance(entry, DataSource) and entry.streaming):  # a streamed file is not read whole
            check_data_file(folder, rel)
    return card


def _dataset_entry(path: Path, what: str, entry: dict) -> DataSource:
    """``{dataset: ..., split: ..., field: ..., config: ..., streaming: ..., limit: ...}`` of a card, checked."""
    unknown = sorted(set(entry) - set(DATASET_KEYS))
    if unknown:
        raise CardError(f"{path}: {what}: unknown keys {unknown}; known: {', '.join(DATASET_KEYS)}")
    if not entry.get("dataset"):
        raise CardError(f"{path}: {what}: 'dataset' names the data set (a file or folder here, or a dataset id)")
    for key, kind in DATASET_KEYS.items():
        value = entry.get(key)
        if value is not None and (not isinstance(value, kind) or (kind is int and isinstance(value, bool))):
            raise CardError(f"{path}: {what}: {key} must be a {kind.__name__}, not {value!r}")
    if entry.get("limit") is not None and entry["limit"] < 1:
        raise CardError(f"{path}: {what}: limit must be a positive number of rows, not {entry['limit']}")
    options = {k: v for k, v in entry.items() if k != "dataset" and v is not None}
    return DataSource(entry["dataset"], **options)


def _resolve(folder: Path, what: str, entry: str | DataSource) -> DataSource:
    """The card's entry as a DataSource: a file name, ``default``, or a data set (a file or folder in the expert
    folder when there is one of that name or it names a data file, else a dataset id); errors reading a data set
    name the card."""
    if entry == DEFAULT:
        return DataSource(str(DEFAULTS[what]))
    if not isinstance(entry, DataSource):
        return DataSource(str(folder / entry))
    name = entry.location
    local = (folder / name).exists() or suffix_of(Path(name)) in BUILDERS or not DATASET_ID.match(name)
    looked = f"{name!r}" if local else f"{name!r}, looked for in {folder} and as a dataset id"
    return replace(
        entry,
        location=str(folder / name) if local else name,
        by_id=not local,
        origin=f"{folder / CARD} ({what} dataset {looked})",
    )


def check_data_folder(folder: Path, rel: str) -> None:
    """A dataset folder named by the card must stay inside the expert folder, and so must every file in it."""
    inside = folder.resolve()
    for path in [folder / rel, *sorted((folder / rel).rglob("*"))]:
        real = path.resolve()
        if not real.is_relative_to(inside):
            raise CardError(f"{path}: a link to {real}, outside the expert folder; copy the data in instead")


def check_data_file(folder: Path, rel: str) -> None:
    """A data file named by the card must stay inside the folder (a symbolic link out of it, say to a system
    file, is refused, not read) and be of bounded size. A missing one is left to its reader to report."""
    target = folder / rel
    if not target.exists() and not target.is_symlink():
        return
    inside = folder.resolve()
    real = target.resolve()
    if not real.is_relative_to(inside):
        raise CardError(f"{target}: a link to {real}, outside the expert folder; copy the file in instead")
    if not real.is_file():
        raise CardError(f"{target}: not a regular file")
    size = real.stat().st_size
    if size > MAX_DATA_BYTES:
        raise CardError(f"{target}: {size / 2**20:.0f} MiB, over the {MAX_DATA_BYTES >> 20} MiB a data file may hold")
