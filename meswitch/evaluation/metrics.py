"""Quality of a compressed expert against the full one: perplexity, KL, and a domain task score."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F

from meswitch.data.loading import DataSource, load_rows

# Task metrics: how a greedy continuation of a prompt is checked against the answer (see task_hit).
TASK_EXACT_MATCH = "arithmetic-exact-match"  # the continuation starts with the number
FINAL_NUMBER = "final-number-exact-match"  # the reply's "answer is N", else its last number
NEXT_LINE = "next-line-exact-match"  # the first non-empty line after the prompt's line, stripped
MAX_NEW_TOKENS = {TASK_EXACT_MATCH: 12, FINAL_NUMBER: 48, NEXT_LINE: 40}


class Task(NamedTuple):
    prompt: str
    answer: str
    metric: str = TASK_EXACT_MATCH


@dataclass(frozen=True)
class EvalData:
    """Held-out texts, and the tasks where the domain has one (evaluation lines with prompt and answer)."""

    texts: list[str]
    tasks: list[Task]
    # per text, the character offset where scoring starts (a line's ``score_from``; 0: every token): a chat
    # expert is scored on its replies, not on the template and user turns it only reads
    score_from: list[int] | None = None

    @classmethod
    def load(cls, source: DataSource | Path | str, limit: int | None = None) -> EvalData:
        """A data set's rows (meswitch.data.loading): ``text`` each, ``score_from`` where scoring starts, and
        ``prompt`` + ``answer`` (+ ``metric``) where the row is a task; the first ``limit`` texts and tasks."""
        rows = load_rows(source, optional=("score_from", "prompt", "answer", "metric"), convert=_eval_row)
        texts = [text for text, _, _ in rows]
        score_from = [start for _, start, _ in rows]
        tasks = [task for _, _, task in rows if task is not None]
        if limit:
            texts, tasks, score_from = texts[:limit], tasks[:limit], score_from[:limit]
        return cls(texts, tasks, score_from if any(score_from) else None)


def _eval_row(row: dict) -> tuple[str, int, Task | None]:
    """(text, score_from, task or None) of one evaluation row."""
    start = int(row["score_from"] or 0)
    task = None
    if row["prompt"] is not None and row["answer"] is not None:
        metric = row["metric"] or TASK_EXACT_MATCH
        if metric not in MAX_NEW_TOKENS:
            raise ValueError(f"unknown task metric {metric!r}; known: {', '.join(MAX_NEW_TOKENS)}")
        task = Task(row["prompt"], str(row["answer"]), metric)
    return row["text"], start, task


def _batches(tokenizer, texts: Sequence[str], max_len: int, batch_size: int, device, score_from=None):
    """(ids, attention mask, scored) per batch: ``scored`` is each token's character count where the token is
    scored, else 0. A token is scored when it starts at or after its text's ``score_from`` character (every real
    token without ``score_from``)."""
    for i in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[i : i + batch_size]),
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=max_len,
            return_offsets_mapping=True,
        )
        mask = enc["attention_mask"]
        start, end = enc["offset_mapping"][..., 0], enc["offset_mapping"][..., 1]
        first = torch.tensor(score_from[i : i + batch_size] if score_from is not None else [0] * len(mask))
        scored = mask * (start >= first.unsqueeze(1)) * (end - start).clamp_min(1)
        yield enc["input_ids"].to(device), mask.to(device), scored.to(device)


@dataclass
class Likelihood:
    """Per text, a model's negative log-likelihood summed over the scored tokens, their count and characters:
    the perplexity, and what a paired interval over the texts resamples."""

    nll_sums: list[float] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    chars: list[int] = field(default_factory=list)

    def units(self, per_char: bool = False) -> list[int]:
        """Per text, what the perplexity divides by: scored tokens, or their characters."""
        return self.chars if per_char else self.tokens

    def perplexity(self, per_char: bool = False) -> float:
        return math.exp(sum(self.nll_sums) / max(sum(self.units(per_char)), 1))

    def _add(self, logprobs: torch.Tensor, ids: torch.Tensor, weight: torch.Tensor) -> None:
        """Append a batch's texts from the model's log-probabilities at their scored positions
        (``[scored tokens, vocabulary]``, :meth:`Scorer.logprobs`)."""
        valid = weight.bool()
        self.nll_sums += _per_text(-logprobs.gather(-1, ids[:, 1:][valid][:, None]).squeeze(-1), valid)
        self.tokens += valid.sum(-1).tolist()
        self.chars += weight.sum(-1).tolist()


@dataclass
class Comparison(Likelihood):
    """The candidate's :class:`Likelihood`, and per text KL(reference || candidate) summed over the scored
    tokens: everything an artifact's evaluation needs, from one forward pass of each model."""

    kl_sums: list[float] = field(default_factory=list)


def _per_text(values: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Per text, the sum of ``values`` (one per scored position, in ``valid``'s order) in fp64."""
    full = torch.zeros(valid.shape, dtype=values.dtype, device=values.device)
    full[valid] = values
    return full.double().sum(-1).tolist()


class Scorer:
    """A model's log-probabilities of each next token at the scored positions of a batch, in fp32.

    ``keep_bytes``: keep them per batch, up to that many bytes, and hand them out again when the same batch comes
    back: an evaluator compares every artifact of an expert with the expert on the same texts, and the expert's
    own likelihood is read off the same log-probabilities, so the expert's forward runs once an evaluation set
    instead of once an artifact (about 200 KB a scored token of a 49k vocabulary)."""

    def __init__(self, model, keep_bytes: int = 0):
        self.model, self.keep_bytes = model, keep_bytes
        self._kept: dict[tuple, torch.Tensor] = {}
        self._bytes = 0

    def logprobs(self, ids: torch.Tensor, mask: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        # a scorer that keeps nothing (every candidate) needs no key: building one copies the batch to the host
        key = None
        if self.keep_bytes:
            key = (tuple(ids.shape), ids.cpu().numpy().tobytes(), valid.cpu().numpy().tobytes())
        if key is not None and key in self._kept:
            return self._kept[key]
        out = F.log_softmax(self.model(input_ids=ids, attention_mask=mask).logits[:, :-1][valid].float(), -1)
        if key is not None and self._bytes + out.nbytes <= self.keep_bytes:
            self._kept[key] = out
            self._bytes += out.nbytes
        return out


def _scorer(model) -> Scorer:
    return model if isinstance(model, Scorer) else Scorer(model)


@torch.no_grad()
def likelihood(
    model, tokenizer, texts: Sequence[str], max_len: int = 256, batch_size: int = 8, score_from=None
) -> Likelihood:
    """The model's negative log-likelihood per text on the texts' scored tokens (padding excluded; see
    :func:`_batches`), by the same arithmetic as :func:`compare`'s candidate, so the same model scores alike.
    ``model``: a model, or a :class:`Scorer` that keeps its log-probabilities for a comparison to come."""
    scorer = _scorer(model)
    device = next(scorer.model.parameters()).device
    out = Likelihood()
    for ids, mask, scored in _batches(tokenizer, texts, max_len, batch_size, device, score_from):
        out._add(scorer.logprobs(ids, mask, scored[:, 1:].bool()), ids, scored[:, 1:])
    return out


def perplexity(
    model,
    tokenizer,
    texts: Sequence[str],
    max_len: int = 256,
    batch_size: int = 8,
    score_from=None,
    per_char: bool = False,
) -> float:
    """Perplexity over the texts' scored tokens (:func:`likelihood`).

    ``per_char``: the mean negative log-likelihood per character rather than per token, the figure that two
    models with different vocabularies (an expert that added tokens, and its base) can be compared by.
    """
    return likelihood(model, tokenizer, texts, max_len, batch_size, score_from).perplexity(per_char)


@torch.no_grad()
def compare(
    reference, candidate, tokenizer, texts: Sequence[str], max_len: int = 256, batch_size: int = 8, score_from=None
) -> Comparison:
    """KL(reference || candidate) and the candidate's likelihood on the texts' scored tokens, per text: the mean
    KL is ``sum(kl_sums) / sum(tokens)``; the per-text sums are what a paired comparison of two candidates
    resamples (:func:`paired_ratio_ci`). Either model may be a :class:`Scorer` (the reference of many
    candidates, its log-probabilities kept)."""
    reference, candidate = _scorer(reference), _scorer(candidate)
    device = next(reference.model.parameters()).device
    out = Comparison()
    for ids, mask, scored in _batches(tokenizer, texts, max_len, batch_size, device, score_from):
        valid = scored[:, 1:].bool()
        p, q = reference.logprobs(ids, mask, valid), candidate.logprobs(ids, mask, valid)
        out._add(q, ids, scored[:, 1:])
        out.kl_sums += _per_text((p.exp() * (p - q)).sum(-1), valid)
    return out


def paired_bootstrap_ci(
    columns: Sequence[Sequence[float]],
    statistic: Callable[..., torch.Tensor],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """``statistic(*columns)`` and its percentile-bootstrap interval, resampling the items (texts) with all
    their columns together.

    ``statistic`` maps the columns, each of shape (..., items), to one value per leading index. Models scored
    on the same texts differ far less than the texts do; resampling whole items keeps that pairing.
    """
    cols = [torch.tensor(c, dtype=torch.float64) for c in columns]
    n = cols[0].numel() if cols else 0
    if n == 0 or any(c.shape != (n,) for c in cols):
        raise ValueError(f"need equally long, non-empty samples, got lengths {[c.numel() for c in cols]}")
    idx = torch.randint(0, n, (resamples, n), generator=torch.Generator().manual_seed(seed))
    values = statistic(*(c[idx] for c in cols))
    tail = (1 - level) / 2
    lo, hi = torch.quantile(values, torch.tensor([tail, 1 - tail], dtype=torch.float64)).tolist()
    return float(statistic(*cols)), lo, hi


def paired_ratio_ci(
    a: Sequence[float], b: Sequence[float], resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """``sum(a) / sum(b)`` and its percentile-bootstrap interval, resampling the paired items (texts).

    Two methods scored on the same texts differ far less than the texts do; resampling the pairs keeps
    that pairing, so the interval says whether a 1% difference of mean KL is the method or the sample.
    """
    return paired_bootstrap_ci([a, b], lambda x, y: x.sum(-1) / y.sum(-1).clamp_min(1e-300), resamples, level, seed)


# An expert's gain over its base at most this large is no gain: the share of it kept would be rounding noise
NO_GAIN = 1e-9


def gain_kept(base: float, expert: float, compressed: float, higher_is_better: bool = False) -> float | None:
    """The share of the expert's gain over the base that the compressed expert keeps (1.0: lossless, 0.0: no better
    than the base); for perplexity ``(base - compressed) / (base - expert)``. None where the expert gained nothing,
    its figure no better than the base's: a ratio of two losses would read as a share kept (1.11 for a compressed
    expert that lost more than the expert did)."""
    sign = 1.0 if higher_is_better else -1.0
    gain = sign * (expert - base)
    return sign * (compressed - base) / gain if gain > NO_GAIN else None


# Per model, (each text's summed negative log-likelihood, each text's tokens or characters)
TextNLL = tuple[Sequence[float], Sequence[float]]


def gain_kept_ci(
    base: TextNLL, expert: TextNLL, compressed: TextNLL, resamples: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float, float]:
    """The share of the expert's perplexity gain over the base that the compressed expert keeps,
    ``(ppl_base - ppl_compressed) / (ppl_base - ppl_expert)``, and its paired-bootstrap interval: one resample
    of the texts serves all three models, so what the texts share cancels and the interval tells a 0.5% shift
    towards the base from the sample."""

    def kept(nb, ub, ne, ue, nc, uc):
        pb, pe, pc = (torch.exp(n.sum(-1) / u.sum(-1).clamp_min(1)) for n, u in ((nb, ub), (ne, ue), (nc, uc)))
        return (pb - pc) / (pb - pe)

    return paired_bootstrap_ci([*base, *expert, *compressed], kept, resamples, level, seed)


def task_hit(metric: str, continuation: str, answer: str) -> bool:
    """Whether a greedy ``continuation`` of a task's prompt gives ``answer`` under ``metric``."""
    if metric == NEXT_LINE:  # the prompt ends at the end of a line: the first non-empty line that follows
        lines = continuation.split("\n")[1:]
        return next((line for line in lines if line.strip()), "").strip() == answer.strip()
    if metric == FINAL_NUMBER:
        stated = re.search(r"answer is\s*\$?(-?\d+)", continuation)
        numbers = re.findall(r"-?\d+", continuation)
        got = stated.group(1) if stated else (numbers[-1] if numbers else None)
        return got == answer
    if metric == TASK_EXACT_MATCH:
        return continuation.startswith(answer) and not continuation[len(answer) : len(answer) + 1].isdigit()
    raise ValueError(f"unknown task metric {metric!r}")


def task_decided(metric: str, continuation: str, answer: str) -> bool:
    """Whether :func:`task_hit`'s verdict on ``continuation`` holds for every longer continuation that starts with
    it: generation can stop there."""
    if metric == NEXT_LINE:  # a non-empty line after the prompt's line, and the newline that ends it
        return any(line.strip() for line in continuation.split("\n")[1:-1])
    if metric == FINAL_NUMBER:  # "answer is N" with something after N: the first statement is the one read
        stated = re.search(r"answer is\s*\$?(-?\d+)", continuation)
        return stated is not None and stated.end() < len(continuation)
    if metric == TASK_EXACT_MATCH:  # past the answer, or off it
        return len(continuation) > len(answer) or not answer.startswith(continuation)
    raise ValueError(f"unknown task metric {metric!r}")


def _stop_when_decided(tokenizer, metric: str, answers: Sequence[str], prompt_len: int):
    """Stopping criteria for a greedy batch: a row stops once its verdict is decided (:func:`task_decided`), the
    batch once every row's is; the longest reply a metric allows is rarely needed (a line of code, a worked
    answer's last sentence)."""
    from transformers import StoppingCriteria, StoppingCriteriaList  # lazily: transformers takes a second

    class Decided(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
            texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
            # a character whose bytes have not all come decodes as U+FFFD for now: it may yet be a digit (fullwidth)
            done = [task_decided(metric, t.rstrip("\ufffd"), a) for t, a in zip(texts, answers, strict=True)]
            return torch.tensor(done, dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Decided()])


@torch.no_grad()
def task_hits(model, tokenizer, tasks: Sequence[Task | tuple[str, str]], batch_size: int = 64) -> list[bool]:
    """Per task, in order, whether its greedy continuation hits the answer (:func:`task_hit`).

    Prompts of one metric are generated together, left-padded, ``batch_size`` at a time; a row stops once its
    verdict can no longer change (:func:`task_decided`), so the verdicts are those of the longest replies.
    """
    if not tasks:
        raise ValueError("no (prompt, answer) pairs to score")
    tasks = [Task(*t) for t in tasks]
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    hits = [False] * len(tasks)
    try:
        for metric in sorted({t.metric for t in tasks}):
            where = [i for i, t in enumerate(tasks) if t.metric == metric]
            for j in range(0, len(where), batch_size):
                chunk = where[j : j + batch_size]
                enc = tokenizer([tasks[i].prompt for i in chunk], return_tensors="pt", padding=True).to(device)
                start = enc["input_ids"].shape[1]
                out = model.generate(
                    **enc,
                    max_new_tokens=MAX_NEW_TOKENS[metric],
                    do_sample=False,
                    pad_token_id=pad,
                    stopping_criteria=_stop_when_decided(tokenizer, metric, [tasks[i].answer for i in chunk], start),
                )
                texts = tokenizer.batch_decode(out[:, start:], skip_special_tokens=True)
                for i, text in zip(chunk, texts, strict=True):
                    hits[i] = task_hit(metric, text, tasks[i].answer)
    finally:
        tokenizer.padding_side = side
    return hits


def exact_match(model, tokenizer, tasks: Sequence[Task | tuple[str, str]], batch_size: int = 64) -> float:
    """Fraction of tasks whose greedy continuation hits the answer (:func:`task_hits`)."""
    hits = task_hits(model, tokenizer, tasks, batch_size)
    return sum(hits) / len(hits)


def task_scores(model, tokenizer, tasks: Sequence[Task]) -> list[float]:
    """Per task, in order, its score in [0, 1]: a next-line task the share of the line's tokens predicted
    (:func:`next_line_token_accuracy`: the exact next line of unseen code separates nothing at this scale, the
    family's code target asks the same), any other 1 or 0 as its greedy continuation hits the answer or not."""
    tasks = [Task(*t) for t in tasks]
    lines = [i for i, t in enumerate(tasks) if t.metric == NEXT_LINE]
    rest = [i for i, t in enumerate(tasks) if t.metric != NEXT_LINE]
    scores = [0.0] * len(tasks)
    if lines:
        for i, s in zip(lines, next_line_token_accuracy(model, tokenizer, [tasks[i] for i in lines]), strict=True):
            scores[i] = s
    if rest:
        for i, hit in zip(rest, task_hits(model, tokenizer, [tasks[i] for i in rest]), strict=True):
            scores[i] = float(hit)
    return scores


def task_score_name(tasks: Sequence[Task]) -> str | None:
    """What :func:`task_scores` measures on these tasks, for readers of a report."""
    names = {"next-line token accuracy" if t.metric == NEXT_LINE else t.metric for t in tasks}
    return ", ".join(sorted(names)) or None


def task_gain_kept_ci(
    base: Sequence[float],
    expert: Sequence[float],
    compressed: Sequence[float],
    resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """The share of the expert's task-score gain over the base that the compressed expert keeps,
    ``(mean_c - mean_b) / (mean_e - mean_b)`` over per-task scores, and its paired-bootstrap interval over the
    tasks (one resample serves the three models: three problems of 200 is a difference the interval can judge)."""

    def kept(b, e, c):
        return (c.mean(-1) - b.mean(-1)) / (e.mean(-1) - b.mean(-1))

    return paired_bootstrap_ci([base, expert, compressed], kept, resamples, level, seed)


@torch.no_grad()
def next_line_token_accuracy(model, tokenizer, tasks: Sequence[Task]) -> list[float]:
    """Per next-line task, the share of its answer line's tokens the model predicts (greedy, given the true
    prefix): a completion score that still separates models where generating the exact line is out of a small
    model's reach (a 135M model's exact next line of unseen code: 4% with or without a code fine-tune)."""
    device = next(model.parameters()).device
    out = []
    for t in tasks:
        if t.metric != NEXT_LINE:
            raise ValueError(f"token accuracy scores next-line tasks, got {t.metric!r}")
        head = tokenizer(t.prompt, add_special_tokens=False).input_ids
        ids = tokenizer(t.prompt + "\n" + t.answer, add_special_tokens=False).input_ids
        # BPE may merge across the cut: score from the first token the prompt alone does not have
        start = next((i for i, (a, b) in enumerate(zip(head, ids, strict=False)) if a != b), len(head))
        logits = model(torch.tensor([ids], device=device)).logits[0, start - 1 : len(ids) - 1]
        out.append((logits.argmax(-1).cpu() == torch.tensor(ids[start:])).float().mean().item())
    return out
