"""What the FP8 planes cost in quality: KL of a compressed expert whose delta product meets x rounded to e4m3.

``LaunchConfig.fp8_planes`` runs each delta's quantized planes on FP8 tensor cores against x scaled per row by
``max|x| / 448`` and rounded to e4m3; the base product and the salient columns keep x. This script applies exactly
that error to the reference model on the CPU: the compressed expert in fp32 (base + Δ̂, as evaluation loads it),
each compressed linear given ``(q(x) − x) · planesᵀ`` on top (``planes``: Δ̂ without its salient columns, ``q``
the per-row e4m3 rounding), and compares, per scored token, KL(expert ‖ compressed) with and without it, and
KL(compressed ‖ compressed with e4m3). No GPU: the rounding is the kernel's (``_x_e4m3_kernel``), not its speed.

    python benchmarks/fp8_activation_kl.py --base BASE --expert EXPERT --artifact ART --data EVAL.jsonl \\
        [--limit 48] --out benchmarks/results/fp8-activation-kl-DATE.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from meswitch.checkpoints import Checkpoint
from meswitch.compression.reconstruct import load_expert_model, open_artifact
from meswitch.evaluation.metrics import EvalData
from meswitch.kernels import e4m3_rows


def add_e4m3_error(model: torch.nn.Module, reader) -> list:
    """Forward hooks adding ``(q(x) − x) · planesᵀ`` to every compressed linear; returns their handles."""
    handles = []
    for name, head in reader.manifest.tensors.items():
        if head["kind"] != "quantized" or not name.endswith(".weight"):
            continue
        module = model.get_submodule(name.removesuffix(".weight"))
        if not isinstance(module, torch.nn.Linear):
            continue  # an embedding: its rows are looked up, no product with x
        planes = reader.compressed(name).quantized().dequantize()

        def hook(mod, args, out, planes=planes):
            x = args[0]
            return out + (e4m3_rows(x).to(x.dtype) - x) @ planes.T.to(x.dtype)

        handles.append(module.register_forward_hook(hook))
    return handles


def kl_per_token(p_logits: torch.Tensor, q_logits: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) per position, in nats."""
    lp, lq = F.log_softmax(p_logits.double(), -1), F.log_softmax(q_logits.double(), -1)
    return (lp.exp() * (lp - lq)).sum(-1)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="base model folder")
    ap.add_argument("--expert", type=Path, required=True, help="the full expert the artifact was made from")
    ap.add_argument("--artifact", type=Path, required=True, help="its compressed artifact")
    ap.add_argument("--data", type=Path, required=True, help="held-out texts (evaluation rows: text, score_from)")
    ap.add_argument("--limit", type=int, default=48, help="texts scored (default 48)")
    ap.add_argument("--max-tokens", type=int, default=256, help="tokens a text at most (default 256)")
    ap.add_argument("--out", type=Path, help="JSON of the figures")
    args = ap.parse_args(argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    base = Checkpoint(args.base)
    reader = open_artifact(args.artifact, base)
    compressed = load_expert_model(base, reader)
    expert = AutoModelForCausalLM.from_pretrained(args.expert, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.expert)
    data = EvalData.load(args.data, args.limit)
    sums = {"expert_vs_compressed": 0.0, "expert_vs_compressed_e4m3": 0.0, "compressed_vs_e4m3": 0.0}
    tokens = 0
    with torch.inference_mode():
        for i, text in enumerate(data.texts):
            start = data.score_from[i] if data.score_from else 0
            enc = tok(text, return_offsets_mapping=True, truncation=True, max_length=args.max_tokens)
            ids = torch.tensor([enc["input_ids"]])
            scored = torch.tensor([s >= start for s, _ in enc["offset_mapping"]])[:-1]  # positions predicting them
            if not scored.any():
                continue
            want = expert(ids).logits[0, :-1][scored]
            plain = compressed(ids).logits[0, :-1][scored]
            handles = add_e4m3_error(compressed, reader)
            try:
                rounded = compressed(ids).logits[0, :-1][scored]
            finally:
                for h in handles:
                    h.remove()
            sums["expert_vs_compressed"] += float(kl_per_token(want, plain).sum())
            sums["expert_vs_compressed_e4m3"] += float(kl_per_token(want, rounded).sum())
            sums["compressed_vs_e4m3"] += float(kl_per_token(plain, rounded).sum())
            tokens += int(scored.sum())
    kl = {k: v / tokens for k, v in sums.items()}
    added = kl["expert_vs_compressed_e4m3"] - kl["expert_vs_compressed"]
    report = {
        "date": dt.date.today().isoformat(),
        "device": f"cpu ({platform.processor() or platform.machine()})",
        "versions": {"torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
        "expert": reader.manifest.name,
        "texts": len(data.texts),
        "tokens": tokens,
        "kl_per_token": {k: float(f"{v:.4g}") for k, v in kl.items()},
        "e4m3_adds_to_kl": float(f"{added:.4g}"),
        "e4m3_adds_fraction_of_compression_kl": float(f"{added / kl['expert_vs_compressed']:.4g}"),
    }
    print(json.dumps(report, indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
