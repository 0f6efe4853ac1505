"""Assemble a compression report from the per-expert parts that `meswitch report` keeps (OUT/parts/*.json),
or merge several finished reports of one family (their report.json files).

For a report run elsewhere (the GPU machine) and stopped before its last expert: its finished parts come
back, and this writes report.md, report.json and the plot from them, with the run's settings and where the
family came from. Reports run with different methods or bit widths on the same family (a GPU session's time
split into several runs) merge into one table and one set of targets; where two runs measured the same
(expert, method, bits), the later file's row is kept.

    python benchmarks/assemble_report.py PARTS... --out DIR --family-json FAMILY.json --device "NVIDIA H200" \\
        --command "meswitch report ..." [--note "..."]
    python benchmarks/assemble_report.py REPORT.json REPORT.json ... --out DIR [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from meswitch.evaluation.report import write_report


def _from_parts(args, parts: list[dict]) -> tuple[dict, list[dict]]:
    settings = {json.dumps(p["settings"]) for p in parts}
    if len(settings) != 1:
        raise SystemExit("the parts come from runs with different settings")
    if not args.device or not args.command:
        raise SystemExit("parts need --device and --command (a part does not record them)")
    family = json.loads(args.family_json.read_text()) if args.family_json else {}
    meta = {
        "family": family.get("size"),
        "base": family.get("base", {}).get("name"),
        "base_source": family.get("base", {}).get("source"),
        "device": args.device,
        "command": args.command,
        "settings": json.loads(parts[0]["settings"]),
        "assembled_from_parts": [p.stem for p in args.inputs],
        "references": {r["name"]: part["reference"] for part in parts for r in part["rows"][:1]},
    }
    return meta, [r for part in parts for r in part["rows"]]


def _from_reports(args, reports: list[dict]) -> tuple[dict, list[dict]]:
    bases = {r.get("base") for r in reports}
    if len(bases) != 1:
        raise SystemExit(f"the reports are of different bases: {sorted(map(str, bases))}")
    rows: dict[tuple, dict] = {}
    for report in reports:  # later files win
        rows.update({(r["name"], r["method"], r["bits"]): r for r in report["rows"]})
    first = reports[0]
    meta = {
        "family": first.get("family"),
        "base": first.get("base"),
        "base_source": first.get("base_source"),
        "device": ", ".join(sorted({str(r.get("device")) for r in reports})),
        "command": "python "
        + " ".join(["benchmarks/assemble_report.py", *map(str, args.inputs), "--out", str(args.out)]),
        "merged_from": [
            {"file": str(p), "command": r.get("command"), "date": r.get("date"), "device": r.get("device")}
            for p, r in zip(args.inputs, reports, strict=True)
        ],
        "references": {k: v for r in reports for k, v in (r.get("references") or {}).items()},
    }
    return meta, list(rows.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "inputs", type=Path, nargs="+", help="OUT/parts/<expert>.json files of one run, or report.json files"
    )
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family-json", type=Path, help="parts: the family.json of the family reported on")
    ap.add_argument("--device", help="parts: where they were computed")
    ap.add_argument("--command", help="parts: the report command that made them")
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    loaded = [json.loads(p.read_text()) for p in args.inputs]
    kinds = {"part" if "reference" in d else "report" for d in loaded}
    if len(kinds) != 1:
        raise SystemExit("give either parts of one run or finished reports, not both")
    meta, rows = (_from_reports if kinds == {"report"} else _from_parts)(args, loaded)
    meta = {**meta, "date": time.strftime("%Y-%m-%d"), "note": args.note}
    for path in write_report(args.out, meta, rows):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
