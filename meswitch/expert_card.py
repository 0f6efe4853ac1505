"""`expert.yaml`: what an expert folder says about itself (name, domain, examples, data files)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from meswitch.data import DEFAULT, DEFAULT_CALIBRATION, DEFAULT_EVALUATION
from meswitch.settings import read_yaml_mapping

log = logging.getLogger(__name__)

CARD = "expert.yaml"
MAX_DATA_BYTES = 256 << 20  # the most a calibration or evaluation file may hold: they are read whole
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
    calibration: str = "calib.jsonl"
    evaluation: str = "eval.jsonl"
    task: str | None = None

    @property
    def calibration_path(self) -> Path:
        """The calibration file: in the folder, or the generic default corpus (``calibration: default``)."""
        return DEFAULT_CALIBRATION if self.calibration == DEFAULT else self.folder / self.calibration

    @property
    def evaluation_path(self) -> Path:
        return DEFAULT_EVALUATION if self.evaluation == DEFAULT else self.folder / self.evaluation


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
    known = {"name", "domain", "description", "examples", "calibration", "evaluation", "task"}
    card = ExpertCard(folder=folder, **{k: v for k, v in data.items() if k in known and v is not None})
    for what, rel in (("calibration", card.calibration), ("evaluation", card.evaluation)):
        if rel == DEFAULT:
            log.warning("%s: %s on the generic default corpus (meswitch/data): its figures say little about "
                        "the expert's own domain; name a file of the expert's data instead", path, what)  # fmt: skip
            continue
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            raise CardError(f"{path}: data file {rel!r} must be a relative path inside the expert folder")
        check_data_file(folder, rel)
    return card


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
