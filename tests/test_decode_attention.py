"""``meswitch::decode_attention`` against attention written out by hand (CPU, CI), and its Triton kernel
against the reference (GPU machine; MESWITCH_ATTENTION_INTERPRET=1 TRITON_INTERPRET=1 with Triton installed
runs the kernel through Triton's interpreter on the CPU, whose bf16 dot is wrong: there only fp16 holds)."""

from __future__ import annotations

import math
import os

import pytest
import torch

from meswitch.kernels.decode_attention import decode_attention, decode_attention_reference

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("MESWITCH_ATTENTION_INTERPRET") == "1"


def _case(b: int, hkv: int, group: int, d: int, length: int, pos: list[int], dtype, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    rows_total = b + 1  # the last row: scratch for padding rows

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(device)

    q, k, v = rnd(b, hkv, group, d), rnd(b, hkv, d), rnd(b, hkv, d)
    kc, vc = rnd(rows_total, hkv, length, d), rnd(rows_total, hkv, length, d)
    rows = torch.arange(b, device=device)
    angle = torch.rand(b, d // 2, generator=gen) * 6.3  # a rotary embedding's layout: each angle in both halves
    cos, sin = (f(torch.cat([angle, angle], dim=1)).to(dtype).to(device) for f in (torch.cos, torch.sin))
    return q, k, v, kc, vc, rows, torch.tensor(pos, device=device), cos, sin


def _rotate(x, cos, sin):
    """HF's rotary embedding by hand: x * cos + rotate_half(x) * sin, ``cos``/``sin`` broadcast over heads."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def _by_hand(q, kc, vc, pos, scale):
    """Each row's attention over its positions 0..pos (the new token already in the cache)."""
    out = torch.empty_like(q, dtype=torch.float32)
    for b, p in enumerate(pos.tolist()):
        keys, values = kc[b, :, : p + 1].float(), vc[b, :, : p + 1].float()  # [Hkv, p+1, D]
        w = torch.softmax(q[b].float() @ keys.transpose(1, 2) * scale, dim=-1)  # [Hkv, G, p+1]
        out[b] = w @ values
    return out


def test_reference_rotates_writes_the_new_token_and_attends_to_each_rows_positions():
    q, k, v, kc, vc, rows, pos, cos, sin = _case(3, 2, 3, 16, 32, [0, 5, 31], torch.float32, "cpu")
    scale = 1 / math.sqrt(16)
    out = decode_attention(q, k, v, kc, vc, rows, pos, 32, scale, cos, sin)
    for b, p in enumerate(pos.tolist()):
        torch.testing.assert_close(kc[b, :, p], _rotate(k[b], cos[b], sin[b]))
        torch.testing.assert_close(vc[b, :, p], v[b])
    q_rot = _rotate(q, cos[:, None, None], sin[:, None, None])
    torch.testing.assert_close(out, _by_hand(q_rot, kc, vc, pos, scale), atol=1e-5, rtol=1e-5)


def test_a_padding_row_writes_to_the_scratch_row_only():
    q, k, v, kc, vc, rows, pos, cos, sin = _case(2, 1, 2, 8, 16, [3, 0], torch.float32, "cpu")
    rows[1] = 2  # the scratch row
    before = kc[1].clone()
    decode_attention(q, k, v, kc, vc, rows, pos, 16, 0.5, cos, sin)
    torch.testing.assert_close(kc[1], before)
    torch.testing.assert_close(kc[2, :, 0], _rotate(k[1], cos[1], sin[1]))


def test_bad_shapes_are_refused():
    q, k, v, kc, vc, rows, pos, cos, sin = _case(2, 2, 2, 8, 16, [1, 1], torch.float32, "cpu")
    with pytest.raises(ValueError, match="k and v must be"):
        decode_attention(q, k[:, :1], v, kc, vc, rows, pos, 16, 0.5, cos, sin)
    with pytest.raises(ValueError, match="cos and sin must be"):
        decode_attention(q, k, v, kc, vc, rows, pos, 16, 0.5, cos[:, :4], sin)
    with pytest.raises(ValueError, match="span"):
        decode_attention(q, k, v, kc, vc, rows, pos, 17, 0.5, cos, sin)


# (batch, kv heads, group, head dim, cache length, span, positions): one split and several, G 3 (SmolLM2)
# and 4 (Mistral), head dims 64 and 128, first positions, a position at the span's end
KERNEL_CASES = [
    (4, 3, 3, 64, 256, 128, [0, 1, 63, 127]),
    (32, 8, 4, 128, 512, 128, [i * 4 for i in range(32)]),
    (1, 8, 4, 128, 2048, 2048, [2047]),
    (2, 2, 4, 128, 1024, 1024, [700, 65]),
]


@pytest.mark.skipif(not (CUDA or INTERPRET), reason="the Triton kernel: needs CUDA (runs on the GPU machine)")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES)
def test_kernel_equals_the_reference(case, dtype):
    from meswitch.kernels.attention_launch import split_count
    from meswitch.kernels.triton_attention import launch

    b, hkv, group, d, length, span, pos = case
    device = "cuda" if CUDA else "cpu"
    q, k, v, kc, vc, rows, pos_t, cos, sin = _case(b, hkv, group, d, length, pos, dtype, device, seed=b)
    rows[-1] = b  # the last row pads: it writes to the scratch row
    kc2, vc2 = kc.clone(), vc.clone()
    scale = 1 / math.sqrt(d)
    want = decode_attention_reference(q, k, v, kc, vc, rows, pos_t, span, scale, cos, sin)
    got = launch(q, k, v, kc2, vc2, rows, pos_t, span, scale, cos, sin, sms=132)
    # the same writes (the kernel rotates k in fp32 and rounds once; HF rounds each product), nothing else touched
    written = torch.zeros(kc.shape[:3], dtype=torch.bool, device=device)
    written[rows, :, pos_t] = True
    assert torch.equal(kc2[~written], kc[~written]) and torch.equal(vc2, vc)
    torch.testing.assert_close(kc2[written].float(), kc[written].float(), atol=2e-2, rtol=2e-2)
    # the padding row's output is never read (the reference attends to its cache row's stale position there)
    torch.testing.assert_close(got[:-1].float(), want[:-1].float(), atol=2e-2, rtol=2e-2)
    if span >= 1024 and b * hkv < 64:
        assert split_count(b * hkv, span, 132) > 1  # the merge kernel took part


def test_launch_choices_follow_the_span_and_batch():
    """32 positions an iteration for short spans with programs enough to fill the SMs, else 64; a split only with
    enough positions for each and too few (sequence, head) programs to fill the SMs; choices given stay."""
    from meswitch.kernels.attention_launch import SPLIT_POSITIONS, AttentionLaunch, resolve

    assert resolve(AttentionLaunch(), 32 * 8, 256, 132).block_n == 32
    assert resolve(AttentionLaunch(), 8 * 8, 256, 132).block_n == 64  # too few programs to fill the SMs
    assert resolve(AttentionLaunch(), 8 * 8, 2048, 132).block_n == 64
    assert resolve(AttentionLaunch(), 8 * 8, SPLIT_POSITIONS, 132).splits == 1  # a merge would cost more
    assert resolve(AttentionLaunch(), 8 * 8, 2048, 132).splits == 4  # 256 programs for 132 SMs
    assert resolve(AttentionLaunch(), 32 * 8, 2048, 132).splits == 1  # a batch of 32 fills the SMs
    fixed = AttentionLaunch(block_n=128, splits=2, num_warps=8)
    assert resolve(fixed, 8, 256, 132) == fixed


@pytest.mark.parametrize("device", ["cpu", "kernel"])
def test_the_deltas_of_q_k_v_are_added_as_they_are_loaded(device):
    """The op with q, k and v's deltas apart gives what it gives on their sums (the reference on the CPU; the
    kernel on the GPU, or under the interpreter in fp16), and writes the cache as the sums would."""
    if device == "kernel" and not (CUDA or INTERPRET):
        pytest.skip("the Triton kernel: needs CUDA (runs on the GPU machine) or MESWITCH_ATTENTION_INTERPRET=1")
    dtype = torch.float16 if device == "kernel" and not CUDA else torch.bfloat16
    on = "cuda" if CUDA and device == "kernel" else "cpu"
    b, hkv, group, d, length, span = 4, 2, 4, 64, 256, 256
    q, k, v, kc, vc, rows, pos, cos, sin = _case(b, hkv, group, d, length, [5, 130, 0, 77], dtype, on, seed=3)
    gen = torch.Generator().manual_seed(4)
    dq, dk, dv = ((torch.randn(t.shape, generator=gen) * 0.1).to(dtype).to(on) for t in (q, k, v))
    kc2, vc2 = kc.clone(), vc.clone()
    scale = 1 / math.sqrt(d)
    if device == "kernel":
        from meswitch.kernels.triton_attention import launch

        got = launch(q, k, v, kc2, vc2, rows, pos, span, scale, cos, sin, sms=132, deltas=(dq, dk, dv))
    else:
        got = decode_attention(q, k, v, kc2, vc2, rows, pos, span, scale, cos, sin, dq, dk, dv)
    want = decode_attention_reference(q + dq, k + dk, v + dv, kc, vc, rows, pos, span, scale, cos, sin)
    torch.testing.assert_close(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(kc2.float(), kc.float(), atol=2e-2, rtol=2e-2)
    assert torch.equal(vc2, vc)  # v's sum written as the sum: bit for bit
    without = decode_attention_reference(q, k, v, kc.clone(), vc.clone(), rows, pos, span, scale, cos, sin)
    assert (got.float() - without.float()).abs().max() > 1e-2  # the deltas did count


def test_the_deltas_of_q_k_v_come_together():
    q, k, v, kc, vc, rows, pos, cos, sin = _case(2, 2, 2, 16, 32, [3, 4], torch.float32, "cpu")
    with pytest.raises(ValueError, match="together"):
        decode_attention(q, k, v, kc, vc, rows, pos, 32, 0.5, cos, sin, torch.zeros_like(q))
    with pytest.raises(ValueError, match="shapes"):
        decode_attention(q, k, v, kc, vc, rows, pos, 32, 0.5, cos, sin, torch.zeros_like(k), k, v)
