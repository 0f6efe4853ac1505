"""What a pipeline run did: per expert (promoted, rejected and why, skipped, failed) and the router."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRODUCTION, REJECTED, FAILED = "production", "rejected", "failed"


@dataclass
class ExpertOutcome:
    """One inbox entry's fate in this run. ``processed`` is False when an earlier run already decided it."""

    entry: str
    status: str  # production | rejected | failed
    name: str | None = None
    domain: str | None = None
    reasons: list[str] = field(default_factory=list)
    processed: bool = True
    version: int | None = None
    fingerprint: str | None = None
    bits_per_param: float | None = None
    delta_bytes: int | None = None
    kl: float | None = None
    ppl_ratio: float | None = None
    task_ratio: float | None = None
    gates_passed: bool | None = None
    mlflow_run_id: str | None = None
    worker: str | None = None  # host:pid that ran the expert's sub-flow

    @classmethod
    def from_registry(cls, entry: str, name: str, found: dict[str, Any]) -> ExpertOutcome:
        """An expert an earlier run already processed, described by its registered version's tags."""
        reasons = [r for r in (found.get("rejected") or "").split("; ") if r]
        return cls(
            entry=entry,
            status=found.get("pipeline.status", PRODUCTION),
            name=name,
            domain=found.get("domain"),
            reasons=reasons,
            processed=False,
            version=int(found["version"]),
            fingerprint=found.get("source_fingerprint"),
            bits_per_param=_num(found.get("bits_per_param")),
            delta_bytes=_int(found.get("delta_bytes")),
            kl=_num(found.get("kl")),
            ppl_ratio=_num(found.get("ppl_ratio")),
            task_ratio=_num(found.get("task_ratio")),
            gates_passed={"true": True, "false": False}.get(found.get("gates_passed", "")),
            mlflow_run_id=found.get("mlflow_run_id"),
        )


@dataclass
class RouterOutcome:
    status: str  # production | rejected | unchanged | skipped | failed
    version: int | None = None
    domains: list[str] = field(default_factory=list)
    accuracy: float | None = None
    reasons: list[str] = field(default_factory=list)
    retrained: bool = False
    mlflow_run_id: str | None = None


@dataclass
class PipelineSummary:
    inbox: str
    base: str | None = None  # the registered base, NAME/VERSION
    base_error: str | None = None
    experts: list[ExpertOutcome] = field(default_factory=list)
    router: RouterOutcome | None = None
    mlflow: str = ""
    report_dir: str | None = None
    notes: list[str] = field(default_factory=list)  # what the user should know beyond the table: an empty inbox

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PipelineSummary:
        """The summary ``to_dict`` wrote (a flow run's result), for printing it again."""
        known = {f.name for f in dataclasses.fields(cls)} - {"experts", "router"}
        summary = cls(**{k: v for k, v in d.items() if k in known})
        summary.experts = [ExpertOutcome(**e) for e in d.get("experts", [])]
        summary.router = RouterOutcome(**d["router"]) if d.get("router") else None
        return summary

    @property
    def failed(self) -> list[ExpertOutcome]:
        return [e for e in self.experts if e.status == FAILED]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["promoted"] = [e.name for e in self.experts if e.status == PRODUCTION and e.processed]
        # by inbox entry: several entries may name one expert, and each has its own reasons
        d["rejected"] = {e.entry: e.reasons for e in self.experts if e.status == REJECTED and e.processed}
        d["skipped"] = [e.entry for e in self.experts if not e.processed]
        d["failed"] = {e.entry: e.reasons for e in self.failed}
        return d

    def markdown(self) -> str:
        lines = []
        if self.experts:
            lines += [
                "| entry | expert | domain | status | new | bits/param | bytes | KL | ppl ratio | gates | version |",
                "|---|---|---|---|---|---:|---:|---:|---:|---|---:|",
            ]
        for e in self.experts:
            gate = {True: "pass", False: "fail", None: "-"}[e.gates_passed]
            lines.append(
                f"| {e.entry} | {e.name or '-'} | {e.domain or '-'} | {e.status} | {'yes' if e.processed else 'no'} | "
                f"{_f(e.bits_per_param, 3)} | {e.delta_bytes or '-'} | {_f(e.kl, 4)} | {_f(e.ppl_ratio, 4)} | "
                f"{gate} | {e.version or '-'} |"
            )
        out = "".join(f"{line}\n" for line in [*lines, *self.notes])
        if self.base or self.base_error:
            out += f"\nBase: {self.base or 'not registered: ' + str(self.base_error)}\n"
        reasons = [(e.entry, e.status, r) for e in self.experts for r in e.reasons]
        if reasons:
            out += "\n" + "\n".join(f"- {n} ({s}): {r}" for n, s, r in reasons) + "\n"
        if self.router is not None:
            r = self.router
            acc = "-" if r.accuracy is None else f"{r.accuracy:.3f}"
            out += (
                f"\nRouter: {r.status}{' (retrained)' if r.retrained else ''}, version {r.version or '-'}, "
                f"domains {', '.join(r.domains) or '-'}, held-out accuracy {acc}"
            )
            out += "".join(f"\n- router: {x}" for x in r.reasons) + "\n"
        return out

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        js = folder / "pipeline_summary.json"
        js.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        md = folder / "pipeline_summary.md"
        md.write_text(self.markdown())
        return [js, md]


def _num(x: Any) -> float | None:
    try:
        return None if x in (None, "", "None") else float(x)
    except (TypeError, ValueError):
        return None


def _int(x: Any) -> int | None:
    v = _num(x)
    return None if v is None else int(v)


def _f(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"
