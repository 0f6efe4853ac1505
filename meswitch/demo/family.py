"""A demo expert family: a small Mistral base pre-trained from scratch, fully fine-tuned into experts.

``build_family(out, size, seed)`` prepares the corpora (see corpora.py), trains a byte-level BPE
tokenizer on the mixed training text, pre-trains the base on all core domains, fine-tunes every
weight of a copy of it on each domain, measures perplexities, and writes the inbox layout:

    out/base/                      Hugging Face folder (config.json, model.safetensors, tokenizer)
    out/experts/<name>/            the same, plus expert.yaml, calib.jsonl and eval.jsonl
    out/extra/<name>/              the fifth domain's expert (only with extra_domain=True)
    out/data/<domain>/{train,calib,eval}.jsonl
    out/routing/{train,test}.jsonl user-style queries of every domain built, labelled with it
    out/family.json                sizes, seeds, losses, perplexities, wall times, sources and licences

The whole folder is built beside ``out`` and renamed into place, so a crash leaves nothing half-written.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import math
import os
import platform
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from meswitch.demo.corpora import (
    CORE_DOMAINS,
    DESCRIPTIONS,
    EXTRA_DOMAINS,
    TASKS,
    Corpus,
    Doc,
    load_corpus,
    routing_queries,
)
from meswitch.devices import bf16_autocast
from meswitch.processes import pid_alive

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>")  # ids 0, 1, 2


@dataclass(frozen=True)
class FamilySpec:
    """Everything a family's size decides: the model, the training budget and the data split sizes."""

    size: str
    # model (MistralForCausalLM, untied lm_head, grouped-query attention)
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    # training
    seq_len: int
    batch_size: int
    base_steps: int
    base_lr: float
    expert_steps: int
    expert_lr: float
    warmup_steps: int
    # data, per domain
    max_train_docs: int
    tokenizer_chars: int
    calib_docs: int
    eval_docs: int
    routing_train: int
    routing_test: int
    eval_texts: int  # eval texts per domain scored for family.json
    task_prompts: int  # math prompts scored by greedy exact match
    math_problems: int
    device: str = "cpu"  # "auto": CUDA when available
    threads: int = 0  # torch CPU threads; 0: every core this process may use

    def model_config(self):
        from transformers import MistralConfig

        return MistralConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            num_key_value_heads=self.num_kv_heads,
            max_position_embeddings=4 * self.seq_len,
            tie_word_embeddings=False,
            sliding_window=None,
            rope_theta=10000.0,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
        )


SIZES: dict[str, FamilySpec] = {
    # For tests: about half a minute on 2 CPU cores.
    "micro": FamilySpec(
        size="micro",
        hidden_size=64,
        intermediate_size=192,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=512,
        seq_len=128,
        batch_size=8,
        base_steps=200,
        base_lr=3e-3,
        expert_steps=50,
        expert_lr=3e-3,
        warmup_steps=10,
        max_train_docs=1500,
        tokenizer_chars=120_000,
        calib_docs=16,
        eval_docs=24,
        routing_train=40,
        routing_test=20,
        eval_texts=24,
        task_prompts=8,
        math_problems=2000,
        threads=1,  # a model this small runs no faster on two threads, and far slower on a busy machine
    ),
    # The default: under ten minutes on 2 CPU cores, corpus preparation included.
    "tiny": FamilySpec(
        size="tiny",
        hidden_size=192,
        intermediate_size=512,
        num_layers=4,
        num_heads=4,
        num_kv_heads=2,
        vocab_size=4096,
        seq_len=256,
        batch_size=8,
        base_steps=700,
        base_lr=2e-3,
        expert_steps=120,
        expert_lr=1e-3,
        warmup_steps=30,
        max_train_docs=12_000,
        tokenizer_chars=600_000,
        calib_docs=128,
        eval_docs=200,
        routing_train=400,
        routing_test=100,
        eval_texts=96,
        task_prompts=48,
        math_problems=14_000,
    ),
    # For a GPU.
    "small": FamilySpec(
        size="small",
        hidden_size=512,
        intermediate_size=1536,
        num_layers=8,
        num_heads=8,
        num_kv_heads=4,
        vocab_size=8192,
        seq_len=512,
        batch_size=32,
        base_steps=4000,
        base_lr=1e-3,
        expert_steps=800,
        expert_lr=3e-4,
        warmup_steps=200,
        max_train_docs=200_000,
        tokenizer_chars=3_000_000,
        calib_docs=256,
        eval_docs=400,
        routing_train=1000,
        routing_test=250,
        eval_texts=256,
        task_prompts=200,
        math_problems=60_000,
        device="auto",
    ),
}


# --------------------------------------------------------------------------------------------------
# Training: a short AdamW loop in the manner of nanoGPT's train.py


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    # bf16 autocast on the CPU too (on CUDA always), where the CPU computes bf16 natively (devices.bf16_autocast):
    # 2-3x faster there with AMX; emulated elsewhere and slower than fp32, so fp32 there
    autocast: bool = False


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then cosine decay to ``min_lr_ratio * lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def get_batch(
    streams: list[torch.Tensor],
    cfg: TrainConfig,
    gen: torch.Generator,
    device,
    labels: list[torch.Tensor] | None = None,
) -> tuple:
    """Random windows; each row picks a stream (domain) uniformly, so every domain gets an equal share.

    ``labels``: per stream, the targets (-100 where a token is read but not learned); default the stream.
    """
    rows, targets = [], []
    which = torch.randint(len(streams), (cfg.batch_size,), generator=gen)
    for i in which.tolist():
        s = streams[i]
        start = int(torch.randint(len(s) - cfg.seq_len - 1, (1,), generator=gen))
        rows.append(s[start : start + cfg.seq_len + 1])
        targets.append((labels or streams)[i][start + 1 : start + cfg.seq_len + 1])
    batch = torch.stack(rows).to(device)
    return batch[:, :-1], torch.stack(targets).to(device)


def train(
    model, streams: list[torch.Tensor], cfg: TrainConfig, seed: int, desc: str, labels: list[torch.Tensor] | None = None
) -> float:
    """Train in place; return the mean loss of the last tenth of the steps (``labels``: see :func:`get_batch`)."""
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        # one pass over parameters, gradients and moments: on a 2-core host with 5-7 GB/s of memory a SmolLM2 step
        # 0.58 -> 0.14 s (foreach streams its intermediates through memory), about a tenth of a short fine-tune step
        fused=True,
    )
    autocast = bf16_autocast(device, device.type == "cuda" or cfg.autocast)
    model.train()
    losses: list[float] = []
    log_every = max(1, cfg.steps // 10)
    t0 = time.perf_counter()
    bar = tqdm(range(cfg.steps), desc=desc, leave=False, disable=None)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        x, y = get_batch(streams, cfg, gen, device, labels)
        with autocast:
            logits = model(input_ids=x).logits
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}", lr=f"{group['lr']:.1e}")
        if (step + 1) % log_every == 0:
            rate = (step + 1) * cfg.batch_size * cfg.seq_len / (time.perf_counter() - t0)
            # INFO where no progress bar is drawn (not a terminal), so a long build still shows progress
            log.log(
                logging.INFO if bar.disable else logging.DEBUG,
                "%s: step %d/%d, loss %.3f, lr %.1e, %.0f tokens/s",
                desc,
                step + 1,
                cfg.steps,
                losses[-1],
                group["lr"],
                rate,
            )
    model.eval()
    tail = losses[-max(1, cfg.steps // 10) :]
    final = sum(tail) / len(tail)
    seconds = time.perf_counter() - t0
    log.info(
        "%s: %d steps in %.0f s (%.0f tokens/s), final loss %.4f",
        desc,
        cfg.steps,
        seconds,
        cfg.steps * cfg.batch_size * cfg.seq_len / seconds,
        final,
    )
    return final


# --------------------------------------------------------------------------------------------------
# Data: splits, tokenizer, token streams


@dataclass
class DomainData:
    domain: str
    corpus: Corpus
    train: list[Doc]
    calib: list[Doc]
    eval: list[Doc]
    routing_train: list[str]
    routing_test: list[str]


def split_domain(corpus: Corpus, spec: FamilySpec, seed: int) -> DomainData:
    """Deterministic, disjoint train/calib/eval splits; code is split by module so no file straddles two."""
    seen: set[str] = set()
    groups: dict[str, list[Doc]] = {}
    for doc in corpus.docs:
        if doc["text"] in seen:
            continue
        seen.add(doc["text"])
        key = (doc.get("module") or doc["text"]) if corpus.domain == "code" else doc["text"]
        groups.setdefault(key, []).append(doc)
    keys = list(groups)
    rng = random.Random(f"meswitch-split-{seed}-{corpus.domain}")
    rng.shuffle(keys)
    parts: list[list[Doc]] = [[], [], []]  # eval, calib, train
    limits = [spec.eval_docs, spec.calib_docs, spec.max_train_docs]
    k = 0
    for i, limit in enumerate(limits):
        while k < len(keys) and len(parts[i]) < limit:
            parts[i].extend(groups[keys[k]])
            k += 1
        parts[i] = parts[i][:limit] if i == 2 else parts[i]
    eval_docs, calib_docs, train_docs = parts
    if len(train_docs) < len(eval_docs) or not eval_docs or not calib_docs:
        raise ValueError(f"domain {corpus.domain}: too few documents ({len(corpus.docs)}) for size {spec.size}")
    qrng = random.Random(f"meswitch-routing-{seed}-{corpus.domain}")
    r_train = routing_queries(corpus.domain, train_docs, spec.routing_train, qrng)
    held = set(r_train)
    r_test = [q for q in routing_queries(corpus.domain, eval_docs, 2 * spec.routing_test, qrng) if q not in held]
    return DomainData(corpus.domain, corpus, train_docs, calib_docs, eval_docs, r_train, r_test[: spec.routing_test])


def train_tokenizer(data: list[DomainData], spec: FamilySpec):
    """Byte-level BPE on an equal share of each domain's training text; digits are split one by one so
    'Answer: ' followed by a number tokenizes the same whether or not the number is there."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def texts() -> Iterator[str]:
        for d in data:
            budget = spec.tokenizer_chars
            for doc in d.train:
                if budget <= 0:
                    break
                budget -= len(doc["text"])
                yield doc["text"]

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", 1)]
    )
    if [tok.token_to_id(t) for t in SPECIAL_TOKENS] != [0, 1, 2]:
        raise RuntimeError("special tokens did not get ids 0, 1, 2")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>", model_max_length=4 * spec.seq_len
    )


def token_stream(tokenizer, docs: list[Doc], min_len: int) -> torch.Tensor:
    """<bos> doc <eos> <bos> doc <eos> ... as one 1-D tensor, repeated if shorter than ``min_len``."""
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch([d["text"] for d in docs], add_special_tokens=False):
        ids.append(tokenizer.bos_token_id)
        ids.extend(enc.ids)
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("no training text")
    reps = max(1, math.ceil(min_len / len(ids)))
    return torch.tensor(ids * reps, dtype=torch.long)


# --------------------------------------------------------------------------------------------------
# Building


def build_family(
    out: Path, size: str = "tiny", seed: int = 0, extra_domain: bool = False, threads: int | None = None
) -> Path:
    """Build (or find already built) the demo family at ``out``; returns ``out``.

    Idempotent: when ``out/family.json`` records the same size and seed nothing is rebuilt; asking for
    the extra domain on such a folder adds only ``extra/`` (the base does not depend on it). Results are
    bitwise reproducible for the same seed, machine and number of threads.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(SIZES)}")
    spec = SIZES[size] if threads is None else replace(SIZES[size], threads=threads)
    out = Path(out).expanduser().resolve()
    manifest = out / "family.json"
    if manifest.is_file():
        family = json.loads(manifest.read_text(encoding="utf-8"))
        if (family.get("size"), family.get("seed")) != (size, seed):
            raise FileExistsError(
                f"{out} holds a family of size {family.get('size')!r} seed {family.get('seed')}, not "
                f"{size!r} seed {seed}; choose another --out or remove it"
            )
        missing = [d for d in EXTRA_DOMAINS if d not in family.get("extra", {})] if extra_domain else []
        if not missing:
            log.info("%s: family (size %s, seed %d) already built; nothing to do", out, size, seed)
            return out
        with _threads(spec):
            _add_extra(out, family, spec, seed, missing)
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists, is not empty and has no family.json; choose another --out")

    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(out.parent, f".{out.name}.building-")
    tmp = out.parent / f".{out.name}.building-{os.getpid()}"
    try:
        with _threads(spec):
            _build(tmp, spec, seed, list(EXTRA_DOMAINS) if extra_domain else [])
        if out.exists():
            out.rmdir()  # empty, checked above
        tmp.rename(out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("family written to %s", out)
    return out


def _build(root: Path, spec: FamilySpec, seed: int, extra: list[str]) -> None:
    from transformers import MistralForCausalLM

    t0 = time.perf_counter()
    walls: dict[str, float] = {}
    device = _device(spec)
    data = {
        d: split_domain(load_corpus(d, seed=seed, n_generated=spec.math_problems), spec, seed) for d in CORE_DOMAINS
    }
    walls["corpora"] = time.perf_counter() - t0

    t = time.perf_counter()
    tokenizer = train_tokenizer(list(data.values()), spec)
    walls["tokenizer"] = time.perf_counter() - t
    for d in data.values():
        _write_data(root, d)
    _write_routing(root / "routing", list(data.values()))

    min_len = 4 * spec.batch_size * (spec.seq_len + 1)
    streams = {d: token_stream(tokenizer, data[d].train, min_len) for d in CORE_DOMAINS}

    t = time.perf_counter()
    torch.manual_seed(seed)
    base = MistralForCausalLM(spec.model_config()).to(device)
    base_cfg = TrainConfig(spec.base_steps, spec.batch_size, spec.seq_len, spec.base_lr, spec.warmup_steps)
    base_loss = train(base, list(streams.values()), base_cfg, seed, "base")
    walls["base"] = time.perf_counter() - t
    _save_model(base, tokenizer, root / "base")
    n_params = sum(p.numel() for p in base.parameters())

    experts, expert_models = {}, {}
    t = time.perf_counter()
    for i, d in enumerate(CORE_DOMAINS):
        model, info = _fine_tune(base, data[d], streams[d], tokenizer, spec, seed + 1 + i)
        _save_expert(model, tokenizer, root / "experts" / d, data[d])
        experts[d] = {**info, "path": f"experts/{d}"}
        expert_models[d] = model
    walls["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    ppl = {"base": _perplexities(base, tokenizer, data, spec)}
    for d, model in expert_models.items():
        ppl[d] = _perplexities(model, tokenizer, data, spec)
        experts[d]["ppl_own_domain"] = ppl[d][d]
        experts[d]["base_ppl_own_domain"] = ppl["base"][d]
    task = _task_scores(base, expert_models, tokenizer, data, spec)
    walls["evaluation"] = time.perf_counter() - t

    family = {
        "format": FORMAT_VERSION,
        "size": spec.size,
        "seed": seed,
        "spec": asdict(spec),
        "architecture": "MistralForCausalLM",
        "parameters": n_params,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "domains": list(CORE_DOMAINS),
        "tokenizer": {
            "type": "byte-level BPE, digits split individually",
            "vocab_size": len(tokenizer),
            "special_tokens": list(SPECIAL_TOKENS),
            "trained_on": list(CORE_DOMAINS),
        },
        "base": {
            "path": "base",
            "train_loss": base_loss,
            "steps": spec.base_steps,
            "tokens_seen": spec.base_steps * spec.batch_size * spec.seq_len,
            "lr": spec.base_lr,
            "trained_on": list(CORE_DOMAINS),
            "seconds": round(walls["base"], 2),
        },
        "experts": experts,
        "extra": {},
        "perplexity": ppl,
        "task_scores": task,
        "data": {d: _data_summary(data[d], streams[d]) for d in CORE_DOMAINS},
        "sources": {d: asdict(data[d].corpus.source) for d in CORE_DOMAINS},
        "routing": {"train": "routing/train.jsonl", "test": "routing/test.jsonl", "domains": list(CORE_DOMAINS)},
        "versions": _versions(),
    }
    walls["total"] = time.perf_counter() - t0
    family["wall_seconds"] = {k: round(v, 2) for k, v in walls.items()}
    _write_json(root / "family.json", family)
    if extra:
        _add_extra(root, family, spec, seed, extra, base=base, tokenizer=tokenizer)


def _add_extra(
    root: Path, family: dict, spec: FamilySpec, seed: int, domains: list[str], base=None, tokenizer=None
) -> None:
    """Fine-tune the base on each extra domain: write extra/<name>/ and data/<domain>/, and add the domain's
    queries to routing/{train,test}.jsonl (routers pick the lines of the domains they serve)."""
    from transformers import AutoTokenizer, MistralForCausalLM

    t0 = time.perf_counter()
    device = _device(spec)
    if base is None:
        base = MistralForCausalLM.from_pretrained(root / "base", dtype=torch.float32).to(device)
        tokenizer = AutoTokenizer.from_pretrained(root / "base")
    _remove_stale(root, ".extra.building-")
    tmp = root / f".extra.building-{os.getpid()}"
    try:
        data = {}
        for d in domains:
            data[d] = split_domain(load_corpus(d, seed=seed), spec, seed)
            _write_data(tmp, data[d])
            stream = token_stream(tokenizer, data[d].train, 4 * spec.batch_size * (spec.seq_len + 1))
            model, info = _fine_tune(
                base, data[d], stream, tokenizer, spec, seed + 1 + len(CORE_DOMAINS) + EXTRA_DOMAINS.index(d)
            )
            _save_expert(model, tokenizer, tmp / "extra" / d, data[d])
            own = _perplexities(model, tokenizer, {d: data[d]}, spec)[d]
            base_own = _perplexities(base, tokenizer, {d: data[d]}, spec)[d]
            family["extra"][d] = {**info, "path": f"extra/{d}", "ppl_own_domain": own, "base_ppl_own_domain": base_own}
            family["data"][d] = _data_summary(data[d], stream)
            family["sources"][d] = asdict(data[d].corpus.source)
        _write_routing(tmp / "routing", list(data.values()), keep=root / "routing")
        # Move into place; anything there already is a leftover of a crash (family.json does not list it).
        for rel in [*(f"data/{d}" for d in domains), *(f"extra/{d}" for d in domains)]:
            dest = root / rel
            if dest.exists():
                shutil.rmtree(dest)
            dest.parent.mkdir(parents=True, exist_ok=True)
            (tmp / rel).rename(dest)
        for split in ("train", "test"):
            (tmp / "routing" / f"{split}.jsonl").replace(root / "routing" / f"{split}.jsonl")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    family["routing"]["domains"] = [*CORE_DOMAINS, *sorted(family["extra"])]
    family["wall_seconds"]["extra"] = round(family["wall_seconds"].get("extra", 0) + time.perf_counter() - t0, 2)
    _write_json(root / "family.json", family)
    log.info("extra experts %s written under %s", ", ".join(domains), root / "extra")


def _fine_tune(base, data: DomainData, stream: torch.Tensor, tokenizer, spec: FamilySpec, seed: int):
    """Full fine-tuning (every weight) of a copy of the base on one domain."""
    model = copy.deepcopy(base)
    cfg = TrainConfig(spec.expert_steps, spec.batch_size, spec.seq_len, spec.expert_lr, max(1, spec.warmup_steps // 3))
    t = time.perf_counter()
    loss = train(model, [stream], cfg, seed, f"expert {data.domain}")
    info = {
        "domain": data.domain,
        "train_loss": loss,
        "steps": cfg.steps,
        "lr": cfg.lr,
        "seed": seed,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": round(time.perf_counter() - t, 2),
        "task": TASKS.get(data.domain),
    }
    return model, info


@torch.no_grad()
def _perplexities(model, tokenizer, data: dict[str, DomainData], spec: FamilySpec) -> dict[str, float]:
    from meswitch.evaluation.metrics import perplexity

    model.eval()
    return {
        d: round(perplexity(model, tokenizer, [x["text"] for x in dd.eval[: spec.eval_texts]], max_len=spec.seq_len), 4)
        for d, dd in data.items()
    }


def _task_scores(base, experts: dict, tokenizer, data: dict[str, DomainData], spec: FamilySpec) -> dict:
    from meswitch.evaluation.metrics import exact_match

    scores = {}
    for d, task in TASKS.items():
        if d not in experts:
            continue
        pairs = [(x["prompt"], x["answer"]) for x in data[d].eval[: spec.task_prompts]]
        scores[d] = {
            "metric": task,
            "prompts": len(pairs),
            "base": exact_match(base, tokenizer, pairs),
            "expert": exact_match(experts[d], tokenizer, pairs),
        }
        log.info(
            "%s on %d %s prompts: base %.3f, expert %.3f", task, len(pairs), d, scores[d]["base"], scores[d]["expert"]
        )
    return scores


# --------------------------------------------------------------------------------------------------
# Writing


def _save_model(model, tokenizer, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def _save_expert(model, tokenizer, folder: Path, data: DomainData) -> None:
    _save_model(model, tokenizer, folder)
    _write_jsonl(folder / "calib.jsonl", [_row(data.domain, x) for x in data.calib])
    _write_jsonl(folder / "eval.jsonl", [_row(data.domain, x) for x in data.eval])
    card = {
        "name": data.domain,
        "domain": data.domain,
        "description": DESCRIPTIONS[data.domain],
        "examples": data.routing_train[:12],
        "calibration": "calib.jsonl",
        "evaluation": "eval.jsonl",
        "task": TASKS.get(data.domain),
    }
    (folder / "expert.yaml").write_text(
        yaml.safe_dump(card, allow_unicode=True, sort_keys=False, width=1000), encoding="utf-8"
    )


def _row(domain: str, doc: Doc) -> dict:
    """A JSONL line: ``text``, plus ``prompt`` and ``answer`` where the domain has an exact-match task."""
    if domain in TASKS:
        return {"text": doc["text"], "prompt": doc["prompt"], "answer": doc["answer"]}
    return {"text": doc["text"]}


def _write_data(root: Path, d: DomainData) -> None:
    folder = root / "data" / d.domain
    for split, docs in (("train", d.train), ("calib", d.calib), ("eval", d.eval)):
        _write_jsonl(folder / f"{split}.jsonl", [_row(d.domain, x) for x in docs])


def _write_routing(folder: Path, data: list[DomainData], keep: Path | None = None) -> None:
    """Queries of ``data``'s domains in a seeded order, after the lines of other domains in ``keep``."""
    new = {d.domain for d in data}
    for split in ("train", "test"):
        rows = [
            {"text": q, "domain": d.domain}
            for d in data
            for q in (d.routing_train if split == "train" else d.routing_test)
        ]
        random.Random(f"meswitch-routing-order-{split}-{'-'.join(sorted(new))}").shuffle(rows)
        if keep is not None:
            rows = [r for r in _read_jsonl(keep / f"{split}.jsonl") if r["domain"] not in new] + rows
        _write_jsonl(folder / f"{split}.jsonl", rows)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _data_summary(d: DomainData, stream: torch.Tensor) -> dict:
    return {
        "train": len(d.train),
        "calib": len(d.calib),
        "eval": len(d.eval),
        "train_tokens": len(stream),
        "routing_train": len(d.routing_train),
        "routing_test": len(d.routing_test),
    }


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


# --------------------------------------------------------------------------------------------------


def _remove_stale(folder: Path, prefix: str) -> None:
    """Delete the build folders (``<prefix><pid>``) that a killed build left, and ours from an earlier call."""
    for path in folder.glob(f"{prefix}*"):
        pid = path.name.removeprefix(prefix)
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            log.info("removing %s, left by an interrupted build", path)
            shutil.rmtree(path, ignore_errors=True)


def _device(spec: FamilySpec) -> torch.device:
    if spec.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(spec.device)


@contextlib.contextmanager
def _threads(spec: FamilySpec):
    """Use the spec's thread count (default: every core we may run on); restore the caller's after."""
    before = torch.get_num_threads()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    torch.set_num_threads(spec.threads or max(1, cores))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _versions() -> dict:
    import tokenizers
    import transformers

    import meswitch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
        "meswitch": meswitch.__version__,
    }
