"""The dp4a GEMV's arithmetic (kernels/gemv_dp4a.py): 2-byte activations written as int16 per group of 16 columns,
and the exact integer dot products of int8 weights with them, 4 bytes per dp4a.

    quant_groups(xa, xb [BM, G, 8] float32: each group's two halves) -> hi, lo [BM, G, 4] int32 words, s [BM, G]
    group_dots(w [1, BN, G, 4] words, hi, lo [BM, 1, G, 4] words) -> [BM, BN, G] int32 = sum over each group of w q
    pack_words(q0..q3 [...] int32, int16 in the low bits) -> (hi, lo) [...] words
    quant_groups_ref(x [M, K]) -> q [M, K] int32, s [M, K / 16] float32  (the pure-PyTorch definition)

Activations. Each row's columns go in groups g of 16. s[m, g] = 2^(E - 14), E the exponent of the group's
largest |x| (clamped to >= -112), and q = round(x / s), an int16 (|q| < 2^15: x / s < 2^15 and x is a 2-byte
float, so it stays below 2^15 - 2^4). A bf16 x (8 significant bits) with |x| >= 2^(E-7) is a multiple of s,
so q s = x exactly; an f16 x (11 bits) is exact from 2^(E-4). Smaller elements round to a multiple of s:
|q s - x| <= s / 2 <= max|x in g| * 2^-15, a 128th of the error bf16 itself allows the group's largest
element (half an ulp, 2^(E-8)) (but for groups whose largest |x| is below 2^-112, where s stays 2^-126:
|q s - x| <= 2^-127). inf or NaN in a group makes s NaN, so the outputs that read it are NaN (a float32 sum
would give inf for an inf times a nonzero weight: never a finite number either way).

Products. q = 256 hi + lo with hi = q >> 8 a signed byte and lo = q & 255 an unsigned one; four of them pack
into a 32-bit word each, so one dp4a multiplies 4 weight bytes by 4 activations' high (or low) bytes and adds:
sum_{k in g} w q = 256 dp4a.s32.s32(w, hi) + dp4a.s32.u32(w, lo) over the group's 4 words, exact in int32
(|w q| <= 128 * 2^15, 16 terms: below 2^26); its conversion to float32 rounds once when it exceeds 2^24.
Not the interpreter's or ROCm's: there the same integers come from shifts and multiplies (`PTX=False`), the
reference of the PTX form (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

GROUP = 16  # columns per activation scale


@triton.jit
def group_dots(w, hi, lo, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, PTX: tl.constexpr):
    """w [1, BN, G, 4] int32 words of int8 bytes; hi, lo [BM, 1, G, 4] words of q's signed high / unsigned low
    bytes -> [BM, BN, G] int32: per group, 256 * dot(w, hi) + dot(w, lo) over its 16 bytes = sum w q."""
    if PTX:  # one asm per 4 words (pack=4): the group's sum lands in the first output, the others are unused
        d = tl.inline_asm_elementwise(
            asm="""{
            dp4a.s32.s32 $0, $4, $8, 0;
            dp4a.s32.s32 $0, $5, $9, $0;
            dp4a.s32.s32 $0, $6, $10, $0;
            dp4a.s32.s32 $0, $7, $11, $0;
            shl.b32 $0, $0, 8;
            dp4a.s32.u32 $0, $4, $12, $0;
            dp4a.s32.u32 $0, $5, $13, $0;
            dp4a.s32.u32 $0, $6, $14, $0;
            dp4a.s32.u32 $0, $7, $15, $0;
            mov.b32 $1, 0;
            mov.b32 $2, 0;
            mov.b32 $3, 0;
            }""",
            constraints="=r,=r,=r,=r,r,r,r,r,r,r,r,r,r,r,r,r", args=[w, hi, lo], dtype=tl.int32, is_pure=True,
            pack=4)
        a, b = tl.split(tl.reshape(d, (BM, BN, G, 2, 2)))  # [BM, BN, G, 2] each: words 0, 2 and 1, 3
        first, third = tl.split(a)  # [BM, BN, G]
        return first
    prod = _byte(w, 0) * (_byte(hi, 0) * 256 + _ubyte(lo, 0)) + _byte(w, 1) * (_byte(hi, 1) * 256 + _ubyte(lo, 1)) \
        + _byte(w, 2) * (_byte(hi, 2) * 256 + _ubyte(lo, 2)) + _byte(w, 3) * (_byte(hi, 3) * 256 + _ubyte(lo, 3))
    return tl.sum(prod, axis=3)


@triton.jit
def _byte(word, i: tl.constexpr):
    """Byte i of int32 words as a signed value."""
    return (word << (24 - 8 * i)) >> 24


@triton.jit
def _ubyte(word, i: tl.constexpr):
    """Byte i of int32 words as an unsigned value."""
    return (word >> (8 * i)) & 255


@triton.jit
def pack_words(q0, q1, q2, q3, PTX: tl.constexpr):
    """4 int32 [...] whose low 16 bits are int16 values q_i -> (hi, lo) int32 words: byte i of hi is q_i's high
    byte, byte i of lo its low byte."""
    if PTX:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 a, b;
            prmt.b32 a, $2, $3, 0x5410;
            prmt.b32 b, $4, $5, 0x5410;
            prmt.b32 $0, a, b, 0x7531;
            prmt.b32 $1, a, b, 0x6420;
            }""",
            constraints="=r,=r,r,r,r,r", args=[q0, q1, q2, q3], dtype=(tl.int32, tl.int32), is_pure=True, pack=1)
    hi = ((q0 >> 8) & 255) | (((q1 >> 8) & 255) << 8) | (((q2 >> 8) & 255) << 16) | (((q3 >> 8) & 255) << 24)
    lo = (q0 & 255) | ((q1 & 255) << 8) | ((q2 & 255) << 16) | ((q3 & 255) << 24)
    return hi, lo


@triton.jit
def _half_words(x, inv, BM: tl.constexpr, G: tl.constexpr, PTX: tl.constexpr):
    """x [BM, G, 8] float32, inv [BM, G] (a power of two) -> hi, lo [BM, G, 2] words of round(x * inv)."""
    # x * inv + 1.5 * 2^23 rounds to an integer held in the low 22 bits; the low 16 are q as an int16
    qb = (x * inv[:, :, None] + 12582912.0).to(tl.int32, bitcast=True)
    a, b = tl.split(tl.reshape(qb, (BM, G, 2, 2, 2)))  # [BM, G, 2, 2] each; element e = 4 word + 2 i + j: a j = 0
    q0, q2 = tl.split(a)  # [BM, G, 2]: bytes 0 and 2 of each word
    q1, q3 = tl.split(b)  # bytes 1 and 3
    return pack_words(q0, q1, q2, q3, PTX)


@triton.jit
def quant_groups(xa, xb, BM: tl.constexpr, G: tl.constexpr, PTX: tl.constexpr):
    """A chunk of x as its groups' halves xa, xb [BM, G, 8] float32 -> hi, lo [BM, G, 4] words, s [BM, G]."""
    mag = tl.maximum(tl.max(xa.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2),
                     tl.max(xb.to(tl.int32, bitcast=True) & 0x7FFFFFFF, axis=2))  # inf / NaN bits are the largest
    e = tl.maximum(mag >> 23, 15)  # the biased exponent of the largest |x|, at least -112 + 127
    s = tl.where(e == 255, 0x7FC00000, (e - 14) << 23).to(tl.float32, bitcast=True)  # 2^(E-14); NaN for inf / NaN
    inv = ((268 - e) << 23).to(tl.float32, bitcast=True)  # 2^(14-E)
    hia, loa = _half_words(xa, inv, BM, G, PTX)
    hib, lob = _half_words(xb, inv, BM, G, PTX)
    hi = tl.reshape(tl.permute(tl.join(hia, hib), (0, 1, 3, 2)), (BM, G, 4))  # [BM, G, half, word] -> [BM, G, 4]
    lo = tl.reshape(tl.permute(tl.join(loa, lob), (0, 1, 3, 2)), (BM, G, 4))
    return hi, lo, s


def quant_groups_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> q [M, K] int32 (|q| < 2^15), s [M, K / 16] float32 powers of two (the module docstring)."""
    xf = x.float()
    groups = xf.view(x.shape[0], -1, GROUP)
    mag = groups.abs().amax(dim=2)
    e = torch.frexp(mag)[1] - 1  # exponent of the largest |x| (frexp: mag = f 2^(e+1), f in [0.5, 1))
    e = torch.where(mag > 0, e, torch.full_like(e, -112)).clamp(min=-112)
    s = torch.ldexp(torch.ones_like(mag), e - 14)
    s = torch.where(torch.isfinite(mag), s, torch.full_like(s, float("nan")))
    q = torch.round(groups / torch.where(torch.isfinite(s), s, torch.ones_like(s))[:, :, None])
    return q.view(x.shape).to(torch.int32), s
