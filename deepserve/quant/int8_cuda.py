"""The CUDA paths of the INT8 linear methods: which kernel runs a layer for a batch of M tokens.

    w8a8_linear(x [M, K], w_q [N, K] int8, w_scale [N] f32, bias) -> [M, N] x.dtype
        activations quantised per token (`kernels/int8_quant.py`), then `w8a8_gemm`
    w8a8_silu_and_mul_linear(gate_up [M, 2K], w_q, w_scale, bias) -> [M, N] gate_up.dtype
        = w8a8_linear(silu_and_mul(gate_up), ...) bit for bit, SiLU-and-mul fused into the quantisation
        (`kernels/silu_and_mul_quant.py`), then `w8a8_gemm`
    w8a8_gemm(x_q [M, K] int8, x_scale [M] f32, w_q, w_scale, bias, out_dtype) -> [M, N], by W8A8_BACKENDS:
        "triton"  kernels/int8_gemm.py, the dequantising epilogue fused; on sm_90, the linears and M buckets
                  of kernels/int8_gemm_ws.py's WS_SHAPE_CONFIGS go to its warp-specialised Gluon GEMM
                  (the same epilogue; the bits of int8_gemm run unsplit), and `w8a8_gate_up_silu_quant`'s
                  gated gate_up to its SiLU variant by SILU_WS_SHAPE_CONFIGS (int8_gemm_silu's bits);
        "int_mm"  torch._int_mm (cuBLASLt int8, M padded to 17 rows; K and N multiples of 8)
                  + kernels/int8_epilogue.py. Both give the same numbers (same float32 epilogue).
    w8a16_linear(x [M, K], w_q [N, K] int8, w_scale [N] f32, w_zero [N] f32 | None, bias) -> [M, N]
        by W8A16_BACKENDS:
        "gemv"     kernels/gemv.py with int8 weights (decode rows; symmetric weights only: with zero
                   points the row goes to "triton"), which hands bf16 / f16 rows on NVIDIA GPUs to
                   kernels/gemv_dp4a.py;
        "triton"   kernels/w8a16_gemm.py, the weight dequantised in registers (read once, as int8; the
                   weight is the tensor-core product's left operand above M = 16);
        "dequant"  kernels/w8a16_dequant.py into a [N, K] temporary, then cuBLAS (F.linear): the
                   weight is rounded to x's dtype first, as a float model's would be.
    w8a16_gated_gemv(x [M, K], w_q [2I, K], w_scale [2I], bias) -> [M, I] | None
        where the "gemv" backend applies: silu(gate) * up of a merged [gate | up] layer from one GEMV
        launch (its epilogue), for `Int8WeightOnlyMethod.apply_gated`; None elsewhere.

Weights are [N, K] row-major on CUDA (see `kernels/int8_gemm.py` for why). The tables map the
largest M of a bucket to a backend; the choice is made on the host from M alone, so each CUDA graph
(one per batch size) captures one fixed path. Measured on an H200 (run s4c2, benchmarks/results/
gpu_quant_kernels.jsonl; CUDA-graph replays over cold weights, summed over a qwen-7b layer's four
linears): W8A8 Triton beats torch._int_mm + epilogue at every M (1.5x at M = 2048). W8A16 Triton beats
dequantise + cuBLAS up to M = 256 (run s18d: 0.105 vs 0.324 ms at M = 16, 0.209 vs 0.330 at M = 128, 0.292
vs 0.365 at M = 256) and loses at M = 512 (0.542 vs 0.499). The
"gemv" rows (M <= 2) follow kernels_gemv.jsonl's bf16 figures (the gemv beats cuBLAS at M <= 2, loses
at M = 4); its int8 (dp4a) kernel is 1.09-1.34x faster than the float32 GEMV at M = 1-2 (run s17e).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from deepserve.kernels.sizes import bucket

if TYPE_CHECKING:
    from deepserve.kernels.int8_gemm_ws import WsConfig
    from deepserve.kernels.int8_quant import Int8Activations

W8A8_BACKENDS: dict[int, str] = {1 << 62: "triton"}
W8A16_BACKENDS: dict[int, str] = {2: "gemv", 256: "triton", 1 << 62: "dequant"}
BACKENDS = {"w8a8": ("triton", "int_mm"), "w8a16": ("gemv", "triton", "dequant")}


def pick_backend(table: dict[int, str], m: int) -> str:
    return bucket(table, m)


def _rows(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def w8a8_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                backend: str | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 on CUDA -> [M, N] x.dtype. `backend` overrides W8A8_BACKENDS."""
    from deepserve.kernels.int8_quant import int8_quant

    x_q, x_scale, _ = int8_quant(_rows(x))
    return w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, x.dtype, backend)


def w8a8_silu_and_mul_linear(gate_up: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                             bias: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """gate_up [M, 2K] f16/bf16/f32 on CUDA -> [M, N] gate_up.dtype: w8a8_linear(silu_and_mul(gate_up))."""
    from deepserve.kernels.silu_and_mul_quant import silu_and_mul_int8_quant

    x_q, x_scale, _ = silu_and_mul_int8_quant(gate_up)
    return w8a8_gemm(x_q, x_scale, w_q, w_scale, bias, gate_up.dtype, backend)


def w8a8_gate_up_silu_quant(x_q: torch.Tensor, x_scale: torch.Tensor, w_g: torch.Tensor, w_scale_g: torch.Tensor,
                            inter: int, out_dtype: torch.dtype) -> Int8Activations:
    """x_q [M, K] int8, x_scale [M] f32 (gate_up's input per token), w_g / w_scale_g: the [gate | up] weight
    [2I, K] int8 and scales [2I] in the gated layout (kernels/int8_gemm_silu.py `to_gated_layout`) ->
    Int8Activations(q [M, I] int8, scale [M] f32, None) of h = silu(gate) * up in out_dtype. Bit for bit
    int8_quant(silu_and_mul(w8a8_gemm(...))) of the weight as loaded where that GEMM runs unsplit
    (gate_up's many n-blocks: every served shape); a split-K GEMM rounds its float32 partials once more."""
    from deepserve.kernels.int8_gemm_silu import int8_gemm_silu, int8_quant_amax

    ws = ws_gate_up_config(x_q, w_g, out_dtype)
    if ws is not None:
        from deepserve.kernels.int8_gemm_silu_ws import int8_gemm_silu_ws

        return int8_quant_amax(*int8_gemm_silu_ws(x_q, x_scale, w_g, w_scale_g, inter, out_dtype, ws))
    return int8_quant_amax(*int8_gemm_silu(x_q, x_scale, w_g, w_scale_g, inter, out_dtype))


def ws_gate_up_config(x_q: torch.Tensor, w_g: torch.Tensor, out_dtype: torch.dtype) -> WsConfig | None:
    """`ws_linear_config` for the gated gate_up (`kernels/int8_gemm_silu_ws.SILU_WS_SHAPE_CONFIGS`): the config
    where the table takes this weight at this M, the device runs it and the epilogue's scratch for out_dtype
    fits beside its ring."""
    from deepserve.kernels import int8_gemm_ws
    from deepserve.kernels.int8_gemm import tma_rows_ok
    from deepserve.kernels.int8_gemm_silu_ws import silu_config_fits, silu_ws_shape_config

    cfg = silu_ws_shape_config(x_q.shape[0], w_g.shape[0], x_q.shape[1])
    if cfg is None or not silu_config_fits(cfg, out_dtype) or not int8_gemm_ws.ws_available(x_q.device):
        return None
    return cfg if tma_rows_ok(x_q, w_g) else None


def w8a8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype, backend: str | None = None) -> torch.Tensor:
    """x_q [M, K] int8 and x_scale [M] f32 (activations quantised per token) -> [M, N] out_dtype."""
    from deepserve.kernels.int8_gemm import int8_gemm

    backend = backend or pick_backend(W8A8_BACKENDS, x_q.shape[0])
    if backend not in BACKENDS["w8a8"]:
        raise ValueError(f"unknown W8A8 backend {backend!r}; use one of {BACKENDS['w8a8']}")
    k, n = x_q.shape[1], w_q.shape[0]
    if backend == "int_mm" and k % 8 == 0 and n % 8 == 0:
        from deepserve.kernels.int8_epilogue import int8_epilogue
        from deepserve.quant.int8 import int8_mm

        return int8_epilogue(int8_mm(x_q, w_q.t()), x_scale, w_scale, bias, out_dtype)
    ws = ws_linear_config(x_q, w_q)
    if ws is not None:
        from deepserve.kernels.int8_gemm_ws import int8_gemm_ws

        return int8_gemm_ws(x_q, x_scale, w_q, w_scale, bias, out_dtype, ws)
    return int8_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype)


def ws_linear_config(x_q: torch.Tensor, w_q: torch.Tensor) -> WsConfig | None:
    """The warp-specialised GEMM's config where its shape table takes this linear at this M and the device
    runs it (`kernels/int8_gemm_ws.py`: sm_90, Gluon, 16-byte aligned rows), else None (int8_gemm)."""
    from deepserve.kernels import int8_gemm_ws
    from deepserve.kernels.int8_gemm import tma_rows_ok

    (m, k), n = x_q.shape, w_q.shape[0]
    cfg = int8_gemm_ws.ws_shape_config(m, n, k)
    if cfg is None or not int8_gemm_ws.ws_available(x_q.device):
        return None
    return cfg if tma_rows_ok(x_q, w_q) else None


def w8a16_linear(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None,
                 bias: torch.Tensor | None, backend: str | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 on CUDA -> [M, N] x.dtype. `backend` overrides W8A16_BACKENDS."""
    backend = backend or pick_backend(W8A16_BACKENDS, x.shape[0])
    if backend not in BACKENDS["w8a16"]:
        raise ValueError(f"unknown W8A16 backend {backend!r}; use one of {BACKENDS['w8a16']}")
    if backend == "dequant":
        from deepserve.kernels.w8a16_dequant import w8a16_dequant

        return F.linear(x, w8a16_dequant(w_q, w_scale, w_zero, x.dtype), bias)
    if backend == "gemv" and w_zero is None and x.dtype in (torch.bfloat16, torch.float16) \
            and x.shape[1] % 16 == 0 and w_q.is_contiguous():
        from deepserve.kernels.gemv import GEMV_MAX_M, gemv

        if x.shape[0] <= GEMV_MAX_M:
            return gemv(_rows(x), w_q, bias, w_scale=w_scale, static_weight=True)  # a layer's weight
    from deepserve.kernels.w8a16_gemm import w8a16_gemm

    return w8a16_gemm(_rows(x), w_q, w_scale, w_zero, bias)


def w8a16_gated_gemv(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None) -> torch.Tensor | None:
    """x [M, K] f16/bf16, w_q [2I, K] int8 (a merged [gate | up] weight, symmetric), w_scale [2I] f32 ->
    silu(gate) * up [M, I] in x's dtype from one launch of the decode GEMV (`gemv(..., gated=True)`), where
    w8a16_linear would take the "gemv" backend for M rows; None elsewhere (the caller runs it unfused)."""
    if pick_backend(W8A16_BACKENDS, x.shape[0]) != "gemv" or x.dtype not in (torch.bfloat16, torch.float16) \
            or x.shape[1] % 16 or not w_q.is_contiguous() or w_q.shape[0] % 2:
        return None
    from deepserve.kernels.gemv import GEMV_MAX_M, gated_applies, gemv

    if not 1 <= x.shape[0] <= GEMV_MAX_M or not gated_applies(x.shape[0], w_q.shape[0], x.shape[1], torch.int8):
        return None
    return gemv(_rows(x), w_q, bias, w_scale=w_scale, static_weight=True, gated=True)
