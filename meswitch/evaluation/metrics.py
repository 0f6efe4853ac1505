"""Quality of a compressed expert against the full one: perplexity, KL, and a domain task score."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

TASK_EXACT_MATCH = "arithmetic-exact-match"


@dataclass(frozen=True)
class EvalData:
    """Held-out texts, and (prompt, answer) pairs where the domain has an exact-match task."""

    texts: list[str]
    tasks: list[tuple[str, str]]

    @classmethod
    def from_jsonl(cls, path: Path, limit: int | None = None) -> EvalData:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: evaluation file not found")
        texts, tasks = [], []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                texts.append(row["text"])
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{n}: expected a JSON object with a 'text' field ({e})") from e
            if "prompt" in row and "answer" in row:
                tasks.append((row["prompt"], str(row["answer"])))
        if limit:
            texts, tasks = texts[:limit], tasks[:limit]
        if not texts:
            raise ValueError(f"{path}: no texts")
        return cls(texts, tasks)


def _batches(tokenizer, texts: Sequence[str], max_len: int, batch_size: int, device):
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]), return_tensors="pt", padding=True, truncation=True, max_length=max_len
        )
        yield enc["input_ids"].to(device), enc["attention_mask"].to(device)


@torch.no_grad()
def perplexity(model, tokenizer, texts: Sequence[str], max_len: int = 256, batch_size: int = 8) -> float:
    """Token-level perplexity over the texts (padding excluded)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for ids, mask in _batches(tokenizer, texts, max_len, batch_size, device):
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
        target = ids[:, 1:]
        valid = mask[:, 1:].bool()
        nll = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
        total += float(nll[valid].sum())
        count += int(valid.sum())
    return math.exp(total / max(count, 1))


@torch.no_grad()
def kl_per_text(
    reference, candidate, tokenizer, texts: Sequence[str], max_len: int = 256, batch_size: int = 8
) -> tuple[list[float], list[int]]:
    """Per text, KL(reference || candidate) of the next-token distributions summed over its tokens, and
    its token count: the mean KL is ``sum(sums) / sum(counts)``; the per-text sums are what a paired
    comparison of two candidates resamples (:func:`paired_ratio_ci`)."""
    device = next(reference.parameters()).device
    sums: list[float] = []
    counts: list[int] = []
    for ids, mask in _batches(tokenizer, texts, max_len, batch_size, device):
        p = F.log_softmax(reference(input_ids=ids, attention_mask=mask).logits.float(), -1)
        q = F.log_softmax(candidate(input_ids=ids, attention_mask=mask).logits.float(), -1)
        kl = (p.exp() * (p - q)).sum(-1) * mask
        sums += kl.sum(-1).double().tolist()
        counts += mask.sum(-1).tolist()
    return sums, counts


def paired_ratio_ci(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``sum(a) / sum(b)`` and its percentile-bootstrap interval, resampling the paired items (texts).

    Two methods scored on the same texts differ far less than the texts do; resampling the pairs keeps
    that pairing, so the interval says whether a 1% difference of mean KL is the method or the sample.
    """
    x, y = torch.tensor(a, dtype=torch.float64), torch.tensor(b, dtype=torch.float64)
    if x.shape != y.shape or x.numel() == 0:
        raise ValueError(f"need two equally long, non-empty samples, got {x.numel()} and {y.numel()}")
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, x.numel(), (resamples, x.numel()), generator=gen)
    ratios = x[idx].sum(1) / y[idx].sum(1).clamp_min(1e-300)
    tail = (1 - level) / 2
    lo, hi = torch.quantile(ratios, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(x.sum() / y.sum().clamp_min(1e-300)), lo, hi


@torch.no_grad()
def exact_match(model, tokenizer, tasks: Sequence[tuple[str, str]], max_new_tokens: int = 12) -> float:
    """Fraction of prompts whose greedy continuation starts with the exact answer (then a non-digit)."""
    if not tasks:
        raise ValueError("no (prompt, answer) pairs to score")
    device = next(model.parameters()).device
    hits = 0
    for prompt, answer in tasks:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"].to(device)
        out = model.generate(
            ids,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id,
        )
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        rest = text[len(answer) :]
        hits += text.startswith(answer) and not (rest[:1].isdigit())
    return hits / len(tasks)
