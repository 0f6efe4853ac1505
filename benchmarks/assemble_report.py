"""Assemble a compression report from the per-expert parts that `meswitch report` keeps (OUT/parts/*.json).

For a report run elsewhere (the GPU machine) and stopped before its last expert: its finished parts come
back, and this writes report.md, report.json and the plot from them, with the run's settings and where the
family came from.

    python benchmarks/assemble_report.py PARTS... --out DIR --family-json FAMILY.json --device "NVIDIA H200" \\
        --command "meswitch report ..." [--note "..."]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from meswitch.evaluation.report import write_report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("parts", type=Path, nargs="+", help="OUT/parts/<expert>.json files of one report run")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--family-json", type=Path, help="the family.json of the family reported on")
    ap.add_argument("--device", required=True, help="where the parts were computed")
    ap.add_argument("--command", required=True, help="the report command that made the parts")
    ap.add_argument("--note", default=None)
    args = ap.parse_args()
    parts = [json.loads(p.read_text()) for p in args.parts]
    settings = {json.dumps(p["settings"]) for p in parts}
    if len(settings) != 1:
        raise SystemExit("the parts come from runs with different settings")
    family = json.loads(args.family_json.read_text()) if args.family_json else {}
    meta = {
        "family": family.get("size"),
        "base": family.get("base", {}).get("name"),
        "base_source": family.get("base", {}).get("source"),
        "date": time.strftime("%Y-%m-%d"),
        "device": args.device,
        "command": args.command,
        "settings": json.loads(parts[0]["settings"]),
        "assembled_from_parts": [p.stem for p in args.parts],
        "note": args.note,
        "references": {r["name"]: part["reference"] for part in parts for r in part["rows"][:1]},
    }
    rows = [r for part in parts for r in part["rows"]]
    for path in write_report(args.out, meta, rows):
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
