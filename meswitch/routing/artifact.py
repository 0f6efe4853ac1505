"""Router artifacts: the project's artifact format (``kind="router"``) and ``load_router``.

Layout, by backend:

- ``mcq`` fine-tuned in full: ``model/`` (HF folder with tokenizer);
- ``mcq`` with LoRA: ``adapter/`` (peft adapter with tokenizer); the base model it adapts is
  named in ``metadata.base_model`` and checked against ``base_fingerprint`` on load;
- ``mcq`` un-fine-tuned (``finetune: none``): no weights, only the base reference;
- ``embedding``: ``classifier.safetensors`` (``weight [n_domains, dim]``, ``bias``) and either
  ``encoder/`` (a copy of a local encoder) or a reference to the packaged sentence encoder,
  checked by sha256.

``metadata.domains`` lists ``{domain, expert, description}`` in the order the router scores them.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from meswitch.artifacts import ArtifactError, Manifest, verify
from meswitch.routing.dataset import DomainSpec
from meswitch.routing.router import Router

log = logging.getLogger(__name__)

MODEL_DIR = "model"
ADAPTER_DIR = "adapter"
ENCODER_DIR = "encoder"
CLASSIFIER = "classifier.safetensors"


def write_mcq_files(folder: Path, model, tokenizer, finetune: str) -> None:
    """Write the MCQ router's weights into a staging folder (nothing for ``finetune='none'``)."""
    if finetune == "full":
        model.save_pretrained(folder / MODEL_DIR, safe_serialization=True)
        tokenizer.save_pretrained(folder / MODEL_DIR)
    elif finetune == "lora":
        model.save_pretrained(folder / ADAPTER_DIR, safe_serialization=True)
        tokenizer.save_pretrained(folder / ADAPTER_DIR)


def write_embedding_files(folder: Path, weight: torch.Tensor, bias: torch.Tensor, encoder_record: dict) -> None:
    save_file({"weight": weight.contiguous(), "bias": bias.contiguous()}, str(folder / CLASSIFIER))
    if "source" in encoder_record:  # a local encoder: copy it, so the artifact stands alone
        shutil.copytree(encoder_record["source"], folder / ENCODER_DIR)


def _domains(manifest: Manifest, folder: Path) -> list[DomainSpec]:
    try:
        return [DomainSpec(d["domain"], d["expert"], d.get("description", "")) for d in manifest.metadata["domains"]]
    except (KeyError, TypeError) as e:
        raise ArtifactError(f"{folder}: manifest metadata.domains is missing or malformed ({e})") from e


def _base_for(manifest: Manifest, folder: Path, base_model: Path | None) -> Path:
    from meswitch.checkpoints import Checkpoint, scan

    base = Path(base_model or manifest.metadata.get("base_model") or "")
    if not str(base) or not base.is_dir():
        raise ArtifactError(
            f"{folder}: this router adapts base model {manifest.metadata.get('base_model')!r}, which is not there; "
            "pass its folder (base_model=..., --base-model)"
        )
    fp = scan(Checkpoint(base)).fingerprint
    if manifest.base_fingerprint and fp != manifest.base_fingerprint:
        raise ArtifactError(f"{folder}: made for base {manifest.base_fingerprint[:16]}…, but {base} is {fp[:16]}…")
    return base


def load_router(
    folder: Path,
    *,
    base_model: Path | None = None,
    device: str = "cpu",
    threshold: float | None = None,
    default_expert: str | None = None,
    orders: int | None = None,
) -> Router:
    """Verify a router artifact's checksums and load it; ``threshold``/``default_expert`` override the
    manifest's, and so does ``orders`` (how many option orders an MCQ router averages)."""
    folder = Path(folder)
    manifest = verify(folder)
    if manifest.kind != "router":
        raise ArtifactError(f"{folder}: a {manifest.kind!r} artifact, not a router")
    domains = _domains(manifest, folder)
    method = manifest.method
    backend_kind = method.get("backend")
    if backend_kind == "mcq":
        from meswitch.routing.mcq import MCQBackend, load_causal_lm, options_for

        finetune = method.get("finetune")
        if finetune == "full":
            model, tok = load_causal_lm(folder / MODEL_DIR, device)
        elif finetune in ("lora", "none"):
            model, tok = load_causal_lm(_base_for(manifest, folder, base_model), device)
            if finetune == "lora":
                from peft import PeftModel

                model = PeftModel.from_pretrained(model, folder / ADAPTER_DIR).merge_and_unload()
        else:
            raise ArtifactError(f"{folder}: unknown MCQ finetune mode {finetune!r}")
        options = options_for(domains, int(method.get("description_words", 12)))
        # routers written before option orders were averaged read the listed order only
        if orders is None:
            orders = int(method.get("orders", 1))
        backend = MCQBackend(model, tok, options, int(method.get("max_length", 512)), orders=orders)
    elif backend_kind == "embedding":
        from meswitch.routing.embedding import (
            EmbeddingBackend,
            MeanPoolEncoder,
            SentenceEncoder,
            _folder_sha256,
            packaged_encoder_path,
        )

        record = manifest.metadata.get("encoder") or {}
        if "package" in record:
            path = packaged_encoder_path()
            if path is None:
                raise ArtifactError(f"{folder}: needs the sentence encoder package {record['package']!r}; install it")
            if record.get("sha256") and _folder_sha256(path) != record["sha256"]:
                raise ArtifactError(
                    f"{folder}: the installed {record['package']} differs from the one it was trained on"
                )
            encoder = SentenceEncoder(path, device)
        elif record.get("kind") == SentenceEncoder.kind:
            encoder = SentenceEncoder(folder / ENCODER_DIR, device)
        elif record.get("kind") == MeanPoolEncoder.kind:
            encoder = MeanPoolEncoder(folder / ENCODER_DIR, device, int(method.get("max_length", 256)))
        else:
            raise ArtifactError(f"{folder}: unknown encoder record {record!r}")
        tensors = load_file(str(folder / CLASSIFIER))
        if tensors["weight"].shape[0] != len(domains):
            raise ArtifactError(
                f"{folder}: classifier has {tensors['weight'].shape[0]} rows for {len(domains)} domains"
            )
        backend = EmbeddingBackend(encoder, tensors["weight"], tensors["bias"])
    else:
        raise ArtifactError(f"{folder}: unknown router backend {backend_kind!r}")
    return Router(
        backend,
        domains,
        threshold=method.get("threshold", 0.5) if threshold is None else threshold,
        default_expert=method.get("default_expert") if default_expert is None else default_expert,
        manifest=manifest,
    )
