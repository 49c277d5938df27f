"""The W8A8 gate_up GEMM with SiLU-and-mul in its epilogue, and the per-token quantisation of its output
(the dense MLP under --quantization int8, between its two projections):

    int8_gemm_silu(x_q [M, K] int8, x_scale [M] f32, w_g [2 I_pad, K] int8, w_scale_g [2 I_pad] f32, I, out_dtype)
        -> (h [M, I] out_dtype, part_max [M, I_pad / GATED_BLOCK] f32)
        h = silu_and_mul(int8_gemm(x_q, x_scale, w_q, w_scale, None, out_dtype)) bit for bit, where
        w_g = to_gated_layout(w_q), w_scale_g = to_gated_layout(w_scale) ([gate | up] rows, w_q [2I, K]);
        part_max[m, j] = max |h[m, i]| over block j's columns (of h's values as stored, in float32)
    int8_quant_amax(h [M, I], part_max [M, P] f32) -> Int8Activations(q [M, I] int8, scale [M] f32, None)
        = int8_quant(h) bit for bit, the row max given as the max of P partial maxima

The gated layout interleaves the weight in blocks of GATED_BLOCK rows: gate block 0, up block 0, gate
block 1, ... (the last blocks padded with zero rows), so that one [2 * GATED_BLOCK, BLOCK_K] box per K step
feeds one tensor-core product whose accumulator holds a block of gate columns next to the same block of up
columns: the main loop is int8_gemm's, at its measured gate_up tile width of 128 columns. (A first version
kept the weight as loaded and ran two products per K step, one per half, into two accumulators: each reads
the activation tile from shared memory again; it was 1.03-1.09x the unfused pair where this layout was
meant to do better: run s8c.) The epilogue is int8_gemm's (`scaled`'s order: float(acc) * x_scale *
w_scale, rounded to out_dtype), then the tile is split into its gate and up halves, then
kernels/silu_and_mul.py's `silu_mul` rounded to out_dtype, as the unfused pair stores it; each row's max |h|
over the tile is stored to part_max[row, block] (every entry written once: no zero fill, no atomics; the
quantisation takes the max over a row's blocks, exact in any order).
Launched with enable_fp_fusion=False like int8_gemm, so the products round as the reference's do.

What this saves against int8_gemm + silu_and_mul_int8_quant (`kernels/silu_and_mul_quant.py`): the
[M, 2I] gate_up output is never written (h is half its size), and the quantisation becomes one
bandwidth-bound pass over h (the row max is known), where silu_and_mul_int8_quant walks each 2I row
twice (run s7d: 402 us at 8192 x 18944 on an H200, 1.9 TB/s counting one read).

No split-K (gate_up has I / GATED_BLOCK n-blocks: hundreds at served sizes) and no bias (the caller
falls back to the unfused path for a biased gate_up). TMA operand loads on sm_90 / sm_100 and under the
interpreter (`int8_gemm.tma_ok`), pointer loads elsewhere. No host synchronisation: CUDA-graph safe.
PDL as int8_gemm (wait first, no early trigger); int8_quant_amax waits then triggers the down projection's
GEMM (a trigger with no effect where that GEMM is kernels/int8_gemm_ws.py's, launched without PDL).
The warp-specialised variant of this GEMM for sm_90 is kernels/int8_gemm_silu_ws.py (the same bits).
int8_quant_amax: one program per (row, 4096 columns), 8 warps (16 elements per thread), each reducing
its row's partial maxima (at most 512 per row: I <= 32768; a few KB of L2 reads per row of h). In the
engine's profiles (PDL off, 8192 x 18944) this layout took 206 us (run s8f) and a first one (4 rows x 1024
columns, 4 warps) 186 us (run s8e): both bound by the division, since replaced by int8_quant's
`divide_by_scale` (a kernel of the same shape: 187.9 -> 136.8 us, run s8g).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_gemm import (TensorDescriptor, check_operands, check_x_scale, grouped_tile, scaled,
                                         tma_ok)
from deepserve.kernels.int8_quant import Int8Activations, quantize_int8_values
from deepserve.kernels.pdl import pdl_launch, pdl_prologue, pdl_wait
from deepserve.kernels.silu_and_mul import silu_mul
from deepserve.kernels.sizes import bucket, cdiv, next_power_of_2

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QUANT_BLOCK = 4096  # columns per int8_quant_amax program (8 warps, 16 per thread)
MAX_PARTS = 512  # partial maxima per row int8_quant_amax takes (I <= 32768 at GATED_BLOCK 64)


GATED_BLOCK = 64  # h columns per block of the gated weight layout (`to_gated_layout`) and per program


class SiluGemmConfig(NamedTuple):
    """Blocks of one int8_gemm_silu launch (the n width is fixed by the layout: 2 * GATED_BLOCK rows of w_g)."""

    block_m: int
    block_k: int
    group_m: int = 8
    num_warps: int = 8
    num_stages: int = 3


# max M -> config (each program: BLOCK_M rows x 2 * GATED_BLOCK gate_up columns). Measured on an H200 (run s8d,
# benchmarks/kernels_gate_up_silu.py --sweep, qwen-7b's gate_up K = 3584, I = 18944, and V2-Lite's shared
# experts K = 2048, I = 2816; CUDA-graph replays over cold weights): each M's best, or within 1% of it. The
# M <= 64 entry is a first estimate.
CONFIGS: dict[int, SiluGemmConfig] = {
    16: SiluGemmConfig(16, 128, group_m=1, num_warps=4, num_stages=3),
    64: SiluGemmConfig(64, 128, num_warps=4, num_stages=4),
    256: SiluGemmConfig(64, 128, num_warps=4, num_stages=3),
    1 << 62: SiluGemmConfig(128, 128, num_warps=8, num_stages=3),
}


def silu_gemm_config(m: int) -> SiluGemmConfig:
    """CONFIGS' entry for M rows: the smallest max-M >= m."""
    return bucket(CONFIGS, m)


def to_gated_layout(w: torch.Tensor, block: int = GATED_BLOCK) -> torch.Tensor:
    """A merged [gate | up] tensor w [2I, ...] (a weight [2I, K] or its scales [2I]) -> [2 * I_pad, ...] with
    I_pad = I rounded up to `block`: gate rows jB..jB+B-1, then up rows jB..jB+B-1, for each block j
    (zero rows pad the last block)."""
    if w.shape[0] % 2:
        raise ValueError(f"a [gate | up] tensor has an even number of rows, got {w.shape[0]}")
    inter = w.shape[0] // 2
    blocks = cdiv(inter, block)
    halves = w.new_zeros((2, blocks * block, *w.shape[1:]))
    halves[:, :inter] = w.view(2, inter, *w.shape[1:])
    return halves.view(2, blocks, block, *w.shape[1:]).transpose(0, 1).reshape(2 * blocks * block, *w.shape[1:])


def from_gated_layout(y: torch.Tensor, inter: int, block: int = GATED_BLOCK) -> torch.Tensor:
    """The inverse along the last dim: y [..., 2 * I_pad] (a product with a gated-layout weight) ->
    [..., 2I] in [gate | up] order (a copy)."""
    blocks = y.shape[-1] // (2 * block)
    halves = y.reshape(*y.shape[:-1], blocks, 2, block).transpose(-3, -2)  # [..., 2, blocks, block]
    return halves.reshape(*y.shape[:-1], 2, blocks * block)[..., :inter].reshape(*y.shape[:-1], 2 * inter)


@triton.jit
def _silu_epilogue(acc, h_ptr, part_ptr, a_scale_ptr, b_scale_ptr, pid_n, offs_m, M, inter, stride_hm,
                   BLOCK_N: tl.constexpr):
    """acc [BLOCK_M, 2 * BLOCK_N] int32: block pid_n's gate columns, then its up columns (gated layout).
    int8_gemm's epilogue on all of it (float(acc) * x_scale * w_scale rounded to h's dtype), split into gate
    and up, SiLU-and-mul as silu_and_mul stores it; h stored, the tile's row max |h| to part_max[:, pid_n]."""
    out_ty = h_ptr.dtype.element_ty
    m_mask = offs_m < M
    y = scaled(acc, a_scale_ptr, b_scale_ptr + pid_n * 2 * BLOCK_N, b_scale_ptr, offs_m, tl.arange(0, 2 * BLOCK_N),
               M, 2 * BLOCK_N, 0, False).to(out_ty)  # [BM, 2 BN]; the block's scale rows all exist (padding: 0)
    gate, up = tl.split(tl.permute(tl.reshape(y, (y.shape[0], 2, BLOCK_N)), (0, 2, 1)))  # [BM, BN] each
    h = silu_mul(gate, up.to(tl.float32)).to(out_ty)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = m_mask[:, None] & (offs_n < inter)[None, :]
    tl.store(h_ptr + offs_m.to(tl.int64)[:, None] * stride_hm + offs_n[None, :], h, mask=mask)
    row_max = tl.max(tl.where(mask, tl.abs(h.to(tl.float32)), 0.0), axis=1)
    tl.store(part_ptr + offs_m.to(tl.int64) * tl.cdiv(inter, BLOCK_N) + pid_n, row_max, mask=m_mask)  # [M, blocks]


@triton.jit
def _int8_gemm_silu_kernel(a_ptr, b_ptr, a_desc, b_desc, h_ptr, part_ptr, a_scale_ptr, b_scale_ptr, M, inter, K,
                           stride_am, stride_bn, stride_hm, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, TMA: tl.constexpr,
                           PDL: tl.constexpr = False):
    """Program (m-block, n-block) in grouped order: acc = a @ w[2 BN j : 2 BN (j + 1)]^T over K (the gated
    layout's block j: BN gate rows, BN up rows), then `_silu_epilogue`. TMA: operands through the
    descriptors (zero-filled past M and K); else pointers (the layout's rows are all there: no row mask)."""
    pdl_wait(PDL)  # first: wait for the previous kernel; no early trigger (kernels/pdl.py)
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, inter, BLOCK_M, BLOCK_N, GROUP_M)
    off_m, off_b = pid_m * BLOCK_M, pid_n * 2 * BLOCK_N
    offs_m = off_m + tl.arange(0, BLOCK_M)
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.int32)
    if TMA:
        for k0 in range(0, K, BLOCK_K):
            acc = tl.dot(a_desc.load([off_m, k0]), b_desc.load([off_b, k0]).T, acc, out_dtype=tl.int32)
    else:
        offs_k = tl.arange(0, BLOCK_K)
        m_mask = offs_m < M
        a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
        b_ptrs = b_ptr + (off_b + tl.arange(0, 2 * BLOCK_N)).to(tl.int64)[None, :] * stride_bn + offs_k[:, None]
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0)
            acc = tl.dot(a, tl.load(b_ptrs, mask=k_mask[:, None], other=0), acc, out_dtype=tl.int32)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K
    _silu_epilogue(acc, h_ptr, part_ptr, a_scale_ptr, b_scale_ptr, pid_n, offs_m, M, inter, stride_hm, BLOCK_N)


def check_silu_operands(x_q: torch.Tensor, x_scale: torch.Tensor, w_g: torch.Tensor, w_scale_g: torch.Tensor,
                        inter: int, out_dtype: torch.dtype, what: str) -> None:
    """The operands of a gate_up GEMM with SiLU-and-mul epilogue (`int8_gemm_silu`, and the warp-specialised
    `kernels/int8_gemm_silu_ws.int8_gemm_silu_ws`): int8 operands, a gated-layout weight of I = inter, at most
    MAX_PARTS blocks, x_scale [M] f32, a float out_dtype."""
    check_operands(x_q, w_g, w_scale_g, None, (torch.int8,), what)
    blocks = cdiv(inter, GATED_BLOCK)
    if inter < 0 or w_g.shape[0] != 2 * GATED_BLOCK * blocks:
        raise ValueError(f"{what}: a gated-layout weight of I = {inter} has {2 * GATED_BLOCK * blocks} "
                         f"rows (to_gated_layout), got {w_g.shape[0]}")
    if blocks > MAX_PARTS:
        raise ValueError(f"{what}: I = {inter} is wider than {GATED_BLOCK * MAX_PARTS} (MAX_PARTS blocks)")
    check_x_scale(x_q, x_scale, what)
    if out_dtype not in _FLOATS:
        raise ValueError(f"{what}: out_dtype must be f16/bf16/f32, got {out_dtype}")


def silu_outputs(m: int, inter: int, k: int, out_dtype: torch.dtype,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(h [M, I] out_dtype, part_max [M, max(1, I_pad / GATED_BLOCK)] f32, done) of a gate_up GEMM with
    SiLU-and-mul epilogue; done: no launch needed, h and part_max already hold the result (M = 0, I = 0, or
    K = 0, where every product is 0: gate = up = 0, silu(0) * 0 = 0)."""
    h = torch.empty((m, inter), dtype=out_dtype, device=device)
    part_max = torch.empty((m, max(cdiv(inter, GATED_BLOCK), 1)), dtype=torch.float32, device=device)
    if m == 0 or inter == 0 or k == 0:
        return h.zero_(), part_max.zero_(), True
    return h, part_max, False


def int8_gemm_silu(x_q: torch.Tensor, x_scale: torch.Tensor, w_g: torch.Tensor, w_scale_g: torch.Tensor, inter: int,
                   out_dtype: torch.dtype = torch.bfloat16, config: SiluGemmConfig | None = None,
                   tma: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x_q [M, K] int8 (unit stride in K), x_scale [M] f32, w_g [2 I_pad, K] int8 and w_scale_g [2 I_pad] f32
    in the gated layout (`to_gated_layout` of the [gate | up] weight and scales, I_pad = I rounded up to
    GATED_BLOCK, at most MAX_PARTS blocks) -> (h [M, I] out_dtype, part_max [M, max(1, I_pad / GATED_BLOCK)]
    f32). `config` overrides the table; `tma=False` forces the pointer loads (tests)."""
    check_silu_operands(x_q, x_scale, w_g, w_scale_g, inter, out_dtype, "int8_gemm_silu")
    blocks = cdiv(inter, GATED_BLOCK)
    m, k = x_q.shape
    h, part_max, done = silu_outputs(m, inter, k, out_dtype, x_q.device)
    if done:
        return h, part_max
    cfg = config or silu_gemm_config(m)
    use_tma = tma_ok(x_q, w_g) if tma is None else (tma and tma_ok(x_q, w_g))
    a_desc = b_desc = None
    if use_tma:
        a_desc = TensorDescriptor.from_tensor(x_q, [cfg.block_m, cfg.block_k])
        b_desc = TensorDescriptor.from_tensor(w_g, [2 * GATED_BLOCK, cfg.block_k])
    grid = (cdiv(m, cfg.block_m) * blocks,)
    _int8_gemm_silu_kernel[grid](x_q, w_g, a_desc, b_desc, h, part_max, x_scale, w_scale_g, m, inter, k, x_q.stride(0),
                                 w_g.stride(0), h.stride(0), BLOCK_M=cfg.block_m, BLOCK_N=GATED_BLOCK,
                                 BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m, TMA=use_tma, num_warps=cfg.num_warps,
                                 num_stages=cfg.num_stages, enable_fp_fusion=False, **pdl_launch(x_q.device))
    return h, part_max


@triton.jit
def _int8_quant_amax_kernel(h_ptr, part_ptr, q_ptr, scale_ptr, N, num_parts, h_stride, q_stride, part_stride,
                            BLOCK_N: tl.constexpr, PARTS: tl.constexpr, HW_ROUND: tl.constexpr,
                            PDL: tl.constexpr = False):
    """Program (row, column block): the row's max over its partial maxima, int8_quant's scale from it, its
    element step, q stored; the column block 0 programs store the scales."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    parts = tl.arange(0, PARTS)
    amax = tl.max(tl.load(part_ptr + row * part_stride + parts, mask=parts < num_parts, other=0.0), axis=0)
    scale = tl.div_rn(tl.maximum(amax, 1e-8), 127.0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = cols < N
    v = tl.load(h_ptr + row * h_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(q_ptr + row * q_stride + cols, quantize_int8_values(v, scale, HW_ROUND).to(tl.int8), mask=mask)
    if tl.program_id(1) == 0:
        tl.store(scale_ptr + row, scale)


def int8_quant_amax(h: torch.Tensor, part_max: torch.Tensor) -> Int8Activations:
    """h [M, N] f16/bf16/f32 (unit stride in N), part_max [M, P] f32 (unit stride in P) whose row max is
    max |h| per row (as `int8_gemm_silu` gives it; P = 1: the row max itself) -> (q [M, N] int8,
    scale [M] f32, None) = int8_quant(h). A wrong part_max gives wrong q: it is not checked."""
    if h.dim() != 2 or h.dtype not in _FLOATS or h.stride(1) != 1:
        raise ValueError(f"int8_quant_amax: h must be [M, N] f16/bf16/f32 with unit stride in N, got "
                         f"{tuple(h.shape)} {h.dtype}")
    if part_max.dim() != 2 or part_max.shape[0] != h.shape[0] or part_max.dtype != torch.float32 \
            or part_max.device != h.device or part_max.stride(1) != 1 or not 1 <= part_max.shape[1] <= MAX_PARTS:
        raise ValueError(f"int8_quant_amax: part_max must be [{h.shape[0]}, 1..{MAX_PARTS}] float32 on {h.device} "
                         f"with unit stride, got {tuple(part_max.shape)} {part_max.dtype}")
    m, n = h.shape
    q = torch.empty((m, n), dtype=torch.int8, device=h.device)
    scale = torch.empty(m, dtype=torch.float32, device=h.device)
    if m == 0:
        return Int8Activations(q, scale, None)
    block_n = min(_QUANT_BLOCK, next_power_of_2(max(n, 1)))
    grid = (m, max(1, cdiv(n, block_n)))
    _int8_quant_amax_kernel[grid](h, part_max, q, scale, n, part_max.shape[1], h.stride(0), q.stride(0),
                                  part_max.stride(0), BLOCK_N=block_n, PARTS=next_power_of_2(part_max.shape[1]),
                                  HW_ROUND=h.is_cuda, num_warps=max(1, min(8, block_n // 512)),
                                  **pdl_launch(h.device))
    return Int8Activations(q, scale, None)
