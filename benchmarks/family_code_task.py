"""Re-score a chat family's code expert with the family's own evaluation (perplexity, exact next line and
next-line token accuracy against the base), without rebuilding the family.

    python benchmarks/family_code_task.py out/smol benchmarks/results/family-smol-code-task-DATE.json
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from meswitch.demo.chat_family import CHAT_SIZES, _evaluate


def main(family: Path, out: Path) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    spec = CHAT_SIZES[json.loads((family / "family.json").read_text())["size"]]
    base = AutoModelForCausalLM.from_pretrained(family / "base", dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(family / "base")
    t0 = time.perf_counter()
    scores = _evaluate(base, tok, {}, spec, torch.device("cpu"), [("code", "code", family / "experts" / "code")])
    res = {"command": " ".join(["python", *sys.argv]), "date": dt.date.today().isoformat(),
           "seconds": round(time.perf_counter() - t0, 1), "code": scores["experts"]["code"]}  # fmt: skip
    out.write_text(json.dumps(res, indent=2) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
