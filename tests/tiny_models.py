"""Tiny random-config models saved as HF folders, for tests that need real checkpoints fast."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MistralConfig

from meswitch.synthetic import byte_tokenizer

VOCAB = 300


def tiny_config(**overrides) -> MistralConfig:
    cfg = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    cfg.update(overrides)
    return MistralConfig(**cfg)


def save_model(model, folder: Path, tokenizer=None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    (tokenizer or byte_tokenizer()).save_pretrained(folder)
    return folder


def make_base(folder: Path, seed: int = 0, **overrides) -> Path:
    torch.manual_seed(seed)
    return save_model(AutoModelForCausalLM.from_config(tiny_config(**overrides)), folder)


def make_expert(base: Path, folder: Path, seed: int = 1, scale: float = 0.02, outliers: int = 2) -> Path:
    """base + a fine-tuning-like delta: low rank plus noise, with a few outlier input channels."""
    model = AutoModelForCausalLM.from_pretrained(base)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() != 2:
                p.add_(scale * 0.1 * torch.randn(p.shape, generator=g))
                continue
            n, k = p.shape
            std = p.std()
            low = torch.randn(n, 4, generator=g) @ torch.randn(4, k, generator=g) / 2
            d = scale * std * 10 * (low + torch.randn(n, k, generator=g))
            cols = torch.randperm(k, generator=g)[:outliers]
            d[:, cols] *= 8
            p.add_(d)
    return save_model(model, folder)


def calib_file(path: Path, n: int = 40) -> Path:
    import json
    import random

    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "code", "math", "sum", "的", "是", "print(x)"]
    with open(path, "w") as f:
        for _ in range(n):
            f.write(json.dumps({"text": " ".join(rng.choice(words) for _ in range(30))}, ensure_ascii=False) + "\n")
    return path


def make_family(root: Path, name: str = "alpha") -> Path:
    """A family folder as the report reads it: ``base/`` and one carded expert with calibration and evaluation
    text (``experts/NAME/{calib,eval}.jsonl``)."""
    import yaml

    expert = make_expert(make_base(root / "base"), root / "experts" / name)
    calib_file(expert / "calib.jsonl")
    calib_file(expert / "eval.jsonl", n=6)
    card = {"name": name, "domain": "prose", "description": "d", "examples": ["q"]}
    (expert / "expert.yaml").write_text(yaml.safe_dump(card))
    return root
