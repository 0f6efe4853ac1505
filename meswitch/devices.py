"""Device names as users give them: ``auto`` (a GPU when there is one), ``cpu``, ``cuda`` or ``cuda:N``.

One check for every command and library entry point, so that ``--device gpu`` is refused by name when the flags
are read, not by a torch traceback minutes into the job. And one rule for bf16 autocast (:func:`bf16_autocast`).
"""

from __future__ import annotations

import argparse
import functools
import re

import torch

DEVICE_HELP = "auto (GPU when present), cpu, cuda, cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(device: str) -> str:
    """``device`` itself when it is one of the names meswitch takes; ValueError otherwise."""
    if not isinstance(device, str) or not _NAME.fullmatch(device):
        raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return device


def resolve_device(device: str = "auto") -> torch.device:
    """The torch device for a name: ``auto`` is the first GPU when CUDA is available, else the CPU; a CUDA
    device that this machine lacks is a ValueError naming what it has."""
    check_device_name(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ValueError(f"device {device!r} requested but this machine has {torch.cuda.device_count()} GPU(s)")
    return resolved


def device_arg(text: str) -> str:
    """An argparse ``type`` for ``--device``: the name checked when the flags are parsed."""
    try:
        return check_device_name(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@functools.cache
def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bf16 natively (AMX, or AVX-512 BF16). Elsewhere torch emulates it: on an
    AVX2-only EPYC (2026-12-05) a bf16 matmul ran 20x slower than in fp32, a SmolLM2 fine-tune step in bf16
    autocast over 3x slower (42 s in fp32)."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")  # torch.cpu's, private: absent means no
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def bf16_autocast(device: torch.device, enabled: bool = True) -> torch.autocast:
    """bf16 autocast where it pays: on a GPU, and on a CPU that computes in bf16 natively (:func:`cpu_has_bf16`);
    elsewhere off, so the forward runs in the weights' fp32."""
    on = enabled and (device.type == "cuda" or (device.type == "cpu" and cpu_has_bf16()))
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=on)
