"""The Triton kernels behind ``meswitch::decode_attention`` (see :mod:`decode_attention`).

One program per (sequence, KV head, split of the positions): the rotary embedding applied to the KV head's G query
heads and the new key in registers, the query heads as one 16-row tile (grouped-query attention reads each cached
position once for all of them), an online softmax over ``BLOCK_N`` positions at a time, and split 0 adds the new
token from registers and writes it into the cache (no program reads that position from the cache, so there is no
race). When a batch has too few (sequence, head) pairs to fill the GPU, the positions are split and a second kernel
merges the splits (flash-decoding). The split count depends only on the batch size, head count and span, so a
captured graph keeps it.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from meswitch.kernels.attention_launch import AttentionLaunch, resolve


@triton.jit
def _attend(
    q_ptr, k_ptr, v_ptr, kc_ptr, vc_ptr, rows_ptr, pos_ptr, cos_ptr, sin_ptr, o_ptr, part_ptr, ml_ptr,
    dq_ptr, dk_ptr, dv_ptr,
    s_qb, s_qh, s_qg, s_kb, s_kh, s_vb, s_vh, s_cr, s_ch, s_cl, s_cos, s_sin,
    G, span, scale,
    D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, PER_SPLIT: tl.constexpr,
    BOUNDED: tl.constexpr, DELTAS: tl.constexpr,
):  # fmt: skip
    """``DELTAS``: q, k and v's expert deltas (``d*_ptr``, laid out as q, k and v) added as they are loaded, each
    sum rounded once to their dtype, as the add they replace rounded it."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    s = tl.program_id(2)
    heads = tl.num_programs(1)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    gm = g < G
    # rotary embedding (HF's rotate_half: x * cos + [-x2, x1] * sin), in fp32
    half: tl.constexpr = D // 2
    swap = tl.where(d < half, d + half, d - half)
    sign = tl.where(d < half, -1.0, 1.0)
    cos = tl.load(cos_ptr + b * s_cos + d).to(tl.float32)
    sin = tl.load(sin_ptr + b * s_sin + d).to(tl.float32) * sign
    q_off = b * s_qb + h * s_qh + g[:, None] * s_qg
    q = tl.load(q_ptr + q_off + d[None, :], mask=gm[:, None], other=0.0)
    q_sw = tl.load(q_ptr + q_off + swap[None, :], mask=gm[:, None], other=0.0)
    if DELTAS:
        q += tl.load(dq_ptr + q_off + d[None, :], mask=gm[:, None], other=0.0)
        q_sw += tl.load(dq_ptr + q_off + swap[None, :], mask=gm[:, None], other=0.0)
    q = (q.to(tl.float32) * cos[None, :] + q_sw.to(tl.float32) * sin[None, :]).to(q_sw.dtype)
    pos = tl.load(pos_ptr + b)
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    # batch row b attends to cache row b (its sequence); positions before its new token
    kc = kc_ptr + b * s_cr + h * s_ch
    vc = vc_ptr + b * s_cr + h * s_ch
    start = s * PER_SPLIT
    end = tl.minimum(tl.minimum(start + PER_SPLIT, pos), span)
    # the loop stops at the row's last position (Triton's interpreter cannot bound a loop by a loaded value:
    # there it runs the split's whole share, masked)
    for i in range(0, end - start if BOUNDED else PER_SPLIT, BLOCK_N):
        n = start + i + tl.arange(0, BLOCK_N)
        nm = n < end
        kt = tl.load(kc + n[:, None] * s_cl + d[None, :], mask=nm[:, None], other=0.0)
        sc = tl.dot(q, tl.trans(kt)) * scale
        sc = tl.where(nm[None, :], sc, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(sc, 1))
        m_use = tl.where(m_new > float("-inf"), m_new, 0.0)  # a block with no position yet: no NaN from -inf - -inf
        alpha = tl.exp(m_i - m_use)
        p = tl.exp(sc - m_use[:, None])
        vt = tl.load(vc + n[:, None] * s_cl + d[None, :], mask=nm[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(vt.dtype), vt)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
    if s == 0:  # the new token, from registers; written to its cache row (a padding row's: the scratch row)
        k_off = b * s_kb + h * s_kh
        kd = tl.load(k_ptr + k_off + d)
        k_sw = tl.load(k_ptr + k_off + swap)
        vn = tl.load(v_ptr + b * s_vb + h * s_vh + d)
        if DELTAS:
            kd += tl.load(dk_ptr + k_off + d)
            k_sw += tl.load(dk_ptr + k_off + swap)
            vn += tl.load(dv_ptr + b * s_vb + h * s_vh + d)
        kn = (kd.to(tl.float32) * cos + k_sw.to(tl.float32) * sin).to(q.dtype)
        sc_new = tl.sum(q.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * scale
        m_new = tl.maximum(m_i, sc_new)
        alpha = tl.exp(m_i - m_new)
        p_new = tl.exp(sc_new - m_new)
        acc = acc * alpha[:, None] + p_new[:, None] * vn.to(tl.float32)[None, :]
        l_i = l_i * alpha + p_new
        m_i = m_new
        r = tl.load(rows_ptr + b)
        tl.store(kc_ptr + r * s_cr + h * s_ch + pos * s_cl + d, kn)
        tl.store(vc_ptr + r * s_cr + h * s_ch + pos * s_cl + d, vn)
    bh = b * heads + h
    if SPLITS == 1:
        out = acc / l_i[:, None]
        tl.store(o_ptr + (bh * G + g[:, None]) * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=gm[:, None])
    else:
        part = (bh * SPLITS + s) * BLOCK_G
        tl.store(part_ptr + (part + g[:, None]) * D + d[None, :], acc)
        tl.store(ml_ptr + 2 * part + g, m_i)
        tl.store(ml_ptr + 2 * part + BLOCK_G + g, l_i)


@triton.jit
def _merge(part_ptr, ml_ptr, o_ptr, G, D: tl.constexpr, BLOCK_G: tl.constexpr, SPLITS: tl.constexpr):
    bh = tl.program_id(0)
    g = tl.arange(0, BLOCK_G)
    d = tl.arange(0, D)
    split = tl.arange(0, SPLITS)
    first = (bh * SPLITS + split[:, None]) * BLOCK_G
    m = tl.load(ml_ptr + 2 * first + g[None, :])  # [SPLITS, BLOCK_G]; finite in split 0 (the new token)
    l_all = tl.load(ml_ptr + 2 * first + BLOCK_G + g[None, :])
    top = tl.max(m, 0)
    denom = tl.sum(tl.exp(m - top[None, :]) * l_all, 0)
    acc = tl.zeros([BLOCK_G, D], tl.float32)
    for i in tl.static_range(SPLITS):
        part = (bh * SPLITS + i) * BLOCK_G
        w = tl.exp(tl.load(ml_ptr + 2 * part + g) - top)
        acc += tl.load(part_ptr + (part + g[:, None]) * D + d[None, :]) * w[:, None]
    out = acc / denom[:, None]
    tl.store(o_ptr + (bh * G + g[:, None]) * D + d[None, :], out.to(o_ptr.dtype.element_ty), mask=(g < G)[:, None])


def launch(
    q, k, v, k_cache, v_cache, rows, pos, span: int, scale: float, cos, sin, sms: int | None = None,
    cfg: AttentionLaunch | None = None, deltas: tuple | None = None,
) -> torch.Tensor:  # fmt: skip
    """``deltas``: (dq, dk, dv), added to q, k and v as the kernel loads them (each laid out as its tensor)."""
    b, heads, group, d = q.shape
    q, k, v, cos, sin = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k, v, cos, sin))
    if deltas is not None and any(dt.stride() != t.stride() for dt, t in zip(deltas, (q, k, v), strict=True)):
        raise ValueError("q, k and v's deltas must be laid out as q, k and v")
    if k_cache.stride(-1) != 1 or k_cache.stride() != v_cache.stride():
        raise ValueError("the caches must share one layout with the head dimension contiguous")
    if sms is None:
        sms = torch.cuda.get_device_properties(q.device).multi_processor_count
    cfg = resolve(cfg or AttentionLaunch(), b * heads, span, sms)
    splits = cfg.splits
    per_split = triton.cdiv(triton.cdiv(span, splits), cfg.block_n) * cfg.block_n
    block_g = max(16, triton.next_power_of_2(group))
    o = torch.empty((b, heads, group, d), dtype=q.dtype, device=q.device)
    part = ml = o  # unused with one split
    if splits > 1:
        part = torch.empty((b * heads * splits * block_g, d), dtype=torch.float32, device=q.device)
        ml = torch.empty((b * heads * splits * 2 * block_g,), dtype=torch.float32, device=q.device)
    _attend[(b, heads, splits)](
        q, k, v, k_cache, v_cache, rows, pos, cos, sin, o, part, ml, *(deltas or (q, k, v)),
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), cos.stride(0), sin.stride(0),
        group, span, scale,
        D=d, BLOCK_G=block_g, BLOCK_N=cfg.block_n, SPLITS=splits, PER_SPLIT=per_split,
        BOUNDED=os.environ.get("TRITON_INTERPRET") != "1", DELTAS=deltas is not None, num_warps=cfg.num_warps,
        **({"num_stages": cfg.num_stages} if cfg.num_stages else {}),
    )  # fmt: skip
    if splits > 1:
        _merge[(b * heads,)](part, ml, o, group, D=d, BLOCK_G=block_g, SPLITS=splits, num_warps=4)
    return o
