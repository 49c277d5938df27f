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

from deepserve.kernels.int8_gemm import GemmConfig, check_operands, scaled_gemm

FP8 = torch.float8_e4m3fn


def fp8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
             bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
             config: GemmConfig | None = None) -> torch.Tensor:
    """x_q [M, K] e4m3 (unit stride in K), x_scale [M] f32, w_q [N, K] e4m3 (unit stride in K),
    w_scale [N] f32, bias [N] float or None -> [M, N] out_dtype. `config` overrides the table."""
    check_operands(x_q, w_q, w_scale, bias, (FP8,), "fp8_gemm", w_dtype=FP8)
    return scaled_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, config, fp8=True, what="fp8_gemm")


def fp8_gemm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Pure-PyTorch reference: products of the e4m3 values in float64 (exact per product), rounded to
    float32, then the float32 epilogue in the kernel's order and one rounding to out_dtype."""
    acc = (x_q.double() @ w_q.double().t()).float()  # [M, N]
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
