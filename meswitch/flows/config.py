"""How the pipeline compresses, evaluates and routes: one dataclass, defaults in code, overrides in YAML.

    compression: {method: meswitch, bits: 2, salient: 0.01, allocation: global, group_size: 0, refine: false}
    calibration: {samples: 64, seq_len: 256}
    evaluation:  {limit: 64, max_len: 256}
    router:      {backend: embedding, test_queries: family/routing/test.jsonl}
    device: auto          # cuda when present
    gpu_slots: null       # global concurrency slots for GPU tasks: null = one per visible GPU, 0 = no limit
    io_retries: 3         # Prefect retries of tasks that talk to MLflow or the object store

The compression and calibration sections are compression/config.py's DeltaConfig and CalibConfig, every field
settable. Gates are separate (gates.py, ``--gates FILE``) so that a team can tighten them without touching the
rest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meswitch.compression.config import CalibConfig, DeltaConfig
from meswitch.flows.gates import Gates, gates_from_dict, load_gates
from meswitch.registry.names import split_ref
from meswitch.settings import env_value, read_yaml_mapping

GPU_LIMIT = "meswitch-gpu"
BASE_PREFIX = "meswitch-base-"


def is_registry_ref(base: str | Path) -> bool:
    """``meswitch-base-NAME@ALIAS`` or ``meswitch-base-NAME/VERSION`` that is not a local folder."""
    text = str(base)
    if Path(text).exists() or not text.startswith(BASE_PREFIX):
        return False
    _, alias, version = split_ref(text)
    return alias is not None or version is not None


@dataclass(frozen=True)
class EvaluationSettings:
    limit: int = 64  # held-out texts per expert
    max_len: int = 256


@dataclass(frozen=True)
class ValidationSettings:
    # An expert whose weights differ from the base's by more than this (relative Frobenius norm, on a
    # sample of matrices) was not fine-tuned from this base: fine-tunes move weights by a few percent to a few
    # tens of percent, while two independently trained bases differ by about sqrt(2) of their norm.
    max_relative_delta: float = 1.0


@dataclass(frozen=True)
class RouterSettings:
    backend: str = "embedding"  # or "mcq" (the LLM multiple-choice router)
    threshold: float = 0.5
    max_per_domain: int = 256
    seed: int = 0
    test_queries: str | None = None  # labelled {"text", "domain"} JSONL for held-out accuracy


@dataclass(frozen=True)
class PipelineConfig:
    compression: DeltaConfig = field(default_factory=DeltaConfig)
    calibration: CalibConfig = field(default_factory=CalibConfig)
    evaluation: EvaluationSettings = field(default_factory=EvaluationSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)
    router: RouterSettings = field(default_factory=RouterSettings)
    gates: Gates = field(default_factory=Gates)
    device: str = "auto"
    gpu_slots: int | None = None
    io_retries: int = 3
    io_retry_delay_s: float = 5.0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def digest(self, *sections: str) -> str:
        """A short hash of some sections: part of the cache keys of the tasks they affect."""
        data = {s: self.to_dict()[s] for s in sections}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> PipelineConfig:
        return dataclasses.replace(self, **changes)

    def resolved_gpu_slots(self) -> int:
        """Slots of the GPU limit: as configured, else one per visible GPU (0 on a machine without one)."""
        if self.gpu_slots is not None:
            return self.gpu_slots
        try:
            import torch

            return torch.cuda.device_count() if torch.cuda.is_available() else 0
        except Exception:
            return 0


def load_config(path: Path | str | None = None, gates: Path | str | None = None, **overrides: Any) -> PipelineConfig:
    """Defaults, then ``path`` (YAML, any subset of the sections), then ``gates`` (a gates file), then overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: pipeline config not found")
        data = read_yaml_mapping(path)
    gates_in_file = data.pop("gates", None)
    config = _build(PipelineConfig, data, str(path or "pipeline config"))
    g = load_gates()
    if gates_in_file:
        if not isinstance(gates_in_file, dict):
            raise ValueError(f"{path}: gates must be a mapping")
        g = gates_from_dict({**g.to_dict(), **gates_in_file}, f"{path}: gates")
    config = config.replace(gates=load_gates(gates, base=g.to_dict()) if gates is not None else g)
    if (slots := env_value(os.environ, "MESWITCH_GPU_SLOTS", int, None)) is not None:
        config = config.replace(gpu_slots=slots)
    return config.replace(**overrides) if overrides else config


def _build(cls, data: dict[str, Any], where: str):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    if unknown := sorted(set(data) - set(fields)):
        raise ValueError(f"{where}: unknown keys {unknown} for {cls.__name__}; known: {sorted(fields)}")
    values = {}
    for key, value in data.items():
        default = fields[key].default_factory() if fields[key].default_factory is not dataclasses.MISSING else None
        if dataclasses.is_dataclass(default) and isinstance(value, dict):
            values[key] = _build(type(default), value, f"{where}: {key}")
        else:
            values[key] = value
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # the dataclass's own checks (DeltaConfig's method, ...) name the file too
        raise ValueError(f"{where}: {e}") from e
