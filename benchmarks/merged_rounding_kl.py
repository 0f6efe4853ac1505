"""What a prefill that merges the base weight into the delta (one product with ``W + Δ̂`` as its bf16 operand) would
cost in quality: KL of compressed real experts against each expert, reconstructed in fp32 (what the base GEMM and the
delta kernel apart compute, to rounding) and with every linear's ``W + Δ̂`` rounded to bf16 (and to fp16, whose 3 more
mantissa bits an fp16 operand would keep). CPU, no GPU needed.

Needs a built chat family (SmolLM2 experts, ``meswitch.demo.chat_family.build_chat_family``): experts are saved in
bf16 or fp32 per domain, and an fp32 expert's fine-tune may lie below bf16's resolution. Compresses each case once
into ``--work`` (kept for a rerun).

    python benchmarks/merged_rounding_kl.py --family /path/to/family --out kl.json
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meswitch.checkpoints import Checkpoint, check_expert, config_dtype
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo, compress_expert
from meswitch.evaluation.evaluate import Evaluator, load_expert_model, open_artifact
from meswitch.evaluation.metrics import EvalData

CASES = (("math", 2, 0.01), ("code", 2, 0.01), ("math", 1, 0.0025))  # (expert, bits, salient share), ME-Switch


def rounded_linears(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A copy with every linear's weight (the reconstruction W + Δ̂) rounded to ``dtype``, the LM head excepted."""
    out = copy.deepcopy(model)
    head = out.get_output_embeddings()
    for m in out.modules():
        if isinstance(m, torch.nn.Linear) and m is not head:
            m.weight.data = m.weight.data.to(dtype).float()
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("out/merged-rounding"))
    ap.add_argument("--texts", type=int, default=12, help="evaluation texts per expert")
    args = ap.parse_args(argv)
    rows = []
    for name, bits, salient in CASES:
        folder = args.family / "experts" / name
        base, expert = Checkpoint(args.family / "base"), Checkpoint(folder)
        art = args.work / f"{name}-{bits}bit"
        if not (art / "manifest.json").is_file():
            config = DeltaConfig(method="meswitch", bits=bits, salient=salient)
            compress_expert(base, expert, check_expert(base, expert), None, config, art, ExpertInfo(name, name), "cpu")
        ev = Evaluator(args.family / "base", folder, EvalData.load(folder / "eval.jsonl", limit=args.texts), "cpu")
        model = load_expert_model(ev.base, open_artifact(art, ev.base, ev.base_fingerprint), device="cpu")
        apart, merged = ev.score(model), ev.score(rounded_linears(model, torch.bfloat16), "rounded to bf16")
        fp16 = ev.score(rounded_linears(model, torch.float16), "rounded to fp16")
        row = {"expert": name, "bits": bits, "salient": salient, "expert_dtype": str(config_dtype(expert.config)),
               "kl_fp32_reconstruction": apart["kl"], "kl_linears_rounded_to_bf16": merged["kl"],
               "kl_linears_rounded_to_fp16": fp16["kl"],
               "gain_kept_fp32": apart["gain_retained"], "gain_kept_rounded": merged["gain_retained"],
               "kl_of_the_expert_itself_rounded_to_bf16": ev.rounded_to_bf16()["kl"]}  # fmt: skip
        rows.append(row)
        print(row, flush=True)
    report = {"date": dt.date.today().isoformat(), "device": "cpu", "python": platform.python_version(),
              "torch": torch.__version__, "command": " ".join(["python", *sys.argv]),
              "data": f"the chat family at {args.family} (SmolLM2-135M-Instruct experts), {args.texts} texts each",
              "rows": rows}  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
