"""CUDA-graph decoding on the real SmolLM2 family: the same greedy tokens as eager decoding (issue 13).

Serves compressed experts of the SmolLM2-135M-Instruct family (artifact folders, as the pipeline
registers them) with the packed payload, asks a mixed batch of chat questions (each expert's own and
the base's), and decodes greedily three ways from the same prompts: the static decoder replaying
CUDA graphs, the same decoder stepping eagerly (the arithmetic a graph captures: the tokens must be
equal), and the engine's eager transformers forward (another attention kernel and cache: agreement
is reported, not required). Also times a decode step each way.

    python benchmarks/graph_real.py --base BASE_DIR --experts ART1,ART2 --out graph-real.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from transformers import AutoTokenizer, DynamicCache

from meswitch.serving.decoder import DecoderConfig, StaticDecoder
from meswitch.serving.engine import EngineConfig, MixedExpertEngine

QUESTIONS = {
    "math": ["What is 17 + 25?", "Compute 48 - 19."],
    "code": ["Write a Python function that reverses a string.", "Write a Python function that sums a list."],
    "chinese": ["用中文介绍一下长城。"],
    "english": ["Describe a rainy afternoon in two sentences."],
    "definitions": ["Define the word 'ephemeral'."],
    None: ["What is the capital of France?"],
}


def eager_engine_greedy(eng: MixedExpertEngine, prompts: list[list[int]], rows: list, steps: int) -> list[list[int]]:
    """Greedy tokens from the engine's transformers forward, one row at a time (no padding)."""
    out = []
    for p, slot in zip(prompts, rows, strict=True):
        cache, toks = DynamicCache(), []
        logits = eng.forward(torch.tensor([p]), [slot], cache=cache, logits_to_keep=1)
        for _ in range(steps):
            t = int(logits[0, -1].argmax())
            toks.append(t)
            pos = torch.tensor([[len(p) + len(toks) - 1]])
            logits = eng.forward(torch.tensor([[t]]), [slot], position_ids=pos, cache=cache, logits_to_keep=1)
        out.append(toks)
    return out


def decoder_greedy(dec: StaticDecoder, prompts: list[list[int]], rows: list, steps: int) -> tuple[list, list]:
    """Greedy tokens and the synchronised ms of each decode step."""
    last = dec.prefill(range(len(rows)), prompts, rows).argmax(-1)
    pos = [len(p) for p in prompts]
    toks, times = [last], []
    for _ in range(steps - 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        last = dec.decode(last, pos, rows).argmax(-1)
        torch.cuda.synchronize()
        times.append(1e3 * (time.perf_counter() - t0))
        toks.append(last)
        pos = [q + 1 for q in pos]
    return torch.stack(toks).T.tolist(), times


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", type=Path, required=True, help="the base folder (meswitch base smollm2 --out DIR)")
    ap.add_argument("--experts", required=True, help="comma-separated artifact folders")
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    eng = MixedExpertEngine(args.base, EngineConfig(device="cuda", payload="packed"))
    tok = AutoTokenizer.from_pretrained(args.base)
    slots = [eng.add_expert(Path(a)) for a in args.experts.split(",")]
    rows, prompts, asked = [], [], []
    for slot in [*slots, None]:
        domain = slot.domain if slot else None
        for q in QUESTIONS.get(domain, QUESTIONS[None]):
            text = tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
            prompts.append(tok(text)["input_ids"])
            rows.append(slot)
            asked.append({"expert": slot.name if slot else None, "question": q})
    graph = StaticDecoder(eng, DecoderConfig(max_rows=8, max_len=256, buckets=(8,)))
    eager = StaticDecoder(eng, DecoderConfig(max_rows=8, max_len=256, buckets=(8,), graphs=False))
    g_tokens, g_ms = decoder_greedy(graph, prompts, rows, args.steps)
    e_tokens, e_ms = decoder_greedy(eager, prompts, rows, args.steps)
    hf_tokens = eager_engine_greedy(eng, prompts, rows, args.steps)
    same_prefix = [next((i for i, (a, b) in enumerate(zip(g, h, strict=True)) if a != b), len(g))
                   for g, h in zip(g_tokens, hf_tokens, strict=True)]  # fmt: skip
    report = {
        "date": dt.date.today().isoformat(),
        "device": torch.cuda.get_device_name(),
        "versions": {"torch": torch.__version__},
        "command": " ".join(["python", *sys.argv]),
        "base": str(args.base),
        "experts": [s.name for s in slots],
        "steps": args.steps,
        "graph_equals_eager_decoder": g_tokens == e_tokens,
        "tokens_equal_to_transformers_forward_before_first_difference": same_prefix,
        "graph_ms_per_step": round(statistics.median(g_ms[2:]), 3),
        "eager_decoder_ms_per_step": round(statistics.median(e_ms[2:]), 3),
        "batch": len(rows),
        "graph_captures": graph.captures,
        "answers": [
            {**a, "graph": tok.decode(g, skip_special_tokens=True)} for a, g in zip(asked, g_tokens, strict=True)
        ],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1, ensure_ascii=False))
    print(json.dumps({k: v for k, v in report.items() if k != "answers"}, indent=1), flush=True)
    for a in report["answers"]:
        print(a, flush=True)
    if not report["graph_equals_eager_decoder"]:
        raise SystemExit("graph decoding disagrees with eager decoding")


if __name__ == "__main__":
    main()
