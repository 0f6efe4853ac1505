"""Evaluate compressed artifacts against their full expert and the base."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer

from meswitch.checkpoints import Checkpoint, scan
from meswitch.compression.methods import applied_bits
from meswitch.compression.reconstruct import load_expert_model, open_artifact
from meswitch.evaluation.metrics import (
    Comparison,
    EvalData,
    Likelihood,
    Scorer,
    compare,
    gain_kept,
    likelihood,
    task_score_name,
    task_scores,
)
from meswitch.processes import check_stop

# A per-text list's field metadata: ``meswitch evaluate --json`` prints it, the summary leaves it out
PER_TEXT = {"per_text": True}
Scores = TypeVar("Scores", Likelihood, Comparison)


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
    gain_retained: float | None  # (ppl_base - ppl_compressed) / (ppl_base - ppl_expert): 1.0 is lossless; None
    # where the expert gained nothing over its base
    task_score_base: float | None
    task_score_expert: float | None
    task_score_compressed: float | None
    task_gain_retained: float | None  # the same share for the task score; None without a task or a gain
    bits_per_param: float
    delta_bytes: int
    fp16_delta_bytes: int
    ppl_unit: str = "token"  # "char" where the expert's vocabulary differs from its base's
    compress_seconds: float | None = None
    device: str | None = None  # where the artifact was compressed
    # Per eval text, what paired intervals resample: KL summed over its tokens and their count; its negative
    # log-likelihood (nats) summed under the base, the expert and the compressed expert, and what perplexity
    # divides it by (tokens, or characters where ppl_unit is "char"; the base's own where its tokenizer differs):
    # ppl_base == exp(sum(nll_text_sums_base) / sum(nll_text_units_base)), and so on; nll_text_units serves the
    # expert and the compressed expert (one tokenizer).
    kl_text_sums: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    kl_text_tokens: list[int] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    nll_text_sums_base: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    nll_text_sums_expert: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    nll_text_sums_compressed: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    nll_text_units_base: list[int] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    nll_text_units: list[int] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    # What the task score measures (metrics.task_score_name), and per task its score under each model: the task
    # score is their mean, and a paired interval on the task gain resamples them.
    task_metric: str | None = None
    task_item_scores_base: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    task_item_scores_expert: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)
    task_item_scores_compressed: list[float] = field(default_factory=list, repr=False, metadata=PER_TEXT)

    def to_dict(self, per_text: bool = False) -> dict:
        """The figures; with ``per_text`` also the per-text lists."""
        out = dataclasses.asdict(self)
        hidden = set() if per_text else {f.name for f in dataclasses.fields(self) if f.metadata.get("per_text")}
        return {k: v for k, v in out.items() if k not in hidden}


def _mean(scores: list[float]) -> float | None:
    """A task score from per-task scores; None without tasks."""
    return sum(scores) / len(scores) if scores else None


def _tokenizer(folder: Path):
    tok = AutoTokenizer.from_pretrained(folder)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


class Evaluator:
    """Holds the full expert and the base figures, so many artifacts of one expert cost one load each."""

    def __init__(
        self,
        base_dir: Path,
        expert_dir: Path,
        data: EvalData,
        device="cpu",
        max_len: int = 256,
        keep_bytes: int = 2 << 30,
    ):
        """``keep_bytes``: how much of the expert's log-probabilities to keep between artifacts (:class:`Scorer`):
        past it, batches are scored again."""
        self.base = Checkpoint(base_dir)
        self.base_dir, self.expert_dir = Path(base_dir), Path(expert_dir)
        self.data, self.device, self.max_len = data, torch.device(device), max_len
        self.batch_size = 32 if self.device.type == "cuda" else 8  # on a GPU, fewer launches per text
        self.tokenizer = _tokenizer(expert_dir)
        self.expert = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).to(self.device).eval()
        self._reference = Scorer(self.expert, keep_bytes)  # the expert's log-probabilities, one pass for all
        # An expert that added tokens reads the texts in other tokens than its base: perplexities per character
        self.per_char = Checkpoint(expert_dir).config.get("vocab_size") != self.base.config.get("vocab_size")

    @cached_property
    def base_fingerprint(self) -> str:
        return scan(self.base).fingerprint

    @cached_property
    def expert_fingerprint(self) -> str:
        return scan(Checkpoint(self.expert_dir)).fingerprint

    @cached_property
    def _expert_nll(self) -> Likelihood:
        return self._likelihood(self._reference, self.tokenizer, "expert")

    @cached_property
    def ppl_expert(self) -> float:
        return self._expert_nll.perplexity(self.per_char)

    @cached_property
    def _task_items_expert(self) -> list[float]:
        return task_scores(self.expert, self.tokenizer, self.data.tasks) if self.data.tasks else []

    @property
    def task_expert(self) -> float | None:
        return _mean(self._task_items_expert)

    @cached_property
    def _base_model(self):
        return AutoModelForCausalLM.from_pretrained(self.base_dir, dtype=torch.float32).to(self.device).eval()

    @cached_property
    def _base_nll(self) -> Likelihood:
        return self._likelihood(self._base_model, _tokenizer(self.base_dir), "base")

    @cached_property
    def ppl_base(self) -> float:
        return self._base_nll.perplexity(self.per_char)

    @cached_property
    def _task_items_base(self) -> list[float]:
        return task_scores(self._base_model, _tokenizer(self.base_dir), self.data.tasks) if self.data.tasks else []

    @property
    def task_base(self) -> float | None:
        return _mean(self._task_items_base)

    def release_base(self) -> None:
        """Free the base model once its figures are known."""
        _ = self.ppl_base, self._task_items_base
        self.__dict__.pop("_base_model", None)

    def rounded_to_bf16(self) -> dict:
        """The full expert with its weights rounded to bf16, scored like an artifact: the error a merged bf16
        copy of the expert carries before any compression (zero for an expert saved in bf16), in KL and in
        gain kept, with the per-text figures of :class:`EvalResult`."""
        return self.score(copy.deepcopy(self.expert).to(torch.bfloat16).float(), "bf16 expert")

    def score(self, model, what: str = "compressed") -> dict:
        """Any model in the compressed expert's place (``what`` names it on the progress bar): mean KL, perplexity,
        gain kept and the per-text lists."""
        c = self._compare(model, what)
        ppl = c.perplexity(self.per_char)
        return {
            "kl": float(f"{sum(c.kl_sums) / max(sum(c.tokens), 1):.6g}"),
            "ppl": round(ppl, 4),
            "ppl_ratio": round(ppl / self.ppl_expert, 5),
            "gain_retained": self._gain_kept(ppl),
            **self._per_text(c),
        }

    def _gain_kept(self, ppl: float) -> float | None:
        """The share of the expert's perplexity gain over the base that a model of perplexity ``ppl`` keeps."""
        kept = gain_kept(self.ppl_base, self.ppl_expert, ppl)
        return None if kept is None else round(kept, 4)

    def _per_text(self, c: Comparison) -> dict:
        """:class:`EvalResult`'s per-text lists for a candidate compared with the expert. NLL sums to 1e-5 nats:
        gain kept rests on differences of about 1e-3 in mean NLL, so relative rounding would blur it."""
        nll = {"base": self._base_nll, "expert": self._expert_nll, "compressed": c}
        return {
            "kl_text_sums": [float(f"{v:.6g}") for v in c.kl_sums],
            "kl_text_tokens": [int(n) for n in c.tokens],
            **{f"nll_text_sums_{k}": [round(v, 5) for v in m.nll_sums] for k, m in nll.items()},
            "nll_text_units_base": [int(n) for n in self._base_nll.units(self.per_char)],
            "nll_text_units": [int(n) for n in c.units(self.per_char)],
        }

    def _likelihood(self, model, tokenizer, what: str) -> Likelihood:
        return self._batched(
            Likelihood,
            what,
            lambda texts, starts: likelihood(model, tokenizer, texts, self.max_len, len(texts), starts),
        )

    def _compare(self, model, what: str) -> Comparison:
        def score(texts, starts):
            return compare(self._reference, model, self.tokenizer, texts, self.max_len, len(texts), starts)

        return self._batched(Comparison, what, score)

    def _batched(
        self, kind: type[Scores], what: str, score: Callable[[Sequence[str], Sequence[int] | None], Scores]
    ) -> Scores:
        """``score`` over the texts a batch at a time, behind a progress bar (a pass over a real model's eval set
        takes tens of seconds on a CPU). The batches are those ``score`` would make itself: the same figures."""
        texts, starts, size = self.data.texts, self.data.score_from, self.batch_size
        out = kind()
        with tqdm(total=len(texts), desc=f"evaluate {what}", unit="text") as bar:
            for i in range(0, len(texts), size):
                check_stop()
                part = score(texts[i : i + size], None if starts is None else starts[i : i + size])
                for f in dataclasses.fields(out):
                    getattr(out, f.name).extend(getattr(part, f.name))
                bar.update(len(part.tokens))
        return out

    def evaluate(self, artifact: Path) -> EvalResult:
        reader = open_artifact(artifact, self.base, self.base_fingerprint)
        m = reader.manifest
        if m.source_fingerprint != self.expert_fingerprint:
            raise ValueError(
                f"{artifact} was made from the expert with fingerprint {m.source_fingerprint[:16]}…, not from "
                f"{self.expert_dir} ({self.expert_fingerprint[:16]}…): its KL against this expert would mean nothing"
            )
        compressed = load_expert_model(self.base, reader, device=self.device)
        scored = self.score(compressed)
        items_c = task_scores(compressed, self.tokenizer, self.data.tasks) if self.data.tasks else []
        task_c = _mean(items_c)
        self.release_base()
        task_gain = None
        if task_c is not None:
            task_gain = gain_kept(self.task_base, self.task_expert, task_c, higher_is_better=True)
            task_gain = None if task_gain is None else round(task_gain, 4)
        return EvalResult(
            name=m.name,
            domain=m.domain,
            method=m.method.get("method", "?"),
            bits=applied_bits(m.method.get("method", "?"), int(m.method.get("bits", 0))),
            salient=float(m.method.get("salient", 0)),
            kl=round(scored["kl"], 6),
            ppl_base=round(self.ppl_base, 4),
            ppl_expert=round(self.ppl_expert, 4),
            ppl_compressed=scored["ppl"],
            ppl_ratio=scored["ppl_ratio"],
            gain_retained=scored["gain_retained"],
            task_score_base=self.task_base,
            task_score_expert=self.task_expert,
            task_score_compressed=task_c,
            task_gain_retained=task_gain,
            bits_per_param=m.metrics["bits_per_param"],
            delta_bytes=m.metrics["delta_bytes"],
            fp16_delta_bytes=m.metrics["fp16_delta_bytes"],
            ppl_unit="char" if self.per_char else "token",
            compress_seconds=m.metrics.get("compress_seconds"),
            device=m.metrics.get("device"),
            **{k: v for k, v in scored.items() if k.startswith(("kl_text_", "nll_text_"))},
            task_metric=task_score_name(self.data.tasks),
            task_item_scores_base=[round(v, 4) for v in self._task_items_base],
            task_item_scores_expert=[round(v, 4) for v in self._task_items_expert],
            task_item_scores_compressed=[round(v, 4) for v in items_c],
        )


def evaluate_artifact(
    base_dir: Path, artifact: Path, expert_dir: Path, data: EvalData, device="cpu", max_len: int = 256
) -> EvalResult:
    """Perplexity of base, expert and compressed expert; KL(expert || compressed); task scores."""
    return Evaluator(base_dir, expert_dir, data, device, max_len).evaluate(artifact)
