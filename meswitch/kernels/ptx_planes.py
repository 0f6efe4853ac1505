"""The inline PTX of one bit plane: how the delta kernels turn packed codes into MMA operands.

Codes are layout 2 (:mod:`.layout`): per K chunk one ``[BLOCK_N, 16]`` int32 tile, read as int16 pairs. Each
plane is one ``lop3`` per register (mask the two codes of a word's half-words and or in a bf16/fp16 exponent:
``bias + code`` in both halves, Marlin's trick) plus at most one shift per three planes; the register-scale
variant adds two packed FMAs for ``code·s + o``. The constants are computed at compile time. Under Triton's
CPU interpreter (``TRITON_INTERPRET=1``), which runs no PTX, each plane is the same bit trick written in
Triton one half-word at a time, so the kernels can be tested on a machine without a GPU.

FP8 planes (:func:`plane_e4m3`, 1- and 2-bit codes): the same words read as bytes, one code of each byte masked
into the low mantissa bits of an e4m3 value whose exponent makes it ``8 + code``: four MMA operands a register
(FP8 tensor cores take them at twice bf16's rate) for one shift and one ``lop3``.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.runtime.jit import constexpr_function

from meswitch.kernels import layout

INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET") == "1")


@constexpr_function
def _per_shift(bits: int) -> int:
    """Codes of a half-word that fit the 7 mantissa bits of bf16 (fp16 has 10) without another shift."""
    return 7 // bits


@constexpr_function
def _mantissa_bits(is_bf16: bool) -> int:
    return 7 if is_bf16 else 10


@constexpr_function
def _plane_consts(bits: int, p: int, is_bf16: bool) -> tuple[int, int, int, float]:
    """(mask2, magic2, neg_bias2, bias) for plane p: the code pair sits at bits bits*q of each
    half-word after a right shift by :func:`_shift_of`; or-ing in an exponent makes it bias + code."""
    q = p % _per_shift(bits)
    mask = ((1 << bits) - 1) << (bits * q)
    top = _mantissa_bits(is_bf16)  # the bias is 2^(top - bits*q): the code's last bit is worth 1
    exp = (127 if is_bf16 else 15) + top - bits * q
    magic = exp << top
    bias = float(2 ** (top - bits * q))
    neg = magic | 0x8000
    return mask | (mask << 16), magic | (magic << 16), neg | (neg << 16), bias


@constexpr_function
def _shift_of(bits: int, p: int) -> int:
    per_shift = _per_shift(bits)
    return bits * per_shift * (p // per_shift)


@constexpr_function
def _shift(bits, p):
    return _shift_of(bits, p)


@constexpr_function
def _half_consts(bits, p, is_bf16):
    """(mask, magic) of plane p for one half-word: what the interpreter's emulation of the lop3 uses."""
    mask2, magic2, _, _ = _plane_consts(bits, p, is_bf16)
    return mask2 & 0xFFFF, magic2 & 0xFFFF


@constexpr_function
def _shift_asm(bits, p):
    return f"shr.u32 $0, $1, {_shift_of(bits, p)};"


@constexpr_function
def plane_bias(bits, p, is_bf16):
    return _plane_consts(bits, p, is_bf16)[3]


@constexpr_function
def _biased_asm(bits, p, is_bf16):
    mask2, magic2, _, _ = _plane_consts(bits, p, is_bf16)
    return f"lop3.b32 $0, $1, {mask2:#x}, {magic2:#x}, 0xEA;"


@constexpr_function
def _scaled_asm(bits, p, is_bf16):
    mask2, magic2, neg2, _ = _plane_consts(bits, p, is_bf16)
    one2 = 0x3F803F80 if is_bf16 else 0x3C003C00
    op = "bf16x2" if is_bf16 else "f16x2"
    return (
        "{ .reg .b32 t, one, nb; "
        f"lop3.b32 t, $1, {mask2:#x}, {magic2:#x}, 0xEA; "
        f"mov.b32 one, {one2:#x}; mov.b32 nb, {neg2:#x}; "
        f"fma.rn.{op} t, t, one, nb; "
        f"fma.rn.{op} $0, t, $2, $3; }}"
    )


@triton.jit
def position_bias(kk, BITS: tl.constexpr, IS_BF16: tl.constexpr):
    """:func:`plane_bias` of each K position ``kk`` (its plane within its chunk of ``32 * 16 // BITS``), in fp32:
    for sums over x weighted as the biased planes weight it."""
    q = ((kk // 32) % (16 // BITS)) % _per_shift(BITS)
    return (1 << (_mantissa_bits(IS_BF16) - BITS * q)).to(tl.float32)


@triton.jit
def plane_source(words, BITS: tl.constexpr, p: tl.constexpr):
    if INTERPRET:  # a logical shift of each half-word (the PTX shifts pairs; the bits it moves across are masked)
        src = ((words.to(tl.int32) & 0xFFFF) >> _shift(BITS, p)).to(tl.int16)
    elif _shift(BITS, p) > 0:
        src = tl.inline_asm_elementwise(_shift_asm(BITS, p), "=r,r", [words], dtype=tl.int16, is_pure=True, pack=2)
    else:
        src = words
    return src


@triton.jit
def plane_biased(src, BITS: tl.constexpr, p: tl.constexpr, IS_BF16: tl.constexpr):
    if INTERPRET:
        half = (src.to(tl.int32) & _half_consts(BITS, p, IS_BF16)[0]) | _half_consts(BITS, p, IS_BF16)[1]
        if IS_BF16:
            w = half.to(tl.int16).to(tl.bfloat16, bitcast=True)
        else:
            w = half.to(tl.int16).to(tl.float16, bitcast=True)
    elif IS_BF16:
        w = tl.inline_asm_elementwise(
            _biased_asm(BITS, p, True), "=r,r", [src], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        w = tl.inline_asm_elementwise(
            _biased_asm(BITS, p, False), "=r,r", [src], dtype=tl.float16, is_pure=True, pack=2
        )
    return w


@triton.jit
def plane_scaled(src, s, o, BITS: tl.constexpr, p: tl.constexpr, IS_BF16: tl.constexpr):
    if INTERPRET:
        code = plane_biased(src, BITS, p, IS_BF16).to(tl.float32) - plane_bias(BITS, p, IS_BF16)
        w = (code * s.to(tl.float32) + o.to(tl.float32)).to(s.dtype)
    elif IS_BF16:
        w = tl.inline_asm_elementwise(
            _scaled_asm(BITS, p, True), "=r,r,r,r", [src, s, o], dtype=tl.bfloat16, is_pure=True, pack=2
        )
    else:
        w = tl.inline_asm_elementwise(
            _scaled_asm(BITS, p, False), "=r,r,r,r", [src, s, o], dtype=tl.float16, is_pure=True, pack=2
        )
    return w


# 0x50 as e4m3: exponent 10 (bias 7), so the low mantissa bits count whole units from 8
E4M3_BIAS = tl.constexpr(layout.E4M3_BIAS)


@constexpr_function
def _e4m3_consts(bits: int) -> tuple[int, int]:
    """(mask, magic) over a word's four bytes: each byte's low ``bits`` bits, and the exponent of 8 or-ed in."""
    return ((1 << bits) - 1) * 0x01010101, 0x50505050


@constexpr_function
def _e4m3_asm(bits, q):
    mask, magic = _e4m3_consts(bits)
    if q == 0:
        return f"lop3.b32 $0, $1, {mask:#x}, {magic:#x}, 0xEA;"
    return f"{{ .reg .b32 t; shr.u32 t, $1, {bits * q}; lop3.b32 $0, t, {mask:#x}, {magic:#x}, 0xEA; }}"


@triton.jit
def plane_e4m3(bytes8, BITS: tl.constexpr, q: tl.constexpr):
    """FP8 plane ``q`` of int8 code bytes: each byte's codes at bits ``[BITS*q, BITS*(q+1))`` as e4m3
    ``8 + code`` (:data:`E4M3_BIAS`). The word's shift brings each byte's neighbour's low bits into its top bits; the
    mask drops them."""
    if INTERPRET:
        b = ((bytes8.to(tl.int32) & 0xFF) >> (BITS * q)) & (_e4m3_consts(BITS)[0] & 0xFF)
        w = (b | (_e4m3_consts(BITS)[1] & 0xFF)).to(tl.int8).to(tl.float8e4nv, bitcast=True)
    else:
        w = tl.inline_asm_elementwise(_e4m3_asm(BITS, q), "=r,r", [bytes8], dtype=tl.float8e4nv, is_pure=True,
                                      pack=4)  # fmt: skip
    return w


@triton.jit
def to_e4m3(v):
    """fp32 ``v`` (within ±448) rounded to e4m3, to nearest even. Triton's interpreter rounds a value that carries
    into the next power of two down to the power below (31.6 -> 16), so there the mantissa is rounded to 3 bits in
    fp32 first and the conversion left exact (e4m3's subnormals, under 2^-6, round once more, as a GPU rounds them)."""
    if INTERPRET:
        b = v.to(tl.int32, bitcast=True)
        b = (b + 0x7FFFF + ((b >> 20) & 1)) & -0x100000
        v = b.to(tl.float32, bitcast=True)
    return v.to(tl.float8e4nv)
