"""Synthetic checkpoints for tests and benchmarks: a byte-level tokenizer and fine-tuning-like deltas.

Nothing here is downloaded or trained. Benchmarks at Mistral-7B geometry use it and label
their results as synthetic.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import MistralConfig, PreTrainedTokenizerFast


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with no merges (259 tokens): no training, no download."""
    vocab = {"<pad>": 0, "<bos>": 1, "<eos>": 2}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def mistral_7b_config(**overrides) -> MistralConfig:
    cfg = dict(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        dtype="bfloat16",
    )
    cfg.update(overrides)
    return MistralConfig(**cfg)


def finetune_like_delta(
    shape: tuple[int, int], scale: float, generator: torch.Generator, device="cpu", rank: int = 16, outliers: int = 8
) -> torch.Tensor:
    """Small low-rank-plus-noise delta with a few outlier input channels, as full fine-tuning leaves."""
    n, k = shape
    u = torch.randn(n, rank, generator=generator, device=device)
    v = torch.randn(rank, k, generator=generator, device=device)
    d = (u @ v) / rank**0.5 + torch.randn(n, k, generator=generator, device=device)
    cols = torch.randperm(k, generator=generator, device=device)[:outliers]
    d[:, cols] *= 10
    return d * scale


def write_synthetic_pair(
    out: Path, config: MistralConfig, seed: int = 0, device="cpu", delta_scale: float = 1e-3
) -> tuple[Path, Path]:
    """Write ``out/base`` and ``out/expert`` (one safetensors shard per block) with the given geometry."""
    base_dir, expert_dir = Path(out) / "base", Path(out) / "expert"
    dtype = config.dtype if isinstance(config.dtype, torch.dtype) else getattr(torch, str(config.dtype or "float32"))
    g = torch.Generator(device=device).manual_seed(seed)
    h, inter, kv = config.hidden_size, config.intermediate_size, config.num_key_value_heads
    head_dim = h // config.num_attention_heads
    shapes = {
        "self_attn.q_proj.weight": (h, h),
        "self_attn.k_proj.weight": (kv * head_dim, h),
        "self_attn.v_proj.weight": (kv * head_dim, h),
        "self_attn.o_proj.weight": (h, h),
        "mlp.gate_proj.weight": (inter, h),
        "mlp.up_proj.weight": (inter, h),
        "mlp.down_proj.weight": (h, inter),
    }
    groups: list[dict[str, tuple]] = [
        {
            "model.embed_tokens.weight": (config.vocab_size, h),
            "model.norm.weight": (h,),
            "lm_head.weight": (config.vocab_size, h),
        }
    ]
    for i in range(config.num_hidden_layers):
        block = {f"model.layers.{i}.{k}": v for k, v in shapes.items()}
        block[f"model.layers.{i}.input_layernorm.weight"] = (h,)
        block[f"model.layers.{i}.post_attention_layernorm.weight"] = (h,)
        groups.append(block)
    for folder in (base_dir, expert_dir):
        folder.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    for index, group in enumerate(groups, 1):
        base_t, expert_t = {}, {}
        for name, shape in group.items():
            if len(shape) == 1:
                b = torch.ones(shape, device=device)
                e = b + 0.01 * torch.randn(shape, generator=g, device=device)
            else:
                std = 0.02
                b = std * torch.randn(shape, generator=g, device=device)
                e = b + finetune_like_delta(shape, std * delta_scale * 10, g, device)
            base_t[name], expert_t[name] = b.to(dtype).cpu(), e.to(dtype).cpu()
        fname = f"model-{index:05d}-of-{len(groups):05d}.safetensors"
        save_file(base_t, base_dir / fname, metadata={"format": "pt"})
        save_file(expert_t, expert_dir / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, fname))
    for folder in (base_dir, expert_dir):
        config.architectures = ["MistralForCausalLM"]
        config.save_pretrained(folder)
        total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
        index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index_json))
        byte_tokenizer().save_pretrained(folder)
    return base_dir, expert_dir
