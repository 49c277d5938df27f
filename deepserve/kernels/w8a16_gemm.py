"""W8A16 GEMM: float activations times int8 weights dequantised inside the kernel.

    w8a16_gemm(x [M, K] f16/bf16/f32, w_q [N, K] int8, w_scale [N] f32, w_zero [N] f32 | None,
               bias [N] | None) -> y [M, N] x.dtype
    y = x @ ((w_q - w_zero) * w_scale)^T (+ bias)

Dequantisation in the kernel: each [BLOCK_K, BLOCK_N] tile of w_q is loaded as int8 (half the bytes
of bf16), the zero point subtracted in float32 and the result converted to x's dtype: |q - zp| <= 255
is an integer that bf16 (8 significant bits) and f16 hold exactly, so the tensor-core product
x @ (q - zp) is the exact float one, accumulated in float32. The per-channel scale is applied once
in the epilogue: y = acc * w_scale (+ bias). Symmetric weights (no zero point) skip the subtraction.

Decode (M <= 16) reads the weight once and is bandwidth bound: narrow N blocks and split-K give
enough programs to keep every SM streaming (`int8_gemm.pick_split_k`); splits write float32 partials
that the host sums (`reduce_splits`; `int8_gemm` sums its splits inside the kernel). Larger M uses
larger tiles; above some M the Int8WeightOnly method may instead dequantise the whole weight
(`kernels/w8a16_dequant.py`) and call cuBLAS (see `deepserve.quant.int8`).
The table is a first estimate for H100 (not yet measured); `benchmarks/gpu_quant.py --tune` prints
measured alternatives. No host synchronisation (CUDA-graph safe).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_gemm import GemmConfig, check_operands, config_for, grouped_tile, num_sms
from deepserve.kernels.sizes import cdiv

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)

# max M -> config (split_k: the most splits allowed). not yet measured: first estimates for H100.
CONFIGS: dict[int, GemmConfig] = {
    16: GemmConfig(16, 64, 128, split_k=4, group_m=1, num_warps=4, num_stages=4),
    64: GemmConfig(64, 64, 64, split_k=2, group_m=4, num_warps=4, num_stages=4),
    256: GemmConfig(64, 128, 64, split_k=1, group_m=8, num_warps=4, num_stages=4),
    1 << 62: GemmConfig(128, 128, 64, split_k=1, group_m=8, num_warps=8, num_stages=3),
}


def w8a16_gemm_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    return config_for(CONFIGS, m, n, k, sms)


@triton.jit
def _w8a16_gemm_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, zero_ptr, bias_ptr, M, N, K, k_per_split,
                       stride_am, stride_bn, stride_cs, stride_cm,
                       HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       GROUP_M: tl.constexpr):
    """c[split] = (a @ (b - zero)^T over this split's K range) * scale (+ bias on split 0)."""
    pid_m, pid_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, GROUP_M)
    split = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + (k_start + offs_k)[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[None, :] * stride_bn + (k_start + offs_k)[:, None]  # [BK, BN]
    if HAS_ZERO:
        zero = tl.load(zero_ptr + offs_n, mask=n_mask, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0)
        if HAS_ZERO:
            b = (q.to(tl.float32) - zero[None, :]).to(a.dtype)  # masked rows meet a == 0
        else:
            b = q.to(a.dtype)
        if IEEE:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y + tl.where(split == 0, bias, 0.0)[None, :]
    c_ptrs = c_ptr + split * stride_cs + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def w8a16_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, config: GemmConfig | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 (unit stride in K), w_q [N, K] int8 (unit stride in K), w_scale [N] f32,
    w_zero [N] f32 integer-valued zero points or None (symmetric), bias [N] or None
    -> [M, N] x.dtype. `config` overrides the table."""
    check_operands(x, w_q, w_scale, bias, _FLOATS, "w8a16_gemm")
    n = w_q.shape[0]
    if w_zero is not None and (w_zero.shape != (n,) or w_zero.dtype != torch.float32 or w_zero.device != x.device):
        raise ValueError(f"w8a16_gemm: zero point must be [{n}] float32 on {x.device}, got "
                         f"{tuple(w_zero.shape)} {w_zero.dtype}")
    m, k = x.shape
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    cfg = config or w8a16_gemm_config(m, n, k, num_sms(x.device))
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    c = split_k_output(m, n, cfg.split_k, x.dtype, x.device)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), cfg.split_k)
    _w8a16_gemm_kernel[grid](
        x, w_q, c, w_scale, w_zero if w_zero is not None else w_scale, bias if bias is not None else w_scale,
        m, n, k, k_per_split, x.stride(0), w_q.stride(0), c.stride(0), c.stride(1),
        HAS_ZERO=w_zero is not None, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return reduce_splits(c, x.dtype)


def w8a16_gemm_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None = None,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference in float64: x @ ((w_q - w_zero) * w_scale)^T + bias, rounded to x.dtype."""
    w = w_q.double() if w_zero is None else w_q.double() - w_zero.double()[:, None]
    y = (x.double() @ w.t()) * w_scale.double()[None, :]
    if bias is not None:
        y = y + bias.double()
    return y.to(x.dtype)


def split_k_output(m: int, n: int, split_k: int, out_dtype: torch.dtype, device) -> torch.Tensor:
    """Where the kernel writes: [1, M, N] out_dtype, or the [S, M, N] float32 partials."""
    return torch.empty((split_k, m, n), dtype=out_dtype if split_k == 1 else torch.float32, device=device)


def reduce_splits(c: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """[S, M, N] -> [M, N] out_dtype (float32 sum of the splits, then one rounding)."""
    return c[0] if c.shape[0] == 1 else c.sum(dim=0).to(out_dtype)
