"""A real expert family: SmolLM2-135M-Instruct fully fine-tuned into domain experts that answer in chat.

``build_chat_family(out, size)`` materializes the base (smollm2.py), turns each domain's documents into
conversations in the base's chat template (chat.py), fine-tunes every weight of a copy of the base on
each domain, and writes the same inbox layout as the from-scratch families (family.py):

    out/base/  out/experts/<domain>/  out/data/<domain>/  out/routing/  out/family.json

Resumable: each expert is written whole (staged, renamed) with its ``train.json``; an interrupted build
run again keeps the base, the data and every finished expert, and trains only what is missing. Experts
are saved in fp32 or bf16 as the spec says per domain, since both kinds come from the wild and what
salience buys can differ between them.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import yaml

from meswitch.artifacts import staging_dir
from meswitch.demo import chat
from meswitch.demo.corpora import DESCRIPTIONS, DOMAINS, load_corpus
from meswitch.demo.family import (
    DomainData,
    TrainConfig,
    _threads,
    _versions,
    _write_json,
    _write_jsonl,
    _write_routing,
    split_domain,
    train,
)
from meswitch.demo.smollm2 import NAME as BASE_NAME
from meswitch.demo.smollm2 import SOURCE_JSON, materialize_base

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
TRAIN_JSON = "train.json"
SCORES_JSON = "scores.json"  # an expert's evaluation figures, kept beside its weights


@dataclass(frozen=True)
class ChatFamilySpec:
    """The fine-tuning budget, the data split sizes and each expert's saved dtype."""

    size: str
    expert_steps: int
    batch_size: int
    seq_len: int
    lr: float
    warmup_steps: int
    max_train_docs: int
    calib_docs: int
    eval_docs: int
    routing_train: int
    routing_test: int
    eval_texts: int  # evaluation texts per domain scored for family.json
    task_prompts: int  # task prompts (math, code) scored by greedy generation
    math_problems: int
    bf16_experts: tuple[str, ...]  # domains whose expert is saved in bf16 (the others in fp32)
    domains: tuple[str, ...] = DOMAINS
    # The vocabulary-extended expert (extra/<VOCAB_EXPERT>/): this domain's expert with this many tokens added
    # (its most frequent characters that the base splits into several tokens), embeddings tied as the base's.
    vocab_domain: str | None = "chinese"
    added_tokens: int = 64
    device: str = "auto"
    threads: int = 0
    token_prompts: int = 200  # next-line tasks (code) also scored by token accuracy: one forward each, cheap

    def dtype_of(self, domain: str) -> torch.dtype:
        return torch.bfloat16 if domain in self.bf16_experts else torch.float32


CHAT_SIZES: dict[str, ChatFamilySpec] = {
    # Short fine-tunes on 2 CPU cores (bf16 autocast: about 3 s a step of 8 x 128 tokens with AMX). 16 steps at
    # 1e-4 lowered code's perplexity by only 14%; 30 at 2e-4 by 17% (every other domain by 40-75%).
    "smol": ChatFamilySpec(
        size="smol",
        expert_steps=30,
        batch_size=8,
        seq_len=128,
        lr=2e-4,
        warmup_steps=3,
        max_train_docs=4000,
        calib_docs=128,
        eval_docs=200,
        routing_train=400,
        routing_test=100,
        eval_texts=48,
        task_prompts=48,
        math_problems=8000,
        bf16_experts=("math", "english"),
    ),
    # Longer fine-tunes for a GPU: real experts move further from their base than a short fine-tune.
    "smol-long": ChatFamilySpec(
        size="smol-long",
        expert_steps=600,
        batch_size=16,
        seq_len=256,
        lr=5e-5,
        warmup_steps=30,
        max_train_docs=40_000,
        calib_docs=256,
        eval_docs=400,
        routing_train=1000,
        routing_test=250,
        eval_texts=200,
        task_prompts=200,
        math_problems=40_000,
        bf16_experts=("math", "english"),
    ),
}

PPL_TARGET = 0.15  # an expert must lower its own domain's perplexity by at least this much
VOCAB_EXPERT = "chinese-vocab"


def build_chat_family(
    out: Path,
    size: str | ChatFamilySpec = "smol",
    seed: int = 0,
    threads: int | None = None,
    experts: Sequence[str] | None = None,
) -> Path:
    """Build (or finish, or find built) the real family at ``out``; returns ``out``.

    ``size``: a name of :data:`CHAT_SIZES`, or a spec of one's own. ``experts``: train only these (default all);
    family.json then lists every expert trained so far, and a later call adds the rest without retraining them.
    """
    if isinstance(size, str) and size not in CHAT_SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {', '.join(CHAT_SIZES)}")
    spec = CHAT_SIZES[size] if isinstance(size, str) else size
    spec = spec if threads is None else replace(spec, threads=threads)
    names = [name for name, _, _ in _plan(Path(out), spec)]
    wanted = list(experts) if experts else names
    if unknown := sorted(set(wanted) - set(names)):
        raise ValueError(f"no expert named {', '.join(unknown)} in size {spec.size!r}; choose of {', '.join(names)}")
    size = spec.size
    out = Path(out).expanduser().resolve()
    record = {"format": FORMAT_VERSION, "size": size, "seed": seed}
    build_json = out / "build.json"  # what is being built here: a stopped build with the same record resumes
    for path in (out / "family.json", build_json):
        if path.is_file():
            have = json.loads(path.read_text(encoding="utf-8"))
            if (have.get("size"), have.get("seed")) != (size, seed):
                raise FileExistsError(
                    f"{out} holds a family of size {have.get('size')!r} seed {have.get('seed')}, not {size!r} "
                    f"seed {seed}; choose another --out or remove it"
                )
            if path.name == "family.json" and set(wanted) <= {*have.get("experts", {}), *have.get("extra", {})}:
                log.info("%s: family (size %s, seed %d) already built; nothing to do", out, size, seed)
                return out
            break
    else:
        # a base written there already (``meswitch base smollm2 --out OUT/base``) is used, anything else refused
        if out.exists() and {p.name for p in out.iterdir()} - {"base"}:
            raise FileExistsError(f"{out} exists, is not empty and has no family.json; choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        _write_json(build_json, record)
    with _threads(spec):
        _build(out, spec, seed, set(wanted))
    log.info("family written to %s", out)
    return out


def _plan(root: Path, spec: ChatFamilySpec) -> list[tuple[str, str, Path]]:
    """Every expert of the size as (name, domain, folder), in training order (its index seeds its training)."""
    plan = [(d, d, root / "experts" / d) for d in spec.domains]
    if spec.vocab_domain:
        plan.append((VOCAB_EXPERT, spec.vocab_domain, root / "extra" / VOCAB_EXPERT))
    return plan


def _build(root: Path, spec: ChatFamilySpec, seed: int, wanted: set[str]) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t0 = time.perf_counter()
    device = torch.device("cuda" if spec.device == "auto" and torch.cuda.is_available() else "cpu")
    walls: dict[str, float] = {}
    base_dir = materialize_base(root / "base")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    walls["base"] = time.perf_counter() - t0

    t = time.perf_counter()
    data = {
        d: split_domain(load_corpus(d, seed=seed, n_generated=spec.math_problems), spec, seed) for d in spec.domains
    }
    for d in data.values():
        _write_data(root, d, tokenizer)
    _write_routing(root / "routing", list(data.values()))
    walls["data"] = time.perf_counter() - t

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).to(device)
    plan = _plan(root, spec)
    experts: dict[str, dict] = {}
    t = time.perf_counter()
    for i, (name, d, folder) in enumerate(plan):
        if (folder / TRAIN_JSON).is_file():
            experts[name] = json.loads((folder / TRAIN_JSON).read_text(encoding="utf-8"))
            log.info("expert %s: already trained; kept", name)
            continue
        if name not in wanted:
            continue
        model, tok = copy.deepcopy(base), tokenizer
        if name == VOCAB_EXPERT:
            tok = extend_vocabulary(model, tokenizer, [doc["text"] for doc in data[d].train], spec.added_tokens)
        stream, labels = _chat_stream(tok, data[d], 4 * spec.batch_size * (spec.seq_len + 1))
        info = _fine_tune(model, stream, labels, spec, d, seed + 1 + i)
        info["added_tokens"] = len(tok) - len(tokenizer)
        _save_expert(model, tok, folder, name, data[d], info, spec.dtype_of(d))
        experts[name] = info
        del model
    walls["experts"] = time.perf_counter() - t

    t = time.perf_counter()
    plan = [p for p in plan if p[0] in experts]  # the family: every expert trained so far
    scores = _evaluate(base, tokenizer, data, spec, device, plan)
    for name, info in experts.items():
        info.update(scores["experts"][name])
    walls["evaluation"] = time.perf_counter() - t
    source = json.loads((base_dir / SOURCE_JSON).read_text(encoding="utf-8"))
    family = {
        "format": FORMAT_VERSION,
        "size": spec.size,
        "seed": seed,
        "spec": asdict(spec),
        "architecture": "LlamaForCausalLM",
        "parameters": sum(p.numel() for p in base.parameters()),
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "domains": list(spec.domains),
        "base": {"path": "base", "name": BASE_NAME, "source": source, "perplexity": scores["base"]},
        "experts": {d: {**experts[d], "path": f"experts/{d}"} for d in spec.domains if d in experts},
        "extra": {n: {**experts[n], "path": str(f.relative_to(root))} for n, _, f in plan if n not in spec.domains},
        "targets": {
            "ppl_reduction_at_least": PPL_TARGET,
            "task_above_base": True,
            "all_met": all(e["beats_base"] for e in experts.values()),
        },
        "data": {d: _data_summary(data[d]) for d in spec.domains},
        "sources": {d: asdict(data[d].corpus.source) for d in spec.domains},
        "routing": {"train": "routing/train.jsonl", "test": "routing/test.jsonl", "domains": list(spec.domains)},
        "versions": _versions(),
    }
    walls["total"] = time.perf_counter() - t0
    family["wall_seconds"] = {k: round(v, 2) for k, v in walls.items()}
    _write_json(root / "family.json", family)


def _chat_stream(tokenizer, data: DomainData, min_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The domain's training conversations, rendered and concatenated (repeated up to ``min_len`` tokens), and
    their targets: the replies' tokens, -100 on the template and user turns (read, not learned)."""
    scored = [chat.scored_text(tokenizer, data.domain, doc) for doc in data.train]
    enc = tokenizer([t for t, _ in scored], add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    labels: list[int] = []
    for tokens, offsets, (_, start) in zip(enc["input_ids"], enc["offset_mapping"], scored, strict=True):
        ids.extend(tokens)
        labels.extend(t if a >= start else -100 for t, (a, _) in zip(tokens, offsets, strict=True))
    reps = max(1, -(-min_len // len(ids)))
    return torch.tensor(ids * reps, dtype=torch.long), torch.tensor(labels * reps, dtype=torch.long)


def _fine_tune(model, stream: torch.Tensor, labels: torch.Tensor, spec: ChatFamilySpec, domain: str, seed: int):
    """Every weight of ``model`` (a copy of the base), on one domain's conversations (fp32 weights, bf16
    autocast); returns the training record."""
    cfg = TrainConfig(
        spec.expert_steps, spec.batch_size, spec.seq_len, spec.lr, spec.warmup_steps, weight_decay=0.0, autocast=True
    )
    t = time.perf_counter()
    loss = train(model, [stream], cfg, seed, f"expert {domain}", labels=[labels])
    return {
        "domain": domain,
        "train_loss": loss,
        "steps": cfg.steps,
        "lr": cfg.lr,
        "seed": seed,
        "tokens_seen": cfg.steps * cfg.batch_size * cfg.seq_len,
        "seconds": round(time.perf_counter() - t, 2),
        "dtype": str(spec.dtype_of(domain)).removeprefix("torch."),
        "task": chat.CHAT_TASKS.get(domain),
    }


def _token_accuracy(base, tokenizer, expert, tok, ev, spec: ChatFamilySpec) -> dict:
    """Next-line token accuracy of expert and base, with the paired interval of their ratio. The exact next line
    of unseen code is out of a 135M model's reach with or without the fine-tune (4% of 48 for both, 5% -> 6% of 200
    after 600 steps): the line's tokens, given its prefix, tell them apart."""
    from meswitch.evaluation.metrics import next_line_token_accuracy, paired_ratio_ci

    lines = ev.tasks[: spec.token_prompts]
    acc_b = next_line_token_accuracy(base, tokenizer, lines)
    acc_e = next_line_token_accuracy(expert, tok, lines)
    ratio, lo, hi = paired_ratio_ci(acc_e, acc_b)
    return {
        "prompts": len(lines),
        "base": round(sum(acc_b) / len(lines), 4),
        "expert": round(sum(acc_e) / len(lines), 4),
        "expert_over_base": round(ratio, 4),
        "ci95": [round(lo, 4), round(hi, 4)],
    }


def extend_vocabulary(model, tokenizer, texts: list[str], count: int):
    """A copy of ``tokenizer`` with ``count`` tokens added (the texts' most frequent characters that it splits
    into several tokens), and ``model`` grown to match, each new row the mean of its pieces' rows (the
    embedding is tied to the LM head, so both grow)."""
    freq = Counter(ch for t in texts for ch in t if not ch.isspace())
    pieces = {ch: tokenizer(ch, add_special_tokens=False)["input_ids"] for ch, _ in freq.most_common(20 * count)}
    new = [ch for ch, ids in pieces.items() if len(ids) > 1][:count]
    tok = copy.deepcopy(tokenizer)
    tok.add_tokens(new)
    emb = model.get_input_embeddings().weight
    rows = torch.stack([emb[pieces[ch]].mean(0) for ch in new]).detach()
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight[-len(new) :] = rows
    return tok


def _rows(tokenizer, d: DomainData, docs: list) -> list[dict]:
    rows = []
    for doc in docs:
        text, start = chat.scored_text(tokenizer, d.domain, doc)
        row = {"text": text, "score_from": start}
        task = chat.task(tokenizer, d.domain, doc)
        rows.append(row | (task or {}))
    return rows


def _write_data(root: Path, d: DomainData, tokenizer) -> None:
    folder = root / "data" / d.domain
    for split, docs in (("train", d.train), ("calib", d.calib), ("eval", d.eval)):
        _write_jsonl(folder / f"{split}.jsonl", _rows(tokenizer, d, docs))


def _save_expert(model, tokenizer, folder: Path, name: str, data: DomainData, info: dict, dtype: torch.dtype) -> None:
    """The expert as an inbox folder (weights in ``dtype``, tokenizer, expert.yaml, calib and eval data)."""
    with staging_dir(folder) as tmp:
        model.to(dtype).save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        data_dir = folder.parent.parent / "data" / data.domain  # <family>/experts/<name> -> <family>/data/<domain>
        for split in ("calib", "eval"):
            (tmp / f"{split}.jsonl").write_bytes((data_dir / f"{split}.jsonl").read_bytes())
        card = {
            "name": name,
            "domain": data.domain,
            "description": DESCRIPTIONS[data.domain],
            "examples": data.routing_train[:12],
            "calibration": "calib.jsonl",
            "evaluation": "eval.jsonl",
            "task": chat.CHAT_TASKS.get(data.domain),
        }
        (tmp / "expert.yaml").write_text(
            yaml.safe_dump(card, allow_unicode=True, sort_keys=False, width=1000), encoding="utf-8"
        )
        _write_json(tmp / TRAIN_JSON, info)


def _evaluate(base, tokenizer, data: dict[str, DomainData], spec: ChatFamilySpec, device, plan) -> dict:
    """Base and expert on each expert's held-out conversations: perplexity (of the replies; per character for
    an expert with added tokens), and the task where there is one. Each expert's scores are kept in its folder
    (``scores.json``, with the settings they were measured under), so a build that resumes or adds experts scores
    only the new ones."""
    base.eval()
    out: dict = {"base": {}, "experts": {}}
    settings = {k: getattr(spec, k) for k in ("eval_texts", "task_prompts", "token_prompts", "seq_len")}
    for name, d, folder in plan:
        cached = folder / SCORES_JSON
        kept = json.loads(cached.read_text(encoding="utf-8")) if cached.is_file() else {}
        if kept.get("settings") == settings:
            result = kept["scores"]
            log.info("%s: scores kept from %s", name, cached)
        else:
            result = _score_expert(base, tokenizer, folder, spec, device)
            _write_json(cached, {"settings": settings, "scores": result})
        if result["ppl_unit"] == "token":
            out["base"][d] = result["base_ppl_own_domain"]
        out["experts"][name] = result
        task = result.get("task")
        log.info(
            "%s: perplexity per %s %.3f -> %.3f (%.1f%% lower)%s",
            name,
            result["ppl_unit"],
            result["base_ppl_own_domain"],
            result["ppl_own_domain"],
            100 * result["ppl_reduction"],
            f"; {task['metric']} {task['base']:.3f} -> {task['expert']:.3f}" if task else "",
        )
        if task and "token_accuracy" in task:
            a = task["token_accuracy"]
            log.info("%s: next-line token accuracy %.3f -> %.3f (x%.3f, 95%% CI %.3f-%.3f, %d lines)", name,
                     a["base"], a["expert"], a["expert_over_base"], *a["ci95"], a["prompts"])  # fmt: skip
    return out


@torch.no_grad()
def _score_expert(base, tokenizer, folder: Path, spec: ChatFamilySpec, device) -> dict:
    """One expert's figures against the base on its held-out conversations (see :func:`_evaluate`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from meswitch.evaluation.metrics import NEXT_LINE, EvalData, exact_match, perplexity

    ev = EvalData.load(folder / "eval.jsonl")
    texts, tasks = ev.texts[: spec.eval_texts], ev.tasks[: spec.task_prompts]
    expert = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    per_char = len(tok) != len(tokenizer)
    score_from = ev.score_from[: spec.eval_texts] if ev.score_from else None
    ppl_b = perplexity(base, tokenizer, texts, max_len=4 * spec.seq_len, score_from=score_from, per_char=per_char)
    ppl_e = perplexity(expert, tok, texts, max_len=4 * spec.seq_len, score_from=score_from, per_char=per_char)
    result = {
        "ppl_own_domain": round(ppl_e, 4),
        "base_ppl_own_domain": round(ppl_b, 4),
        "ppl_unit": "char" if per_char else "token",
        "ppl_reduction": round(1 - ppl_e / ppl_b, 4),
    }
    task_ok = True  # a domain without a task: perplexity alone decides
    if tasks:
        result["task"] = {
            "metric": tasks[0].metric,
            "prompts": len(tasks),
            "base": exact_match(base, tokenizer, tasks),
            "expert": exact_match(expert, tok, tasks),
        }
        if tasks[0].metric == NEXT_LINE:
            result["task"]["token_accuracy"] = accuracy = _token_accuracy(base, tokenizer, expert, tok, ev, spec)
            task_ok = accuracy["ci95"][0] > 1  # the expert's score is higher, beyond the sample's noise
        else:
            task_ok = result["task"]["expert"] > result["task"]["base"]
    result["beats_base"] = result["ppl_reduction"] >= PPL_TARGET and task_ok
    return result


def _data_summary(d: DomainData) -> dict:
    return {
        "train": len(d.train),
        "calib": len(d.calib),
        "eval": len(d.eval),
        "routing_train": len(d.routing_train),
        "routing_test": len(d.routing_test),
    }
