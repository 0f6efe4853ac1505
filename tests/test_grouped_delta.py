"""Grouped banks: sibling projections (q/k/v, gate/up) banked along N so one launch adds all their deltas.

CPU: a grouped bank is its projections side by side (views back, the reference per projection slice), its
errors, and the N block a launch picks. Kernel: the Triton kernels against the reference on CUDA (bf16 and
fp16), or on the CPU through Triton's interpreter with ``TRITON_INTERPRET=1`` and Triton importable (fp16 only:
the interpreter's bf16 ``tl.dot`` is wrong), e.g.
``TRITON_INTERPRET=1 PYTHONPATH=/path/to/triton .venv/bin/python -m pytest tests/test_grouped_delta.py``.
"""

from __future__ import annotations

import itertools
import os

import pytest
import torch

from meswitch.kernels import LAYOUT_V1, DeltaBank, ExpertRows, mixed_delta, mixed_delta_reference
from meswitch.kernels.bank import device_tiles
from meswitch.kernels.launch_config import LaunchConfig, block_within
from meswitch.kernels.ops import mixed_delta_tiles

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cuda" if CUDA else "cpu"
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (runs on the GPU machine)")
kernel = pytest.mark.skipif(not (CUDA or INTERPRET), reason="the Triton kernel: CUDA, or TRITON_INTERPRET=1 on the CPU")
IDS = [0, -1, 2, 2, 1, 0, -1, 2, 0]  # rows of several experts, rows with none (E=3)


def _group(widths, salient, k=320, seed=0, device="cpu", **kw):
    """Random banks of 3 experts for projections ``widths`` wide (``salient`` columns each) and their group."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = zip(widths, salient, strict=True)
    parts = [DeltaBank.random(3, (w, k), salient=s, device=device, generator=gen, **kw) for w, s in sizes]
    return parts, DeltaBank.concat(parts)


def _each(x, parts, ids, y):
    """Each projection's reference on its slice of the concatenated output."""
    bounds = itertools.accumulate((b.grid.shape[0] for b in parts), initial=0)
    for bank, (a, b) in zip(parts, itertools.pairwise(bounds), strict=True):
        mixed_delta_reference(x, bank, ids, y[:, a:b])
    return y


# ----------------------------------------------------------------------------------------- bank


@pytest.mark.parametrize("layout", [None, LAYOUT_V1])
def test_a_grouped_bank_is_its_projections_side_by_side(layout):
    parts, bank = _group((64, 32, 48), (3, 0, 7), layout_version=layout)
    assert bank.grid.shape == (144, 320) and bank.splits == (64, 32, 48) and bank.bounds == (0, 64, 96, 144)
    assert tuple(bank.salient_idx.shape) == (3, 3, 7) and bank.kmax == 7
    for p, part in enumerate(parts):
        view = bank.part(p)
        assert view.packed.untyped_storage().data_ptr() == bank.packed.untyped_storage().data_ptr()
        assert view.grid == part.grid and view.kmax == 7  # padded with index 0, value 0
        for e in range(3):
            torch.testing.assert_close(view.dequantize(e), part.dequantize(e), rtol=0, atol=0)
    for e in range(3):
        want = torch.cat([part.dequantize(e) for part in parts])
        torch.testing.assert_close(bank.dequantize(e), want, rtol=0, atol=0)


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("symmetric", [False, True])
def test_the_grouped_reference_is_each_projections_reference(bits, symmetric):
    parts, bank = _group((64, 32, 32), (5, 0, 9), bits=bits, symmetric=symmetric, seed=bits)
    g = torch.Generator().manual_seed(bits)
    x, y = torch.randn(len(IDS), 320, generator=g), torch.randn(len(IDS), 128, generator=g)
    got = mixed_delta_reference(x, bank, IDS, y.clone())
    torch.testing.assert_close(got, _each(x, parts, IDS, y.clone()), rtol=1e-5, atol=1e-5)
    base = torch.tensor(IDS) < 0
    assert torch.equal(got[base], y[base]) and not torch.allclose(got[~base], y[~base])
    tiles = device_tiles(torch.tensor(IDS), 16)  # the op's reference path, as a captured step calls it
    torch.testing.assert_close(mixed_delta_tiles(x, bank, tiles, y.clone()), got, rtol=0, atol=0)


def test_grouped_banks_refuse_what_one_launch_cannot_serve():
    a = DeltaBank.random(2, (32, 256))
    with pytest.raises(ValueError, match="one input, one grid"):
        DeltaBank.concat([a, DeltaBank.random(2, (32, 512))])
    with pytest.raises(ValueError, match="one input, one grid"):
        DeltaBank.concat([a, DeltaBank.random(2, (32, 256), bits=4)])
    with pytest.raises(ValueError, match="experts"):
        DeltaBank.concat([a, DeltaBank.random(3, (32, 256))])
    with pytest.raises(ValueError, match="2 to 3 projections"):
        DeltaBank.concat([a, a, a, a])
    with pytest.raises(ValueError, match="already a grouped bank"):
        DeltaBank.concat([DeltaBank.concat([a, a]), a])
    with pytest.raises(ValueError, match="one matrix"):
        DeltaBank.concat([a.with_layout(LAYOUT_V1)] * 2).lookup(torch.tensor([0]), torch.tensor([0]))


def test_a_launch_picks_n_blocks_within_one_projection():
    def group(*widths):
        return DeltaBank.concat([DeltaBank.random(1, (w, 256)) for w in widths])

    assert block_within(128, group(576, 192, 192)) == 64  # SmolLM2's q/k/v
    assert block_within(128, group(4096, 1024, 1024)) == 128  # a 7B model's
    assert block_within(256, group(14336, 14336)) == 256  # its gate/up
    assert block_within(128, group(40, 24)) == 128  # no block fits: one launch per projection
    assert block_within(128, DeltaBank.random(1, (200, 256))) == 128  # one matrix: any block


# --------------------------------------------------------------------------------------- kernel


def _kernel_case(parts, bank, dtype, seed):
    n, k = bank.grid.shape
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(len(IDS), k, device=DEVICE, generator=g).to(dtype)
    y0 = (torch.randn(len(IDS), n, device=DEVICE, generator=g) * 0.01).to(dtype)
    y0[torch.tensor(IDS, device=DEVICE) < 0] = float("nan")  # poison: a write to a base-only row shows
    want = _each(x.float(), [p.to(DEVICE) for p in parts], IDS, y0.float().clone())
    return x, y0, want


def _assert_delta(got, y0, want):
    live = torch.tensor(IDS, device=got.device) >= 0
    assert torch.isnan(got[~live]).all(), "a base-only row was written"
    d_got, d_want = got[live].double() - y0[live].double(), want[live].double() - y0[live].double()
    err = float((d_got - d_want).norm() / d_want.norm())
    assert err < 1e-2, f"relative error {err:.2e}"


DTYPES = [torch.float16, torch.bfloat16] if CUDA else [torch.float16]


@kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bits,symmetric,layout,epilogue,block_n,split_k",
    [
        (2, False, None, True, 32, 1),  # one launch: 32 divides 64 and 96
        (2, False, None, True, 64, 1),  # one launch per projection: 64 does not divide 96
        (2, True, None, False, 32, 2),  # steps in registers, K split (atomic adds)
        (4, False, None, True, 32, 1),
        (1, True, None, True, 16, 1),
        (2, False, LAYOUT_V1, False, 32, 1),  # the generic layout-1 kernel
    ],
)
def test_the_grouped_kernel_equals_the_reference(dtype, bits, symmetric, layout, epilogue, block_n, split_k):
    from meswitch.kernels.triton_delta import launch

    parts, bank = _group((64, 32, 48), (3, 0, 40), bits=bits, symmetric=symmetric, layout_version=layout, seed=bits)
    bank = bank.to(DEVICE)
    x, y0, want = _kernel_case(parts, bank, dtype, seed=block_n + split_k)
    cfg = LaunchConfig(block_n=block_n, block_m=16, split_k=split_k, epilogue_scale=epilogue, num_stages=2)
    _assert_delta(launch(x, bank, ExpertRows.from_ids(IDS).tiles(16, x.device), y0.clone(), cfg), y0, want)


@kernel
def test_the_kernel_reads_a_projections_view_of_a_grouped_bank():
    """The per-projection path (``grouped=False``, the eager engine) reads views whose strides are the group's."""
    from meswitch.kernels.triton_delta import launch

    parts, bank = _group((64, 32, 48), (3, 0, 40), seed=5)
    bank = bank.to(DEVICE)
    x, y0, want = _kernel_case(parts, bank, torch.float16, seed=5)
    got, tiles = y0.clone(), ExpertRows.from_ids(IDS).tiles(16, x.device)
    for p, (a, b) in enumerate(itertools.pairwise(bank.bounds)):
        launch(x, bank.part(p), tiles, got[:, a:b], LaunchConfig(block_n=32, block_m=16, num_stages=2))
    _assert_delta(got, y0, want)


@kernel
@pytest.mark.parametrize("block_n", [32, 64])  # one launch; one per projection (64 does not divide 96)
def test_fp8_planes_serve_a_grouped_bank_and_its_projections_views(block_n):
    """FP8 planes (``LaunchConfig.fp8_planes``) over a grouped bank, whole and through each projection's view (the
    codes read as bytes with the group's strides): the reference's delta where x is exactly r·e4m3, salient columns
    included."""
    from meswitch.kernels.triton_delta import launch

    parts, bank = _group((64, 32, 48), (3, 0, 40), seed=7)
    bank = bank.to(DEVICE)
    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is wrong
    _, y0, _ = _kernel_case(parts, bank, dtype, seed=7)
    g = torch.Generator().manual_seed(7)
    x = torch.randint(-448, 449, (len(IDS), bank.grid.shape[1]), generator=g).float().to(torch.float8_e4m3fn)
    x = (x.float() * 2.0**-5).to(dtype).to(DEVICE)
    x[:, 5] = 14.0  # max|x| = 448 · 2^-5: r a power of two, so x / r is exact in e4m3
    want = _each(x.float(), [p.to(DEVICE) for p in parts], IDS, y0.float().clone())
    cfg = LaunchConfig(block_n=block_n, block_m=16, num_stages=2, fp8_planes=True)
    tiles = ExpertRows.from_ids(IDS).tiles(16, x.device)
    _assert_delta(launch(x, bank, tiles, y0.clone(), cfg), y0, want)
    got = y0.clone()
    for p, (a, b) in enumerate(itertools.pairwise(bank.bounds)):
        launch(x, bank.part(p), tiles, got[:, a:b], cfg)
    _assert_delta(got, y0, want)


@gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "widths,k",
    [((576, 192, 192), 576), ((1536, 1536), 576), ((1024, 256, 256), 1024), ((200, 40, 40), 512)],
    ids=["smol-qkv", "smol-gate-up", "qkv", "no-block-fits"],
)
@pytest.mark.parametrize("m", [9, 40, 300])
def test_grouped_launches_on_the_gpu(dtype, widths, k, m):
    """The op and the eager entry point as serving calls them (launch heuristics included) against the reference,
    decode and prefill row counts; SmolLM2's q/k/v take 64-channel blocks."""
    from meswitch.kernels.launch_config import config_for

    gen = torch.Generator(device="cuda").manual_seed(m)
    sizes = zip(widths, (6, 0, 11)[: len(widths)], strict=True)
    parts = [DeltaBank.random(8, (w, k), salient=s, device="cuda", generator=gen) for w, s in sizes]
    bank = DeltaBank.concat(parts)
    if widths[0] == 576:
        assert config_for(bank, 16, 8, torch.device("cuda")).block_n == 64
    ids = torch.randint(-1, 8, (m,), generator=torch.Generator().manual_seed(m)).tolist()
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    y0 = (torch.randn(m, bank.grid.shape[0], device="cuda") * 0.01).to(dtype)
    want = _each(x.float(), parts, ids, y0.float().clone())
    got = mixed_delta(x, bank, ids, y0.clone())
    tiled = mixed_delta_tiles(x, bank, device_tiles(torch.tensor(ids, device="cuda"), 16), y0.clone())
    torch.cuda.synchronize()
    live = torch.tensor(ids, device="cuda") >= 0
    for out in (got, tiled):
        assert torch.equal(out[~live], y0[~live])
        d_out, d_want = out[live].double() - y0[live].double(), want[live].double() - y0[live].double()
        assert float((d_out - d_want).norm() / d_want.norm()) < 1e-2
