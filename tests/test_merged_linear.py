"""A projection's whole output with the base weight merged into the delta kernel's planes (``mixed_linear``):
against the base GEMM plus the reference deltas. The kernel runs on the GPU, or on the CPU through Triton's
interpreter (``TRITON_INTERPRET=1``, fp16: the interpreter's bf16 dot is wrong); the fallback runs everywhere."""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from meswitch.kernels import DeltaBank, ExpertRows, mixed_delta_reference, mixed_linear
from meswitch.kernels.launch_config import LaunchConfig

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
kernel = pytest.mark.skipif(not (CUDA or INTERPRET), reason="the Triton kernel: CUDA, or TRITON_INTERPRET=1 on the CPU")
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (runs on the GPU machine)")


def _case(widths, k, ids, dtype, device, seed, **kw):
    """Banks of 3 experts for projections ``widths`` wide, grouped; a base weight; x; the reference output."""
    gen = torch.Generator(device=device).manual_seed(seed)
    parts = [DeltaBank.random(3, (w, k), salient=5, device=device, generator=gen, **kw) for w in widths]
    bank = parts[0] if len(parts) == 1 else DeltaBank.concat(parts)
    weight = (torch.randn(sum(widths), k, device=device, generator=gen) * 0.05).to(dtype)
    x = torch.randn(len(ids), k, device=device, generator=gen).to(dtype)
    want = x.float() @ weight.float().T
    bounds = list(itertools.accumulate(widths, initial=0))
    for part, (a, b) in zip(parts, itertools.pairwise(bounds), strict=True):
        mixed_delta_reference(x.float(), part, ids, want[:, a:b])
    return bank, weight, x, want


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@kernel
@pytest.mark.parametrize(
    "bits,symmetric,k,block_n,split_k",
    [
        (2, False, 512, 32, 1),  # one launch over the group: 32 divides 64 and 96
        (2, False, 320, 64, 2),  # K not a whole number of chunks; one launch per projection; K split
        (4, True, 512, 32, 1),
        (1, False, 512, 16, 1),
    ],
)
def test_the_merged_kernel_gives_the_base_gemm_plus_the_deltas(bits, symmetric, k, block_n, split_k):
    from meswitch.kernels.triton_delta import launch

    ids = [0, 2, 2, 1, 0, 2, 0, 1, 1, 2, 0]  # every row has an expert
    bank, weight, x, want = _case((64, 32, 48), k, ids, torch.float16, DEVICE, seed=bits + k, bits=bits,
                                  symmetric=symmetric)  # fmt: skip
    cfg = LaunchConfig(block_n=block_n, block_m=16, split_k=split_k, epilogue_scale=False, num_stages=2)
    y = torch.zeros(len(ids), bank.grid.shape[0], dtype=x.dtype, device=DEVICE)
    got = launch(x, bank, ExpertRows.from_ids(ids).tiles(16, x.device), y, cfg, base=weight)
    assert _rel(got, want) < 1e-2
    delta = want - x.float() @ weight.float().T  # and the deltas themselves are in it, not only the base
    assert _rel(got.float() - x.float() @ weight.float().T, delta) < 5e-2


@kernel
def test_the_merged_kernel_refuses_what_it_cannot_merge():
    from meswitch.kernels.triton_delta import launch

    bank, weight, x, _ = _case((64,), 512, [0, 1], torch.float16, DEVICE, seed=1)
    tiles = ExpertRows.from_ids([0, 1]).tiles(16, x.device)
    y = torch.zeros(2, 64, dtype=x.dtype, device=DEVICE)
    with pytest.raises(ValueError, match="registers"):
        launch(x, bank, tiles, y, LaunchConfig(block_m=16, epilogue_scale=True), base=weight)
    with pytest.raises(ValueError, match="base must be"):
        launch(x, bank, tiles, y, LaunchConfig(block_m=16, epilogue_scale=False), base=weight[:, :256])


def test_a_merged_launch_fits_an_sms_shared_memory():
    """The base weight's planes are pipelined too: at most 128 channels a program over two stages."""
    from meswitch.kernels.launch_config import merged_config

    prefill = LaunchConfig(block_n=256, block_m=128, num_warps=8, num_stages=3, epilogue_scale=False)
    assert merged_config(prefill) == LaunchConfig(block_n=128, block_m=128, num_warps=8, num_stages=2,
                                                  epilogue_scale=False)  # fmt: skip
    decode = LaunchConfig(block_n=64, block_m=16, split_k=2, x_sums=True)
    assert merged_config(decode) == LaunchConfig(block_n=64, block_m=16, split_k=2, num_stages=2,
                                                 epilogue_scale=False)  # fmt: skip


def test_mixed_linear_falls_back_to_the_base_gemm_and_the_deltas():
    """Off the kernel (here: the CPU), and for rows without an expert, the base GEMM and then the reference."""
    ids = [0, -1, 2, 1, -1]
    bank, weight, x, want = _case((64, 32), 256, ids, torch.float32, "cpu", seed=3)
    got = mixed_linear(x, weight, bank, ids)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bank's shape"):
        mixed_linear(x, weight[:32], bank, ids)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("widths,k", [((1024, 256, 256), 1024), ((576, 192, 192), 576), ((1536,), 576)])
def test_mixed_linear_merges_a_prefill_on_the_gpu(dtype, widths, k, monkeypatch):
    """Prefill-long segments of experts only: one merged launch (launch heuristics included), equal to the base
    GEMM plus the deltas; with a row on the base alone, or switched off, the unmerged path gives the same."""
    ids = [e for e in (0, 1, 2) for _ in range(100)]
    bank, weight, x, want = _case(widths, k, ids, dtype, "cuda", seed=k)
    merged = mixed_linear(x, weight, bank, ids)
    monkeypatch.setenv("MESWITCH_MERGE_BASE", "0")
    apart = mixed_linear(x, weight, bank, ids)
    assert _rel(merged, want) < 1e-2 and _rel(apart, want) < 1e-2
    assert _rel(merged, want) <= 2 * _rel(apart, want) + 1e-3  # merging W into the planes costs no precision
