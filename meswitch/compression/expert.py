"""Compress a whole expert against its base into an artifact folder, one tensor at a time.

Every linear of every block and the lm_head get a salient-aware low-bit delta (calibrated);
an untied input embedding gets the same treatment with uniform channel weights (its input is a
one-hot token, so there are no activation statistics), a tied one the LM head's statistics (it is
the LM head too); rows the expert added to the
vocabulary are stored whole in fp16; every other tensor (norms, biases) is an fp16 delta.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

from meswitch.artifacts import LayerRecord, Manifest, seal, staging_dir
from meswitch.checkpoints import CONFIG, Checkpoint, Pairing
from meswitch.compression.bit_budget import (
    allocate_bits,
    budget_bytes,
    candidate_widths,
    floor_width,
    residual_error,
)
from meswitch.compression.calibration import LM_HEAD, diagonal
from meswitch.compression.config import ConfigError, DeltaConfig
from meswitch.compression.delta import channel_weights, compress_delta, delta_nbytes, relative_errors
from meswitch.compression.methods import get_method
from meswitch.compression.refine import refine_steps
from meswitch.compression.salience import allocate_salient, reconstruction_scores
from meswitch.processes import check_stop

log = logging.getLogger(__name__)

SOURCE_DIR = "source"  # the expert's config.json and tokenizer files
SHARD_BYTES = 2 << 30


@dataclass(frozen=True)
class ExpertInfo:
    """What the artifact says about the expert it came from."""

    name: str
    domain: str | None = None
    description: str | None = None


def is_linear_weight(ckpt: Checkpoint, name: str) -> bool:
    spec = ckpt.spec
    if name == spec.lm_head:
        return True
    if not name.startswith(spec.layers + ".") or not name.endswith(".weight"):
        return False
    _index, _, module = name[len(spec.layers) + 1 : -len(".weight")].partition(".")
    return module in spec.linears


def stats_key(ckpt: Checkpoint, name: str) -> str:
    return LM_HEAD if name == ckpt.spec.lm_head else name[: -len(".weight")]


def is_quantized(ckpt: Checkpoint, name: str) -> bool:
    """Tensors stored as low-bit codes: every linear's weight, the LM head and the input embedding."""
    return is_linear_weight(ckpt, name) or name == ckpt.spec.embed


def check_grouping(base: Checkpoint, config: DeltaConfig) -> None:
    """Refuse a group size that does not divide some quantized matrix's inputs, from the headers alone: before
    calibration, not minutes in at that matrix."""
    g = config.group_size
    if g <= 0:
        return
    widths = sorted({base.shape(n)[-1] for n in base.keys() if is_quantized(base, n)})
    if any(k % g for k in widths):
        fits = [str(d) for d in (32, 64, 128, 256) if all(k % d == 0 for k in widths)]
        hint = f"try {' or '.join(fits)}" if fits else "use 0 (per output channel)"
        raise ConfigError(
            "group_size",
            f"{g} does not divide the inputs of every matrix (this model's have {' or '.join(map(str, widths))}"
            f"); {hint}",
        )


def second_moment(
    ckpt: Checkpoint, name: str, stats: dict[str, torch.Tensor] | None, device: torch.device | str
) -> torch.Tensor | None:
    """The calibration statistics of ``name``'s inputs; None (all channels alike) uncalibrated.

    An untied input embedding's input is a one-hot token: no statistics. A tied one is also the LM head,
    whose inputs (the final normed hidden states) are calibrated like every other linear's.
    """
    if stats is None or (name == ckpt.spec.embed and not ckpt.tied_embeddings):
        return None
    return diagonal(stats[LM_HEAD if name == ckpt.spec.embed else stats_key(ckpt, name)]).to(device)


def input_hessian(
    ckpt: Checkpoint, name: str, stats: dict[str, torch.Tensor] | None, device: torch.device | str
) -> torch.Tensor | None:
    """``Σ x xᵀ`` of ``name``'s inputs where calibration gathered it (``CalibConfig.hessian``), else None.

    Never for the embedding: a tied one is looked up row by row as well, and error compensation tuned to
    the LM head's inputs would move its rows away from the expert's.
    """
    if stats is None or not is_linear_weight(ckpt, name) or name == ckpt.spec.embed:
        return None
    stat = stats[stats_key(ckpt, name)]
    return stat.to(device) if stat.dim() == 2 else None


@dataclass
class Plan:
    """Per quantized matrix, decided before any is compressed: its salient channel count, its bit width, and
    its reconstruction scores at that width (which the salient selection then reuses)."""

    counts: dict[str, int]
    widths: dict[str, int]
    scores: dict[str, torch.Tensor]


def plan_matrices(
    base: Checkpoint,
    expert: Checkpoint,
    stats: dict[str, torch.Tensor] | None,
    config: DeltaConfig,
    names: list[str],
    device: torch.device | str,
) -> Plan:
    """Salient channels and bit width per matrix, from each matrix's reconstruction scores.

    Global allocation: as many salient channels in all as ``config.salient`` gives matrix by matrix, placed
    where they hold the largest share of their matrix's error (the shares come from the reconstruction error
    whatever the method, so magnitude selection gets the same counts and bytes as ME-Switch). A bit budget
    (``config.bit_budget``): the scores at the budget's floor width and one more, the salient counts placed at
    the floor width, then the widths chosen by compression/bit_budget.py so that the whole expert's bytes stay
    within the budget. The error a width leaves is the absolute activation-weighted one: normalising it by each
    matrix's output energy (of its weight or of its delta) gave higher KL on SmolLM2's chinese expert.
    """
    quantized = [n for n in names if is_quantized(base, n)]
    budget = config.bit_budget
    widths = candidate_widths(budget) if budget is not None else (config.quant_spec().bits,)
    specs = {w: replace(config, bits=w).quant_spec() for w in widths}
    scores: dict[int, dict[str, torch.Tensor]] = {w: {} for w in widths}
    shapes: dict[str, tuple[int, int]] = {}
    for name in tqdm(quantized, desc="plan matrices", unit="tensor"):
        check_stop()
        b = base.get(name, device).float()
        delta = expert.get(name, device).float()[: b.shape[0]] - b
        s = channel_weights(second_moment(base, name, stats, device), delta.shape[1], delta.device)
        shapes[name] = tuple(delta.shape)
        for w in widths:
            scores[w][name] = reconstruction_scores(delta, s, specs[w])
    low = widths[0]
    if config.allocates_globally:
        counts = allocate_salient(scores[low], sum(config.salient_count(shapes[n][1]) for n in quantized))
    else:
        counts = {n: config.salient_count(shapes[n][1]) for n in quantized}
    chosen = dict.fromkeys(quantized, low)
    if budget is not None:
        errors = {n: {w: residual_error(scores[w][n], counts[n]) for w in widths} for n in quantized}
        costs = {n: {w: delta_nbytes(shapes[n], specs[w], counts[n]) for w in widths} for n in quantized}
        fixed, num_params = _fixed_bytes(base, expert, names)
        allowed = budget_bytes(budget, num_params)
        floor = fixed + sum(c[low] for c in costs.values())
        if floor > allowed:
            raise ValueError(
                f"bit budget {budget} is below what {expert.path.name} costs at {low} bit(s) in every matrix: "
                f"{8 * floor / num_params:.4f} bits/param (codes, step sizes, salient channels, fp16 tensors)"
            )
        chosen = allocate_bits(errors, costs, allowed - fixed)
        log.info("bit budget %s: widths %s", budget, dict(sorted(Counter(chosen.values()).items())))
    return Plan(counts, chosen, {n: scores[chosen[n]][n] for n in quantized})


def _fixed_bytes(base: Checkpoint, expert: Checkpoint, names: list[str]) -> tuple[int, int]:
    """(the bytes a budget cannot move: fp16 deltas of unquantized tensors and added vocabulary rows, and the
    expert's parameter count), as compress_expert counts them."""
    fixed = num_params = 0
    for name in names:
        numel = math.prod(expert.shape(name))
        num_params += numel
        if not is_quantized(base, name):
            fixed += 2 * numel
        elif expert.shape(name) != base.shape(name):
            fixed += 2 * (numel - math.prod(base.shape(name)))
    return fixed, num_params


def compress_expert(
    base: Checkpoint,
    expert: Checkpoint,
    pairing: Pairing,
    stats: dict[str, torch.Tensor] | None,
    config: DeltaConfig,
    out: Path,
    info: ExpertInfo,
    device: torch.device | str = "cpu",
) -> Manifest:
    """Write the compressed artifact of ``expert`` to ``out`` (atomically) and return its manifest.

    ``stats`` are the calibration second moments from :func:`calibrate`; ``None`` weights all
    input channels equally (the uncalibrated baselines).
    """
    t0 = time.perf_counter()
    check_grouping(base, config)
    spec = base.spec
    if config.rounding == "gptq" and not (stats and next(iter(stats.values())).dim() == 2):
        raise ValueError("rounding 'gptq' needs calibration Hessians: calibrate with CalibConfig(hessian=True)")
    layers: list[LayerRecord] = []
    handling: dict[str, dict] = {}
    total_bytes = 0
    num_params = 0
    with staging_dir(out) as tmp:
        writer = _ShardWriter(tmp)
        names = [n for n in base.keys() if not (n == spec.lm_head and expert.tied_embeddings)]
        plan = None
        if config.allocates_globally or config.bit_budget is not None:
            plan = plan_matrices(base, expert, stats, config, names, device)
        for name in tqdm(names, desc=f"compress {info.name}", unit="tensor"):
            check_stop()
            b = base.get(name, device).float()
            e = expert.get(name, device).float()
            num_params += e.numel()
            extra = e[b.shape[0] :] if e.shape != b.shape else None
            delta = e[: b.shape[0]] - b
            if is_quantized(base, name):
                s = second_moment(base, name, stats, device)
                cfg = replace(config, salient=plan.counts[name], bits=plan.widths[name]) if plan else config
                scores = plan.scores[name] if plan else None
                cd = compress_delta(delta, s, cfg, scores, input_hessian(base, name, stats, device))
                if config.refine and cd.spec.bits > 1:
                    cd = refine_steps(delta, cd, s)
                approx = cd.dequantize()
                rel, act_rel = relative_errors(delta, approx, s)
                layers.append(
                    LayerRecord(
                        name=name,
                        shape=list(delta.shape),
                        bits=cd.spec.bits,
                        salient=int(cd.salient_idx.numel()),
                        bits_per_param=round(cd.bits_per_param(), 4),
                        rel_error=round(rel, 6),
                        act_rel_error=None if act_rel is None else round(act_rel, 6),
                    )
                )
                total_bytes += writer.add(cd.tensors(name))
                handling[name] = {"kind": "quantized", "shape": list(delta.shape), **_spec_dict(cd.spec)}
            else:
                total_bytes += writer.add({f"{name}.delta": delta.half()})
                handling[name] = {"kind": "fp16_delta", "shape": list(delta.shape)}
            if extra is not None:
                total_bytes += writer.add({f"{name}.extra_rows": extra.half()})
                handling[name]["extra_rows"] = int(extra.shape[0])
        writer.close()
        (tmp / SOURCE_DIR).mkdir()
        shutil.copy2(expert.path / CONFIG, tmp / SOURCE_DIR / CONFIG)
        for f in expert.extra_files():
            shutil.copy2(f, tmp / SOURCE_DIR / f.name)
        manifest = Manifest(
            kind="expert-delta",
            name=info.name,
            domain=info.domain,
            description=info.description,
            base_fingerprint=pairing.base_fingerprint,
            source_fingerprint=pairing.expert_fingerprint,
            method={**_method_record(config, plan), "calibrated": stats is not None},
            layers=layers,
            tensors=handling,
            metrics={
                "bits_per_param": round(8 * total_bytes / num_params, 4),
                "delta_bytes": total_bytes,
                "fp16_delta_bytes": 2 * num_params,
                "num_params": num_params,
                "compress_seconds": round(time.perf_counter() - t0, 2),
                "device": str(device),
            },
            metadata={
                "architecture": base.architecture,
                "base_vocab": pairing.base_vocab,
                "expert_vocab": pairing.expert_vocab,
                "tied_embeddings": expert.tied_embeddings,
            },
        )
        seal(tmp, manifest)
    log.info(
        "%s: %.3f bits/param, %d bytes (%s than the fp16 delta)",
        info.name,
        manifest.metrics["bits_per_param"],
        total_bytes,
        size_against_fp16(total_bytes, 2 * num_params),
    )
    return manifest


def size_against_fp16(delta_bytes: int, fp16_delta_bytes: int) -> str:
    """``5.9x smaller`` or ``1.2x larger``: a delta's bytes against its fp16 delta's, the ratio read the right way
    round (many salient channels, 8 bits or small groups can cost more than fp16)."""
    if delta_bytes <= fp16_delta_bytes:
        return f"{fp16_delta_bytes / delta_bytes:.1f}x smaller"
    return f"{delta_bytes / fp16_delta_bytes:.1f}x larger"


def _method_record(config: DeltaConfig, plan: Plan | None = None) -> dict:
    """The config as the artifact was really made: the grid the method used (BitDelta: 1 bit, symmetric, one step
    per tensor), no salient fraction for methods that keep none, and under a bit budget the budget's floor width
    as ``bits`` (1 for 1.1, 2 for 2.3) with how many matrices got each width (``widths``; each matrix's own is in
    its entry)."""
    spec = config.quant_spec()
    selects = get_method(config.method).selects
    record = {**dataclasses.asdict(config), **_spec_dict(spec), "salient": config.salient if selects else 0}
    if plan is not None and config.bit_budget is not None:
        count = Counter(plan.widths.values())
        record |= {"bits": floor_width(config.bit_budget), "widths": {str(b): count[b] for b in sorted(count)}}
    return record


def _spec_dict(spec) -> dict:
    return {"bits": spec.bits, "symmetric": spec.symmetric, "group_size": spec.group_size}


class _ShardWriter:
    """Accumulates tensors into ``delta-NNNNN.safetensors`` files of at most SHARD_BYTES."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.pending: dict[str, torch.Tensor] = {}
        self.size = 0
        self.index = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> int:
        n = 0
        for k, v in tensors.items():
            v = v.detach().contiguous().cpu()
            self.pending[k] = v
            n += v.numel() * v.element_size()
        self.size += n
        if self.size >= SHARD_BYTES:
            self.flush()
        return n

    def flush(self) -> None:
        if self.pending:
            self.index += 1
            save_file(self.pending, self.folder / f"delta-{self.index:05d}.safetensors", metadata={"format": "pt"})
            self.pending, self.size = {}, 0

    def close(self) -> None:
        self.flush()
