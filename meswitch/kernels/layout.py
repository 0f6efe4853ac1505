"""Packed-code layouts the delta kernels read, and the repack from the artifact's layout 1.

Layout 1 (``meswitch.compression.quantize.pack``, what artifacts store): ``int32 [N, ceil(K / vpw)]``,
code ``j`` of a word at bits ``[j*bits, (j+1)*bits)``, words in K order along a row.

Layout 2 (bits 1, 2 and 4; built when a bank is loaded, never stored): K is cut into chunks of
``C = 32 * P`` positions, ``P = 16 // bits``; one chunk of one row is 16 int32 words, and the chunk's
words for all N rows are contiguous, so a kernel's ``[BLOCK_N, 16]`` tile is one coalesced block::

    packed_v2: int32 [ceil(K / C), N, 16]

Within a chunk, word ``i`` holds, for each *plane* ``p < P``, the codes of positions
``p*32 + 2i`` (bits ``[p*bits, (p+1)*bits)``, low half-word) and ``p*32 + 2i + 1``
(bits ``[16 + p*bits, ...)``, high half-word). One and-or of a word with a mask and a
bf16/fp16 exponent gives a register with two ready 16-bit values for adjacent K positions of one
plane: exactly the operand pair a tensor-core MMA wants, with no per-value shift or convert.
Positions past K are padded with code 0 (the kernel reads no x there).
"""

from __future__ import annotations

import torch

from meswitch.compression.quantize import pack, unpack, values_per_word

LAYOUT_V1 = 1
LAYOUT_V2 = 2
V2_BITS = (1, 2, 4)
WORDS_PER_CHUNK = 16
PLANE_WIDTH = 32  # K positions per plane: 16 words x 2 half-words


def v2_supported(bits: int, group_size: int = 0) -> bool:
    """Layout 2 holds 1-, 2- and 4-bit codes; step-size groups must cover whole planes."""
    return bits in V2_BITS and (group_size <= 0 or group_size % PLANE_WIDTH == 0)


def v2_planes(bits: int) -> int:
    """Planes per chunk: pairs of codes per word."""
    _check_v2_bits(bits)
    return 16 // bits


def v2_chunk(bits: int) -> int:
    """K positions per chunk."""
    return PLANE_WIDTH * v2_planes(bits)


def v2_num_chunks(bits: int, k: int) -> int:
    return -(-k // v2_chunk(bits))


def position_biases(k: int, bits: int, is_bf16: bool) -> torch.Tensor:
    """fp32 [k]: the bias each K position's plane carries in the kernels' operands (``bias + code``: the codes
    masked in place in their half-word, the bf16/fp16 exponent that makes their last bit worth 1 or-ed in), for
    the row sums the decode epilogue subtracts (:mod:`meswitch.kernels.row_sums`). The same arithmetic as
    ``ptx_planes._plane_consts``, which Triton evaluates at compile time and where it may call no plain function:
    a plane's codes sit ``bits * (p % (7 // bits))`` bits up (7 mantissa bits in bf16 hold ``7 // bits`` planes
    before the words are shifted), under ``7`` (bf16) or ``10`` (fp16) mantissa bits."""
    plane = (torch.arange(k) // PLANE_WIDTH) % v2_planes(bits)
    place = bits * (plane % (7 // bits))
    return torch.exp2(((7 if is_bf16 else 10) - place).float())


E4M3_BITS = (1, 2)
E4M3_PLANE_WIDTH = 64  # K positions per FP8 plane: 16 words x 4 bytes
E4M3_BIAS = 8.0  # an FP8 plane's operand is 8 + code (ptx_planes.plane_e4m3), at every position


def e4m3_positions(bits: int) -> torch.Tensor:
    """int64 [C]: for each K position of a chunk as the FP8 planes order it, the position in the chunk whose code it
    meets (``ptx_planes.plane_e4m3``). FP8 plane ``q`` (of ``8 // bits``) reads bits ``[q*bits, ...)`` of each byte
    ``j`` of the chunk's 16 words: byte ``b`` of word ``i`` holds layout-2 plane ``q + (8 // bits) * (b % 2)`` at
    position ``2i + b // 2``. The activations are written in this order (their K permuted within each chunk, as the
    MMA needs nothing else), so layout 2 serves both the bf16 and the FP8 planes."""
    if bits not in E4M3_BITS:
        raise ValueError(f"FP8 planes hold {E4M3_BITS}-bit codes (e4m3 has 3 mantissa bits), got {bits} bits")
    d = torch.arange(v2_chunk(bits))
    q, j = d // E4M3_PLANE_WIDTH, d % E4M3_PLANE_WIDTH
    b = j % 4
    return (q + (8 // bits) * (b % 2)) * PLANE_WIDTH + 2 * (j // 4) + b // 2


def _check_v2_bits(bits: int) -> None:
    if bits not in V2_BITS:
        raise ValueError(f"layout 2 packs {V2_BITS}-bit codes, got {bits} bits")


def pack_v2(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [N, K] -> int32 [ceil(K / C), N, 16] (layout 2)."""
    if codes.dim() != 2:
        raise ValueError(f"codes must be [N, K], got shape {tuple(codes.shape)}")
    n, k = codes.shape
    planes = v2_planes(bits)
    chunks = v2_num_chunks(bits, k)
    padded = torch.zeros(n, chunks * v2_chunk(bits), dtype=torch.int64, device=codes.device)
    padded[:, :k] = codes.to(torch.int64)
    # position = c*C + p*32 + 2i + h  ->  word (c, n, i), slot j = p + h*P, bits [j*bits, ...)
    v = padded.view(n, chunks, planes, WORDS_PER_CHUNK, 2)
    slot = torch.arange(planes, device=codes.device).view(planes, 1, 1) + planes * torch.arange(
        2, device=codes.device
    ).view(1, 1, 2)
    words = (v << (slot * bits)).sum(dim=(2, 4))  # [N, chunks, 16]
    words = torch.where(words >= 2**31, words - 2**32, words)
    return words.permute(1, 0, 2).contiguous().to(torch.int32)


def unpack_v2(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_v2`: int32 [chunks, N, 16] -> uint8 codes [N, K]."""
    if packed.dim() != 3 or packed.shape[2] != WORDS_PER_CHUNK:
        raise ValueError(f"layout-2 codes must be [chunks, N, 16], got shape {tuple(packed.shape)}")
    chunks, n, _ = packed.shape
    planes = v2_planes(bits)
    if chunks * v2_chunk(bits) < k:
        raise ValueError(f"{chunks} chunks hold {chunks * v2_chunk(bits)} positions, fewer than K={k}")
    w = packed.to(torch.int64).permute(1, 0, 2).reshape(n, chunks, 1, WORDS_PER_CHUNK, 1)
    slot = torch.arange(planes, device=packed.device).view(planes, 1, 1) + planes * torch.arange(
        2, device=packed.device
    ).view(1, 1, 2)
    codes = (w >> (slot * bits)) & ((1 << bits) - 1)  # [N, chunks, P, 16, 2]
    return codes.reshape(n, chunks * v2_chunk(bits))[:, :k].to(torch.uint8)


def repack_v1_to_v2(packed_v1: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Layout 1 ``int32 [N, W]`` (as stored in artifacts) -> layout 2 ``int32 [chunks, N, 16]``."""
    return pack_v2(unpack(packed_v1, bits, k), bits)


def repack_v2_to_v1(packed_v2: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Layout 2 -> layout 1, for round-trip checks and for writing artifacts back."""
    return pack(unpack_v2(packed_v2, bits, k), bits)


def unpack_codes(packed: torch.Tensor, bits: int, k: int, layout_version: int) -> torch.Tensor:
    """Codes [N, K] from either layout."""
    if layout_version == LAYOUT_V1:
        if packed.dim() != 2 or packed.shape[1] * values_per_word(bits) < k:
            raise ValueError(f"layout-1 codes must be [N, >= K/{values_per_word(bits)}], got {tuple(packed.shape)}")
        return unpack(packed, bits, k)
    if layout_version == LAYOUT_V2:
        return unpack_v2(packed, bits, k)
    raise ValueError(f"unknown layout_version {layout_version}; known: {LAYOUT_V1}, {LAYOUT_V2}")
