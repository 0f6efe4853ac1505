"""How much of a delta's output error its top input channels carry: the room salience has.

ME-Switch keeps the input channels with the largest activation-weighted quantization error in
fp16. That can only pay when a few channels hold much of the error, as activation outliers make
them do in large pre-trained LLMs. This measures, per expert and linear, the share of
``Σ_i s_i Σ_j (Δ_ij - Δ̂_ij)²`` (2-bit, per output channel, all channels in the fit) held by the top
``--salient`` fraction of channels, and how peaked the input second moments ``s`` are.

And whether a salient column is worth its bytes against spending them on one more bit everywhere.
A salient column costs ``16 N`` bits (its fp16 correction) and removes its share ``e_i`` of the
error; one more bit on every column costs ``N K`` bits and removes a fraction ``r`` of the error
(``r = 1 - E_{b+1}/E_b``, measured with the same quantizer: about 0.75). Per bit, the column wins
when ``e_i > 16 r / K``: 6% of the matrix's error in one channel at K = 192 (the tiny family),
0.3% at K = 4096 (Mistral-7B). ``past_break_even`` counts the channels above that line (the
refit of the step sizes once a column leaves the fit is ignored, in the column's disfavour).

    python benchmarks/salience_concentration.py out/demo/family \
        --out benchmarks/results/salience-concentration-DATE.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from meswitch.checkpoints import Checkpoint, check_expert
from meswitch.compression.calibration import CalibConfig, calibrate, read_texts
from meswitch.compression.quantize import QuantSpec
from meswitch.compression.salience import reconstruction_scores, shares_of
from meswitch.devices import resolve_device
from meswitch.expert_card import load_card


def concentration(delta: torch.Tensor, s: torch.Tensor, bits: int, fraction: float) -> dict:
    """Share of the weighted error in the top ``fraction`` of channels, max/median of ``s``, and the
    channels whose share passes the break-even against one more bit on every column."""
    scores = reconstruction_scores(delta, s, QuantSpec(bits))
    shares = shares_of(scores)
    k = max(1, round(fraction * delta.shape[1]))
    more_bits = reconstruction_scores(delta, s, QuantSpec(bits + 1)).sum() if bits < 4 else None
    reduction = None if more_bits is None else float(1 - more_bits / scores.sum().clamp_min(1e-30))
    break_even = None if reduction is None else 16 * reduction / delta.shape[1]
    return {
        "top_share": round(float(shares.topk(k).values.sum()), 4),
        "s_max_over_median": round(float(s.max() / s.median().clamp_min(1e-30)), 1),
        "salient_count": k,
        "one_more_bit_removes": None if reduction is None else round(reduction, 4),
        "break_even_share": None if break_even is None else round(break_even, 5),
        "past_break_even": None if break_even is None else int((shares > break_even).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("family", type=Path, help="a folder made by `meswitch demo-family`")
    p.add_argument("--out", type=Path, required=True, help="result JSON")
    p.add_argument("--bits", type=int, default=2)
    p.add_argument("--salient", type=float, default=0.01, help="fraction of input channels (default 0.01)")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    device = resolve_device(args.device)
    base = Checkpoint(args.family / "base")
    experts = {}
    for folder in sorted(d for d in (args.family / "experts").iterdir() if d.is_dir()):
        card, expert = load_card(folder), Checkpoint(folder)
        check_expert(base, expert)
        stats = calibrate(expert, read_texts(card.calibration_data), CalibConfig(), device)
        layers = {}
        for name, s in stats.items():
            weight = f"{name}.weight"
            delta = expert.get(weight).float().to(device) - base.get(weight).float().to(device)
            layers[name] = concentration(delta, s.float().to(device), args.bits, args.salient)
        shares = [v["top_share"] for v in layers.values()]
        peaks = [v["s_max_over_median"] for v in layers.values()]
        budget = sum(v["salient_count"] for v in layers.values())
        worth = sum(min(v["past_break_even"] or 0, v["salient_count"]) for v in layers.values())
        experts[card.name] = {
            "linears": len(layers),
            "top_share_median": statistics.median(shares),
            "top_share_max": max(shares),
            "s_max_over_median_median": statistics.median(peaks),
            "s_max_over_median_max": max(peaks),
            "salient_budget": budget,
            "salient_past_break_even": worth,
            "channels_past_break_even": sum(v["past_break_even"] or 0 for v in layers.values()),
            "layers": layers,
        }
        print(f"{card.name}: top {args.salient:.0%} of channels hold {statistics.median(shares):.1%} of the weighted "
              f"error (median over {len(layers)} linears; max {max(shares):.1%}); {worth} of the {budget} salient "
              f"channels are worth their bytes against one more bit everywhere")  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"),
        "command": " ".join(["python", *sys.argv]),
        "family": str(args.family), "bits": args.bits, "salient": args.salient, "device": str(device),
        "torch": torch.__version__, "experts": experts,
    }, indent=2) + "\n")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
