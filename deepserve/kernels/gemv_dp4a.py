"""W8A16 decode GEMV on dp4a: int8 weights times 2-byte activation rows that the kernel writes as int16.

    gemv_dp4a(x [M, K] bf16/f16 (unit stride in K), w [N, K] int8 contiguous, w_scale [N] f32, bias [N] | None)
        -> y [M, N] x.dtype,   1 <= M <= GEMV_MAX_M, K % 16 == 0
    y[m, n] = round(w_scale[n] * sum_g s[m, g] * sum_{k in g} w[n, k] q[m, k] + bias[n])
    gated=True (w = [gate | up], N = 2I) -> h [M, I] = silu_and_mul(y), as kernels/gemv.py's gated epilogue

The arithmetic is kernels/dp4a.py's: each x row as int16 per group g of 16 columns with a power-of-two scale
s[m, g] (bf16 values within 2^7 of the group's largest exact), q = 256 hi + lo dotted with 4 weight bytes per
dp4a, the group's sum an exact int32. Per 16 weight bytes and row: 8 dp4a, a shift, one conversion to
float32 and one FMA with s, where the float32 GEMV (kernels/gemv.py) converts and multiplies every byte; the
weight stays packed in registers (4 bytes a register), so a thread keeps more bytes in flight for its
registers.

Kernels. A chunk is G = 32 * num_warps groups (512 * num_warps columns): each thread loads 16 bytes of each
of its weight rows (one group) and quantises its group of each x row in registers; no data leaves the thread
until the sum over G (lanes, then warps), once per row block, then w_scale, the bias and the store (gated:
kernels/gemv.py's `_gated_store`). With `static_weight` (kernels/gemv.py's PDL contract) a program's first
weights are requested before the PDL wait. No host synchronisation, no allocation but the output:
CUDA-graph safe.
  * streaming (`_gemv_dp4a_kernel`, blocks = 0): program j owns row block j (BLOCK_N rows; gated:
    `gemv._program_rows`) and walks K chunk by chunk, acc [BLOCK_M, BLOCK_N, G] += float(group sum) * s;
    a K that is not a multiple of the chunk ends with one masked chunk.
  * x-stationary (`_gemv_dp4a_xs_kernel`, blocks = B > 0, K within two chunks): program j quantises x once
    and keeps its words in registers, then runs row blocks jB..jB+B-1 in straight-line code (`ahead`: block
    r+1's weights requested before block r's sums). The activation work is per program, not per row block:
    at qwen-7b's gate_up (K = 3584) it was ~1.8 us of the streaming kernel's time (run s17c, a probe that
    skipped it). Same terms, same order: the streaming kernel's bits.

Measured (NVIDIA H200, cold weights, CUDA-graph replays; kernels_gemv.jsonl and gpu.jsonl):
  * the sweep (run s17d, `benchmarks/kernels_gemv.py --sweep --weights dp4a`) picked TABLE at M = 1: qwen-7b
    qkv 5.13 us, o 4.81, gate_up (gated) 31.98, down 18.29;
  * against the float32 GEMV's table configs in one call (run s17e), us at M = 1 / 2 / 4: qkv 5.58 vs 6.33,
    7.48 vs 9.42, 12.61 vs 16.25; o 4.80 vs 5.31, 5.86 vs 7.87, 10.70 vs 12.43; gate_up 32.36 vs 35.59,
    36.45 vs 42.30, 63.26 vs 65.25; down 18.34 vs 20.03, 23.28 vs 28.33, 31.20 vs 47.38. A decode step's four
    linears x 28 layers at M = 1: 1.710 vs 1.883 ms (run s17c: the float32 GEMV 1.879, bf16 over the same
    bytes 1.698);
  * W-b1 qwen-7b W8A16 (run s17e, one call): 2.2431 / 2.2433 ms per token against 2.4353 with the float32
    GEMV (tree c5a5c6f); bf16 3.6331 / 3.6365.
Accuracy: on the bundled SmolLM2 (CPU, every W8A16 input in the int16 form, benchmarks/dp4a_act_accuracy.py)
the next-token distributions move by a mean KL of 7.3e-5 nats against bf16 inputs, as rounding float32
inputs to bf16 does (5.8e-5); top-1 0.9957 (benchmarks/results/quant_accuracy.md).

The table (`dp4a_config`, keyed by N and K as kernels/gemv.py's) holds what the sweep found fastest at
qwen-7b's shapes; V2-Lite's shapes share its buckets, not swept.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.dp4a import GROUP, group_dots, quant_groups, quant_groups_ref
from deepserve.kernels.gemv import GEMV_MAX_M, _gated_store, _program_rows, check_scale_bias
from deepserve.kernels.int8_convert import nvidia_ptx
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2

_ACC_ROWS = 32  # BLOCK_M * BLOCK_N cap (float32 accumulators a thread keeps per group)
_ANY = 1 << 62


class Dp4aConfig(NamedTuple):
    block_n: int  # weight rows per program
    num_warps: int = 4  # a chunk is 512 * num_warps columns
    ahead: bool = False  # x-stationary: the next row block's weights requested before this one's sums
    maxnreg: int | None = None  # registers a thread may take (ptxas .maxnreg), at M = 1 only
    blocks: int = 0  # > 0: the x-stationary kernel (K within two chunks), this many row blocks a program


# (largest N, largest K, config at M = 1); the first entry covering the shape wins.
TABLE: tuple[tuple[int, int, Dp4aConfig], ...] = (
    (4096, 4096, Dp4aConfig(2, 4, True, None, 2)),  # qwen-7b/o, v2-lite/q_kv_a, v2-lite/o
    (4096, _ANY, Dp4aConfig(4, 4)),  # qwen-7b/down, v2-lite/dense_down
    (8192, _ANY, Dp4aConfig(2, 4, True, None, 2)),  # qwen-7b/qkv
    (_ANY, _ANY, Dp4aConfig(4, 4, True, None, 2)),  # qwen-7b/gate_up, v2-lite/dense_gate_up
)


def dp4a_config(m: int, n: int, k: int) -> Dp4aConfig:
    """The table's entry for (N, K), fitted to the shape: no more warps than K's groups fill, BLOCK_N cut so
    that BLOCK_M * BLOCK_N <= 32, the register limit only at M = 1."""
    cfg = next(c for max_n, max_k, c in TABLE if n <= max_n and k <= max_k)
    return fit_config(cfg, m, k)


def fit_config(cfg: Dp4aConfig, m: int, k: int) -> Dp4aConfig:
    num_warps = max(1, min(cfg.num_warps, next_power_of_2(cdiv(k, 32 * GROUP))))
    block_n = max(1, min(cfg.block_n, _ACC_ROWS // next_power_of_2(m)))
    maxnreg = cfg.maxnreg if m == 1 and num_warps == cfg.num_warps else None
    blocks = cfg.blocks if k <= 2 * _chunk_cols(num_warps) else 0  # x-stationary: K within two chunks
    return cfg._replace(block_n=block_n, num_warps=num_warps, maxnreg=maxnreg, blocks=blocks)


def _chunk_cols(num_warps: int) -> int:
    """Columns of a chunk: a group of 16 per thread."""
    return 32 * num_warps * GROUP


def dp4a_applies(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> bool:
    """Whether `gemv` (kernels/gemv.py) runs this kernel: int8 w with its scales, 2-byte x rows with whole
    groups, 16-byte aligned rows, on an NVIDIA GPU (the PTX form; elsewhere the float32 GEMV)."""
    return (w_scale is not None and w.dtype == torch.int8 and x.dtype in (torch.bfloat16, torch.float16)
            and x.dim() == 2 and x.shape[0] >= 1 and x.shape[1] > 0 and x.shape[1] % GROUP == 0
            and w.data_ptr() % 16 == 0 and nvidia_ptx(x.device))


@triton.jit
def _load_half(x_ptr, offs, x_ok, M, stride_xm, BM: tl.constexpr):
    """[BM, G, 8] float32: x rows 0..BM-1 (clamped to M - 1) at column offsets offs [G, 8]; one [G, 8] load per
    row, stacked with join (the rows stay in each thread, as BM = 1's layout has them: no exchange)."""
    if BM == 1:  # a [1, G, 8] load (expanding a [G, 8] one would change its layout: an exchange per chunk)
        if x_ok is None:
            x = tl.load(x_ptr + offs[None, :, :]).to(tl.float32)
        else:
            x = tl.load(x_ptr + offs[None, :, :], mask=x_ok[None, :, :], other=0.0).to(tl.float32)
    elif BM == 2:
        r0 = _load_row(x_ptr, offs, x_ok)
        x = tl.permute(tl.join(r0, _load_row(x_ptr + tl.minimum(1, M - 1) * stride_xm, offs, x_ok)), (2, 0, 1))
    else:
        r0 = _load_row(x_ptr, offs, x_ok)
        r1 = _load_row(x_ptr + tl.minimum(1, M - 1) * stride_xm, offs, x_ok)
        r2 = _load_row(x_ptr + tl.minimum(2, M - 1) * stride_xm, offs, x_ok)
        r3 = _load_row(x_ptr + tl.minimum(3, M - 1) * stride_xm, offs, x_ok)
        rows = tl.permute(tl.join(tl.join(r0, r1), tl.join(r2, r3)), (3, 2, 0, 1))  # [2, 2, G, 8]: row 2 a + b
        x = tl.reshape(rows, (4, offs.shape[0], 8))  # [4, G, 8]
    return x


@triton.jit
def _load_row(ptr, offs, x_ok):
    """[G, 8] float32 at ptr + offs (x_ok: its mask, None: all of it)."""
    if x_ok is None:
        r = tl.load(ptr + offs)
    else:
        r = tl.load(ptr + offs, mask=x_ok, other=0.0)
    return r.to(tl.float32)


@triton.jit
def _chunk(w, x_ptr, offs, x_ok, M, stride_xm, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr,
           PTX: tl.constexpr):
    """w [BN, 4G] int32 words; x_ptr + offs [G, 8]: row 0's groups' first halves (x_ok their mask, None: all)
    -> this chunk's [BM, BN, G] float32 terms."""
    xa = _load_half(x_ptr, offs, x_ok, M, stride_xm, BM)
    xb = _load_half(x_ptr + 8, offs, x_ok, M, stride_xm, BM)
    hi, lo, s = quant_groups(xa, xb, BM, G, PTX)
    return _terms(w, hi, lo, s, BM, BN, G, PTX)


@triton.jit
def _gemv_dp4a_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                      PTX: tl.constexpr, PREFETCH_W: tl.constexpr = False, GATED: tl.constexpr = False,
                      PDL: tl.constexpr = False):
    """out [M, N] (GATED: [M, N / 2]) = the module docstring's y. w_ptr: the int8 weight as int32 words."""
    CH: tl.constexpr = 16 * G  # columns per chunk
    kw = K // 4  # words per weight row
    rows, n_ok = _program_rows(tl.program_id(0), N, BLOCK_N, GATED)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, G)
    offs_w = tl.arange(0, 4 * G)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * kw + offs_w[None, :]  # [BN, 4G] at k = 0
    offs_x = offs_g[:, None] * 16 + tl.arange(0, 8)[None, :]  # [G, 8]: each group's first half
    k_full = K // CH * CH  # whole chunks end here
    if PREFETCH_W:  # a static weight: nothing on the stream writes it (kernels/gemv.py)
        w_cur = tl.load(w_rows, mask=(offs_w < kw)[None, :], other=0)
    pdl_prologue(PDL)  # everything else only after the previous kernel (kernels/pdl.py)
    if not PREFETCH_W:
        w_cur = tl.load(w_rows, mask=(offs_w < kw)[None, :], other=0)
    acc = tl.zeros([BLOCK_M, BLOCK_N, G], dtype=tl.float32)
    # w_cur holds chunk k0's weights; the first loop's next chunk is whole (unmasked loads), the second loop (the
    # last whole chunk) masks them, as the next is the partial one or none
    k_safe = tl.maximum(k_full - CH, 0)
    for k0 in range(0, k_safe, CH):
        acc += _chunk(w_cur, x_ptr + k0, offs_x, None, M, stride_xm, BLOCK_M, BLOCK_N, G, PTX)
        w_cur = tl.load(w_rows + (k0 + CH) // 4)
    for k0 in range(k_safe, k_full, CH):
        acc += _chunk(w_cur, x_ptr + k0, offs_x, None, M, stride_xm, BLOCK_M, BLOCK_N, G, PTX)
        w_cur = tl.load(w_rows + (k0 + CH) // 4, mask=((k0 + CH) // 4 + offs_w < kw)[None, :], other=0)
    if k_full < K:  # the last, partial chunk
        x_ok = (k_full + offs_g * 16 < K)[:, None]
        acc += _chunk(w_cur, x_ptr + k_full, offs_x, x_ok, M, stride_xm, BLOCK_M, BLOCK_N, G, PTX)
    _store_rows(acc, tl.program_id(0), rows, n_ok, offs_m, M, N, scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BLOCK_N,
                GATED)


@triton.jit
def _quant_chunk(x_ptr, offs_x, k0, K, M, stride_xm, BM: tl.constexpr, G: tl.constexpr, PTX: tl.constexpr):
    """x's columns k0..k0+16G-1 (groups past K read as zeros) -> hi, lo [BM, G, 4] words, s [BM, G]."""
    x_ok = (k0 + tl.arange(0, G) * 16 < K)[:, None]
    xa = _load_half(x_ptr + k0, offs_x, x_ok, M, stride_xm, BM)
    xb = _load_half(x_ptr + k0 + 8, offs_x, x_ok, M, stride_xm, BM)
    return quant_groups(xa, xb, BM, G, PTX)


@triton.jit
def _terms(w, hi, lo, s, BM: tl.constexpr, BN: tl.constexpr, G: tl.constexpr, PTX: tl.constexpr):
    """w [BN, 4G] words times a quantised chunk (hi, lo [BM, G, 4], s [BM, G]) -> [BM, BN, G] float32 terms."""
    w4 = tl.reshape(w, (1, BN, G, 4))  # [BN, 4G] words -> [1, BN, G, 4]: a group's 4 words in one thread
    d = group_dots(w4, hi[:, None, :, :], lo[:, None, :, :], BM, BN, G, PTX)  # [BM, BN, G]
    return d.to(tl.float32) * s[:, None, :]


@triton.jit
def _store_rows(acc, block, rows, n_ok, offs_m, M, N, scale_ptr, bias_ptr, out_ptr, HAS_BIAS: tl.constexpr,
                BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """acc [BM, BN, G] float32 of row block `block` -> its outputs: the sum over G, w_scale, the bias, the store
    (GATED: silu_and_mul's, `gemv._gated_store`)."""
    y = tl.sum(acc, axis=2) * tl.load(scale_ptr + rows, mask=n_ok, other=0.0)[None, :]  # [BM, BN]
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    if GATED:
        _gated_store(y.to(out_ptr.dtype.element_ty), out_ptr, block, offs_m, M, N // 2, BLOCK_N // 2)
    else:
        out = out_ptr + offs_m.to(tl.int64)[:, None] * N + rows[None, :]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _gemv_dp4a_xs_kernel(x_ptr, w_ptr, scale_ptr, bias_ptr, out_ptr, M, N, K, stride_xm,
                         HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, G: tl.constexpr,
                         TWO: tl.constexpr, BLOCKS: tl.constexpr, PTX: tl.constexpr, AHEAD: tl.constexpr = False,
                         PREFETCH_W: tl.constexpr = False,
                         GATED: tl.constexpr = False, PDL: tl.constexpr = False):
    """x-stationary (K <= 16G, or <= 32G with TWO): program j quantises x once, into registers, then runs row blocks
    jB..jB+B-1 (B = BLOCKS, unrolled: the compiler may request a block's weights during the one before)."""
    CH: tl.constexpr = 16 * G
    kw = K // 4
    offs_m = tl.arange(0, BLOCK_M)
    offs_w = tl.arange(0, 4 * G)
    ok0 = (offs_w < kw)[None, :]
    ok1 = (CH // 4 + offs_w < kw)[None, :]
    offs_x = tl.arange(0, G)[:, None] * 16 + tl.arange(0, 8)[None, :]  # [G, 8]: each group's first half
    first = tl.program_id(0) * BLOCKS
    rows, n_ok = _program_rows(first, N, BLOCK_N, GATED)
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * kw + offs_w[None, :]  # [BN, 4G]
    if PREFETCH_W:  # a static weight: nothing on the stream writes it (kernels/gemv.py)
        w0 = tl.load(w_rows, mask=ok0, other=0)
        if TWO:
            w1 = tl.load(w_rows + CH // 4, mask=ok1, other=0)
    pdl_prologue(PDL)  # everything else only after the previous kernel (kernels/pdl.py)
    if not PREFETCH_W:
        w0 = tl.load(w_rows, mask=ok0, other=0)
        if TWO:
            w1 = tl.load(w_rows + CH // 4, mask=ok1, other=0)
    hi0, lo0, s0 = _quant_chunk(x_ptr, offs_x, 0, K, M, stride_xm, BLOCK_M, G, PTX)
    if TWO:
        hi1, lo1, s1 = _quant_chunk(x_ptr, offs_x, CH, K, M, stride_xm, BLOCK_M, G, PTX)
    for r in tl.static_range(BLOCKS):
        if AHEAD and r + 1 < BLOCKS:  # the next block's weights requested before this block's sums
            rows_n, n_ok_n = _program_rows(first + r + 1, N, BLOCK_N, GATED)
            w_rows = w_ptr + rows_n.to(tl.int64)[:, None] * kw + offs_w[None, :]
            w0_n = tl.load(w_rows, mask=ok0, other=0)
            if TWO:
                w1_n = tl.load(w_rows + CH // 4, mask=ok1, other=0)
        if not AHEAD and r > 0:
            rows, n_ok = _program_rows(first + r, N, BLOCK_N, GATED)
            w_rows = w_ptr + rows.to(tl.int64)[:, None] * kw + offs_w[None, :]
            w0 = tl.load(w_rows, mask=ok0, other=0)
            if TWO:
                w1 = tl.load(w_rows + CH // 4, mask=ok1, other=0)
        acc = _terms(w0, hi0, lo0, s0, BLOCK_M, BLOCK_N, G, PTX)
        if TWO:
            acc += _terms(w1, hi1, lo1, s1, BLOCK_M, BLOCK_N, G, PTX)
        _store_rows(acc, first + r, rows, n_ok, offs_m, M, N, scale_ptr, bias_ptr, out_ptr, HAS_BIAS, BLOCK_N, GATED)
        if AHEAD and r + 1 < BLOCKS:
            rows, n_ok, w0 = rows_n, n_ok_n, w0_n
            if TWO:
                w1 = w1_n


def _check(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16) or x.shape[1] % GROUP or (
            x.shape[1] > 1 and x.stride(1) != 1) or not 1 <= x.shape[0] <= GEMV_MAX_M:
        raise ValueError(f"gemv_dp4a: x must be [M <= {GEMV_MAX_M}, K] bf16/f16 with K a multiple of {GROUP} "
                         f"and unit stride in K, got {tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if w.dtype != torch.int8 or w.dim() != 2 or w.shape[1] != x.shape[1] or not w.is_contiguous() \
            or w.data_ptr() % 16:
        raise ValueError(f"gemv_dp4a: w must be [N, K={x.shape[1]}] int8, contiguous and 16-byte aligned, got "
                         f"{tuple(w.shape)} {w.dtype}")
    if w_scale is None:
        raise ValueError("gemv_dp4a: int8 weights need their w_scale [N] float32")
    check_scale_bias("gemv_dp4a", x, w, w_scale, bias)


def gemv_dp4a(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None,
              config: Dp4aConfig | None = None, static_weight: bool = False, gated: bool = False,
              ptx: bool | None = None) -> torch.Tensor:
    """The module docstring's y (gated: silu_and_mul of it, [M, N / 2]). static_weight: kernels/gemv.py's
    promise (the first row block's weights read before the PDL wait). ptx: the dp4a / prmt form (default: on
    NVIDIA GPUs) or the portable one (False: tests compare the two)."""
    _check(x, w, w_scale, bias)
    return run_dp4a(x, w, w_scale, bias, config, static_weight, gated, ptx)


def run_dp4a(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
             config: Dp4aConfig | None, static_weight: bool, gated: bool, ptx: bool | None = None) -> torch.Tensor:
    """gemv_dp4a without its argument check, for a caller that has made it: kernels/gemv.py's `gemv` (its own
    check plus `dp4a_applies` cover `_check`'s), on the decode path."""
    (m, k), n = x.shape, w.shape[0]
    if gated and n % 2:
        raise ValueError(f"gemv_dp4a: a gated weight [gate | up] has an even number of rows, got {n}")
    if n == 0:
        return torch.empty((m, 0), dtype=x.dtype, device=x.device)
    cfg = config or dp4a_config(m, n, k)
    if cfg.block_n < 1 or cfg.block_n & (cfg.block_n - 1) or cfg.num_warps < 1 or cfg.num_warps & (cfg.num_warps - 1):
        raise ValueError(f"gemv_dp4a: block_n and num_warps must be powers of two, got {cfg}")
    if cfg.blocks < 0 or cfg.blocks and k > 2 * _chunk_cols(cfg.num_warps):
        raise ValueError(f"gemv_dp4a: the x-stationary kernel (blocks > 0) takes K <= two chunks "
                         f"({2 * _chunk_cols(cfg.num_warps)} columns at {cfg.num_warps} warps), got K={k}, {cfg}")
    if gated:
        cfg = cfg._replace(block_n=max(2, cfg.block_n))
    ptx = nvidia_ptx(x.device) if ptx is None else ptx
    out = torch.empty((m, n // 2) if gated else (m, n), dtype=x.dtype, device=x.device)
    args = (x, w.view(torch.int32), w_scale, bias if bias is not None else w_scale, out, m, n, k, x.stride(0))
    common = dict(HAS_BIAS=bias is not None, BLOCK_M=next_power_of_2(m), BLOCK_N=cfg.block_n, G=32 * cfg.num_warps,
                  PTX=ptx, PREFETCH_W=static_weight, GATED=gated, num_warps=cfg.num_warps,
                  **({"maxnreg": cfg.maxnreg} if ptx and cfg.maxnreg else {}))
    blocks = cdiv(n, cfg.block_n)  # row blocks (gated: of BLOCK_N / 2 output columns, N / 2 of them)
    if gated:
        blocks = cdiv(n // 2, cfg.block_n // 2)
    if cfg.blocks:
        _gemv_dp4a_xs_kernel[(cdiv(blocks, cfg.blocks),)](*args, TWO=k > _chunk_cols(cfg.num_warps), BLOCKS=cfg.blocks,
                                                           AHEAD=cfg.ahead, **common, **pdl_launch(x.device))
    else:
        _gemv_dp4a_kernel[(blocks,)](*args, **common, **pdl_launch(x.device))
    return out


def gemv_dp4a_ref(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference of y (float64 sums of the quantised x, one rounding to x.dtype)."""
    q, s = quant_groups_ref(x)
    xq = (q.double() * s.double().repeat_interleave(GROUP, dim=1))
    y = (xq @ w.double().t()) * w_scale.double()
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)
