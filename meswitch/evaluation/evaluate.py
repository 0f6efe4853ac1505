"""Evaluate one compressed artifact against its full expert and the base."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from meswitch.checkpoints import Checkpoint
from meswitch.compression.reconstruct import load_expert_model, open_artifact
from meswitch.evaluation.metrics import EvalData, exact_match, mean_kl, perplexity


@dataclass
class EvalResult:
    """What `meswitch evaluate --json` prints."""

    name: str
    domain: str | None
    method: str
    bits: int
    salient: float
    kl: float
    ppl_base: float
    ppl_expert: float
    ppl_compressed: float
    ppl_ratio: float
    task_score_expert: float | None
    task_score_compressed: float | None
    bits_per_param: float
    delta_bytes: int
    fp16_delta_bytes: int

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def evaluate_artifact(
    base_dir: Path,
    artifact: Path,
    expert_dir: Path,
    data: EvalData,
    device: str | torch.device = "cpu",
    max_len: int = 256,
) -> EvalResult:
    """Perplexity of base, expert and compressed expert; KL(expert || compressed); task scores."""
    base = Checkpoint(base_dir)
    reader = open_artifact(artifact, base)
    m = reader.manifest
    tokenizer = AutoTokenizer.from_pretrained(expert_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    expert = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).to(device).eval()
    compressed = load_expert_model(base, reader, device=device)
    ppl_expert = perplexity(expert, tokenizer, data.texts, max_len)
    ppl_compressed = perplexity(compressed, tokenizer, data.texts, max_len)
    kl = mean_kl(expert, compressed, tokenizer, data.texts, max_len)
    task_expert = exact_match(expert, tokenizer, data.tasks) if data.tasks else None
    task_compressed = exact_match(compressed, tokenizer, data.tasks) if data.tasks else None
    del expert, compressed
    base_model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device).eval()
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    if base_tok.pad_token is None:
        base_tok.pad_token = base_tok.eos_token
    ppl_base = perplexity(base_model, base_tok, data.texts, max_len)
    return EvalResult(
        name=m.name,
        domain=m.domain,
        method=m.method.get("method", "?"),
        bits=int(m.method.get("bits", 0)) if m.method.get("method") != "bitdelta" else 1,
        salient=float(m.method.get("salient", 0)),
        kl=round(kl, 6),
        ppl_base=round(ppl_base, 4),
        ppl_expert=round(ppl_expert, 4),
        ppl_compressed=round(ppl_compressed, 4),
        ppl_ratio=round(ppl_compressed / ppl_expert, 5),
        task_score_expert=task_expert,
        task_score_compressed=task_compressed,
        bits_per_param=m.metrics["bits_per_param"],
        delta_bytes=m.metrics["delta_bytes"],
        fp16_delta_bytes=m.metrics["fp16_delta_bytes"],
    )
