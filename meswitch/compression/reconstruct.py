"""Apply a compressed artifact to its base: the expert's weights, tensor by tensor.

The reference path for everything downstream: `meswitch reconstruct` writes these tensors as
an HF folder, evaluation loads them into a model, and serving's fused kernels are checked
against the same dequantization.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from meswitch.artifacts import RECONSTRUCTED_MARK, Manifest, staging_dir, verify
from meswitch.checkpoints import CONFIG, Checkpoint, config_dtype, scan
from meswitch.compression.delta import CompressedDelta
from meswitch.compression.expert import SHARD_BYTES, SOURCE_DIR
from meswitch.compression.quantize import QuantSpec

_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "I16": 2, "F16": 2, "BF16": 2, "I32": 4, "F32": 4, "I64": 8, "F64": 8}


class DeltaReader:
    """Random access to the tensors of a verified artifact's delta files."""

    def __init__(self, folder: Path, manifest: Manifest):
        self.folder = Path(folder)
        self.manifest = manifest
        self._where: dict[str, Path] = {}
        for rel in manifest.files:
            if rel.endswith(".safetensors") and "/" not in rel:
                with safe_open(self.folder / rel, framework="pt") as f:
                    for key in f.keys():
                        self._where[key] = self.folder / rel

    def get(self, key: str, device="cpu") -> torch.Tensor:
        return self.get_many([key], device)[key]

    def get_many(self, keys: Iterable[str], device="cpu") -> dict[str, torch.Tensor]:
        """Several tensors, each file opened once: an opening parses the file's header, which for an
        expert's thousand-odd tensors cost a millisecond a key (a second an expert when serving loads it)."""
        out = {}
        for path, names in self._by_file(keys).items():
            with safe_open(path, framework="pt", device=str(device)) as f:
                out.update((k, f.get_tensor(k)) for k in names)
        return out

    def nbytes(self, keys: Iterable[str]) -> int:
        """Bytes the tensors ``keys`` take, from the files' headers (no tensor is read)."""
        total = 0
        for path, names in self._by_file(keys).items():
            with safe_open(path, framework="pt") as f:
                for k in names:
                    sl = f.get_slice(k)
                    total += math.prod(sl.get_shape()) * _DTYPE_BYTES[sl.get_dtype()]
        return total

    def _by_file(self, keys: Iterable[str]) -> dict[Path, list[str]]:
        by_file: dict[Path, list[str]] = {}
        for key in keys:
            by_file.setdefault(self._where[key], []).append(key)
        return by_file

    def has(self, key: str) -> bool:
        return key in self._where

    def compressed(self, name: str, device="cpu") -> CompressedDelta:
        """The packed delta of a quantized tensor."""
        h = self.manifest.tensors[name]
        spec = QuantSpec(bits=h["bits"], symmetric=h["symmetric"], group_size=h["group_size"])
        keys = ("packed", "scale", "offset", "salient_idx", "salient_val")
        tensors = self.get_many([f"{name}.{k}" for k in keys if self.has(f"{name}.{k}")], device)
        return CompressedDelta.from_tensors(tensors, name, h["shape"], spec)

    def delta(self, name: str, device="cpu") -> torch.Tensor:
        """Δ̂ of any tensor, fp32."""
        h = self.manifest.tensors[name]
        if h["kind"] == "quantized":
            return self.compressed(name, device).dequantize()
        return self.get(f"{name}.delta", device).float()


def open_artifact(folder: Path, base: Checkpoint, base_fingerprint: str | None = None) -> DeltaReader:
    """Verify the artifact's checksums and that it was made for ``base``, then open it."""
    manifest = verify(folder, base_fingerprint or scan(base).fingerprint)
    return DeltaReader(folder, manifest)


def expert_tensors(
    base: Checkpoint, reader: DeltaReader, device="cpu", dtype: torch.dtype | None = None
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the reconstructed expert's tensors (base + Δ̂, extra vocabulary rows appended) in ``dtype``
    (default: the base's).

    Evaluation asks for fp32: a small delta added to a bf16 base and rounded back to bf16 loses most of
    itself, which serving (base and delta applied apart) never does.
    """
    for name in reader.manifest.tensors:
        b = base.get(name, device)
        w = b.float() + reader.delta(name, device)
        if reader.has(f"{name}.extra_rows"):
            w = torch.cat([w, reader.get(f"{name}.extra_rows", device).float()])
        yield name, w.to(dtype or b.dtype)


def reconstruct(base: Checkpoint, artifact: Path, out: Path) -> Path:
    """Write the compressed expert as a full HF folder (config, tokenizer, safetensors shards) and a
    ``reconstructed.json`` naming the artifact and base it came from."""
    reader = open_artifact(artifact, base)
    with staging_dir(out) as tmp:
        shard: dict[str, torch.Tensor] = {}
        size, index, weight_map = 0, 0, {}

        def flush():
            nonlocal shard, size, index
            if shard:
                index += 1
                fname = f"model-{index:05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
                shard, size = {}, 0

        dtype = config_dtype(json.loads((Path(artifact) / SOURCE_DIR / CONFIG).read_text()))
        tensors = expert_tensors(base, reader, dtype=dtype)
        for name, w in tqdm(tensors, total=len(reader.manifest.tensors), desc="reconstruct"):
            shard[name] = w.contiguous()
            size += w.numel() * w.element_size()
            if size >= SHARD_BYTES:
                flush()
        flush()
        if index == 1:
            (tmp / "model-00001.safetensors").rename(tmp / "model.safetensors")
        else:
            total = sum((tmp / f).stat().st_size for f in set(weight_map.values()))
            index_json = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (tmp / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2))
        for f in (Path(artifact) / SOURCE_DIR).iterdir():
            shutil.copy2(f, tmp / f.name)
        # what it was made from; it also marks the folder as one a later reconstruct may replace (check_out)
        mark = {"artifact": str(Path(artifact).resolve()), "base": str(Path(base.path).resolve()),
                "expert": reader.manifest.name}  # fmt: skip
        (tmp / RECONSTRUCTED_MARK).write_text(json.dumps(mark, indent=2) + "\n")
    return Path(out)


def load_expert_model(base: Checkpoint, reader: DeltaReader, device="cpu", dtype=torch.float32):
    """The compressed expert as a transformers model in memory (for evaluation)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(Path(reader.folder) / SOURCE_DIR)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = dict(expert_tensors(base, reader, device, dtype))
    if reader.manifest.metadata.get("tied_embeddings") and base.spec.lm_head not in state:
        state[base.spec.lm_head] = state[base.spec.embed]
    model.load_state_dict(state, strict=False, assign=True)
    _rebuild_buffers(model, config, device)
    model.tie_weights()
    return model.eval()


def _rebuild_buffers(model, config, device) -> None:
    inner = model.get_decoder()
    if hasattr(inner, "rotary_emb"):
        inner.rotary_emb = type(inner.rotary_emb)(config).to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise RuntimeError(f"parameters not restored from the artifact: {leftover[:5]}")
