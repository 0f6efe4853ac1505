"""The paper's router: a causal LM answers a multiple-choice question over the domains.

The router never generates: it reads the next-token logits after "Answer:" at the option letters
only, and the softmax over those letters is both the choice and its confidence. Supervised
fine-tuning (full, or LoRA through ``peft``) teaches the model to answer with the right letter;
the options are shuffled for every training query so the model learns the domains, not the
letter that usually wins.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from meswitch.devices import bf16_autocast
from meswitch.routing.dataset import Example
from meswitch.routing.prompt import LETTERS, Option, PromptEncoder, letter_token_ids

log = logging.getLogger(__name__)

FINETUNE_MODES = ("full", "lora", "none")


@dataclass
class MCQConfig:
    """How the MCQ router is fine-tuned.

    Training runs ``steps`` optimizer steps (or ``epochs`` passes when given), cycling over the
    queries. ``lr`` None picks a rate by model size: small models trained from scratch (the demo
    family's, under 100M parameters) take 1e-3; larger, pre-trained ones 2e-5 (full) or 2e-4 (LoRA).
    The schedule is a short warm-up, a constant rate, and a linear decay over the last ``decay``
    fraction of the steps. A small LM that was never taught multiple-choice questions sits on a
    plateau (loss ln n) for several hundred steps before it learns to match a query to an option
    line and copy its letter, and when it leaves the plateau varies with the machine's numerics:
    800 steps were enough on an H100 but left the tiny family's router at 83% on 2 CPU cores,
    1600 took it to 96% there; a retrain over one more domain, warm-started (``init_from``), needs
    800 (benchmarks/results/router-2026-11-30.json).
    """

    finetune: str = "full"  # full | lora | none (the un-fine-tuned model, zero-shot)
    steps: int = 1600
    epochs: int | None = None  # when set, replaces ``steps`` by this many passes over the queries
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float = 0.0
    warmup: float = 0.03
    decay: float = 0.2
    max_length: int = 512  # the router's context, capped by the model's max_position_embeddings
    train_query_tokens: int = 48  # queries are cut to this many tokens while training (speed)
    description_words: int = 12  # each option shows its domain and the first words of its description
    orders: int = 0  # option orders averaged when routing: 0 = every cyclic shift, 1 = the listed order only
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "all-linear"
    loss: str = "letters"  # letters: cross-entropy over the option letters only; vocab: over the whole vocabulary
    threads: int | None = None  # torch threads while training (None: leave as set)
    # forward passes in bf16 autocast while training (weights and optimizer stay fp32): 2-3x faster on CPUs
    # with bf16 units, for a pretrained model such as SmolLM2 (on others fp32: devices.bf16_autocast); off by
    # default, as the tiny routers need fp32
    autocast: bool = False
    seed: int = 0

    def __post_init__(self):
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"finetune must be one of {FINETUNE_MODES}, got {self.finetune!r}")
        if self.loss not in ("letters", "vocab"):
            raise ValueError(f"loss must be 'letters' or 'vocab', got {self.loss!r}")
        if self.orders < 0:
            raise ValueError(f"orders must be 0 (every cyclic shift) or a positive count, got {self.orders}")
        if self.steps < 1 or self.batch_size < 1 or (self.epochs is not None and self.epochs < 1):
            raise ValueError("steps, epochs and batch_size must be at least 1")
        if not (0 <= self.warmup < 1 and 0 <= self.decay <= 1 and self.warmup + self.decay <= 1):
            raise ValueError("warmup and decay are fractions of the steps that together are at most 1")

    def learning_rate(self, num_params: int) -> float:
        if self.lr is not None:
            return self.lr
        small = num_params < 100_000_000
        if self.finetune == "lora":
            return 1e-3 if small else 2e-4
        return 1e-3 if small else 2e-5

    def total_steps(self, n_examples: int) -> int:
        return self.steps if self.epochs is None else self.epochs * math.ceil(n_examples / self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


def options_for(domains: Sequence, description_words: int) -> list[Option]:
    """The options a router shows: each domain with the first ``description_words`` words of its description."""
    return [Option(d.domain, " ".join(d.description.split()[:description_words])) for d in domains]


def load_causal_lm(path: Path, device: str = "cpu", dtype: torch.dtype | None = None):
    """A local Hugging Face causal LM and its tokenizer (never downloads)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path}: not a Hugging Face model folder (no config.json)")
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=dtype or torch.float32)
    return model.to(device), tokenizer


def context_length(model, requested: int) -> int:
    limit = getattr(model.config, "max_position_embeddings", None)
    return min(requested, limit) if limit else requested


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def last_token_logits(model, seqs: Sequence[Sequence[int]], pad_id: int, device) -> torch.Tensor:
    """Next-token logits after each sequence, ``[B, vocab]``: one left-padded forward pass."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
        mask[i, width - len(s) :] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids.to(device), attention_mask=mask.to(device), position_ids=pos.to(device), logits_to_keep=1)
    return out.logits[:, -1, :]


class MCQBackend:
    """Scores a fixed, ordered list of domain options with a causal LM.

    With ``orders`` > 1 each query is asked under that many cyclic shifts of the option list (0: all
    of them, so every domain is shown once under every letter) and the per-domain probabilities are
    averaged: a small LM's preference for a letter or a position cancels out, at ``orders`` times the
    compute, all in one batched forward pass. The router was trained on shuffled orders, so every
    shift is a prompt it knows.
    """

    kind = "mcq"

    def __init__(
        self, model, tokenizer, options: Sequence[Option], max_length: int, batch_size: int = 16, orders: int = 1
    ):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.options = list(options)
        self.max_length = context_length(model, max_length)
        self.batch_size = batch_size
        self.encoder = PromptEncoder(tokenizer, self.max_length)
        self.letter_ids = letter_token_ids(tokenizer, len(self.options))
        n = len(self.options)
        count = n if orders == 0 else min(max(1, orders), n)
        self.shifts = [round(i * n / count) for i in range(count)]
        # for shift s the letter j shows option (j + s) % n; the tails are tokenized once
        self.tails = [self.encoder.tail_ids(self.options[s:] + self.options[:s]) for s in self.shifts]
        self.pad_id = _pad_id(tokenizer)
        longest = max(self.tails, key=len)
        if self.encoder.query_budget(len(longest)) < 1:
            self.encoder.encode(self.options, "", longest)  # raises the explanatory error
        # column j of shift s's letter probabilities belongs to domain (j + s) % n: undo it with a gather
        self.unshift = torch.tensor([[(d - s) % n for d in range(n)] for s in self.shifts])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        probs, cut = [], []
        letters = torch.tensor(self.letter_ids, device=self.device)
        k = len(self.shifts)
        per_pass = max(1, self.batch_size // k)
        for i in range(0, len(texts), per_pass):
            chunk = texts[i : i + per_pass]
            enc = [self.encoder.encode(self.options, t, tail) for t in chunk for tail in self.tails]
            logits = last_token_logits(self.model, [e[0] for e in enc], self.pad_id, self.device)
            p = torch.softmax(logits.float()[:, letters], dim=-1).cpu().view(len(chunk), k, -1)
            p = p.gather(2, self.unshift.expand(len(chunk), -1, -1))  # letters -> domains, per shift
            probs.append(p.mean(dim=1))
            cut.extend(any(e[1] for e in enc[j * k : (j + 1) * k]) for j in range(len(chunk)))
        return torch.cat(probs), cut


@dataclass
class TrainStats:
    steps: int
    examples: int
    seconds: float
    first_loss: float
    final_loss: float
    trainable_params: int
    lr: float


def wrap_lora(model, cfg: MCQConfig):
    from peft import LoraConfig, get_peft_model

    target = cfg.lora_targets if cfg.lora_targets == "all-linear" else [t.strip() for t in cfg.lora_targets.split(",")]
    lcfg = LoraConfig(
        task_type="CAUSAL_LM",
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=target,
    )
    return get_peft_model(model, lcfg)


def finetune(model, tokenizer, options: Sequence[Option], train: Sequence[Example], cfg: MCQConfig) -> TrainStats:
    """Supervised fine-tuning in place: for each query, the options in a fresh random order, and the
    cross-entropy of the next token after "Answer:" against the right letter's token, over the
    option letters only (``loss='letters'``, the distribution the router reads) or the whole
    vocabulary (``loss='vocab'``, plain SFT).

    ``model`` may be a peft model (only its adapters train).
    """
    if len(options) > len(LETTERS):
        raise ValueError(f"the MCQ router lists at most {len(LETTERS)} domains, got {len(options)}")
    unknown = sorted({ex.domain for ex in train} - {opt.domain for opt in options})
    if unknown:
        raise ValueError(f"training queries for domains the router does not list: {unknown}")
    with _threads(cfg.threads):
        return _finetune(model, tokenizer, options, train, cfg)


@contextmanager
def _threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch threads, then restore (one thread is often fastest for tiny models on a busy CPU)."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _finetune(model, tokenizer, options: Sequence[Option], train: Sequence[Example], cfg: MCQConfig) -> TrainStats:
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    device = next(model.parameters()).device
    encoder = PromptEncoder(tokenizer, context_length(model, cfg.max_length))
    letter_ids = torch.tensor(letter_token_ids(tokenizer, len(LETTERS)), device=device)
    pad_id = _pad_id(tokenizer)
    params = [p for p in model.parameters() if p.requires_grad]
    lr = cfg.learning_rate(sum(p.numel() for p in model.parameters()))
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=True)  # one pass (demo.family.train)
    total = cfg.total_steps(len(train))
    warm, flat_until = max(1, int(cfg.warmup * total)), int((1 - cfg.decay) * total)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warm, 1.0, (total - s) / max(1, total - flat_until))
    )
    model.train()
    order: list[Example] = []
    losses: list[float] = []
    start = time.perf_counter()
    for step in range(total):
        if len(order) < cfg.batch_size:  # a fresh pass, in a fresh order, when the current one runs out
            more = list(train)
            rng.shuffle(more)
            order += more
        batch, order = order[: cfg.batch_size], order[cfg.batch_size :]
        seqs, targets, shown = [], [], []
        for ex in batch:
            perm = list(options)
            rng.shuffle(perm)  # a new option order for every query: the letter carries no prior
            ids, _ = encoder.encode(perm, ex.text, max_query=cfg.train_query_tokens)
            seqs.append(ids)
            targets.append([o.domain for o in perm].index(ex.domain))
            shown.append(letter_ids[: len(perm)])
        with bf16_autocast(device, cfg.autocast):
            logits = last_token_logits(model, seqs, pad_id, device).float()
        target = torch.tensor(targets, device=device)
        cand = torch.stack(shown)  # [B, n]: the token ids of the letters each query was shown
        if cfg.loss == "letters":
            loss = F.cross_entropy(logits.gather(1, cand), target)
        else:
            loss = F.cross_entropy(logits, cand[torch.arange(len(batch)), target])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if (step + 1) % 50 == 0 or step + 1 == total:
            log.info("mcq sft step %d/%d loss %.4f lr %.2e", step + 1, total, sum(losses[-50:]) / len(losses[-50:]),
                     sched.get_last_lr()[0])  # fmt: skip
    model.eval()
    tail = losses[-min(len(losses), 50) :]
    return TrainStats(
        steps=total,
        examples=total * cfg.batch_size,
        seconds=time.perf_counter() - start,
        first_loss=losses[0] if losses else float("nan"),
        final_loss=sum(tail) / len(tail) if tail else float("nan"),
        trainable_params=sum(p.numel() for p in params),
        lr=lr,
    )
