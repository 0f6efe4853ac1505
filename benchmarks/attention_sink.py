"""Does the attention-sink position decide salience? (issue 11)

In pretrained LLMs the first position of a sequence is an attention sink: in some layers nearly all of a
linear's input energy (sum of squares over the calibration tokens) comes from it. This script measures,
per matrix, the first position's share of that energy, then compresses each expert twice at the same
settings (statistics over every position, and with the first position left out: ``CalibConfig.skip_first``),
and compares the salient sets chosen and the KL to the full expert.

    python benchmarks/attention_sink.py FAMILY --out benchmarks/results/attention-sink-smol-DATE.json \\
        [--experts code,math] [--bits 2] [--limit 100] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.calibration import CalibConfig, calibrate, read_texts
from meswitch.compression.delta import DeltaConfig
from meswitch.compression.expert import ExpertInfo, compress_expert
from meswitch.compression.reconstruct import open_artifact
from meswitch.devices import resolve_device
from meswitch.evaluation.evaluate import Evaluator
from meswitch.evaluation.metrics import EvalData
from meswitch.evaluation.report import _ratio_ci
from meswitch.expert_card import load_card


def sink_shares(full: dict[str, torch.Tensor], skipped: dict[str, torch.Tensor]) -> dict[str, float]:
    """Per matrix, the share of its input energy that the first position carries."""
    return {k: float(1 - skipped[k].sum() / full[k].sum().clamp_min(1e-30)) for k in full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("family", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--experts", default="", help="comma-separated expert names (default: all)")
    ap.add_argument("--bits", type=int, default=2)
    ap.add_argument("--limit", type=int, default=100, help="evaluation texts per expert")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = resolve_device(args.device)
    base_dir = args.family / "base"
    base = Checkpoint(base_dir)
    names = [n for n in args.experts.split(",") if n] or sorted(p.name for p in (args.family / "experts").iterdir())
    calib = CalibConfig()
    out = {
        "family": str(args.family),
        "date": time.strftime("%Y-%m-%d"),
        "device": str(device),
        "command": " ".join(["python", *sys.argv]),
        "bits": args.bits,
        "calibration": {"samples": calib.samples, "seq_len": calib.seq_len},
        "experts": {},
    }
    for name in names:
        folder = args.family / "experts" / name
        card, expert = load_card(folder), Checkpoint(folder)
        texts = read_texts(card.calibration_data)
        stats = {skip: calibrate(expert, texts, replace(calib, skip_first=skip), device) for skip in (0, 1)}
        shares = sink_shares(stats[0], stats[1])
        evaluator = Evaluator(base_dir, folder, EvalData.load(card.evaluation_data, args.limit), device)
        results, salient = {}, {}
        with tempfile.TemporaryDirectory() as tmp:
            for skip, s in stats.items():
                art = Path(tmp) / f"skip{skip}"
                cfg = DeltaConfig(bits=args.bits)
                compress_expert(base, expert, check_expert(base, expert), s, cfg, art, ExpertInfo(name, name), device)
                results[skip] = evaluator.evaluate(art)
                reader = open_artifact(art, base)
                salient[skip] = {
                    n: set(reader.compressed(n).salient_idx.tolist())
                    for n, h in reader.manifest.tensors.items()
                    if h["kind"] == "quantized"
                }
        overlap = {
            n: len(salient[0][n] & salient[1][n]) / max(1, len(salient[0][n] | salient[1][n])) for n in salient[0]
        }
        down = {k: v for k, v in shares.items() if k.endswith("down_proj")}
        out["experts"][name] = {
            "sink_share": {k: round(v, 4) for k, v in shares.items()},
            "down_proj_sink_share_max": round(max(down.values()), 4),
            "down_proj_layers_over_90pct": sum(v > 0.9 for v in down.values()),
            "salient_jaccard_mean": round(sum(overlap.values()) / len(overlap), 4),
            "salient_jaccard_min": round(min(overlap.values()), 4),
            "kl_all_positions": results[0].kl,
            "kl_sink_skipped": results[1].kl,
            "bits_per_param": [results[0].bits_per_param, results[1].bits_per_param],
            "skipped_vs_all": _ratio_ci(results[1].kl_text_sums, results[0].kl_text_sums),
        }
        print(name, json.dumps({k: v for k, v in out["experts"][name].items() if k != "sink_share"}), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
