"""Is an expert really a fine-tune of this base? The check ``checkpoints.check_expert`` cannot make.

``check_expert`` refuses another architecture, other shapes and non-finite weights, but an expert
trained from another base of the same shape passes it, and would then be compressed into a huge,
useless delta. Fine-tuning moves weights by a few percent; two independently trained bases differ
by about their own norm (about sqrt(2) relative to one of them). A sample of matrices is enough to
tell, so this reads a few tensors, not the checkpoint. (It belongs beside ``check_expert`` in
``meswitch.checkpoints``; it lives here until the core library takes it.)
"""

from __future__ import annotations

from meswitch.checkpoints import Checkpoint, CheckpointError


def sample_matrices(base: Checkpoint) -> list[str]:
    """The 2-D tensors of the first decoder block, and the input embedding."""
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


def check_same_base(base: Checkpoint, expert: Checkpoint, max_relative_delta: float) -> float:
    """Raise CheckpointError when the expert's weights are too far from the base's; return the largest ratio."""
    ratios = relative_delta(base, expert)
    name, worst = max(ratios.items(), key=lambda kv: kv[1])
    if worst > max_relative_delta:
        raise CheckpointError(
            f"{expert.path}: not a fine-tune of the base {base.path}: {name} differs from the base's by "
            f"{worst:.2f} of its norm (fine-tunes move weights by a few percent, independently trained bases by "
            f"about 1.4; the limit is {max_relative_delta}); was it trained from another base?"
        )
    return worst
