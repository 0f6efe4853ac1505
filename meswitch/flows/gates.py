"""Quality gates: the thresholds a compressed expert (and a retrained router) must meet to go to production.

The defaults live in ``gates.yaml`` beside this module; a file of one's own overrides any of them.
A gate that cannot be measured (no task data, a full expert that scores 0) is reported as not
applied rather than silently passed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meswitch.settings import read_yaml_mapping

DEFAULT_GATES_FILE = Path(__file__).with_name("gates.yaml")


@dataclass(frozen=True)
class Gates:
    max_kl: float = 0.05
    max_ppl_ratio: float = 1.05
    min_task_ratio: float = 0.9
    min_router_accuracy: float = 0.6
    # per domain, against the router in production: no domain it routes may lose more than this much
    # held-out accuracy, and a domain it does not route yet needs at least min_new_domain_accuracy
    max_domain_accuracy_drop: float = 0.02
    min_new_domain_accuracy: float = 0.9

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class GateCheck:
    """One gate applied to one measurement."""

    gate: str
    value: float | None
    limit: float
    passed: bool
    note: str = ""

    @property
    def reason(self) -> str:
        """Why it failed, for people (and the registry's ``rejected`` tag)."""
        if self.note:
            return f"{self.gate}: {self.note}"
        op = "<=" if self.gate.startswith("max_") else ">="
        return f"{self.gate}: {_fmt(self.value)} is not {op} {_fmt(self.limit)}"


@dataclass(frozen=True)
class GateReport:
    checks: list[GateCheck] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(c.passed for c in self.checks)

    @property
    def reasons(self) -> list[str]:
        return [c.reason for c in self.checks if not c.passed]

    def to_dict(self) -> dict[str, Any]:
        """``{gate: {"passed", "value", "limit"[, "note"]}}``, the shape the registry's ``gates`` tag reads."""
        out: dict[str, Any] = {}
        for c in self.checks:
            out[c.gate] = {"passed": c.passed, "value": c.value, "limit": c.limit}
            if c.note:
                out[c.gate]["note"] = c.note
        return out


def load_gates(path: Path | str | None = None, base: dict[str, Any] | None = None) -> Gates:
    """The default gates (or ``base``), with the values in ``path`` (YAML) on top; unknown keys are an error."""
    if base is not None:
        values = dict(base)
    elif DEFAULT_GATES_FILE.is_file():
        values = read_gates_file(DEFAULT_GATES_FILE)
    else:  # an install without the package data: the same numbers, from the dataclass
        values = Gates().to_dict()
    if path is not None:
        values.update(read_gates_file(Path(path)))
    return gates_from_dict(values, str(path or DEFAULT_GATES_FILE))


def gates_from_dict(values: dict[str, Any], where: str) -> Gates:
    known = {f.name for f in dataclasses.fields(Gates)}
    if unknown := sorted(set(values) - known):
        raise ValueError(f"{where}: unknown gates {unknown}; known: {sorted(known)}")
    try:
        gates = Gates(**{k: float(v) for k, v in values.items()})
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: every gate must be a number ({e})") from e
    for name, value in gates.to_dict().items():
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"{where}: gate {name} must be a finite number >= 0, got {value}")
    return gates


def check_expert_gates(result: dict[str, Any], gates: Gates) -> GateReport:
    """Apply the expert gates to an evaluation (``EvalResult.to_dict()``)."""
    checks = [
        _at_most("max_kl", result.get("kl"), gates.max_kl),
        _at_most("max_ppl_ratio", result.get("ppl_ratio"), gates.max_ppl_ratio),
    ]
    expert, compressed = result.get("task_score_expert"), result.get("task_score_compressed")
    if expert is None or compressed is None:
        checks.append(GateCheck("min_task_ratio", None, gates.min_task_ratio, True, "not applied (no task data)"))
    elif expert <= 0:
        checks.append(
            GateCheck("min_task_ratio", None, gates.min_task_ratio, True, "not applied (the full expert scores 0)")
        )
    else:
        ratio = round(compressed / expert, 5)
        checks.append(GateCheck("min_task_ratio", ratio, gates.min_task_ratio, ratio >= gates.min_task_ratio))
    return GateReport(checks)


def check_router_gates(
    evaluation: dict[str, Any] | None, gates: Gates, previous: dict[str, float] | None = None
) -> GateReport:
    """The router gates on a held-out evaluation (``RouterEval.to_dict()``), domain by domain.

    ``previous``: the production router's held-out accuracy per domain (None: there is none). Every domain of
    the new router must have held-out queries and the overall accuracy ``min_router_accuracy``; against a router in
    production, an old domain may drop by at most ``max_domain_accuracy_drop`` and a domain it adds needs
    ``min_new_domain_accuracy``. The first router has nothing to keep serving instead: the overall gate decides.
    """
    if evaluation is None:
        note = "not applied (no held-out routing queries)"
        return GateReport([GateCheck("min_router_accuracy", None, gates.min_router_accuracy, True, note)])
    accuracy = float(evaluation["accuracy"])
    checks = [
        GateCheck("min_router_accuracy", accuracy, gates.min_router_accuracy, accuracy >= gates.min_router_accuracy)
    ]
    previous = previous or {}
    for domain, row in sorted(evaluation.get("per_domain", {}).items()):
        acc = row.get("accuracy")
        if not row.get("n") or acc is None or math.isnan(acc):
            note = f"{domain}: no held-out queries of this domain, so its routing cannot be checked"
            checks.append(GateCheck("domain_has_test_queries", None, 1, False, note))
        elif domain in previous:
            drop = round(previous[domain] - acc, 4)
            passed = drop <= gates.max_domain_accuracy_drop
            note = (
                ""
                if passed
                else (
                    f"{domain} fell from {previous[domain]:.3f} to {acc:.3f} ({100 * drop:.1f} points; at most "
                    f"{100 * gates.max_domain_accuracy_drop:.1f} allowed)"
                )
            )
            checks.append(GateCheck("max_domain_accuracy_drop", drop, gates.max_domain_accuracy_drop, passed, note))
        elif previous:
            passed = acc >= gates.min_new_domain_accuracy
            note = "" if passed else f"new domain {domain}: {acc:.3f} is below {gates.min_new_domain_accuracy:.3f}"
            checks.append(GateCheck("min_new_domain_accuracy", acc, gates.min_new_domain_accuracy, passed, note))
    return GateReport(checks)


def per_domain_accuracy(evaluation: dict[str, Any] | None) -> dict[str, float]:
    """``{domain: held-out accuracy}`` of a router evaluation (what the next router's gate compares with)."""
    rows = (evaluation or {}).get("per_domain", {})
    return {d: float(r["accuracy"]) for d, r in rows.items() if r.get("n") and not math.isnan(r["accuracy"])}


def task_ratio(result: dict[str, Any]) -> float | None:
    expert, compressed = result.get("task_score_expert"), result.get("task_score_compressed")
    if expert is None or compressed is None or expert <= 0:
        return None
    return round(compressed / expert, 5)


def _at_most(gate: str, value: Any, limit: float) -> GateCheck:
    if value is None or not math.isfinite(float(value)):
        return GateCheck(gate, None, limit, False, f"not measured or not finite ({value!r})")
    return GateCheck(gate, float(value), limit, float(value) <= limit)


def read_gates_file(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: gates file not found")
    return read_yaml_mapping(path, "a mapping of gate names to numbers")


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"
