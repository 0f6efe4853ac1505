"""Pure tensor functions: quantize, pack/unpack, salience, refinement."""

import pytest
import torch

from meswitch.compression.delta import DeltaConfig, compress_delta, relative_errors
from meswitch.compression.quantize import SUPPORTED_BITS, QuantSpec, pack, quantize, unpack, values_per_word
from meswitch.compression.refine import refine_steps
from meswitch.compression.salience import allocate_salient, reconstruction_scores, select_salient, shares_of


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("k", [1, 31, 64, 97])
def test_pack_unpack_round_trip(bits, k):
    g = torch.Generator().manual_seed(bits * 100 + k)
    codes = torch.randint(0, 2**bits, (7, k), generator=g, dtype=torch.uint8)
    packed = pack(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (7, -(-k // values_per_word(bits)))
    assert torch.equal(unpack(packed, bits, k), codes)


def test_unpack_refuses_too_few_words():
    with pytest.raises(ValueError, match="fewer than K"):
        unpack(torch.zeros(2, 1, dtype=torch.int32), 2, 17)


@pytest.mark.parametrize("bits", SUPPORTED_BITS)
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("group_size", [0, 16, -1])
def test_quantize_codes_in_range_and_error_shrinks_with_bits(bits, symmetric, group_size):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(32, 64, generator=g)
    q = quantize(w, QuantSpec(bits, symmetric, group_size))
    assert q.codes.max() <= 2**bits - 1
    assert q.scale.dtype == torch.float16
    assert (q.offset is None) == symmetric
    rel = float((q.dequantize() - w).norm() / w.norm())
    # A b-bit uniform grid fitted per row can't be worse than the zero matrix, and 8 bits is near exact.
    assert rel < 1.0
    if bits == 8:
        assert rel < 0.02


def test_more_bits_less_error():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    errs = [float((quantize(w, QuantSpec(b)).dequantize() - w).norm()) for b in (1, 2, 3, 4, 8)]
    assert errs == sorted(errs, reverse=True)


def test_invalid_specs_are_refused():
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=5)
    with pytest.raises(ValueError, match="multiple of group_size"):
        quantize(torch.randn(4, 10), QuantSpec(2, group_size=4))
    with pytest.raises(ValueError, match="method"):
        DeltaConfig(method="best")
    with pytest.raises(ValueError, match="count"):
        DeltaConfig(salient=2.5)


BIG, HOT = [0, 1, 2, 3], [4, 5, 6, 7]


def _constructed_case():
    """Columns BIG: the largest deltas but almost no activation. Columns HOT: modest deltas, hot inputs."""
    g = torch.Generator().manual_seed(3)
    delta = 0.01 * torch.randn(64, 128, generator=g)
    delta[:, BIG] *= 10
    delta[:, HOT] *= 3
    s = torch.ones(128)
    s[BIG] = 1e-2
    s[HOT] = 1e2
    return delta, s


def test_salience_picks_channels_by_output_error_where_magnitude_picks_wrong():
    delta, s = _constructed_case()
    spec = QuantSpec(2)
    assert select_salient(delta, s, spec, 4, "magnitude").tolist() == BIG
    assert select_salient(delta, s, spec, 4, "meswitch").tolist() == HOT
    ours = compress_delta(delta, s, DeltaConfig("meswitch", salient=4))
    mag = compress_delta(delta, s, DeltaConfig("magnitude", salient=4))
    fixed = compress_delta(delta, s, DeltaConfig("fixed"))
    assert ours.nbytes() == mag.nbytes()  # equal bytes, so the comparison is fair
    err = {
        name: relative_errors(delta, cd.dequantize(), s)[1]
        for name, cd in (("ours", ours), ("mag", mag), ("fixed", fixed))
    }
    # The activation-weighted (output) error is what matters, and ours is clearly lowest...
    assert err["ours"] < 0.8 * err["mag"] < 0.8 * err["fixed"]
    # ...even though magnitude selection wins on the plain weight error it optimises.
    assert relative_errors(delta, mag.dequantize(), None)[0] < relative_errors(delta, ours.dequantize(), None)[0]


def test_global_allocation_puts_the_budget_where_the_error_is_concentrated():
    concentrated, s_hot = _constructed_case()  # four hot channels hold most of the weighted error
    g = torch.Generator().manual_seed(5)
    flat = 0.01 * torch.randn(64, 128, generator=g)  # the error spread evenly over the channels
    shares = {
        "hot": shares_of(reconstruction_scores(concentrated, s_hot, QuantSpec(2))),
        "flat": shares_of(reconstruction_scores(flat, torch.ones(128), QuantSpec(2))),
    }
    assert all(float(v.sum()) == pytest.approx(1.0) for v in shares.values())
    # a budget of 4 (2 per matrix under per-layer allocation) all goes to the hot channels...
    assert allocate_salient(shares, 4) == {"hot": 4, "flat": 0}
    # ...and once those are taken, the evenly spread error of the other matrix is worth more than the rest
    assert allocate_salient(shares, 8) == {"hot": 4, "flat": 4}
    # the hot matrix's top channels are exactly its hot ones: what the per-matrix choice would pick too
    assert torch.topk(shares["hot"], 4).indices.sort().values.tolist() == HOT
    assert allocate_salient(shares, 0) == {"hot": 0, "flat": 0}
    with pytest.raises(ValueError, match="allocation"):
        DeltaConfig(allocation="everywhere")
    assert not DeltaConfig("fixed").allocates_globally and DeltaConfig("magnitude").allocates_globally
    assert not DeltaConfig("meswitch", allocation="layer").allocates_globally


def test_salient_channels_are_reproduced_to_fp16():
    delta, s = _constructed_case()
    cd = compress_delta(delta, s, DeltaConfig("meswitch", salient=4))
    idx = cd.salient_idx.long()
    assert torch.allclose(cd.dequantize()[:, idx], delta[:, idx], atol=1e-3, rtol=1e-3)
    assert torch.equal(idx, idx.sort().values)


def test_bits_per_param_counts_every_overhead():
    n, k = 64, 256
    cd = compress_delta(torch.randn(n, k), torch.ones(k), DeltaConfig("meswitch", bits=2, salient=8))
    expected_bits = n * k * 2 + n * 16 * 2 + 8 * 32 + n * 8 * 16  # codes, scale+offset, indices, salient values
    assert cd.nbytes() * 8 == expected_bits
    sym = compress_delta(torch.randn(n, k), torch.ones(k), DeltaConfig("meswitch", bits=2, salient=8, symmetric=True))
    assert sym.nbytes() * 8 == expected_bits - n * 16  # no offsets stored


def test_bitdelta_is_sign_times_one_scale():
    delta = torch.randn(32, 64, generator=torch.Generator().manual_seed(4))
    cd = compress_delta(delta, None, DeltaConfig("bitdelta"))
    approx = cd.dequantize()
    assert cd.scale.numel() == 1
    assert torch.equal(torch.sign(approx), torch.sign(delta))
    assert torch.allclose(approx.abs().mean(), delta.abs().mean(), rtol=1e-3)


def test_refinement_never_increases_weighted_error():
    g = torch.Generator().manual_seed(5)
    delta = torch.randn(48, 96, generator=g) * torch.linspace(0.1, 3, 96)
    s = torch.rand(96, generator=g) * 10
    for sym in (False, True):
        cd = compress_delta(delta, s, DeltaConfig("meswitch", bits=2, salient=2, symmetric=sym, clip_search=False))
        refined = refine_steps(delta, cd, s)
        before = relative_errors(delta, cd.dequantize(), s)[1]
        after = relative_errors(delta, refined.dequantize(), s)[1]
        assert after <= before + 1e-6
        assert torch.equal(refined.salient_idx, cd.salient_idx)
    # and without clip search it has room to improve a lot on this skewed matrix
    assert after < before


def _correlated_inputs(k: int, t: int = 2048, seed: int = 0) -> torch.Tensor:
    """Inputs with correlated channels and a few outlier channels, as a pretrained LLM's are."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.eye(k) + 0.5 * torch.randn(k, k, generator=g) / k**0.5
    x = torch.randn(t, k, generator=g) @ mix
    x[:, :3] *= 20
    return x


@pytest.mark.parametrize("bits", [1, 2, 3])
@pytest.mark.parametrize("group_size", [0, 32, -1])
def test_gptq_rounding_lowers_the_output_error_at_the_same_bytes(bits, group_size):
    x = _correlated_inputs(128)
    h = x.T @ x
    delta = torch.randn(48, 128, generator=torch.Generator().manual_seed(1)) * 0.01
    out = {}
    for rounding in ("nearest", "gptq"):
        cfg = DeltaConfig(bits=bits, salient=4, group_size=group_size, rounding=rounding)
        cd = compress_delta(delta, torch.diagonal(h), cfg, hessian=h)
        out[rounding] = cd
    err = {r: float(((x @ (delta - cd.dequantize()).T) ** 2).sum()) for r, cd in out.items()}
    assert err["gptq"] < 0.9 * err["nearest"], err
    assert out["gptq"].nbytes() == out["nearest"].nbytes()
    # the same salient channels and grid; only the codes and the salient corrections differ
    assert torch.equal(out["gptq"].salient_idx, out["nearest"].salient_idx)
    assert torch.equal(out["gptq"].scale, out["nearest"].scale)


def test_gptq_without_a_hessian_is_nearest_rounding():
    delta = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    s = torch.rand(64) + 0.1
    a = compress_delta(delta, s, DeltaConfig(bits=2, salient=2, rounding="gptq"))
    b = compress_delta(delta, s, DeltaConfig(bits=2, salient=2))
    assert torch.equal(a.packed, b.packed) and torch.equal(a.salient_val, b.salient_val)


def test_gptq_survives_dead_input_channels():
    x = _correlated_inputs(64)
    x[:, 5] = 0  # a channel that never fires: a singular Hessian without the damping and the dead-channel fix
    h = x.T @ x
    delta = torch.randn(16, 64, generator=torch.Generator().manual_seed(3)) * 0.01
    cd = compress_delta(delta, torch.diagonal(h), DeltaConfig(bits=2, salient=2, rounding="gptq"), hessian=h)
    assert torch.isfinite(cd.dequantize()).all()


def test_unknown_rounding_is_refused():
    with pytest.raises(ValueError, match="rounding must be one of"):
        DeltaConfig(rounding="stochastic")


SPECS = [QuantSpec(bits=2), QuantSpec(bits=3, symmetric=True), QuantSpec(bits=4, group_size=64)]


@pytest.mark.parametrize("spec", SPECS)
def test_the_clip_search_by_row_blocks_picks_what_the_whole_matrix_search_picks(spec, monkeypatch):
    """On a CPU the clip search takes a block of rows at a time (to stay in cache): the codes and steps are those
    of one pass over the whole matrix, including rows of a last, shorter block."""
    from meswitch.compression import quantize as q

    g = torch.Generator().manual_seed(3)
    w = torch.randn(2000, 640, generator=g) * 0.02
    w[:, 5] *= 30  # an outlier column, so the clip ratios differ row to row
    weight = torch.rand(640, generator=g)
    assert 2000 % (q._CPU_BLOCK // 640) and w.numel() > 2 * q._CPU_BLOCK  # three blocks, the last shorter
    blocks = q.quantize(w, spec, weight)
    monkeypatch.setattr(q, "_CPU_BLOCK", 1 << 40)
    whole = q.quantize(w, spec, weight)
    assert torch.equal(blocks.codes, whole.codes) and torch.equal(blocks.scale, whole.scale)
    assert (blocks.offset is None) == spec.symmetric and (spec.symmetric or torch.equal(blocks.offset, whole.offset))
