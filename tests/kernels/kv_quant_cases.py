"""8-bit KV cache test helpers: quantised paged cases and the error bounds the tests derive.

Round trip (deepserve/layers/kv_quant.py), per element of a row with scale s:
    int8: |x - q s| <= s / 2                                (round to nearest on a grid of step s)
    fp8:  |x - q s| <= max(2^-4 |x|, 2^-10 s)               (e4m3: 3 mantissa bits, subnormal step 2^-9 s)
each plus float32 slack for the division x / s and the product q s (a few ulps of |x| <= 448 s),
taken here as 2^-15 s (int8) or 2^-13 s (fp8), far below the bounds themselves.

Attention: if every logit of a query moves by at most delta and every value element by at most
e_v, each softmax weight moves by a factor within [e^-2delta, e^2delta], so
    |o - o'| <= (e^(2 delta) - 1) max_j |v_j| + max_j e_v,j        (per query, head, dim)
with delta = softmax_scale * max_j sum_d |q_d| e_k,jd from the K bound above.
"""

from __future__ import annotations

import torch

from deepserve.layers.kv_quant import dequantize_kv, quantize_kv
from tests.kernels.paged_cases import PagedCase

QUANT_DTYPES = (torch.int8, torch.float8_e4m3fn)


def round_trip_bound(x: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-element bound on |x - dequantize(quantize(x))|: x [..., D] f32, scales [...] f32."""
    s = scales[..., None]
    if dtype == torch.int8:
        return s * (0.5 + 2.0 ** -15)
    return torch.maximum(x.abs() * 2.0 ** -4, s * 2.0 ** -10) + s * 2.0 ** -13


def quantized_case(case: PagedCase, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(data [2, N, bs, H_kv, D] in dtype, scales [2, N, bs, H_kv] f32) of case.kv_cache: every row
    no sequence owns (NaN in the float case) gets a NaN scale, so reading it poisons the output."""
    unused = case.kv_cache.isnan().any(-1)  # [2, N, bs, H_kv]
    data, scales = quantize_kv(case.kv_cache.float().nan_to_num(0.0), dtype)
    scales[unused] = float("nan")
    return data, scales


def dequantized(data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return dequantize_kv(data, scales, torch.float32)


def attention_bound(q: torch.Tensor, rows: list[tuple[int, int]], case: PagedCase, scales: torch.Tensor,
                    dtype: torch.dtype, softmax_scale: float) -> torch.Tensor:
    """Bound [T, H, D] on |attention over the 8-bit cache - attention over case.kv_cache| (see the
    module docstring) for q [T, H, D] whose rows[i] = (lo, hi) belong to sequence i. Taken over the
    sequence's whole context: a causal row sees a subset, for which the bound only shrinks."""
    exact = case.kv_cache.float().cpu()
    err = round_trip_bound(exact.nan_to_num(0.0), scales.cpu().nan_to_num(0.0), dtype)  # [2, N, bs, H_kv, D]
    out = torch.zeros(q.shape, dtype=torch.float32)
    block_size, rep = exact.shape[2], q.shape[1] // exact.shape[3]
    for i, (seq_len, (lo, hi)) in enumerate(zip(case.seq_lens.tolist(), rows)):
        blocks = case.block_tables[i, : -(-seq_len // block_size)].long().cpu()
        v = exact[1][blocks].flatten(0, 1)[:seq_len]  # [S, H_kv, D]
        e = err[:, blocks].flatten(1, 2)[:, :seq_len]  # [2, S, H_kv, D]
        e_k, e_v, v = (t.repeat_interleave(rep, 1) for t in (e[0], e[1], v))  # [S, H, D]
        delta = softmax_scale * torch.einsum("thd,shd->ths", q[lo:hi].float().abs().cpu(), e_k).amax(-1)  # [L, H]
        out[lo:hi] = torch.expm1(2 * delta)[..., None] * v.abs().amax(0) + e_v.amax(0)
    return out
