"""The 8-bit KV cache format (`--kv-cache-dtype fp8 | int8`), in PyTorch.

A layer's cache is `data [2, N, bs, H_kv, D]` (int8 or float8_e4m3fn; K = [0], V = [1]) plus
`scales [2, N, bs, H_kv]` float32. Each row x [D] of K or V (one token, one KV head) is stored as

    s = max(max_d |x_d|, 1e-8) / QMAX
    q = clamp(round(x / s), -127, 127)        int8  (QMAX 127, round half to even)
    q = e4m3(clamp(x / s, -448, 448))         fp8   (QMAX 448, round to nearest even)

and read back as x' = q * s. The scale is dynamic, per token and per head, written with the row
by the cache-write kernel: no calibration, and one outlier token or head does not coarsen the grid
of the others. Error per element: int8 |x - x'| <= s / 2 = amax / 254; fp8 |x - x'| <= 2^-4 |x|
(3 mantissa bits) and <= s * 2^-10 below |x / s| = 2^-6 (subnormals). A float32 scale costs 4 bytes
per D bytes of data (3 % at D = 128): a block holds 2D / (D + 4) ~ 1.94x the tokens of bf16.
The math is the per-token activation quantisers' (deepserve/quant/int8.py, fp8.py), row by row,
so the Triton write kernel matches these references bit for bit.

MLA (layers/mla.py) caches `data [N, bs, R + Dr]` per layer, one row [latent | rope key] per token (its
one "KV head"), and `scales [N, bs]`: one scale per row, the same shapes rule (scales_shape). 4 bytes
per 576 at R + Dr = 512 + 64: 1.99x the tokens of bf16.
"""

from __future__ import annotations

from types import MappingProxyType

import torch

FP8_KV_DTYPE = torch.float8_e4m3fn
QUANT_MAX = MappingProxyType({torch.int8: 127.0, FP8_KV_DTYPE: 448.0})
_STORAGE = MappingProxyType({"fp8": FP8_KV_DTYPE, "int8": torch.int8})
SCALE_DTYPE = torch.float32


def kv_storage_dtype(kv_cache_dtype: str, model_dtype: torch.dtype) -> torch.dtype:
    """The cache tensor's dtype for `--kv-cache-dtype` ("auto": the model's dtype)."""
    if kv_cache_dtype == "auto":
        return model_dtype
    if kv_cache_dtype not in _STORAGE:
        raise ValueError(f"unknown kv_cache_dtype {kv_cache_dtype!r}; expected auto, fp8 or int8")
    return _STORAGE[kv_cache_dtype]


def is_quantized(dtype: torch.dtype) -> bool:
    """An 8-bit cache dtype, which needs scales beside the data."""
    return dtype in QUANT_MAX


def scales_shape(cache_shape: tuple[int, ...] | torch.Size) -> tuple[int, ...]:
    """[2, N, bs, H_kv, D] -> [2, N, bs, H_kv]: one scale per stored row."""
    return tuple(cache_shape[:-1])


def quantize_kv(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., D] float -> (q [..., D] `dtype`, scales [...] float32), one scale per row of D."""
    from deepserve.quant.fp8 import quantize_per_token_fp8_ref
    from deepserve.quant.int8 import quantize_per_token_ref

    if not is_quantized(dtype):
        raise ValueError(f"{dtype} is not an 8-bit KV cache dtype")
    rows = x.reshape(-1, x.shape[-1])  # [R, D]
    q, scales = (quantize_per_token_ref if dtype == torch.int8 else quantize_per_token_fp8_ref)(rows)
    return q.view(x.shape), scales.view(x.shape[:-1])


def dequantize_kv(q: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """q [..., D] int8 / e4m3, scales [...] float32 -> q * scale [..., D] in `dtype` (float32 math)."""
    return (q.float() * scales.float()[..., None]).to(dtype)
