"""Hugging Face-format checkpoints read lazily, tensor by tensor, from safetensors files.

The one checkpoint reader: everything that touches expert or base weights goes through it.
Pickle formats (``*.bin``, ``*.pt``) are refused, never loaded: an expert is untrusted input.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from meswitch.processes import reraise_interrupt

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)


class CheckpointError(Exception):
    """A checkpoint folder cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True)
class ArchSpec:
    """Where the parts of one decoder-only architecture live in its state dict."""

    layers: str  # prefix of decoder blocks: f"{layers}.{i}."
    embed: str
    lm_head: str
    final_norm: str
    linears: tuple[str, ...]  # per block, relative to the block prefix, in execution order

    def block_prefix(self, i: int) -> str:
        return f"{self.layers}.{i}."


_LLAMA_LIKE = ArchSpec(
    layers="model.layers",
    embed="model.embed_tokens.weight",
    lm_head="lm_head.weight",
    final_norm="model.norm.weight",
    linears=(
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    ),
)

# The one table of per-architecture module names (keyed by config.json "architectures").
ARCHITECTURES: dict[str, ArchSpec] = {
    "LlamaForCausalLM": _LLAMA_LIKE,
    "MistralForCausalLM": _LLAMA_LIKE,
    "Qwen2ForCausalLM": _LLAMA_LIKE,
}


def config_dtype(config: dict[str, Any]) -> torch.dtype:
    """The dtype a model was saved in, from its config.json (fp32 when it does not say)."""
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(str(name), torch.float32)


class Checkpoint:
    """A read-only view of an HF model folder; tensors are read one at a time on demand."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory")
        config_path = self.path / CONFIG
        if not config_path.is_file():
            raise CheckpointError(f"{config_path}: missing; not a Hugging Face model folder")
        try:
            self.config: dict[str, Any] = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{config_path}: invalid JSON ({e})") from e
        self._files = self._locate_weights()

    def _locate_weights(self) -> dict[str, Path]:
        """Map each tensor name to its safetensors file."""
        index = self.path / INDEX
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = {name: self.path / fname for name, fname in weight_map.items()}
            for f in set(files.values()):
                if not f.is_file():
                    raise CheckpointError(f"{f}: listed in {INDEX} but missing")
            return files
        single = self.path / SINGLE
        shards = [single] if single.is_file() else sorted(self.path.glob("*.safetensors"))
        if not shards:
            pickles = sorted(p.name for p in self.path.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                raise CheckpointError(
                    f"{self.path}: only pickle weights found ({', '.join(pickles)}); meswitch never unpickles "
                    "an untrusted checkpoint. Convert it to safetensors first "
                    "(model.save_pretrained(dir, safe_serialization=True) where you trust it)."
                )
            raise CheckpointError(f"{self.path}: no *.safetensors weights")
        files: dict[str, Path] = {}
        for shard in shards:
            for name in _open(shard).keys():
                files[name] = shard
        return files

    @cached_property
    def architecture(self) -> str:
        archs = self.config.get("architectures") or []
        if not archs:
            raise CheckpointError(f"{self.path / CONFIG}: no 'architectures' entry")
        return archs[0]

    @cached_property
    def spec(self) -> ArchSpec:
        if self.architecture not in ARCHITECTURES:
            raise CheckpointError(
                f"{self.path / CONFIG}: architecture {self.architecture!r} is not supported "
                f"(supported: {', '.join(sorted(ARCHITECTURES))})"
            )
        return ARCHITECTURES[self.architecture]

    @property
    def num_layers(self) -> int:
        return int(self.config["num_hidden_layers"])

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False)) or self.spec.lm_head not in self._files

    def keys(self) -> list[str]:
        return list(self._files)

    def __contains__(self, name: str) -> bool:
        return name in self._files

    def file_of(self, name: str) -> Path:
        return self._files[name]

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self._files[name], framework="pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        if name not in self._files:
            raise CheckpointError(f"{self.path}: tensor {name!r} not found")
        try:
            with safe_open(self._files[name], framework="pt", device=str(device)) as f:
                return f.get_tensor(name)
        except Exception as e:  # safetensors raises several types for a corrupt file
            reraise_interrupt(e)  # or torch turned a SIGTERM into one
            raise CheckpointError(f"{self._files[name]}: cannot read tensor {name!r} ({e})") from e

    def tensors(self, device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (name, tensor) file by file, so each shard is opened once."""
        by_file: dict[Path, list[str]] = {}
        for name, f in self._files.items():
            by_file.setdefault(f, []).append(name)
        for f, names in sorted(by_file.items()):
            try:
                handle = safe_open(f, framework="pt", device=str(device))
            except Exception as e:
                raise CheckpointError(f"{f}: not a readable safetensors file ({e})") from e
            with handle:
                for name in sorted(names):
                    try:
                        yield name, handle.get_tensor(name)
                    except Exception as e:
                        reraise_interrupt(e)
                        raise CheckpointError(f"{f}: cannot read tensor {name!r} ({e})") from e

    def block_tensors(self, i: int, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
        """The tensors of decoder block i, keyed relative to the block prefix."""
        prefix = self.spec.block_prefix(i)
        return {name[len(prefix) :]: self.get(name, device) for name in self._files if name.startswith(prefix)}

    def extra_files(self) -> list[Path]:
        """Tokenizer and generation files that travel with the weights."""
        return [self.path / n for n in TOKENIZER_FILES if (self.path / n).is_file()]


def _open(path: Path):
    try:
        return safe_open(path, framework="pt")
    except Exception as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e


@dataclass(frozen=True)
class Scan:
    """What one pass over every tensor found."""

    fingerprint: str
    nonfinite: tuple[str, ...]
    num_params: int


def all_finite(t: torch.Tensor) -> bool:
    """No NaN or infinity in ``t``: its min and max are finite (both propagate NaN), a reduction that runs
    at memory speed where ``isfinite(t).all()`` writes a boolean per element (20x slower on bf16)."""
    if not t.is_floating_point() or t.numel() == 0:
        return True
    try:
        lo, hi = torch.aminmax(t)
    except RuntimeError:  # dtypes without a min/max kernel (fp8)
        return bool(torch.isfinite(t.float()).all())
    return bool(torch.isfinite(lo) and torch.isfinite(hi))


def _tensor_digest(name: str, t: torch.Tensor) -> tuple[bytes, bool]:
    """sha256 of a tensor's name, dtype, shape and bytes (hashed in place, no copy), and whether it is finite."""
    th = hashlib.sha256(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        th.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return th.digest(), all_finite(t)


SCAN_INFLIGHT_BYTES = 1 << 30  # tensors read but not yet hashed, at most (plus one)


def scan(ckpt: Checkpoint, workers: int | None = None) -> Scan:
    """Fingerprint a checkpoint (sha256 over its config and each tensor's bytes) and find non-finite tensors.

    One read of every tensor does both, so validation costs a single pass over the weights. Tensors are
    hashed on ``workers`` threads (default: every core, at most 8; sha256 and the reductions release the
    GIL), with at most ``SCAN_INFLIGHT_BYTES`` read ahead of the hashing.
    """
    h = hashlib.sha256()
    config = {k: v for k, v in ckpt.config.items() if k not in ("_name_or_path", "transformers_version")}
    h.update(json.dumps(config, sort_keys=True).encode())
    nonfinite: list[str] = []
    digests: dict[str, bytes] = {}
    total = 0
    workers = workers or min(8, os.cpu_count() or 1)
    pending: deque[tuple[str, int, Future]] = deque()
    inflight = 0

    def collect() -> None:
        nonlocal inflight
        name, nbytes, future = pending.popleft()
        digests[name], finite = future.result()
        inflight -= nbytes
        if not finite:
            nonfinite.append(name)

    with ThreadPoolExecutor(workers, thread_name_prefix="scan") as pool:
        for name, t in ckpt.tensors():
            total += t.numel()
            nbytes = t.numel() * t.element_size()
            pending.append((name, nbytes, pool.submit(_tensor_digest, name, t)))
            inflight += nbytes
            while inflight > SCAN_INFLIGHT_BYTES and len(pending) > 1:
                collect()
        while pending:
            collect()
    for name in sorted(digests):  # by name, so the fingerprint does not depend on sharding
        h.update(digests[name])
    return Scan(fingerprint=h.hexdigest(), nonfinite=tuple(sorted(nonfinite)), num_params=total)


_SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads")


@dataclass(frozen=True)
class Pairing:
    """An expert checked against its base: fingerprints and the vocabulary rows it added."""

    base_fingerprint: str
    expert_fingerprint: str
    base_vocab: int
    expert_vocab: int
    relative_delta: float | None = None  # the largest ||W_e - W_b|| / ||W_b|| of the sampled matrices


# Fine-tuning moves weights by a few percent; two independently trained bases differ by about
# their own norm (about sqrt(2) relative to one of them).
MAX_RELATIVE_DELTA = 1.0


def sample_matrices(base: Checkpoint) -> list[str]:
    """The 2-D tensors of the first decoder block, and the input embedding: enough to tell a base apart."""
    prefix = base.spec.block_prefix(0)
    names = [n for n in base.keys() if n.startswith(prefix) and len(base.shape(n)) == 2]
    return [*names, base.spec.embed]


def relative_delta(base: Checkpoint, expert: Checkpoint, names: list[str] | None = None) -> dict[str, float]:
    """``||W_expert - W_base||_F / ||W_base||_F`` per sampled matrix (rows the expert added are ignored)."""
    out: dict[str, float] = {}
    for name in names or sample_matrices(base):
        b = base.get(name).float()
        e = expert.get(name).float()[: b.shape[0]]
        norm = float(b.norm())
        out[name] = float((e - b).norm()) / norm if norm > 0 else float((e - b).norm())
    return out


def check_same_base(base: Checkpoint, expert: Checkpoint, max_relative_delta: float = MAX_RELATIVE_DELTA) -> float:
    """Refuse an expert whose weights are too far from the base's to be its fine-tune; return the largest ratio.

    An expert trained from another base of the same shape passes every shape check and would be
    compressed into a huge, useless delta. A few matrices tell, so this reads those, not the checkpoint.
    """
    ratios = relative_delta(base, expert)
    name, worst = max(ratios.items(), key=lambda kv: kv[1])
    if worst > max_relative_delta:
        raise CheckpointError(
            f"{expert.path}: not a fine-tune of the base {base.path}: {name} differs from the base's by "
            f"{worst:.2f} of its norm (fine-tunes move weights by a few percent, independently trained bases by "
            f"about 1.4; the limit is {max_relative_delta}); was it trained from another base?"
        )
    return worst


def check_expert(
    base: Checkpoint,
    expert: Checkpoint,
    base_scan: Scan | None = None,
    max_relative_delta: float | None = MAX_RELATIVE_DELTA,
) -> Pairing:
    """Refuse an expert that is not a fine-tune of ``base``: architecture, shapes, distance from the
    base (``max_relative_delta``, None to skip), finiteness.

    Only the embedding and lm_head may have more rows than the base (an extended vocabulary). The base itself,
    given as its own expert (the same folder, or weights of the same fingerprint), is refused: its delta is zero.
    """
    if expert.path.resolve() == base.path.resolve():
        raise CheckpointError(
            f"{expert.path}: the expert is the base folder itself; give the fine-tuned expert's folder"
        )
    where = expert.path / CONFIG
    if expert.architecture != base.architecture:
        raise CheckpointError(
            f"{where}: architecture {expert.architecture!r} differs from the base's {base.architecture!r}"
        )
    spec = base.spec
    for key in _SHAPE_KEYS:
        if key in base.config and expert.config.get(key) != base.config.get(key):
            raise CheckpointError(f"{where}: {key}={expert.config.get(key)!r}, the base has {base.config.get(key)!r}")
    missing = sorted(set(base.keys()) - set(expert.keys()))
    extra = sorted(set(expert.keys()) - set(base.keys()))
    if missing or extra:
        raise CheckpointError(
            f"{expert.path}: tensor names differ from the base (missing {missing[:5]}, extra {extra[:5]})"
        )
    vocab_rows = (spec.embed, spec.lm_head)
    for name in base.keys():
        bs, es = base.shape(name), expert.shape(name)
        if bs == es:
            continue
        if name in vocab_rows and len(bs) == 2 and es[1] == bs[1] and es[0] > bs[0]:
            continue
        raise CheckpointError(f"{expert.file_of(name)}: tensor {name!r} has shape {list(es)}, the base has {list(bs)}")
    worst = None if max_relative_delta is None else check_same_base(base, expert, max_relative_delta)
    base_scan = base_scan or scan(base)
    if base_scan.nonfinite:
        raise CheckpointError(f"{base.path}: base has non-finite weights in {list(base_scan.nonfinite[:5])}")
    expert_scan = scan(expert)
    if expert_scan.nonfinite:
        bad = list(expert_scan.nonfinite[:5])
        raise CheckpointError(f"{expert.file_of(bad[0])}: non-finite (NaN/Inf) weights in {bad}")
    if expert_scan.fingerprint == base_scan.fingerprint:
        raise CheckpointError(
            f"{expert.path}: the same weights and config as the base {base.path} (fingerprint "
            f"{base_scan.fingerprint[:16]}…), so there is no delta to compress; give the fine-tuned expert's folder"
        )
    return Pairing(
        base_fingerprint=base_scan.fingerprint,
        expert_fingerprint=expert_scan.fingerprint,
        base_vocab=base.shape(spec.embed)[0],
        expert_vocab=expert.shape(spec.embed)[0],
        relative_delta=worst,
    )
