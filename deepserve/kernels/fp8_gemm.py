"""FP8 W8A8 GEMM in Triton: float8_e4m3fn x float8_e4m3fn -> float32 on tensor cores, the row-wise
dequantising epilogue fused; the alternative to `torch._scaled_mm` (cuBLASLt / CUTLASS row-wise).

    fp8_gemm(x_q [M, K] e4m3, x_scale [M] f32, w_q [N, K] e4m3, w_scale [N] f32, bias [N] | None,
             out_dtype) -> y [M, N] out_dtype
    y = acc * x_scale[:, None] * w_scale[None, :] (+ bias),   acc = x_q @ w_q^T in float32

It is `kernels/int8_gemm.py`'s kernel with FP8=True (same tiling, split-K, grouped order, block
table and epilogue order); only the operand type and the accumulator differ. Hopper's fp8 wgmma takes
K-major operands, the [N, K] row-major layout of the weights. The sum is kept in float32
(max_num_imprecise_acc=0: Hopper's fp8 wgmma otherwise accumulates in reduced precision), which
Triton 3.6 compiles to mma.sync: measured for comparison in benchmarks/gpu_quant.py, not used by
the fp8 method (torch._scaled_mm). The reference agrees to float32 accumulation error.
"""

from __future__ import annotations

import torch
import triton

from deepserve.kernels.int8_gemm import (GemmConfig, _int8_gemm_kernel, check_operands, int8_gemm_config, num_sms,
                                         reduce_splits, split_k_output)

FP8 = torch.float8_e4m3fn


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: GemmConfig | None = None) -> torch.Tensor:
    """x_q [M, K] e4m3 (unit stride in K), x_scale [M] f32, w_q [N, K] e4m3 (unit stride in K),
    w_scale [N] f32, bias [N] float or None -> [M, N] out_dtype. `config` overrides the table."""
    check_operands(x_q, w_q, w_scale, bias, (FP8,), "fp8_gemm", w_dtype=FP8)
    if x_scale.shape != (x_q.shape[0],) or x_scale.dtype != torch.float32 or x_scale.device != x_q.device:
        raise ValueError(f"fp8_gemm: x_scale must be [{x_q.shape[0]}] float32 on {x_q.device}, got "
                         f"{tuple(x_scale.shape)} {x_scale.dtype}")
    (m, k), n = x_q.shape, w_q.shape[0]
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=out_dtype, device=x_q.device)
    cfg = config or int8_gemm_config(m, n, k, num_sms(x_q.device))
    k_per_split = triton.cdiv(triton.cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    c = split_k_output(m, n, cfg.split_k, out_dtype, x_q.device)
    grid = (triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n), cfg.split_k)
    _int8_gemm_kernel[grid](
        x_q, w_q, c, x_scale, w_scale, bias if bias is not None else w_scale, m, n, k, k_per_split,
        x_q.stride(0), w_q.stride(0), c.stride(0), c.stride(1),
        HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        GROUP_M=cfg.group_m, FP8=True, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        enable_fp_fusion=False)
    return reduce_splits(c, out_dtype)


def fp8_gemm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Pure-PyTorch reference: products of the e4m3 values in float64 (exact per product), rounded to
    float32, then the float32 epilogue in the kernel's order and one rounding to out_dtype."""
    acc = (x_q.double() @ w_q.double().t()).float()  # [M, N]
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
