"""``mixed_delta``: the Triton kernel on CUDA, the PyTorch reference everywhere else."""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import torch

from meswitch.kernels.bank import DeltaBank, ExpertRows
from meswitch.kernels.reference import as_expert_rows, check_inputs, mixed_delta_reference

BACKENDS = ("auto", "triton", "reference")


@cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available()


def mixed_delta(
    x: torch.Tensor,
    bank: DeltaBank,
    experts: ExpertRows | torch.Tensor | Sequence[int],
    y: torch.Tensor,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """Add each row's expert delta to the base output ``y`` in place; return ``y``.

    ``x`` [M, K] bf16/fp16, ``y`` [M, N] of x's dtype, ``experts`` a per-row expert index
    (-1: base only) or an :class:`ExpertRows` built once per batch (cheaper: ids are read on the
    host once). ``backend="auto"`` runs the Triton kernel for bf16/fp16 CUDA tensors and the
    reference otherwise.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    rows = as_expert_rows(experts)
    check_inputs(x, bank, rows, y)
    if backend == "auto":
        fast = x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and triton_available()
        backend = "triton" if fast else "reference"
    if backend == "triton":
        from meswitch.kernels.triton_delta import mixed_delta_triton

        return mixed_delta_triton(x, bank, rows, y)
    return mixed_delta_reference(x, bank, rows, y)
