"""Pure-PyTorch references for DeepSeek-V3/R1 block FP8 (no Triton; CPU paths use these directly).

Published layout of a quantised linear weight (DeepSeek-V3 `README_WEIGHTS.md`):

    <name>.weight            [N, K] float8_e4m3fn
    <name>.weight_scale_inv  [ceil(N / bn), ceil(K / bk)] float32, block (bn, bk) = (128, 128)
    w[n, k] = weight[n, k] * weight_scale_inv[n // bn, k // bk]

Blocks at the right and bottom edges are partial when N or K is not a multiple of the block; their
scale is that of the block zero-padded to full size (padding does not change a block's max |w|).
Activations are quantised at run time per token and per group of bk columns:

    x[m, k] ~ q[m, k] * a_scale[m, k // bk],    a_scale[m, g] = max(max |x[m, group g]|, eps) / 448

and the GEMM sums, per K block, (q_a . q_w) * a_scale[m, kb] * w_scale[n // bn, kb] in float32.
Leading batch dimensions (stacked experts [E, N, K] with scales [E, Nb, Kb]) are allowed where noted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from deepserve.quant.int8 import div_rn, quantize_per_channel_ref

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)  # (rows of N, columns of K) per weight scale
AMAX_EPS = 1e-10  # an all-zero group or block gets a tiny positive scale, never 0 (no division by 0)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def scale_shape(weight_shape: tuple[int, ...] | torch.Size, block: tuple[int, int] = DEFAULT_BLOCK
                ) -> tuple[int, ...]:
    """[..., N, K] -> (..., ceil(N / bn), ceil(K / bk))."""
    *lead, n, k = weight_shape
    return (*lead, _cdiv(n, block[0]), _cdiv(k, block[1]))


def _blocked(w: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """[..., N, K] -> zero-padded view [..., Nb, bn, Kb, bk] (float32)."""
    bn, bk = block
    *lead, n, k = w.shape
    nb, kb = _cdiv(n, bn), _cdiv(k, bk)
    padded = F.pad(w.float(), (0, kb * bk - k, 0, nb * bn - n))  # [..., Nb*bn, Kb*bk]
    return padded.view(*lead, nb, bn, kb, bk)


def _unblocked(blocks: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """[..., Nb, bn, Kb, bk] -> [..., N, K] (drops the padding)."""
    *lead, nb, bn, kb, bk = blocks.shape
    return blocks.reshape(*lead, nb * bn, kb * bk)[..., :n, :k]


def _to_fp8(v: torch.Tensor) -> torch.Tensor:
    """float32 -> float8_e4m3fn, round to nearest even, saturating at +-448."""
    return v.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def block_fp8_quantize_weight_ref(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
                                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] float8_e4m3fn, scale_inv [..., Nb, Kb] f32), one scale
    per (bn x bk) block: scale = max(max |w_block|, eps) / 448, q = e4m3(w / scale)."""
    n, k = w.shape[-2:]
    blocks = _blocked(w, block)  # [..., Nb, bn, Kb, bk]
    scale = div_rn(blocks.abs().amax(dim=(-3, -1)).clamp(min=AMAX_EPS), FP8_MAX)  # [..., Nb, Kb]
    q = _to_fp8(blocks / scale[..., :, None, :, None])
    return _unblocked(q.float(), n, k).to(FP8_DTYPE).contiguous(), scale


def block_fp8_dequant_ref(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                          out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [..., N, K] float8_e4m3fn, scale_inv [..., Nb, Kb] -> [..., N, K] out_dtype: each element
    times its block's scale in float32, rounded once to out_dtype."""
    if tuple(scale_inv.shape) != scale_shape(w.shape, block):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not fit weight {tuple(w.shape)} "
                         f"with {block[0]}x{block[1]} blocks (expected {scale_shape(w.shape, block)})")
    n, k = w.shape[-2:]
    blocks = _blocked(w, block) * scale_inv.float()[..., :, None, :, None]  # [..., Nb, bn, Kb, bk]
    return _unblocked(blocks, n, k).to(out_dtype).contiguous()


def block_fp8_quant_ref(x: torch.Tensor, group_size: int = DEFAULT_BLOCK[1]
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token-group activation quantisation: x [M, K] float -> (q [M, K] float8_e4m3fn,
    scale [M, ceil(K / group_size)] f32). The last group of a row may be partial."""
    m, k = x.shape
    groups = _cdiv(k, group_size)
    padded = F.pad(x.float(), (0, groups * group_size - k)).view(m, groups, group_size)
    scale = div_rn(padded.abs().amax(dim=-1).clamp(min=AMAX_EPS), FP8_MAX)  # [M, G]
    q = _to_fp8(padded / scale[..., None]).view(m, groups * group_size)[:, :k]
    return q.contiguous(), scale


def expand_group_scales(scale: torch.Tensor, k: int, group_size: int) -> torch.Tensor:
    """[M, G] -> [M, K]: each column's group scale."""
    return scale.float().repeat_interleave(group_size, dim=-1)[..., :k]


def block_fp8_gemm_ref(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                       block: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype = torch.bfloat16
                       ) -> torch.Tensor:
    """a_q [M, K] fp8, a_scale [M, Kb] f32, w_q [N, K] fp8, w_scale [Nb, Kb] f32 -> [M, N] out_dtype.

    Dequantises both operands (exact products of an fp8 value and its scale, up to float32
    rounding) and multiplies them in float32."""
    a = a_q.float() * expand_group_scales(a_scale, a_q.shape[1], block[1])  # [M, K]
    w = block_fp8_dequant_ref(w_q, w_scale, block)  # [N, K]
    return (a @ w.t()).to(out_dtype)


def block_fp8_linear_ref(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                         block: tuple[int, int] = DEFAULT_BLOCK, bias: torch.Tensor | None = None
                         ) -> torch.Tensor:
    """The whole block-FP8 linear: x [M, K] float -> quantise per token group -> GEMM -> [M, N] x's dtype."""
    a_q, a_scale = block_fp8_quant_ref(x, block[1])
    y = block_fp8_gemm_ref(a_q, a_scale, w_q, w_scale, block, torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def quantize_rows_int8_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [..., N, K] float -> (q [..., N, K] int8, scale [..., N] f32): symmetric int8 per output row
    (per expert and row for stacked experts); every element round-trips within scale / 2."""
    *lead, n, k = w.shape
    q, scale, _ = quantize_per_channel_ref(w.reshape(-1, k), symmetric=True)
    return q.view(*lead, n, k), scale.view(*lead, n)


def block_fp8_to_int8_ref(w_q: torch.Tensor, w_scale: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Block FP8 [..., N, K] (+ scales) -> per-row int8 (q [..., N, K] int8, scale [..., N] f32),
    through the exact float32 dequantisation. |int8 value - fp8 value| <= scale[row] / 2."""
    return quantize_rows_int8_ref(block_fp8_dequant_ref(w_q, w_scale, block))
