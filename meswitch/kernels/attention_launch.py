"""Launch parameters of the decode attention kernel (:mod:`.triton_attention`): plain Python, no Triton, so the
rules are tested where Triton cannot be imported (as :mod:`.launch_config` is for the delta kernels)."""

from __future__ import annotations

from dataclasses import dataclass, replace

MAX_SPLITS = 16
SPLIT_POSITIONS = 256  # the fewest positions a split takes: below, its merge costs more than it saves


@dataclass(frozen=True)
class AttentionLaunch:
    """Launch parameters of the decode attention kernel; None: decided by the span and batch (:func:`resolve`,
    from ``benchmarks/attention_sweep.py``, which times the others)."""

    block_n: int | None = None  # cached positions per iteration
    num_warps: int = 4
    num_stages: int | None = None  # None: Triton's default
    splits: int | None = None


def split_count(programs: int, span: int, sms: int) -> int:
    """Splits of the positions so that every SM gets a program, each with at least ``SPLIT_POSITIONS`` (a batch
    of 32 on 8 KV heads fills an H200 unsplit; asking two programs an SM split it, and its merge took 2 us a layer;
    a batch of 8 over 256 positions took 6.9 us unsplit, 8.1 and 8.6 us in 2 and 4 splits on the H200)."""
    splits = 1
    while programs * splits < sms and 2 * splits * SPLIT_POSITIONS <= span and splits < MAX_SPLITS:
        splits *= 2
    return splits


def resolve(cfg: AttentionLaunch, programs: int, span: int, sms: int) -> AttentionLaunch:
    """``cfg`` with its open choices made. 32 positions an iteration up to a span of 256 when the (sequence, head)
    programs fill the SMs: fewer registers a program let more run (H200, ~160 positions: batch 32 11.2 against
    12.0 us, batch 64 16.7 against 21.8 us); 64 otherwise, where each program's chain of iterations is what counts
    (batch 8: 7.0 against 8.0 us; 2,048 positions at batch 32: 61.5 against 65.9 us).
    ``results/attention-sweep-2026-12-04.json``, ``attention-sweep-pdl-2026-12-04.json``."""
    block_n = cfg.block_n or (32 if span <= 256 and programs >= sms else 64)
    return replace(cfg, block_n=block_n, splits=cfg.splits or split_count(programs, span, sms))
