"""One call from expert folders to a sealed router artifact: what the CLI and the flows use.

Registering an expert with a new domain and calling ``train_router`` again over all production
experts yields a router over the expanded domain set: the domains and their queries always come
from the expert folders given, never from a previous router.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

from meswitch.artifacts import Manifest, seal, staging_dir
from meswitch.routing.dataset import RoutingData, build_routing_data, family_root, find_experts
from meswitch.routing.embedding import EmbeddingConfig
from meswitch.routing.mcq import MCQConfig
from meswitch.routing.prompt import LETTERS, TEMPLATE_VERSION, render_prompt
from meswitch.routing.router import Router

log = logging.getLogger(__name__)

BACKENDS = ("mcq", "embedding")


@dataclass
class RouterJob:
    experts: list[Path]
    out: Path
    backend: str = "mcq"
    base_model: Path | None = None  # MCQ model (default: the family's base/); mean-pool encoder fallback
    mcq: MCQConfig = field(default_factory=MCQConfig)
    embedding: EmbeddingConfig = field(default_factory=EmbeddingConfig)
    threshold: float = 0.5
    default_expert: str | None = None
    max_per_domain: int = 256
    seed: int = 0
    name: str = "router"
    device: str = "cpu"
    evaluate: bool = True  # held-out accuracy into the manifest, when the family has routing/test.jsonl
    init_from: Path | None = None  # MCQ: start from this earlier router's weights (same base and mode)

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {self.threshold}")


def default_base_model(data_experts: list, given: Path | None) -> Path | None:
    """``given``, else the ``base/`` folder of the first expert's family."""
    if given is not None:
        return Path(given)
    for card in data_experts:
        root = family_root(card)
        if root is not None and (root / "base" / "config.json").is_file():
            return root / "base"
    return None


def train_router(job: RouterJob) -> Manifest:
    """Build the training set from the experts, train the backend, evaluate on held-out queries, seal."""
    cards = find_experts(job.experts)
    if job.default_expert is not None and job.default_expert not in {c.name for c in cards}:
        raise ValueError(f"default expert {job.default_expert!r} is not one of the experts given")
    data = build_routing_data(cards, job.max_per_domain, job.seed)
    base = default_base_model(cards, job.base_model)
    start = time.perf_counter()
    with staging_dir(job.out) as tmp:
        if job.backend == "mcq":
            router, method, metrics, metadata, base_fp = _train_mcq(job, data, base, tmp)
        else:
            router, method, metrics, metadata, base_fp = _train_embedding(job, data, base, tmp)
        metrics["train_seconds"] = round(time.perf_counter() - start, 2)
        metrics["train_examples"] = len(data.train)
        if job.evaluate and data.test:
            from meswitch.routing.evaluate import evaluate_router

            ev = evaluate_router(router, data.test, latency=False)
            metrics["heldout"] = {k: v for k, v in ev.to_dict().items() if k != "latency_ms"}
            metrics["heldout_accuracy"] = ev.accuracy
        manifest = Manifest(
            kind="router",
            name=job.name,
            description=f"{job.backend} router over {len(data.domains)} domains: "
            + ", ".join(d.domain for d in data.domains),
            base_fingerprint=base_fp,
            source_fingerprint=data.fingerprint(),
            method={"backend": job.backend, "threshold": job.threshold, "default_expert": job.default_expert, **method},
            metrics=metrics,
            metadata={
                "domains": [d.to_dict() for d in data.domains],
                "train_counts": data.counts(),
                "data_sources": data.sources,
                "experts": [str(c.folder.resolve()) for c in cards],
                **metadata,
            },
        )
        seal(tmp, manifest)
    log.info("router %s: %s", job.out, {k: v for k, v in metrics.items() if not isinstance(v, dict)})
    return manifest


def _train_mcq(job: RouterJob, data: RoutingData, base: Path | None, tmp: Path):
    from meswitch.checkpoints import Checkpoint, scan
    from meswitch.routing.artifact import write_mcq_files
    from meswitch.routing.mcq import MCQBackend, context_length, finetune, load_causal_lm, options_for, wrap_lora

    if base is None:
        raise FileNotFoundError("the MCQ router needs a causal LM: give --base-model DIR (no family base/ found)")
    cfg = job.mcq
    base_fp = scan(Checkpoint(base)).fingerprint
    options = options_for(data.domains, cfg.description_words)
    metrics: dict = {}
    metadata: dict = {}
    if job.init_from is not None:
        model, tok, metadata["init_from"] = _warm_start(job, base, base_fp)
    else:
        model, tok = load_causal_lm(base, job.device)
        if cfg.finetune == "lora":
            model = wrap_lora(model, cfg)
    if cfg.finetune != "none":
        stats = finetune(model, tok, options, data.train, cfg)
        metrics.update(
            sft_seconds=round(stats.seconds, 2),
            sft_steps=stats.steps,
            first_loss=round(stats.first_loss, 4),
            final_loss=round(stats.final_loss, 4),
            trainable_params=stats.trainable_params,
            lr=stats.lr,
        )
    write_mcq_files(tmp, model, tok, cfg.finetune)
    if cfg.finetune == "lora":
        model = model.merge_and_unload()
    max_length = context_length(model, cfg.max_length)
    backend = MCQBackend(model, tok, options, max_length, orders=cfg.orders)
    router = Router(backend, data.domains, job.threshold, job.default_expert)
    method = {
        "finetune": cfg.finetune,
        "max_length": max_length,
        "description_words": cfg.description_words,
        "orders": cfg.orders,
        "template_version": TEMPLATE_VERSION,
        "sft": cfg.to_dict(),
    }
    metadata |= {
        "base_model": str(base.resolve()),
        "letters": LETTERS[: len(options)],
        "prompt_example": render_prompt(options, "<query>"),
    }
    return router, method, metrics, metadata, base_fp


def _warm_start(job: RouterJob, base: Path, base_fp: str):
    """The model of a previous MCQ router of the same base and fine-tuning mode, to train further.

    A router that has learnt to read lettered options keeps that skill, so a retrain over a grown
    domain set starts past the plateau a fresh fine-tune has to cross.
    """
    from meswitch.artifacts import ArtifactError, verify
    from meswitch.routing.artifact import ADAPTER_DIR, MODEL_DIR
    from meswitch.routing.mcq import load_causal_lm

    prev = verify(job.init_from)
    mode = job.mcq.finetune
    if prev.kind != "router" or prev.method.get("backend") != "mcq" or prev.method.get("finetune") != mode:
        raise ArtifactError(
            f"{job.init_from}: not an MCQ router fine-tuned with {mode!r} "
            f"(backend {prev.method.get('backend')!r}, finetune {prev.method.get('finetune')!r})"
        )
    if prev.base_fingerprint != base_fp:
        raise ArtifactError(f"{job.init_from}: fine-tuned from another base than {base}")
    if mode == "full":
        model, tok = load_causal_lm(Path(job.init_from) / MODEL_DIR, job.device)
    elif mode == "lora":
        from peft import PeftModel

        model, tok = load_causal_lm(base, job.device)
        model = PeftModel.from_pretrained(model, Path(job.init_from) / ADAPTER_DIR, is_trainable=True)
    else:
        raise ValueError("init_from needs a fine-tuning mode (full or lora), not 'none'")
    record = {"path": str(Path(job.init_from).resolve()), "source_fingerprint": prev.source_fingerprint,
              "domains": [d["domain"] for d in prev.metadata.get("domains", [])]}  # fmt: skip
    return model, tok, record


def _train_embedding(job: RouterJob, data: RoutingData, base: Path | None, tmp: Path):
    from meswitch.routing.artifact import write_embedding_files
    from meswitch.routing.embedding import EmbeddingBackend, fit_classifier, open_encoder

    cfg = job.embedding
    encoder, record = open_encoder(cfg.encoder, base, job.device, cfg)
    weight, bias, stats = fit_classifier(encoder, data.train, [d.domain for d in data.domains], cfg)
    write_embedding_files(tmp, weight, bias, record)
    router = Router(EmbeddingBackend(encoder, weight, bias), data.domains, job.threshold, job.default_expert)
    method = {"max_length": encoder.max_length, "classifier": "logistic-regression", "config": cfg.to_dict()}
    return router, method, stats, {"encoder": record}, None
