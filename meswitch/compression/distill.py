"""Scale distillation, as BitDelta does, with one multiplier per stored step size: fitted end to end.

The compressed expert is ``W_b + m ⊙ Δ̂`` for every quantized matrix; the multipliers ``m`` (starting at 1)
are trained so its next-token distributions match the full expert's on calibration text (KL, Adam). They
are then folded into the stored step sizes, offsets and salient corrections, so the distilled artifact
has the same layout and bytes and dequantizes to ``m ⊙ Δ̂``. BitDelta stores one step size per matrix
and fits one scalar; a grid with a step size per output row (meswitch's) gets one multiplier per row,
the same bytes and far more freedom (``per_row=False`` restores BitDelta's scalar).
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from meswitch.artifacts import Manifest, read_manifest, seal, staging_dir
from meswitch.checkpoints import Checkpoint
from meswitch.compression.calibration import CalibConfig, token_chunks
from meswitch.compression.reconstruct import load_expert_model, open_artifact
from meswitch.devices import bf16_autocast

log = logging.getLogger(__name__)

# Stored tensors that scale with the multiplier: the dequantized part (step size, offset) and the corrections.
_SCALED = ("scale", "offset", "salient_val")


@dataclass(frozen=True)
class DistillConfig:
    steps: int = 100
    lr: float = 2e-3
    batch_size: int = 4
    seq_len: int = 128
    per_row: bool = True  # one multiplier per output row where the grid stores a step size per row


def _rows(reader, name: str, delta: torch.Tensor, per_row: bool) -> int:
    """How many multipliers matrix ``name`` gets: its rows when its stored step sizes are per row."""
    scale = reader.get(f"{name}.scale")
    return delta.shape[0] if per_row and scale.ndim >= 1 and scale.shape[0] == delta.shape[0] else 1


def fit_multipliers(
    base: Checkpoint, expert_dir: Path, artifact: Path, texts: list[str], cfg: DistillConfig, device="cpu"
) -> dict[str, torch.Tensor]:
    """Per quantized matrix, the multipliers of its Δ̂ (fp32 [rows] or [1]) that best match the full
    expert's outputs."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = torch.device(device)
    reader = open_artifact(artifact, base)
    names = [n for n, h in reader.manifest.tensors.items() if h["kind"] == "quantized"]
    tokenizer = AutoTokenizer.from_pretrained(expert_dir)
    ids = token_chunks(tokenizer, texts, CalibConfig(samples=cfg.steps * cfg.batch_size, seq_len=cfg.seq_len))
    teacher = AutoModelForCausalLM.from_pretrained(expert_dir, dtype=torch.float32).to(device).eval()
    student = load_expert_model(base, reader, device=device)
    for p in student.parameters():
        p.requires_grad_(False)
    start = {n: student.get_parameter(n).detach() for n in names}
    deltas = {n: reader.delta(n, device) for n in names}
    mult = [torch.ones(_rows(reader, n, deltas[n], cfg.per_row), device=device, requires_grad=True) for n in names]
    opt = torch.optim.Adam(mult, lr=cfg.lr)
    autocast = bf16_autocast(device)
    batches = ids.split(cfg.batch_size)
    for step in tqdm(range(cfg.steps), desc=f"distill {reader.manifest.name}", unit="step", leave=False):
        batch = batches[step % len(batches)].to(device)
        with torch.no_grad(), autocast:
            target = F.log_softmax(teacher(input_ids=batch).logits.float(), -1)
        params = {}
        for i, n in enumerate(names):
            d = deltas[n]
            w = start[n]
            extra = w.shape[0] - d.shape[0]  # rows the expert added to the vocabulary are not scaled
            step_d = (mult[i] - 1).unsqueeze(1) * d
            params[n] = w + (F.pad(step_d, (0, 0, 0, extra)) if extra else step_d)
        with autocast:
            logits = torch.func.functional_call(student, params, (batch,)).logits.float()
        loss = F.kl_div(F.log_softmax(logits, -1), target, log_target=True, reduction="batchmean") / batch.shape[1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return {n: m.detach().cpu() for n, m in zip(names, mult, strict=True)}


def apply_multipliers(
    artifact: Path, out: Path, multipliers: dict[str, torch.Tensor | float], record: dict
) -> Manifest:
    """A copy of ``artifact`` at ``out`` whose quantized matrices dequantize to ``m ⊙ Δ̂`` (resealed);
    ``m`` [rows] scales each output row, [1] or a float the whole matrix."""
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    with staging_dir(Path(out)) as tmp:
        shutil.copytree(artifact, tmp, dirs_exist_ok=True)
        for rel in manifest.files:
            if not rel.endswith(".safetensors") or "/" in rel:
                continue
            tensors = load_file(tmp / rel)
            for key in list(tensors):
                name, _, part = key.rpartition(".")
                if part in _SCALED and name in multipliers:
                    t, m = tensors[key], torch.as_tensor(multipliers[name], dtype=torch.float32)
                    m = m.reshape(-1, *[1] * (t.ndim - 1)) if m.numel() > 1 else m.reshape(())
                    tensors[key] = (t.float() * m).to(t.dtype)
            save_file(tensors, tmp / rel, metadata={"format": "pt"})
        manifest.method = {**manifest.method, "distilled": record}
        seconds = manifest.metrics.get("compress_seconds", 0) + record.get("seconds", 0)
        manifest.metrics = {**manifest.metrics, "compress_seconds": round(seconds, 2)}
        return seal(tmp, manifest)


def distill_artifact(
    base: Checkpoint,
    expert_dir: Path,
    artifact: Path,
    out: Path,
    texts: list[str],
    cfg: DistillConfig = DistillConfig(),
    device="cpu",
) -> Manifest:
    """Fit the multipliers (:func:`fit_multipliers`) and write the distilled artifact to ``out``."""
    t0 = time.perf_counter()
    mult = fit_multipliers(base, expert_dir, artifact, texts, cfg, device)
    seconds = round(time.perf_counter() - t0, 2)
    values = torch.cat(list(mult.values()))
    log.info(
        "distilled %d multipliers of %d matrices in %.0f s: %.3f..%.3f",
        values.numel(),
        len(mult),
        seconds,
        values.min(),
        values.max(),
    )
    return apply_multipliers(artifact, out, mult, {**asdict(cfg), "seconds": seconds})
