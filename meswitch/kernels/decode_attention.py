"""``decode_attention``: one decode step's rotary embedding and attention on the static KV cache, the new
token's K/V written into it, in one kernel.

In a captured 7B decode step at batch 32 (H200), cuDNN's SDPA spent 19.5 us a layer on 128 cached
positions, where reading them takes about 4 us, and writing the new token's K and V into the cache took
two more launches (together 0.9 ms of a 7.9 ms step; benchmarks/results/profile-decode-2026-12-03.json);
the kernel took 0.9 ms off the step (2026-12-04). Every launch in a replayed step also costs about 1.4 us of
boundary, so the rotary embedding of q and k is applied in the same kernel.
The registered op ``meswitch::decode_attention`` runs the Triton kernel (:mod:`triton_attention`) on CUDA
and :func:`decode_attention_reference` (HF's rotary embedding, index writes and SDPA) everywhere else.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from meswitch.kernels.ops import triton_available


def decode_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    span: int,
    scale: float,
    cos: torch.Tensor | None = None,
    sin: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Rotate ``q``/``k`` by ``cos``/``sin`` ([B, D]; None: already rotated), write ``k``/``v`` at
    ``(rows[b], :, pos[b])``, then attend batch row b to cache row b's positions 0..pos[b] (of the first ``span``)
    with SDPA; ``mask`` ([B, 1, 1, span]: position <= pos[b]) may be made once for all layers."""
    b = q.shape[0]
    if cos is not None:
        q, k = apply_rotary_pos_emb(q, k[:, :, None], cos[:, None], sin[:, None])
        k = k[:, :, 0]
    k_cache[rows, :, pos] = k
    v_cache[rows, :, pos] = v
    if mask is None:
        mask = decode_mask(pos, span)
    return F.scaled_dot_product_attention(q, k_cache[:b, :, :span], v_cache[:b, :, :span], attn_mask=mask, scale=scale)


def decode_mask(pos: torch.Tensor, span: int) -> torch.Tensor:
    return (torch.arange(span, device=pos.device)[None, :] <= pos[:, None])[:, None, None, :]


def _fits_kernel(q: torch.Tensor) -> bool:
    d = q.shape[-1]
    return q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and d & (d - 1) == 0 and triton_available()


@torch.library.custom_op("meswitch::decode_attention", mutates_args=("k_cache", "v_cache"))
def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    rows: torch.Tensor,
    pos: torch.Tensor,
    span: int,
    scale: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    dq: torch.Tensor | None = None,
    dk: torch.Tensor | None = None,
    dv: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of one decode step for ``B`` sequences, grouped-query, without repeating the cache.

    ``q`` [B, Hkv, G, D] (a KV head's G query heads), ``k``/``v`` [B, Hkv, D] the new token's, ``q`` and ``k``
    before the rotary embedding, which ``cos``/``sin`` [B, D] (each row's position) apply; caches [R, Hkv, L, D].
    The new K (rotated) and V go to cache row ``rows[b]`` at ``pos[b]`` (a padding row names a scratch row);
    row b attends to cache row b's positions before ``pos[b]`` and its new token, within the first ``span``
    positions. Returns [B, Hkv, G, D]; nothing is read on the host, so a CUDA graph can hold it. ``dq``, ``dk``,
    ``dv``: expert deltas of q, k and v (shaped and laid out as them; all or none), added before anything else: the
    kernel adds them as it loads q, k and v, so the step needs no add of its own for them.
    """
    b, hkv, _, d = q.shape
    if k.shape != (b, hkv, d) or v.shape != (b, hkv, d):
        raise ValueError(f"k and v must be [{b}, {hkv}, {d}], got {tuple(k.shape)} and {tuple(v.shape)}")
    if cos.shape != (b, d) or sin.shape != (b, d):
        raise ValueError(f"cos and sin must be [{b}, {d}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.shape[1] != hkv or k_cache.shape[3] != d:
        raise ValueError(f"caches must be [R, {hkv}, L, {d}], got {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if not 0 < span <= k_cache.shape[2] or k_cache.shape[0] < b:
        raise ValueError(f"span {span} and batch {b} must fit the cache {tuple(k_cache.shape)}")
    deltas = (dq, dk, dv)
    if any(t is None for t in deltas) != all(t is None for t in deltas):
        raise ValueError("give the deltas of q, k and v together, or none")
    if dq is not None and (dq.shape != q.shape or dk.shape != k.shape or dv.shape != v.shape):
        raise ValueError("q, k and v's deltas must have their shapes")
    if _fits_kernel(q):
        from meswitch.kernels.triton_attention import launch

        return launch(q, k, v, k_cache, v_cache, rows, pos, span, scale, cos, sin,
                      deltas=None if dq is None else deltas)  # fmt: skip
    if dq is not None:
        q, k, v = q + dq, k + dk, v + dv
    return decode_attention_reference(q, k, v, k_cache, v_cache, rows, pos, span, scale, cos, sin)


@decode_attention.register_fake
def _(q, k, v, k_cache, v_cache, rows, pos, span, scale, cos, sin, dq=None, dk=None, dv=None) -> torch.Tensor:
    return torch.empty_like(q)
