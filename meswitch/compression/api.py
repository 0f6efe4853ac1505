"""One call from folders to an artifact: validate, calibrate, compress. What the CLI and flows use."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from meswitch.artifacts import Manifest
from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.calibration import calibrate, read_texts
from meswitch.compression.config import CalibConfig, DeltaConfig, calibration_for
from meswitch.compression.expert import ExpertInfo, check_grouping, compress_expert
from meswitch.compression.methods import get_method
from meswitch.data.loading import DataSource
from meswitch.devices import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CompressJob:
    base: Path
    expert: Path
    calib: DataSource | Path | str | None  # a file, dataset folder or dataset id (meswitch.data.loading)
    out: Path
    info: ExpertInfo
    delta: DeltaConfig = field(default_factory=DeltaConfig)
    calib_cfg: CalibConfig = field(default_factory=CalibConfig)
    device: str = "auto"


def run_compress(job: CompressJob) -> Manifest:
    """Check the expert against the base before any work, then calibrate and compress it.

    Methods that use no activation statistics (bitdelta) and jobs without calibration data skip calibration.
    """
    device = resolve_device(job.device)
    base, expert = Checkpoint(job.base), Checkpoint(job.expert)
    pairing = check_expert(base, expert)
    check_grouping(base, job.delta)
    method = get_method(job.delta.method)
    stats = None
    if job.calib is not None and job.delta.uses_calibration:
        stats = calibrate(expert, read_texts(job.calib), calibration_for(job.delta, job.calib_cfg), device)
    elif method.needs_calibration:
        raise ValueError(f"method {method.name!r} scores channels on calibration data: pass a calibration file")
    return compress_expert(base, expert, pairing, stats, job.delta, job.out, job.info, device)
