"""Per-token dynamic symmetric INT8 quantisation of activations, optionally fused with residual add +
RMSNorm (the pre-norm block's norm feeding a W8A8 linear).

    int8_quant(x [T, K])                           -> Int8Activations(q [T, K] int8, scale [T] f32, None)
    rms_norm_int8_quant(x, residual, weight, eps)  -> Int8Activations(q, scale, x + residual or None)
    launch_row_quant(..., fp8=True)                -> the same row kernels storing e4m3 (scale max / 448,
                                                      `quantize_fp8_values`): fp8_quant.rms_norm_fp8_quant

The module also holds the element steps every 8-bit activation quantiser shares (`round_half_even`,
`divide_by_scale`, `quantize_int8_values`, `round_to_e4m3_grid`, `quantize_fp8_values`, `quantize_row_values`):
fp8_quant.py, silu_and_mul_quant.py, int8_gemm_silu.py and the KV cache writes import them from here.

Per row t (the math of `deepserve.quant.int8.quantize_per_token_ref`, bit for bit):

    scale_t = max(max_k |v_tk|, 1e-8) / 127,     q_tk = clamp(round(v_tk / scale_t), -127, 127)

with IEEE divisions (`tl.div_rn`) and round-half-to-even (`torch.round`): on the GPU libdevice's
rint (HW_ROUND); under the Triton interpreter, which has no libdevice, the same rounding written with
`floor` (`round_half_even` below, exact for |v| < 2^23).

The fused variant first computes, in registers, what `kernels/rms_norm.py` writes (exactly, up to
the order of the row's sum of squares, which the wide-row kernel below changes: it sums lane-wise over
the chunks, then across lanes):
    s = x + residual (in x's dtype; stored as the new residual),
    v = weight * (s.f32 * rsqrt(mean(s.f32^2) + eps)).to(x.dtype), rounded to promote(x, weight)
and quantises v; the normalised activations never go to memory. The whole-row fused kernel sums the
squares in rms_norm's order: it runs at rms_norm's warps (`row_num_warps`) and stores q at 16 bytes of
x per thread (a `max_contiguous` hint: 8 int8 for bf16), so the row keeps rms_norm's register layout
(8 bf16 per thread); without the hint the 16-int8 store vectors made it 16 elements per thread, another
order of the sum (and the warps differed at 1025-2048 columns: 4 vs 8). Checked by compiling both for
sm_90a (Triton 3.9, no GPU; hidden, strides and pointers 16-aligned as Triton specialises them for
served models): the TTGIR up to and including the sum-of-squares reduction is the same, layouts
included, for bf16 / f16 / f32 at 896-8192 columns, with and without residual, and the PTX float ops
before the rsqrt are the same multiset; no spills. The 8-byte q stores are untimed. Bit-equality on a
GPU is asserted by GPU tests (tests/kernels/test_int8_quant.py, tests/unit/test_fused_norm_quant_linear.py;
with FP8 also tests/kernels/test_fp8_quant.py), which passed on an H200 (run s11d: the decoder layer fused ==
unfused for int8 and fp8 at qwen-7b / qwen-1.5b shapes, 1-2048 tokens). The plain int8_quant kernel (NORM off)
is unchanged.

Two kernels, one program per row in both:
  * K <= whole_row_max (default _WHOLE_ROW_MAX = 8192): the whole row in registers (BLOCK =
    next_power_of_2(K)), so x is read once. Measured on an H200 (run s6h2, benchmarks/gpu_quant.py):
    near bandwidth at K = 3584 (0.041 ms for 8192 rows); at K = 18944 (qwen-7b's down-projection
    input) 0.497 ms for 8192 rows, 4.5x the bytes' time, and 17.6 us for 256 rows: BLOCK 32768
    leaves 42% of the lanes idle and needs 32 warps with 32 elements per thread.
  * wider rows (`_int8_quant_wide_kernel`): the program loops over the row in chunks of CHUNK
    (default _CHUNK = 4096) columns: pass 1 takes max |v| chunk by chunk (the max does not depend on
    the order, so it equals the whole-row one exactly), pass 2 re-reads the chunks last to first
    (the most recently read first), quantises them and stores q. The re-reads are expected to hit
    L2 (a guess: a 18944-column bf16 row is 38 KB; 6 resident rows per SM, see below, x 132 SMs
    is 30 MB of the 50 MB L2). Same per-element arithmetic (`quantize_int8_values`), so the bits are those of the
    whole-row kernel and of the reference. The fused variant makes one more pass first (residual
    add, stored once, and the sum of squares) and recomputes s from x and residual in the later
    passes. x is read from memory once and from cache once or twice.
    Measured on an H200 (run s6h4, benchmarks/gpu_quant.py, 18944 columns of bf16): 0.202 ms for 8192
    rows, 11.6 us for 256 (the whole-row kernel took 0.497 ms / 17.6 us in run s6h2, another run). The
    threshold 8192, CHUNK 4096 and 8 warps are first estimates, not tuned, as is the evict_first hint on
    the re-reads. The reasons for them: 16 elements per thread
    (two 16-byte loads of bf16 per chunk) is the tile of the whole-row kernel at K = 4096, the one
    measured near bandwidth; ptxas (sm_90a, compiled here without a GPU through Triton 3.9) gives
    the bf16 wide kernel 40 registers and no spills, so 6 programs (48 warps, ~48 KB of loads in
    flight) fit an SM, where the 32768-wide whole-row program (49 registers x 1024 threads) fits
    one; the per-element work is ~25 instructions (the IEEE division dominates), so idle lanes
    cost time: 4096-column chunks cover 18944 columns with 20480 lanes, 8192-column ones with 24576.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.rms_norm import check_rows, load_row_add_residual, rms_normalize, row_num_warps
from deepserve.kernels.sizes import next_power_of_2

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_WHOLE_ROW_MAX = 8192  # widest row (columns) held whole in registers; wider rows are looped over in chunks
_CHUNK = 4096  # columns per loop step of the wide-row kernel (a power of two; 8 warps)
_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


class Int8Activations(NamedTuple):
    q: torch.Tensor  # [T, K] int8
    scale: torch.Tensor  # [T] f32: row t ~ q[t] * scale[t]
    residual: torch.Tensor | None  # [T, K] x.dtype: x + residual (fused variant with a residual), else None


@triton.jit
def round_half_even(y):
    """float32 -> the nearest integer as float32, ties to even (torch.round); |y| < 2^23."""
    f = tl.floor(y)
    frac = y - f  # exact
    odd = (f - 2.0 * tl.floor(f * 0.5)) != 0.0
    up = (frac > 0.5) | ((frac == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def divide_by_scale(v, scale, FAST: tl.constexpr):
    """RN(v / scale), the IEEE quotient tl.div_rn gives, for a row's f32 values v and its scalar scale > 0
    (finite or +inf). FAST (the GPU): the reciprocal r = RN(1 / scale) once per row, then per element y = v * r
    and two corrections y = fma(fma(-y, scale, v), r, y): the first makes y faithful, the second returns the
    correctly rounded quotient (Markstein's theorem: r correctly rounded, y faithful, the remainder exact in
    an FMA). Quotients here are at most 127 or 448 in size (no overflow); those in float32's subnormal range
    may be off, and round to 0 in int8 and e4m3 anyway. Where v * r is 0 (v = +-0, whose sign the corrections
    lose: -0 + +0; scale = +inf, r = 0, where they would give NaN) it is the result, exact there. Four FMAs
    and a multiply in place of div.rn's sequence, which bounded the quantisation kernels (run s8g,
    benchmarks/kernels_quant_division.py). Off (the interpreter's default here): tl.div_rn."""
    if FAST:
        r = tl.div_rn(1.0, scale)
        y0 = v * r
        y = tl.fma(tl.fma(-y0, scale, v), r, y0)
        y = tl.fma(tl.fma(-y, scale, v), r, y)
        y = tl.where(y0 == 0.0, y0, y)
    else:
        y = tl.div_rn(v, scale)
    return y


@triton.jit
def quantize_int8_values(v, scale, HW_ROUND: tl.constexpr):
    """f32 values [N] of a row whose scale is `scale` (a scalar) -> q [N] as f32 in [-127, 127] (both
    kernels). HW_ROUND (the GPU) also divides by `divide_by_scale`'s fast path."""
    y = divide_by_scale(v, scale, HW_ROUND)
    if HW_ROUND:  # one cvt.rni per element on the GPU; the interpreter has no libdevice
        y = libdevice.rint(y)
    else:
        y = round_half_even(y)
    return tl.minimum(tl.maximum(y, -127.0), 127.0)


@triton.jit
def round_to_e4m3_grid(v):
    """float32 |v| <= 448 -> the nearest float8_e4m3fn value (ties to even), as float32."""
    mag = tl.abs(v)
    pow2 = (mag.to(tl.int32, bitcast=True) & 0x7F800000).to(tl.float32, bitcast=True)  # 2^floor(log2|v|)
    step = tl.maximum(pow2 * 0.125, 0.001953125)  # 3 mantissa bits; subnormal spacing 2^-9
    r = round_half_even(tl.div_rn(mag, step)) * step  # exact: step is a power of two; r >= +0.0
    # v's sign bit copied onto r (-0.0 included, as torch's cast keeps it); not `-r`, which Triton
    # 3.6 compiles as 0 - r, turning -0.0 into +0.0
    sign = v.to(tl.uint32, bitcast=True) & 0x80000000
    return (r.to(tl.uint32, bitcast=True) | sign).to(tl.float32, bitcast=True)


@triton.jit
def quantize_fp8_values(v, scale, HW_CAST: tl.constexpr):
    """f32 values [N] of a row whose scale is `scale` (a scalar) -> q [N] e4m3 (every fp8 row kernel: fp8_quant's,
    the FP8 row kernels here, silu_and_mul_quant's). HW_CAST (sm_90+) also divides by `divide_by_scale`'s fast
    path (the same bits as tl.div_rn)."""
    y = tl.minimum(tl.maximum(divide_by_scale(v, scale, HW_CAST), -448.0), 448.0)
    if HW_CAST:  # the GPU's cvt (round to nearest even, as torch's cast)
        q = y.to(tl.float8e4nv)
    else:
        q = round_to_e4m3_grid(y).to(tl.float8e4nv)
    return q


@triton.jit
def quantize_row_values(v, scale, HW: tl.constexpr, FP8: tl.constexpr):
    """A row's f32 values [N] and its scale -> what the kernels store: int8 (`quantize_int8_values`) or, FP8,
    e4m3 (`quantize_fp8_values`; HW there means the GPU's cast rounds like torch's: sm_90+)."""
    if FP8:
        q = quantize_fp8_values(v, scale, HW)
    else:
        q = quantize_int8_values(v, scale, HW).to(tl.int8)
    return q


@triton.jit
def row_scale(amax, FP8: tl.constexpr):
    """max(amax, 1e-8) / 127 (int8) or / 448 (FP8: e4m3's largest finite value), an IEEE division."""
    if FP8:
        scale = tl.div_rn(tl.maximum(amax, 1e-8), 448.0)
    else:
        scale = tl.div_rn(tl.maximum(amax, 1e-8), 127.0)
    return scale


@triton.jit
def _int8_quant_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, res_out_ptr, hidden,
                       x_stride, res_stride, q_stride, res_out_stride, eps,
                       NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_DTYPE: tl.constexpr,
                       BLOCK: tl.constexpr, HW_ROUND: tl.constexpr = False, FP8: tl.constexpr = False,
                       PDL: tl.constexpr = False):
    """One program per row, the whole row [BLOCK] in registers; NORM: (residual add +) RMSNorm,
    rounded to NORM_DTYPE, before quantising; FP8: to e4m3 (`quantize_row_values`), else int8."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    x = load_row_add_residual(x_ptr, res_ptr, res_out_ptr, row, cols, mask, x_stride, res_stride, res_out_stride,
                              HAS_RESIDUAL)
    v = x.to(tl.float32)
    if NORM:
        v = rms_normalize(x, w_ptr, cols, mask, hidden, eps).to(NORM_DTYPE).to(tl.float32)
    scale = row_scale(tl.max(tl.abs(v), axis=0), FP8)
    q = quantize_row_values(v, scale, HW_ROUND, FP8)
    if NORM:  # q stored 16 bytes of x per thread (8 int8 for bf16), not 16: the row keeps rms_norm's layout
        cols = tl.max_contiguous(cols, 128 // x_ptr.dtype.element_ty.primitive_bitwidth)
    tl.store(q_ptr + row * q_stride + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _chunk_values(x_ptr, res_ptr, w_ptr, row, cols, mask, x_stride, res_stride, rstd,
                  NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_DTYPE: tl.constexpr,
                  EVICT: tl.constexpr):
    """Columns `cols` [CHUNK] of row `row` -> the f32 values the whole-row kernel quantises there:
    x (+ residual, rounded like `load_row_add_residual`), NORM: normalised with the row's rstd
    (rounded to x's dtype as `rms_normalize` does), times the weight, rounded to NORM_DTYPE."""
    x = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0, eviction_policy=EVICT)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + row * res_stride + cols, mask=mask, other=0.0, eviction_policy=EVICT)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x.dtype)
    v = x.to(tl.float32)
    if NORM:
        normed = (v * rstd).to(x.dtype).to(tl.float32)
        v = (normed * tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)).to(NORM_DTYPE).to(tl.float32)
    return v


@triton.jit
def _row_rstd(x_ptr, res_ptr, res_out_ptr, row, hidden, x_stride, res_stride, res_out_stride, eps,
              HAS_RESIDUAL: tl.constexpr, CHUNK: tl.constexpr):
    """The fused wide path's first pass over row `row`: s = x (+ residual, stored to res_out) chunk by
    chunk -> rsqrt(mean(s.f32^2) + eps), the squares summed in a different order than the
    whole-row kernel's."""
    cols = tl.arange(0, CHUNK)
    squares = tl.zeros([CHUNK], dtype=tl.float32)
    for start in range(0, hidden, CHUNK):
        mask = start + cols < hidden
        x = load_row_add_residual(x_ptr + start, res_ptr + start, res_out_ptr + start, row, cols, mask,
                                  x_stride, res_stride, res_out_stride, HAS_RESIDUAL).to(tl.float32)
        squares += x * x
    return tl.rsqrt(tl.sum(squares, axis=0) / hidden + eps)


@triton.jit
def _int8_quant_wide_kernel(x_ptr, res_ptr, w_ptr, q_ptr, scale_ptr, res_out_ptr, hidden,
                            x_stride, res_stride, q_stride, res_out_stride, eps,
                            NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr, NORM_DTYPE: tl.constexpr,
                            CHUNK: tl.constexpr, HW_ROUND: tl.constexpr = False, FP8: tl.constexpr = False,
                            PDL: tl.constexpr = False):
    """One program per row, looping over it in chunks [CHUNK]: (NORM: the rstd pass,) the max pass,
    then the quantise pass last chunk first. The values of `_int8_quant_kernel` bit for bit without NORM;
    with NORM the sum of squares runs in another order (lane-wise over the chunks), so rstd may differ
    by float32 roundings."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    rstd = 1.0
    if NORM:
        rstd = _row_rstd(x_ptr, res_ptr, res_out_ptr, row, hidden, x_stride, res_stride, res_out_stride, eps,
                         HAS_RESIDUAL, CHUNK)
    amax = tl.zeros([CHUNK], dtype=tl.float32)  # lane-wise max over the chunks; 0 is the masked lanes' value
    for start in range(0, hidden, CHUNK):
        v = _chunk_values(x_ptr + start, res_ptr + start, w_ptr + start, row, cols, start + cols < hidden,
                          x_stride, res_stride, rstd, NORM, HAS_RESIDUAL, NORM_DTYPE, "")
        amax = tl.maximum(amax, tl.abs(v))
    scale = row_scale(tl.max(amax, axis=0), FP8)
    num_chunks = tl.cdiv(hidden, CHUNK)
    for i in range(0, num_chunks):
        start = (num_chunks - 1 - i) * CHUNK  # last chunk first: the most recently read
        mask = start + cols < hidden
        v = _chunk_values(x_ptr + start, res_ptr + start, w_ptr + start, row, cols, mask, x_stride, res_stride,
                          rstd, NORM, HAS_RESIDUAL, NORM_DTYPE, "evict_first")
        q = quantize_row_values(v, scale, HW_ROUND, FP8)
        tl.store(q_ptr + row * q_stride + start + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def quant_num_warps(block: int) -> int:
    """Warps for a program holding one row of `block` elements: at most 16 elements per thread up to
    32 warps (a 18944-wide row at 16 warps kept 64 per thread and spilled: 0.68 ms for 8192 rows of
    qwen-7b's down projection input on an H200, 6x its bytes' time)."""
    return max(4, min(32, block // 512))


def check_row_inputs(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None) -> None:
    """rms_norm's row checks, restricted to the dtypes the kernel stores (f16/bf16/f32)."""
    check_rows(x, residual, weight)
    for name, t in (("x", x), ("weight", weight)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"{name} must be f16/bf16/f32, got {t.dtype}")


class RowTiling(NamedTuple):
    wide: bool  # the row is looped over in chunks (the wide-row kernel), else held whole
    block: int  # columns a program holds at once: BLOCK = next_power_of_2(K), or CHUNK
    num_warps: int


def row_tiling(hidden: int, whole_row_max: int | None = None, chunk: int | None = None) -> RowTiling:
    """How a per-row quantisation kernel (int8 here, fp8_quant too) covers a row of `hidden` columns:
    whole, up to `whole_row_max` (default _WHOLE_ROW_MAX) columns, else in chunks of `chunk`
    (default _CHUNK, a power of two >= 16) columns at 16 elements per thread (1-16 warps; 8 for 4096).
    Tests pass small values to take the wide path at small shapes; benchmarks to compare the two."""
    whole_row_max = _WHOLE_ROW_MAX if whole_row_max is None else whole_row_max
    if hidden <= whole_row_max:
        block = next_power_of_2(hidden)
        return RowTiling(False, block, quant_num_warps(block))
    chunk = _CHUNK if chunk is None else chunk
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"chunk must be a power of two >= 16, got {chunk}")
    return RowTiling(True, chunk, max(1, min(16, chunk // 512)))


def launch_row_quant(x, residual, weight, eps: float, norm: bool, tiling: RowTiling, fp8: bool = False,
                     hardware: bool | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(q [T, K] int8, or e4m3 with fp8, scale [T] f32, x + residual or None) of one row-kernel launch (checked
    inputs). hardware: the kernels' HW flag (default: x on CUDA; fp8_quant passes its sm_90+ rule for e4m3)."""
    num_tokens, hidden = x.shape
    q = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn if fp8 else torch.int8, device=x.device)
    scale = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    res_out = torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else None
    if num_tokens == 0:
        return q, scale, res_out
    res_in = residual if residual is not None else x  # unused pointers when HAS_RESIDUAL is off
    res_dst = res_out if res_out is not None else x
    norm_dtype = torch.promote_types(x.dtype, weight.dtype) if weight is not None else x.dtype
    args = (x, res_in, weight if weight is not None else x, q, scale, res_dst, hidden,
            x.stride(0), res_in.stride(0), q.stride(0), res_dst.stride(0), eps)
    # the fused whole-row kernel at rms_norm's warps (and layout: the kernel), so its sum of squares is rms_norm's
    num_warps = row_num_warps(tiling.block) if norm and not tiling.wide else tiling.num_warps
    flags = dict(NORM=norm, HAS_RESIDUAL=residual is not None, NORM_DTYPE=_TL_DTYPES[norm_dtype],
                 HW_ROUND=x.is_cuda if hardware is None else hardware, FP8=fp8, num_warps=num_warps)
    if tiling.wide:
        _int8_quant_wide_kernel[(num_tokens,)](*args, CHUNK=tiling.block, **flags, **pdl_launch(x.device))
    else:
        _int8_quant_kernel[(num_tokens,)](*args, BLOCK=tiling.block, **flags, **pdl_launch(x.device))
    return q, scale, res_out


def int8_quant(x: torch.Tensor, *, whole_row_max: int | None = None, chunk: int | None = None) -> Int8Activations:
    """x [T, K] f16/bf16/f32 (rows may be strided) -> (q [T, K] int8, scale [T] f32, None).
    whole_row_max / chunk: `row_tiling` (defaults: rows up to 8192 whole, wider in chunks of 4096)."""
    check_row_inputs(x, None, None)
    return Int8Activations(*launch_row_quant(x, None, None, 0.0, False, row_tiling(x.shape[1], whole_row_max, chunk)))


def rms_norm_int8_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                        whole_row_max: int | None = None, chunk: int | None = None) -> Int8Activations:
    """x [T, H], residual like x or None, weight [H] -> (q [T, H] int8 of the normalised rows,
    scale [T] f32, x + residual [T, H] x.dtype or None). Inputs are not modified.
    whole_row_max / chunk: as `int8_quant`."""
    check_row_inputs(x, residual, weight)
    return Int8Activations(*launch_row_quant(x, residual, weight, eps, True,
                                             row_tiling(x.shape[1], whole_row_max, chunk)))


def norm_matches_rms_norm(hidden: int) -> bool:
    """Whether `rms_norm_int8_quant`'s default launch normalises rows of `hidden` columns with rms_norm's
    bits: the whole-row kernel does; the wide one (rows over _WHOLE_ROW_MAX) sums the squares lane-wise
    over chunks, another float32 order."""
    return not row_tiling(hidden).wide


def int8_quant_ref(x: torch.Tensor) -> Int8Activations:
    """Pure-PyTorch reference: `deepserve.quant.int8.quantize_per_token_ref`."""
    from deepserve.quant.int8 import quantize_per_token_ref

    return Int8Activations(*quantize_per_token_ref(x), None)


def rms_norm_int8_quant_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                            eps: float) -> Int8Activations:
    """Pure-PyTorch reference: `kernels.rms_norm.rms_norm_ref`, then the per-token quantisation."""
    from deepserve.kernels.rms_norm import rms_norm_ref  # pure PyTorch part of that module
    from deepserve.quant.int8 import quantize_per_token_ref

    out, new_residual = rms_norm_ref(x, residual, weight, eps)
    return Int8Activations(*quantize_per_token_ref(out), new_residual)
