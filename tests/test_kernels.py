"""The mixed-expert delta op: layouts, bank, reference (CPU) and the Triton kernel (CUDA only).

CPU: the reference against a dense per-row dequantize-then-matmul built straight from
``compress_delta``, for several bits, group sizes and expert mixes with base-only rows; layout
round trips. GPU (skipped without CUDA): the kernel against the reference on fresh random inputs,
decode and prefill shapes, 1-16 experts, base-only rows left bit-identical. The precomputed row sums also run on
the CPU through Triton's interpreter (``TRITON_INTERPRET=1`` with Triton importable; fp16 activations there).
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

from meswitch.compression.delta import DeltaConfig, compress_delta
from meswitch.compression.quantize import pack
from meswitch.kernels import (
    LAYOUT_V1,
    LAYOUT_V2,
    DeltaBank,
    ExpertRows,
    e4m3_rows,
    mixed_delta,
    mixed_delta_reference,
    repack_v1_to_v2,
    repack_v2_to_v1,
)
from meswitch.kernels.layout import pack_v2, position_biases, unpack_codes, unpack_v2, v2_chunk
from meswitch.kernels.reference import FP8_PLANES_ERROR

CUDA = torch.cuda.is_available()
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA (runs on the GPU machine)")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
kernel = pytest.mark.skipif(not (CUDA or INTERPRET), reason="the Triton kernel: CUDA, or TRITON_INTERPRET=1 on the CPU")


def _experts(num, n, k, config, seed):
    g = torch.Generator().manual_seed(seed)
    deltas = [torch.randn(n, k, generator=g) * 0.01 for _ in range(num)]
    s = torch.rand(k, generator=g) + 0.1
    return [compress_delta(d, s, config) for d in deltas]


def _dense_per_row(x, y0, deltas, ids):
    """float64 y0 + x[m] · Δ̂_{ids[m]}ᵀ from each CompressedDelta's own dequantize()."""
    out = y0.double().clone()
    for m, e in enumerate(ids):
        if e >= 0:
            out[m] += x[m].double() @ deltas[e].dequantize().double().T
    return out


# --------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("k", [64, 256, 1000, 1024])
def test_layout_v2_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 1000 + k)
    codes = torch.randint(0, 1 << bits, (7, k), generator=g, dtype=torch.uint8)
    v2 = pack_v2(codes, bits)
    assert v2.shape == (-(-k // v2_chunk(bits)), 7, 16) and v2.dtype == torch.int32
    assert torch.equal(unpack_v2(v2, bits, k), codes)
    v1 = pack(codes, bits)
    assert torch.equal(repack_v1_to_v2(v1, bits, k), v2)
    assert torch.equal(repack_v2_to_v1(v2, bits, k), v1)


def test_layout_v2_bit_positions():
    """Word i of a chunk holds plane p's codes for positions p*32+2i (low half) and p*32+2i+1 (high)."""
    bits, k = 2, 256
    codes = torch.zeros(1, k, dtype=torch.uint8)
    codes[0, 3 * 32 + 2 * 5] = 1  # plane 3, word 5, low half
    codes[0, 6 * 32 + 2 * 9 + 1] = 2  # plane 6, word 9, high half
    w = pack_v2(codes, bits)[0, 0]
    assert int(w[5]) == 1 << (3 * bits)
    assert int(w[9]) == 2 << (16 + 6 * bits)
    assert int(w.count_nonzero()) == 2


@pytest.mark.parametrize("bits", [1, 2, 4])
@pytest.mark.parametrize("is_bf16", [True, False])
def test_position_biases_are_what_the_plane_trick_adds_to_each_code(bits, is_bf16):
    """The kernels turn a plane's codes into MMA operands by masking them in place in a half-word (after one shift
    shared by the planes that fit the 7 mantissa bits of bf16) and or-ing in the exponent that makes a code's last
    bit worth 1: each operand is ``bias + code``. Emulated here on the packed words, position by position, that
    value is exactly ``position_biases + code``: what the epilogue's row sums subtract."""
    k = 3 * v2_chunk(bits) - 40  # three chunks, the last one short
    codes = torch.randint(0, 1 << bits, (1, k), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
    words = pack_v2(codes, bits)[:, 0].to(torch.int64) & 0xFFFFFFFF  # [chunks, 16]
    at = torch.arange(k)
    chunk, plane, word, high = at // v2_chunk(bits), (at % v2_chunk(bits)) // 32, (at % 32) // 2, at % 2
    half = (words[chunk, word] >> (16 * high)) & 0xFFFF
    per_shift, mantissa = 7 // bits, 7 if is_bf16 else 10
    place = bits * (plane % per_shift)  # where the plane's codes sit after the shift their group shares
    src = half >> (bits * per_shift * (plane // per_shift))
    exponent = (127 if is_bf16 else 15) + mantissa - place  # the code's last bit worth 2**0
    value_bits = (src & (((1 << bits) - 1) << place)) | (exponent << mantissa)
    value = value_bits.to(torch.int16).view(torch.bfloat16 if is_bf16 else torch.float16).float()
    assert torch.equal(value, position_biases(k, bits, is_bf16) + codes[0].float())


def test_row_sums_are_each_splits_sums_of_x_and_of_its_plane_biased_x():
    """What the epilogue needs per row and K split, the last split shorter: ``(Σx, Σ bias·x)`` in the launch's
    order, as one weight matrix's full-row reductions (for the glue to fuse with its norm)."""
    from meswitch.kernels.row_sums import SumsPlan, row_sums, sum_weights

    plan = SumsPlan(k=1000, span=384, splits=3, bits=2, is_bf16=True)
    x = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0)).bfloat16()
    (got,) = row_sums(x, [sum_weights(plan)])
    bias = position_biases(1000, 2, True).double()
    want = []
    for a in range(0, 1000, 384):
        part = x[:, a : a + 384].double()
        want += [part.sum(-1), (part * bias[a : a + 384]).sum(-1)]
    assert got.shape == (5, plan.width) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), torch.stack(want, -1), rtol=1e-6, atol=1e-3)


@pytest.mark.parametrize("bits", [1, 2])
def test_e4m3_inputs_are_x_rounded_per_row_in_the_fp8_planes_order_with_its_split_sums(bits):
    """What FP8 planes take of x (``row_sums.e4m3_inputs``, the glue's and the kernel test's reference): x8 in the
    planes' K order (``layout.e4m3_positions`` in each chunk, zeros past K) is ``e4m3_rows(x) / r``, the row's
    largest |x| lands on 448, and per K split (whole chunks, the last shorter) ``(Σ r·x8, 8·Σ r·x8)``."""
    from meswitch.kernels.layout import e4m3_positions
    from meswitch.kernels.row_sums import SumsPlan, e4m3_inputs, launch_args, launch_inputs, sum_weights

    k, chunk = 1000, v2_chunk(bits)
    plan = SumsPlan(k=k, span=chunk, splits=-(-k // chunk), bits=bits, is_bf16=True, fp8=True)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(bits)).bfloat16()
    x8, r, sums = e4m3_inputs(x, *sum_weights(plan))
    assert x8.dtype == torch.float8_e4m3fn and x8.shape == (2, 3, plan.padded)
    assert r.shape == (2, 3) and sums.shape == (2, 3, plan.width)
    assert torch.equal(x8.float().abs().amax(-1), torch.full((2, 3), 448.0))
    rounded = e4m3_rows(x)
    for c in range(plan.splits):
        at = c * chunk + e4m3_positions(bits)
        inside = at < k
        part = x8[..., c * chunk : (c + 1) * chunk].float() * r[..., None]
        assert torch.equal(part[..., inside], rounded[..., at[inside]]), c
        assert not part[..., ~inside].any()  # past K: zeros
        want = rounded[..., c * chunk : (c + 1) * chunk].double().sum(-1)
        torch.testing.assert_close(sums[..., 2 * c].double(), want, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(sums[..., 2 * c + 1], 8 * sums[..., 2 * c])
    (given,) = launch_inputs(x, [sum_weights(plan)])  # as the glue hands them to the launch
    args = launch_args(given, 6)
    assert args["x8"].shape == (6, plan.padded) and args["r"].shape == (6,)
    assert args["sums"].shape == (6, plan.splits, 2)


def test_layout_errors():
    with pytest.raises(ValueError, match="layout 2 packs"):
        pack_v2(torch.zeros(2, 64, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="unknown layout_version"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 2, 64, 7)


# ----------------------------------------------------------------------------------------- bank


@pytest.mark.parametrize(
    "config",
    [
        DeltaConfig(bits=2),
        DeltaConfig(bits=2, group_size=32),
        DeltaConfig(bits=4, symmetric=True),
        DeltaConfig(bits=3, group_size=64),
        DeltaConfig(bits=8),
        DeltaConfig(method="bitdelta"),
        DeltaConfig(bits=1, salient=0),
    ],
    ids=lambda c: f"{c.method}-b{c.bits}-g{c.group_size}-{'sym' if c.symmetric else 'asym'}",
)
def test_bank_dequantize_matches_compressed_delta(config):
    deltas = _experts(3, 24, 128, config, seed=config.bits)
    for version in (None, LAYOUT_V1):
        bank = DeltaBank.from_compressed(deltas, layout_version=version)
        for e, d in enumerate(deltas):
            torch.testing.assert_close(bank.dequantize(e), d.dequantize(), rtol=0, atol=0)


def test_bank_pads_salient_columns_and_picks_layout():
    a = _experts(1, 16, 128, DeltaConfig(bits=2, salient=5), seed=1)[0]
    b = _experts(1, 16, 128, DeltaConfig(bits=2, salient=0), seed=2)[0]
    bank = DeltaBank.from_compressed([a, b])
    assert bank.grid.layout_version == LAYOUT_V2 and bank.kmax == 5
    assert torch.equal(bank.salient_val[1], torch.zeros(16, 5, dtype=torch.float16))
    torch.testing.assert_close(bank.dequantize(1), b.dequantize(), rtol=0, atol=0)
    odd = _experts(1, 8, 96, DeltaConfig(bits=2, group_size=48), seed=3)
    assert DeltaBank.from_compressed(odd).grid.layout_version == LAYOUT_V1  # groups must cover whole planes
    assert DeltaBank.from_compressed(_experts(1, 8, 64, DeltaConfig(bits=3), seed=4)).grid.layout_version == LAYOUT_V1
    v1 = bank.with_layout(LAYOUT_V1)
    assert torch.equal(v1.with_layout(LAYOUT_V2).packed, bank.packed)


def test_bank_rejects_mixed_experts():
    a = _experts(1, 8, 64, DeltaConfig(bits=2), seed=1)[0]
    with pytest.raises(ValueError, match="shape"):
        DeltaBank.from_compressed([a, _experts(1, 8, 128, DeltaConfig(bits=2), seed=2)[0]])
    with pytest.raises(ValueError, match="one quantization grid"):
        DeltaBank.from_compressed([a, _experts(1, 8, 64, DeltaConfig(bits=4), seed=2)[0]])
    with pytest.raises(ValueError, match="group_size"):
        DeltaBank.from_compressed([a, _experts(1, 8, 64, DeltaConfig(bits=2, group_size=32), seed=2)[0]])
    with pytest.raises(ValueError, match="at least one"):
        DeltaBank.from_compressed([])


def test_random_bank_is_consistent():
    for bits, gs, k in [(2, 0, 512), (2, 128, 384), (4, 0, 200), (3, 0, 100)]:
        bank = DeltaBank.random(
            3, (16, k), bits=bits, group_size=gs, salient=4, generator=torch.Generator().manual_seed(0)
        )
        assert bank.dequantize(2).shape == (16, k)
        if bank.grid.layout_version == LAYOUT_V2:
            v1 = bank.with_layout(LAYOUT_V1)
            torch.testing.assert_close(v1.dequantize(1), bank.dequantize(1), rtol=0, atol=0)


@pytest.mark.parametrize("symmetric", [False, True])
def test_bank_lookup_rows_equal_dequantized_rows(symmetric):
    a, b = _experts(2, 16, 64, DeltaConfig(bits=2, salient=3, group_size=32, symmetric=symmetric), seed=5)
    b = replace(b, salient_idx=b.salient_idx[:1], salient_val=b.salient_val[:, :1])  # padded in the bank
    bank = DeltaBank.from_compressed([a, b], layout_version=LAYOUT_V1)
    experts, rows = torch.tensor([1, 0, 1, 0]), torch.tensor([3, 3, 15, 0])
    want = torch.stack([bank.dequantize(int(e))[int(r)] for e, r in zip(experts, rows, strict=True)])
    assert torch.equal(bank.lookup(experts, rows), want)
    assert torch.equal(bank.dequantize(1), b.dequantize())


# ------------------------------------------------------------------------------------ expert rows


def test_expert_rows_from_ids_and_segments():
    rows = ExpertRows.from_ids(torch.tensor([2, -1, 0, 2, 0, -1, 1]))
    assert rows.num_rows == 7 and rows.seg_experts == [0, 1, 2] and rows.seg_starts == [0, 2, 3, 5]
    assert rows.order.tolist() == [2, 4, 6, 0, 3]
    assert rows.tiles(1, torch.device("cpu")).tolist() == [[0, 1, 2], [0, 1, 4], [1, 1, 6], [2, 1, 0], [2, 1, 3]]
    assert rows.tiles(4, torch.device("cpu")).tolist() == [[0, 2, 2, 4, 0, 0], [1, 1, 6, 0, 0, 0], [2, 2, 0, 3, 0, 0]]
    assert rows.max_segment == 2
    seg = ExpertRows.from_segments([0, 3, 3, 5, 9], [1, 0, -1, 4], num_rows=10)
    assert seg.seg_experts == [1, 4] and seg.order.tolist() == [0, 1, 2, 5, 6, 7, 8]
    assert ExpertRows.from_ids([-1, -1]).num_segments == 0


def test_expert_rows_errors():
    with pytest.raises(ValueError, match=">= -1"):
        ExpertRows.from_ids([0, -2])
    with pytest.raises(ValueError, match="1-D"):
        ExpertRows.from_ids(torch.zeros(2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="integers"):
        ExpertRows.from_ids(torch.zeros(3))
    with pytest.raises(ValueError, match="non-decreasing"):
        ExpertRows.from_segments([0, 4, 2], [0, 1])
    with pytest.raises(ValueError, match="len"):
        ExpertRows.from_segments([0, 4], [0, 1])


# -------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize(
    "config",
    [
        DeltaConfig(bits=2),
        DeltaConfig(bits=2, group_size=32, salient=3),
        DeltaConfig(bits=1, symmetric=True),
        DeltaConfig(bits=3),
        DeltaConfig(bits=4, group_size=64),
        DeltaConfig(bits=8, salient=0),
        DeltaConfig(method="bitdelta"),
    ],
    ids=lambda c: f"{c.method}-b{c.bits}-g{c.group_size}",
)
@pytest.mark.parametrize("ids", [[0], [1, -1, 0, 2, 2, -1, 1, 0], [-1, -1, -1], [3, 3, 3, 0]])
def test_reference_matches_dense_per_row(config, ids):
    n, k = 40, 128
    deltas = _experts(4, n, k, config, seed=len(ids) + config.bits)
    bank = DeltaBank.from_compressed(deltas)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(len(ids), k, generator=g)
    y0 = torch.randn(len(ids), n, generator=g)
    want = _dense_per_row(x, y0, deltas, ids)
    got = mixed_delta_reference(x, bank, torch.tensor(ids), y0.clone())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    base_only = torch.tensor(ids) < 0
    assert torch.equal(got[base_only], y0[base_only])


def test_mixed_delta_on_cpu_uses_reference_and_checks_inputs():
    deltas = _experts(2, 16, 64, DeltaConfig(bits=2), seed=5)
    bank = DeltaBank.from_compressed(deltas)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    y = torch.zeros(3, 16, dtype=torch.bfloat16)
    out = mixed_delta(x, bank, [0, 1, -1], y)
    assert out is y and torch.equal(y[2], torch.zeros(16, dtype=torch.bfloat16))
    want = _dense_per_row(x.float(), torch.zeros(3, 16), deltas, [0, 1, -1])
    torch.testing.assert_close(y.double(), want, rtol=1e-2, atol=1e-3)
    with pytest.raises(ValueError, match=r"x must be \[M, K=64\]"):
        mixed_delta(torch.randn(3, 32, dtype=torch.bfloat16), bank, [0, 1, -1], y)
    with pytest.raises(ValueError, match="y must be"):
        mixed_delta(x, bank, [0, 1, -1], torch.zeros(3, 8, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="dtype"):
        mixed_delta(x, bank, [0, 1, -1], torch.zeros(3, 16))
    with pytest.raises(ValueError, match="out of range"):
        mixed_delta(x, bank, [0, 2, -1], y)
    with pytest.raises(ValueError, match="describe 2 rows"):
        mixed_delta(x, bank, [0, 1], y)
    with pytest.raises(ValueError, match="backend"):
        mixed_delta(x, bank, [0, 1, -1], y, backend="cuda")


# -------------------------------------------------------------------------------------------- GPU


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _check_kernel(bank, ids, dtype=torch.bfloat16, config=None, seed=0):
    """Kernel vs reference on fresh random x; base-only rows must stay bit-identical (NaN there)."""
    from meswitch.kernels.triton_delta import mixed_delta_triton

    n, k = bank.grid.shape
    m = len(ids)
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(m, k, device="cuda", generator=g).to(dtype)
    y0 = (torch.randn(m, n, device="cuda", generator=g) * 0.01).to(dtype)
    base_only = torch.tensor(ids, device="cuda") < 0
    y0[base_only] = float("nan")  # poison: a write there shows up as a non-NaN
    rows = ExpertRows.from_ids(torch.tensor(ids, device="cuda"))
    ref = mixed_delta_reference(x, bank, rows, y0.clone())
    got = mixed_delta_triton(x, bank, rows, y0.clone(), config)
    torch.cuda.synchronize()
    assert torch.isnan(got[base_only]).all(), "a base-only row was written"
    live = ~base_only
    if live.any():
        assert torch.isfinite(got[live]).all(), "non-finite output"
        # compare the deltas themselves (y0 is small), so an unwritten element fails
        err = _rel(got[live].float() - y0[live].float(), ref[live].float() - y0[live].float())
        assert err < 1e-2, f"relative error {err:.2e}"
    return got


def _ids(m, experts, base_only_every=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, experts, (m,), generator=g)
    if base_only_every:
        ids[::base_only_every] = -1
    return ids.tolist()


@gpu
@pytest.mark.parametrize("m", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("experts", [1, 4, 8, 16])
def test_kernel_decode_2bit_per_channel(m, experts):
    bank = DeltaBank.random(16, (512, 1024), bits=2, salient=11, device="cuda")
    _check_kernel(bank, _ids(m, experts, base_only_every=3 if m > 2 else 0, seed=m), seed=m * 31 + experts)


@gpu
@pytest.mark.parametrize("m", [300, 1024])
@pytest.mark.parametrize("experts", [1, 4, 16])
def test_kernel_prefill_2bit(m, experts):
    bank = DeltaBank.random(16, (384, 768), bits=2, salient=8, device="cuda")
    _check_kernel(bank, _ids(m, experts, base_only_every=7, seed=m), seed=m + experts)


@gpu
@pytest.mark.parametrize(
    "bits,group_size,symmetric,k",
    [
        (2, 128, False, 1024),
        (2, 64, True, 512),
        (2, 512, False, 1024),
        (2, 0, False, 1000),  # K not a multiple of the chunk
        (4, 0, False, 512),
        (4, 128, True, 512),
        (1, 0, True, 1024),
        (3, 0, False, 600),  # generic layout-1 path
        (8, 64, False, 256),
        (2, 48, False, 480),  # groups that do not cover whole planes: layout 1
    ],
)
@pytest.mark.parametrize("m", [3, 40, 200])
def test_kernel_bits_and_groups(bits, group_size, symmetric, k, m):
    bank = DeltaBank.random(
        4, (200, k), bits=bits, group_size=group_size, salient=5, symmetric=symmetric, device="cuda"
    )
    _check_kernel(bank, _ids(m, 4, base_only_every=4, seed=bits + m), seed=k + m)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kernel_on_compressed_experts(dtype):
    deltas = _experts(4, 256, 512, DeltaConfig(bits=2, salient=0.02), seed=11)
    bank = DeltaBank.from_compressed(deltas, device="cuda")
    ids = _ids(24, 4, base_only_every=5, seed=3)
    got = _check_kernel(bank, ids, dtype=dtype, seed=5)
    # and against the dense per-row product of the compressed experts themselves
    g = torch.Generator(device="cuda").manual_seed(5)
    x = torch.randn(24, 512, device="cuda", generator=g).to(dtype)
    y0 = (torch.randn(24, 256, device="cuda", generator=g) * 0.01).to(dtype)
    want = _dense_per_row(x.float().cpu(), y0.float().cpu(), deltas, ids)
    live = torch.tensor(ids) >= 0
    assert _rel(got[live].float().cpu() - y0[live].float().cpu(), want[live] - y0[live].double().cpu()) < 1e-2


@gpu
@pytest.mark.parametrize("split_k", [2, 5])
@pytest.mark.parametrize("block_m,epilogue", [(8, True), (16, True), (32, True), (64, False), (128, False)])
def test_kernel_launch_variants(split_k, block_m, epilogue):
    from meswitch.kernels.launch_config import LaunchConfig

    bank = DeltaBank.random(8, (256, 2048), bits=2, salient=9, device="cuda")
    cfg = LaunchConfig(block_m=block_m, split_k=split_k, epilogue_scale=epilogue, num_stages=3)
    _check_kernel(bank, _ids(min(block_m, 40), 8, base_only_every=6, seed=block_m), config=cfg, seed=split_k)


@gpu
def test_kernel_rejects_bad_inputs():
    from meswitch.kernels.triton_delta import mixed_delta_triton

    bank = DeltaBank.random(2, (64, 256), device="cuda")
    rows = ExpertRows.from_ids([0, 1])
    x = torch.randn(2, 256, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(2, 64, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):
        mixed_delta_triton(x.cpu(), bank, rows, y.cpu())
    with pytest.raises(ValueError, match="bf16 or fp16"):
        mixed_delta_triton(x.float(), bank, rows, y.float())
    with pytest.raises(ValueError, match="one device"):
        mixed_delta_triton(x, bank.to("cpu"), rows, y)
    with pytest.raises(ValueError, match="contiguous"):
        mixed_delta_triton(x.t().contiguous().t(), bank, rows, y)


@gpu
def test_mixed_delta_dispatches_to_triton():
    bank = DeltaBank.random(3, (128, 512), salient=4, device="cuda")
    x = torch.randn(6, 512, device="cuda", dtype=torch.bfloat16)
    y = torch.zeros(6, 128, device="cuda", dtype=torch.bfloat16)
    ids = torch.tensor([0, 2, -1, 1, 1, 0], device="cuda")
    ref = mixed_delta(x, bank, ids, y.clone(), backend="reference")
    got = mixed_delta(x, bank, ids, y.clone())
    assert _rel(got.float(), ref.float()) < 1e-2


@kernel
@pytest.mark.parametrize(
    "bits,symmetric,split_k,salient,k",
    [
        (2, False, 1, 0, 1024),
        (2, True, 2, 9, 1024),
        (1, False, 3, 0, 2048),
        (4, True, 1, 5, 512),
        (2, False, 2, 0, 1000),
        (2, False, 2, 70, 1024),  # three blocks of salient columns dealt round two K splits
        (2, True, 3, 40, 2048),  # two blocks, three splits: one takes none
    ],
)
@pytest.mark.parametrize("block_m", [8, 16])
def test_precomputed_row_sums_give_the_loops_result(bits, symmetric, split_k, salient, k, block_m):
    """``LaunchConfig.x_sums``: x's row sums from one small kernel, not from every N block's loop, with split K
    (each split its rows' sums over its part of K) and K not a whole number of chunks: the reference's delta, and
    the same as the sums accumulated in the loop; and the same again with the sums given, as the kernel that makes x
    computes them (:mod:`meswitch.kernels.row_sums`)."""
    from meswitch.kernels.launch_config import LaunchConfig, k_splits
    from meswitch.kernels.row_sums import SumsPlan, row_sums, sum_weights
    from meswitch.kernels.triton_delta import launch

    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is wrong
    device = "cuda" if CUDA else "cpu"
    bank = DeltaBank.random(4, (96, k), bits=bits, salient=salient, symmetric=symmetric,
                            generator=torch.Generator().manual_seed(bits)).to(device)  # fmt: skip
    ids = [0, -1, 2, 2, 1, 3, 0, -1, 3, 1, 2, 0]
    g = torch.Generator().manual_seed(k + split_k)
    x = (torch.randn(len(ids), k, generator=g) * 2).to(dtype).to(device)
    y0 = (torch.randn(len(ids), 96, generator=g) * 0.01).to(dtype).to(device)
    y0[torch.tensor(ids) < 0] = float("nan")  # poison: a write to a base-only row shows
    want = mixed_delta_reference(x.float(), bank, ids, y0.float().clone())
    tiles = ExpertRows.from_ids(ids).tiles(block_m, x.device)  # 8: the 8-row tiles of 4-row segments
    got = {}
    for sums in (False, True):  # the last cfg takes the sums
        cfg = LaunchConfig(block_n=32, block_m=block_m, split_k=split_k, num_stages=2, x_sums=sums)
        got[sums] = launch(x, bank, tiles, y0.clone(), cfg)
    splits, per_split = k_splits(bank.packed.shape[1], split_k)
    plan = SumsPlan(k, per_split * v2_chunk(bits), splits, bits, dtype == torch.bfloat16)
    (given,) = row_sums(x, [sum_weights(plan, x.device)])
    capped = replace(cfg, maxnreg=96)  # and at most 96 registers a thread (LaunchConfig.maxnreg)
    got["given"] = launch(x, bank, tiles, y0.clone(), capped, given.view(len(ids), splits, 2))
    paired = replace(cfg, paired_planes=True)  # and two planes a dot
    got["paired"] = launch(x, bank, tiles, y0.clone(), paired, given.view(len(ids), splits, 2))
    with pytest.raises(ValueError, match="row sums must be"):
        launch(x, bank, tiles, y0.clone(), cfg, given)  # [M, 2S], not [M, S, 2]
    live = torch.tensor(ids, device=x.device) >= 0
    delta = want[live] - y0[live].float()
    for way in (True, "given", "paired"):
        assert torch.isnan(got[way][~live]).all(), "a base-only row was written"
        assert _rel(got[way][live].float() - y0[live].float(), delta) < 1e-2
        assert _rel(got[way][live].float() - y0[live].float(), got[False][live].float() - y0[live].float()) < 1e-2


def test_e4m3_positions_name_the_code_each_byte_of_a_chunk_holds():
    """FP8 plane q of byte j of a chunk (its bits [q*bits, ...), read from the words as little-endian bytes) is the
    code of chunk position ``e4m3_positions(bits)[q*64 + j]``: a permutation of the chunk, so the activations the
    FP8 planes meet are x's positions in that order."""
    from meswitch.kernels.layout import e4m3_positions

    for bits in (1, 2):
        order = e4m3_positions(bits)
        assert torch.equal(order.sort().values, torch.arange(v2_chunk(bits)))
        k = 3 * v2_chunk(bits)
        codes = torch.randint(0, 1 << bits, (5, k), generator=torch.Generator().manual_seed(bits), dtype=torch.uint8)
        packed = pack_v2(codes, bits)  # [chunks, N, 16]
        for c in range(packed.shape[0]):
            byte = packed[c].contiguous().view(torch.uint8).long()  # [N, 64]
            for q in range(8 // bits):
                got = (byte >> (bits * q)) & ((1 << bits) - 1)
                want = codes[:, c * v2_chunk(bits) + order[q * 64 : (q + 1) * 64]].long()
                assert torch.equal(got, want), (bits, c, q)
    with pytest.raises(ValueError, match="1, 2"):
        e4m3_positions(4)


@kernel
@pytest.mark.parametrize("bits,symmetric,split_k,k", [(2, False, 1, 512), (2, True, 2, 1000), (1, False, 2, 1024),
                                                      (1, True, 1, 700)])  # fmt: skip
@pytest.mark.parametrize("block_m", [16, 32, 64])
def test_fp8_planes_give_the_delta_of_x_rounded_to_e4m3(bits, symmetric, split_k, k, block_m):
    """``LaunchConfig.fp8_planes``: the planes on FP8 tensor cores against x rounded to e4m3 per row. Where x is
    exactly r·e4m3 (r a power of two) the launch gives the reference's delta, salient columns included; for any x
    without salient columns, the reference's delta of x rounded as above; against x itself an error of a few % of
    the delta (the rounding, on the delta's product only). With split K and K not a whole number of chunks."""
    from meswitch.kernels.launch_config import LaunchConfig
    from meswitch.kernels.triton_delta import launch

    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is wrong
    # y's own rounding, once a K split (bf16: 2.7-2.8e-3 with two splits on an H100), far below the e4m3 error (~3%)
    tol = 5e-3 if dtype == torch.bfloat16 else 2e-3
    device = "cuda" if CUDA else "cpu"
    ids = [0, -1, 2, 2, 1, 3, 0, -1, 3, 1, 2, 0]
    live = torch.tensor(ids, device=device) >= 0
    g = torch.Generator().manual_seed(k + split_k)
    y0 = (torch.randn(len(ids), 96, generator=g) * 0.01).to(dtype).to(device)
    y0[~live] = float("nan")  # poison: a write to a base-only row shows
    cfg = LaunchConfig(block_n=32, block_m=block_m, split_k=split_k, num_stages=2, fp8_planes=True)
    tiles = ExpertRows.from_ids(ids).tiles(block_m, device)

    def delta(out: torch.Tensor) -> torch.Tensor:
        assert torch.isnan(out[~live]).all(), "a base-only row was written"
        return out[live].float() - y0[live].float()

    exact = torch.randint(-448, 449, (len(ids), k), generator=g).float()
    exact = (exact.to(torch.float8_e4m3fn).float() * 2.0**-5).to(dtype).to(device)
    exact[:, 3] = 14.0  # max|x| = 448 · 2^-5: r a power of two, so x / r is exact in e4m3
    salient = DeltaBank.random(4, (96, k), bits=bits, salient=7, symmetric=symmetric,
                               generator=torch.Generator().manual_seed(bits)).to(device)  # fmt: skip
    want = mixed_delta_reference(exact.float(), salient, ids, y0.float().clone())
    assert _rel(delta(launch(exact, salient, tiles, y0.clone(), cfg)), delta(want)) < tol

    x = (torch.randn(len(ids), k, generator=g) * 2).to(dtype).to(device)
    plain = DeltaBank.random(4, (96, k), bits=bits, symmetric=symmetric,
                             generator=torch.Generator().manual_seed(bits + 10)).to(device)  # fmt: skip
    got = delta(launch(x, plain, tiles, y0.clone(), cfg))
    assert _rel(got, delta(mixed_delta_reference(e4m3_rows(x), plain, ids, y0.float().clone()))) < tol
    assert _rel(got, delta(mixed_delta_reference(x.float(), plain, ids, y0.float().clone()))) < FP8_PLANES_ERROR


@kernel
@pytest.mark.parametrize("bits,split_k,k", [(2, 2, 1000), (1, 1, 1024), (2, 3, 2048)])
def test_fp8_planes_take_x_in_e4m3_from_the_kernel_that_made_x(bits, split_k, k):
    """x in e4m3, its row scales and their sums as the decoder's glue computes them (``row_sums.e4m3_inputs``) are
    what ``_x_e4m3_kernel`` writes before a launch that is given none, and the launch given them adds the same
    delta; given piecemeal, to bf16 planes or mis-shaped, they are refused with a message."""
    from meswitch.kernels import triton_delta
    from meswitch.kernels.launch_config import LaunchConfig, k_splits
    from meswitch.kernels.row_sums import SumsPlan, launch_args, launch_inputs, sum_weights

    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is wrong
    device = "cuda" if CUDA else "cpu"
    ids = [0, -1, 2, 2, 1, 3, 0, -1, 3, 1, 2, 0]
    g = torch.Generator().manual_seed(k + bits)
    bank = DeltaBank.random(4, (96, k), bits=bits, salient=5, generator=g).to(device)
    x = (torch.randn(len(ids), k, generator=g) * 2).to(dtype).to(device)
    y0 = (torch.randn(len(ids), 96, generator=g) * 0.01).to(dtype).to(device)
    tiles = ExpertRows.from_ids(ids).tiles(16, device)
    cfg = LaunchConfig(block_n=32, block_m=16, split_k=split_k, num_stages=2, fp8_planes=True)
    chunks = bank.packed.shape[1]
    splits, per_split = k_splits(chunks, split_k)
    plan = SumsPlan(k, per_split * v2_chunk(bits), splits, bits, dtype == torch.bfloat16, fp8=True)
    given = launch_args(launch_inputs(x, [sum_weights(plan, device)])[0], len(ids))

    x8 = torch.empty(len(ids), chunks * v2_chunk(bits), dtype=torch.float8_e4m3fn, device=device)
    r, sums = torch.empty(len(ids), device=device), torch.empty(len(ids), splits, 2, device=device)
    triton_delta._x_e4m3_kernel[(len(ids), splits)](x, x8, r, sums, k, chunks, per_split, x.stride(0), x8.stride(0),
                                                    BITS=bits, BLOCK_K=1024)  # fmt: skip
    assert torch.equal(r, given["r"])
    same = (x8.float() == given["x8"].float()).float().mean()
    assert same > 0.999  # the interpreter rounds e4m3's subnormals twice (ptx_planes.to_e4m3): rarely one step off
    torch.testing.assert_close(sums, given["sums"], rtol=1e-5, atol=1e-3)

    own = triton_delta.launch(x, bank, tiles, y0.clone(), cfg)
    taken = triton_delta.launch(x, bank, tiles, y0.clone(), cfg, **given)
    live = torch.tensor(ids, device=device) >= 0
    assert torch.equal(taken[~live], y0[~live])
    assert _rel(taken[live].float() - y0[live].float(), own[live].float() - y0[live].float()) < 2e-3
    with pytest.raises(ValueError, match="go together"):
        triton_delta.launch(x, bank, tiles, y0.clone(), cfg, given["sums"], x8=given["x8"])
    with pytest.raises(ValueError, match="go together"):  # to bf16 planes
        triton_delta.launch(x, bank, tiles, y0.clone(), replace(cfg, fp8_planes=False), **given)
    with pytest.raises(ValueError, match="x in e4m3 must be"):
        triton_delta.launch(x, bank, tiles, y0.clone(), cfg, given["sums"], given["x8"][:, :-1], given["r"])
    with pytest.raises(ValueError, match="row scales must be"):
        triton_delta.launch(x, bank, tiles, y0.clone(), cfg, given["sums"], given["x8"], given["r"].double())


@kernel
def test_fp8_planes_refuse_what_they_cannot_hold():
    """4-bit codes (e4m3 has 3 mantissa bits), per-group steps and row sums given for the bf16 planes are refused
    with a message, never run."""
    from meswitch.kernels.launch_config import LaunchConfig
    from meswitch.kernels.triton_delta import launch

    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float16
    x = torch.randn(2, 512, device=device).to(dtype)
    y = torch.zeros(2, 64, device=device, dtype=dtype)
    tiles = ExpertRows.from_ids([0, 1]).tiles(16, device)
    cfg = LaunchConfig(block_n=32, block_m=16, num_stages=2, fp8_planes=True)
    for bank in (DeltaBank.random(2, (64, 512), bits=4), DeltaBank.random(2, (64, 512), bits=2, group_size=128)):
        with pytest.raises(ValueError, match="FP8 planes need"):
            launch(x, bank.to(device), tiles, y, replace(cfg, epilogue_scale=bank.grid.group_size == 0))
    sums = torch.zeros(2, 1, 2, device=device)
    with pytest.raises(ValueError, match="with x8 and r"):
        launch(x, DeltaBank.random(2, (64, 512), bits=2).to(device), tiles, y, cfg, sums)


def test_the_mlp_shapes_with_many_row_tiles_take_precomputed_row_sums(monkeypatch):
    """``config_for``'s rule from the H200 A/B (NOTES-kernels.md): row sums from their own kernel and K split in
    two only on the MLP's shapes with 8 or more row tiles; off with MESWITCH_X_SUMS=0 and in deterministic mode.
    The SM count is patched to the H200's (132): the rule reads the device, which this machine may lack."""
    from meswitch.kernels import launch_config
    from meswitch.kernels.launch_config import config_for

    monkeypatch.setattr(launch_config, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    down = DeltaBank.random(1, (4096, 14336), bits=2)
    qkv = DeltaBank.random(1, (6144, 4096), bits=2)
    on = config_for(down, 16, 8, cpu)
    assert on.x_sums and on.split_k == 2 and on.epilogue_scale
    assert not config_for(down, 16, 4, cpu).x_sums  # 4 experts: the extra launch costs more than it saves
    assert not config_for(qkv, 16, 8, cpu).x_sums  # a small shape
    assert not config_for(down, 64, 8, cpu).x_sums  # no epilogue scaling past 32 rows a tile
    monkeypatch.setenv("MESWITCH_X_SUMS", "0")
    assert not config_for(down, 16, 8, cpu).x_sums
    monkeypatch.delenv("MESWITCH_X_SUMS")
    torch.use_deterministic_algorithms(True)
    try:
        det = config_for(down, 16, 8, cpu)
    finally:
        torch.use_deterministic_algorithms(False)
    assert det.split_k == 1 and not det.x_sums


def test_a_launch_given_row_sums_takes_them_wherever_the_epilogue_scales(monkeypatch):
    """Row sums given by the kernel that made x (``sums_given``) are taken by every launch that scales in the
    epilogue, whatever its shape and row tiles, with K split as without them; ``sums_plan`` cuts K as the launch
    will (splits and positions a split) and plans nothing for prefill tiles. H200's SM count patched in."""
    from meswitch.kernels import launch_config
    from meswitch.kernels.launch_config import config_for, sums_plan

    monkeypatch.setattr(launch_config, "_sm_count", lambda device: 132)
    cpu = torch.device("cpu")
    down = DeltaBank.random(1, (4096, 14336), bits=2)
    qkv = DeltaBank.random(1, (6144, 4096), bits=2)
    for bank, tiles in ((qkv, 8), (qkv, 1), (down, 4), (down, 8)):
        alone, given = (config_for(bank, 16, tiles, cpu, sums_given=g) for g in (False, True))
        same = {f: getattr(alone, f) for f in ("x_sums", "paired_planes", "maxnreg")}
        assert given.x_sums and replace(given, **same) == alone  # K split as without them
    plan = sums_plan(down, 16, 8, cpu, torch.bfloat16)
    assert (plan.k, plan.splits, plan.span, plan.bits, plan.is_bf16) == (14336, 2, 7168, 2, True)
    plan = sums_plan(qkv, 16, 1, cpu, torch.float16)  # one tile: K split four ways
    assert (plan.splits, plan.span, plan.is_bf16) == (4, 1024, False)
    assert sums_plan(down, 64, 8, cpu, torch.bfloat16) is None  # prefill tiles scale in registers
    paired = config_for(down, 16, 8, cpu)  # 16-row tiles with the sums: two planes a dot in 128 registers
    assert paired.paired_planes and paired.maxnreg == 128
    assert config_for(down, 32, 8, cpu).maxnreg is None and not config_for(down, 32, 8, cpu).paired_planes
    assert not config_for(qkv, 16, 8, cpu).paired_planes  # no sums given, none of its own: the loop sums
    monkeypatch.setenv("MESWITCH_DELTA_CONFIG", '{"maxnreg": 96, "paired_planes": true}')  # an A/B in the step
    overridden = config_for(down, 16, 8, cpu)
    monkeypatch.delenv("MESWITCH_DELTA_CONFIG")
    assert overridden == replace(config_for(down, 16, 8, cpu), maxnreg=96)
    monkeypatch.setenv("MESWITCH_DELTA_CONFIG", '{"fp8_planes": true}')  # FP8 planes where they fit, and no sums
    assert config_for(down, 16, 8, cpu).fp8_planes and sums_plan(down, 16, 8, cpu, torch.bfloat16).fp8
    assert not config_for(DeltaBank.random(1, (4096, 4096), bits=4), 16, 8, cpu).fp8_planes  # 4-bit codes
    assert not config_for(down, 8, 8, cpu).fp8_planes  # 8-row tiles
    prefill = config_for(down, 128, 8, cpu)  # prefill tiles too, scaling in the epilogue (x's sums come with x8)
    assert prefill.fp8_planes and prefill.epilogue_scale and prefill.block_m == 128
    for wrong in ('{"fp8": true}', "fp8_planes=1", "[1]"):  # a misspelt field, not JSON, not an object
        monkeypatch.setenv("MESWITCH_DELTA_CONFIG", wrong)
        with pytest.raises(ValueError, match="MESWITCH_DELTA_CONFIG"):
            config_for(down, 16, 8, cpu)
    monkeypatch.delenv("MESWITCH_DELTA_CONFIG")
    torch.use_deterministic_algorithms(True)
    try:
        assert sums_plan(down, 16, 8, cpu, torch.bfloat16).splits == 1
    finally:
        torch.use_deterministic_algorithms(False)


@kernel
@pytest.mark.parametrize("block_m,split_k", [(64, 1), (128, 2)])
def test_prefill_tiles_take_steps_in_the_epilogue_from_row_sums(block_m, split_k):
    """Prefill-sized row tiles with per-channel steps applied in the epilogue (``x_sums``: no [32, BLOCK_M]
    accumulators in the loop): the reference's delta, rows of three experts and base-only rows left alone."""
    from meswitch.kernels.launch_config import LaunchConfig
    from meswitch.kernels.triton_delta import launch

    dtype = torch.bfloat16 if CUDA else torch.float16  # the interpreter's bf16 dot is wrong
    device = "cuda" if CUDA else "cpu"
    codes = torch.Generator().manual_seed(block_m)
    bank = DeltaBank.random(3, (64, 512), bits=2, salient=7, generator=codes).to(device)
    ids = _ids(150, 3, base_only_every=9, seed=block_m)
    g = torch.Generator().manual_seed(block_m + split_k)
    x = torch.randn(len(ids), 512, generator=g).to(dtype).to(device)
    y0 = (torch.randn(len(ids), 64, generator=g) * 0.01).to(dtype).to(device)
    y0[torch.tensor(ids) < 0] = float("nan")
    want = mixed_delta_reference(x.float(), bank, ids, y0.float().clone())
    cfg = LaunchConfig(block_n=32, block_m=block_m, split_k=split_k, num_warps=4, num_stages=2, x_sums=True)
    got = launch(x, bank, ExpertRows.from_ids(ids).tiles(block_m, x.device), y0.clone(), cfg)
    live = torch.tensor(ids, device=x.device) >= 0
    assert torch.isnan(got[~live]).all(), "a base-only row was written"
    assert _rel(got[live].float() - y0[live].float(), want[live] - y0[live].float()) < 1e-2
