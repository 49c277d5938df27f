"""Block-scaled FP8 GEMM (DeepSeek-V3 block-FP8 linears): y = dequant(a) @ dequant(w)^T.

    block_fp8_gemm(a_q [M, K] e4m3, a_scale [M, Kb] f32, w_q [N, K] e4m3, w_scale [Nb, Kb] f32,
                   block=(128, 128), out_dtype=bf16) -> [M, N] out_dtype

with Kb = ceil(K / bk), Nb = ceil(N / bn): a_q/a_scale from `block_fp8_quant` (one scale per token
per bk columns), w_q/w_scale as the checkpoint stores them (one scale per bn x bk block).

Each program computes a BLOCK_M x BLOCK_N tile of y. BLOCK_K equals the scale group bk, so every
iteration of the K loop covers exactly one scale column: the fp8 x fp8 tensor-core dot of that
block (float32 result) is multiplied by a_scale[m, kb] * w_scale[n // bn, kb] and added to a
float32 accumulator. The scales are applied once per 128-deep block, so the tensor cores' reduced
precision accumulation of fp8 products spans at most 128 terms (the promotion interval DeepSeek-V3
uses, tech report sec. 3.3.2). The per-column weight scale is gathered as w_scale[offs_n // bn], so
BLOCK_N need not divide bn. Partial K / N / M blocks are masked (zeros contribute nothing).

Tile sizes follow M (`gemm_config`): decode batches (M <= 16) take 16-row tiles and narrow N tiles
so that more programs stream the weight; prefill takes 64 or 128-row tiles. Programs are ordered in
groups of GROUP_M row tiles so neighbours share weight tiles in L2.

FP8 tensor-core dots need compute capability 8.9+ (Ada, Hopper); the Triton interpreter runs this
file on CPU for tests. `block_fp8_gemm_ref` (float32 matmul of the dequantised operands) is the
reference.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.sizes import cdiv

from deepserve.quant.block_fp8_ref import DEFAULT_BLOCK, FP8_DTYPE, block_fp8_gemm_ref, scale_shape

__all__ = ["GemmConfig", "block_fp8_gemm", "block_fp8_gemm_ref", "gemm_config"]

_OUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    group_m: int = 8


def gemm_config(m: int, n: int) -> GemmConfig:
    """Tile sizes for M rows and N output columns (BLOCK_K is the scale group, 128)."""
    if m <= 16:
        return GemmConfig(16, 32 if n <= 4096 else 64, 4, 4)
    if m <= 64:
        return GemmConfig(32 if m <= 32 else 64, 64, 4, 4)
    if m <= 256:
        return GemmConfig(64, 128, 4, 3)
    return GemmConfig(128, 128, 8, 3)


@triton.jit
def _block_fp8_gemm_kernel(a_ptr, as_ptr, b_ptr, bs_ptr, c_ptr, M, N, K,
                           stride_am, stride_asm, stride_ask, stride_bn, stride_bsn, stride_bsk, stride_cm,
                           GROUP_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                           BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """C[tile] = sum over K blocks kb of (A[:, kb] . B[:, kb]^T) * as[:, kb] * bs[n // GROUP_N, kb]."""
    pid = tl.program_id(0)
    num_m_blocks = tl.cdiv(M, BLOCK_M)
    num_n_blocks = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n_blocks
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m_blocks - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_size
    pid_n = (pid % per_group) // group_size
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask, n_mask = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m.to(tl.int64)[:, None] * stride_am + offs_k[None, :]  # [BM, BK]
    b_ptrs = b_ptr + offs_n.to(tl.int64)[:, None] * stride_bn + offs_k[None, :]  # [BN, BK]
    as_ptrs = as_ptr + offs_m * stride_asm  # [BM]
    bs_ptrs = bs_ptr + (offs_n // GROUP_N) * stride_bsn  # [BN]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kb in range(0, tl.cdiv(K, BLOCK_K)):
        k_mask = offs_k < K - kb * BLOCK_K
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
        a_s = tl.load(as_ptrs + kb * stride_ask, mask=m_mask, other=0.0)
        b_s = tl.load(bs_ptrs + kb * stride_bsk, mask=n_mask, other=0.0)
        acc += tl.dot(a, tl.trans(b)) * a_s[:, None] * b_s[None, :]
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    c_ptrs = c_ptr + offs_m.to(tl.int64)[:, None] * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


def _check(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
           block: tuple[int, int], out_dtype: torch.dtype) -> None:
    if a_q.dtype != FP8_DTYPE or w_q.dtype != FP8_DTYPE:
        raise TypeError(f"block_fp8_gemm wants float8_e4m3fn operands, got {a_q.dtype} and {w_q.dtype}")
    if a_q.dim() != 2 or w_q.dim() != 2 or a_q.shape[1] != w_q.shape[1]:
        raise ValueError(f"shapes a {tuple(a_q.shape)} and w {tuple(w_q.shape)} do not chain ([M, K], [N, K])")
    if (a_q.shape[1] and a_q.stride(1) != 1) or (w_q.shape[1] and w_q.stride(1) != 1):
        raise ValueError("a_q and w_q must be unit-stride along K")
    bn, bk = block
    if bk < 16 or bk & (bk - 1) or bn < 1:
        raise ValueError(f"block {block}: bk must be a power of two >= 16")
    m, k = a_q.shape
    expected_a = (m, cdiv(k, bk))
    if tuple(a_scale.shape) != expected_a or tuple(w_scale.shape) != scale_shape(w_q.shape, block):
        raise ValueError(f"scales a {tuple(a_scale.shape)} / w {tuple(w_scale.shape)} do not fit a "
                         f"{tuple(a_q.shape)} / w {tuple(w_q.shape)} with {bn}x{bk} blocks (expected "
                         f"{expected_a} / {scale_shape(w_q.shape, block)})")
    if a_scale.dtype != torch.float32 or w_scale.dtype != torch.float32:
        raise TypeError(f"scales must be float32, got {a_scale.dtype} and {w_scale.dtype}")
    if out_dtype not in _OUT_DTYPES:
        raise TypeError(f"out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")


def block_fp8_gemm(a_q: torch.Tensor, a_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                   block: tuple[int, int] = DEFAULT_BLOCK, out_dtype: torch.dtype = torch.bfloat16,
                   config: GemmConfig | None = None) -> torch.Tensor:
    """See the module docstring. a_q rows may be strided; `config` overrides the tile table."""
    _check(a_q, a_scale, w_q, w_scale, block, out_dtype)
    m, k = a_q.shape
    n = w_q.shape[0]
    out = torch.empty((m, n), dtype=out_dtype, device=a_q.device)
    if m == 0 or n == 0:
        return out
    if k == 0:
        return out.zero_()
    cfg = config or gemm_config(m, n)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n),)
    _block_fp8_gemm_kernel[grid](
        a_q, a_scale, w_q, w_scale, out, m, n, k,
        a_q.stride(0), a_scale.stride(0), a_scale.stride(1), w_q.stride(0), w_scale.stride(0),
        w_scale.stride(1), out.stride(0),
        GROUP_N=block[0], BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=block[1], GROUP_M=cfg.group_m,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out
