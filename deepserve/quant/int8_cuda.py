"""The CUDA paths of the INT8 linear methods: which kernel runs a layer for a batch of M tokens.

    w8a8_linear(x [M, K], w_q [N, K] int8, w_scale [N] f32, bias) -> [M, N] x.dtype
        activations quantised per token (`kernels/int8_quant.py`), then by W8A8_BACKENDS:
        "triton"  kernels/int8_gemm.py, the dequantising epilogue fused;
        "int_mm"  torch._int_mm (cuBLASLt int8, M padded to 17 rows; K and N multiples of 8)
                  + kernels/int8_epilogue.py. Both give the same numbers (same float32 epilogue).
    w8a16_linear(x [M, K], w_q [N, K] int8, w_scale [N] f32, w_zero [N] f32 | None, bias) -> [M, N]
        by W8A16_BACKENDS:
        "triton"   kernels/w8a16_gemm.py, the weight dequantised in registers (read once, as int8);
        "dequant"  kernels/w8a16_dequant.py into a [N, K] temporary, then cuBLAS (F.linear): the
                   weight is rounded to x's dtype first, as a float model's would be.

Weights are [N, K] row-major on CUDA (see `kernels/int8_gemm.py` for why). The tables map the
largest M of a bucket to a backend; the choice is made on the host from M alone, so each CUDA graph
(one per batch size) captures one fixed path. The entries are not yet measured: they are first
estimates, to be replaced by what `benchmarks/gpu_quant.py` prints (its "choice" table).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# not yet measured: first estimates (decode bandwidth-bound -> Triton; prefill -> cuBLAS)
W8A8_BACKENDS: dict[int, str] = {16: "triton", 64: "triton", 256: "triton", 1 << 62: "int_mm"}
W8A16_BACKENDS: dict[int, str] = {16: "triton", 64: "triton", 256: "triton", 1 << 62: "dequant"}
BACKENDS = {"w8a8": ("triton", "int_mm"), "w8a16": ("triton", "dequant")}


def pick_backend(table: dict[int, str], m: int) -> str:
    return table[min(bound for bound in table if bound >= m)]


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                backend: str | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 on CUDA -> [M, N] x.dtype. `backend` overrides W8A8_BACKENDS."""
    from deepserve.kernels.int8_gemm import int8_gemm
    from deepserve.kernels.int8_quant import int8_quant

    x_q, x_scale, _ = int8_quant(_rows(x))
    backend = backend or pick_backend(W8A8_BACKENDS, x.shape[0])
    if backend not in BACKENDS["w8a8"]:
        raise ValueError(f"unknown W8A8 backend {backend!r}; use one of {BACKENDS['w8a8']}")
    k, n = x.shape[1], w_q.shape[0]
    if backend == "int_mm" and k % 8 == 0 and n % 8 == 0:
        from deepserve.kernels.int8_epilogue import int8_epilogue
        from deepserve.quant.int8 import int8_mm

        return int8_epilogue(int8_mm(x_q, w_q.t()), x_scale, w_scale, bias, x.dtype)
    return int8_gemm(x_q, x_scale, w_q, w_scale, bias, x.dtype)


def w8a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                 bias: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 on CUDA -> [M, N] x.dtype. `backend` overrides W8A16_BACKENDS."""
    backend = backend or pick_backend(W8A16_BACKENDS, x.shape[0])
    if backend not in BACKENDS["w8a16"]:
        raise ValueError(f"unknown W8A16 backend {backend!r}; use one of {BACKENDS['w8a16']}")
    if backend == "dequant":
        from deepserve.kernels.w8a16_dequant import w8a16_dequant

        return F.linear(x, w8a16_dequant(w_q, w_scale, w_zero, x.dtype), bias)
    from deepserve.kernels.w8a16_gemm import w8a16_gemm

    return w8a16_gemm(_rows(x), w_q, w_scale, w_zero, bias)
