"""W8A16 GEMM: float activations times int8 weights dequantised inside the kernel.

    w8a16_gemm(x [M, K] f16/bf16/f32, w_q [N, K] int8, w_scale [N] f32, w_zero [N] f32 | None,
               bias [N] | None) -> y [M, N] x.dtype
    y = x @ ((w_q - w_zero) * w_scale)^T (+ bias)

Two kernels, picked by M and x's dtype (`weight_left`):
  x-left  (M <= X_LEFT_MAX_M) y = x @ w^T: each [BLOCK_K, BLOCK_N] tile of w_q is loaded as int8,
          converted in registers and, as the right operand of the tensor-core product, written back
          to shared memory in x's dtype;
  w-left  (larger M) y^T = w @ x^T: the weight is the left operand, which Hopper's wgmma reads from
          registers, so the converted tile goes straight to the tensor cores; x^T [BLOCK_K, BLOCK_M]
          is read from shared memory as it is, and M becomes the product's narrow dimension.
Both read every weight byte once, as int8. Side by side on an H200 (run s18e, qwen-7b's four linears summed,
CUDA-graph replays over cold weights; x-left with its earlier tables, w-left with these): M = 8 and 16,
x-left 0.104 ms against w-left 0.138; M = 32, 0.184 against 0.148; M = 64, 0.190 against 0.173; M = 128,
0.341 against 0.211. In run s18d, beside these kernels as routed: dequantise + cuBLAS 0.330 ms and bf16
cuBLAS 0.142 at M = 128.

Exactness: |q - zp| <= 255 is an integer that bf16 (8 significant bits) and f16 hold exactly, so
the tensor-core product x (q - zp) is the exact float one, accumulated in float32. The per-channel
scale is applied once in the epilogue: y = acc * w_scale (+ bias). Symmetric weights (no zero
point) skip the subtraction. float32 x multiplies in IEEE float32 (no tensor cores), always in the
x-left kernel on FLOAT32_CONFIG's small tiles.

Split-K (few tiles: small N) writes float32 partials that the host sums (`reduce_splits`).
CONFIGS and SHAPE_CONFIGS hold GemmConfig(block_m: rows of x per tile, block_n: rows of w_q per
tile, block_k, split_k: the most splits allowed (`int8_gemm.pick_split_k`), group_m: tiles of the
outer operand walking the other's together, num_warps, num_stages) for either kernel. Above
int8_cuda.W8A16_BACKENDS' "triton" bucket the Int8WeightOnly method dequantises the whole weight and
calls cuBLAS instead (`kernels/w8a16_dequant.py`). No host synchronisation (CUDA-graph safe).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_gemm import GemmConfig, check_operands, config_for, grouped_tile, num_sms
from deepserve.kernels.sizes import cdiv

_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
X_LEFT_MAX_M = 16  # the largest M the x-left kernel runs (see the docstring)

# max M -> config. M <= 16: the x-left kernel's (run s4c2); the others: the w-left kernel's best summed over
# qwen-7b's four linears in run s18c (`benchmarks/gpu_quant.py --tune --tune-kernels w8a16_gemm`).
CONFIGS: dict[int, GemmConfig] = {
    16: GemmConfig(16, 64, 128, split_k=4, group_m=1, num_warps=4, num_stages=4),
    32: GemmConfig(32, 64, 128, split_k=4, group_m=8, num_warps=4, num_stages=4),
    64: GemmConfig(64, 64, 128, split_k=4, group_m=8, num_warps=4, num_stages=4),
    128: GemmConfig(128, 64, 128, split_k=4, group_m=8, num_warps=4, num_stages=3),
    256: GemmConfig(256, 128, 64, split_k=4, group_m=8, num_warps=8, num_stages=3),
    1 << 62: GemmConfig(256, 64, 64, split_k=1, group_m=8, num_warps=4, num_stages=3),
}

# float32 x (IEEE products on CUDA cores, not a serving dtype): the x-left kernel on small tiles at every M. The
# tables' tiles, sized for 16-bit x, would need 104-224 KB of shared memory in float32: more than sm_89 / sm_120
# (99 KB) or sm_80 (163 KB) give a block.
FLOAT32_CONFIG = GemmConfig(16, 64, 64, split_k=4, group_m=1, num_warps=4, num_stages=3)

# (N, K) -> {max M: GemmConfig} for linear shapes tuned apart, laid over CONFIGS (`w8a16_gemm_config`): each
# qwen-7b linear's best in run s18c (split_k as the tune resolved it on 132 SMs). Summed over the four at
# M = 128: 0.210 ms against CONFIGS' 0.227; at M = 256: 0.290 against 0.320.
_QKV, _GATE_UP, _O, _DOWN = (4608, 3584), (37888, 3584), (3584, 3584), (3584, 18944)
SHAPE_CONFIGS: dict[tuple[int, int], dict[int, GemmConfig]] = {
    _QKV: {32: GemmConfig(32, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
           64: GemmConfig(64, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
           128: GemmConfig(128, 64, 64, split_k=1, group_m=8, num_warps=4, num_stages=4),
           256: GemmConfig(256, 64, 64, split_k=1, group_m=8, num_warps=4, num_stages=3)},
    _GATE_UP: {32: GemmConfig(32, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
               64: GemmConfig(64, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
               128: GemmConfig(128, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=3),
               256: GemmConfig(256, 64, 64, split_k=1, group_m=8, num_warps=4, num_stages=3)},
    _O: {32: GemmConfig(32, 64, 128, split_k=3, group_m=8, num_warps=4, num_stages=4),
         64: GemmConfig(32, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
         128: GemmConfig(64, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4),
         256: GemmConfig(128, 64, 64, split_k=1, group_m=8, num_warps=4, num_stages=4)},
    _DOWN: {32: GemmConfig(32, 64, 128, split_k=3, group_m=8, num_warps=4, num_stages=4),
            64: GemmConfig(64, 64, 128, split_k=3, group_m=8, num_warps=4, num_stages=4),
            128: GemmConfig(128, 128, 128, split_k=4, group_m=8, num_warps=8, num_stages=3),
            256: GemmConfig(256, 128, 64, split_k=4, group_m=8, num_warps=8, num_stages=3)},
}


@functools.lru_cache(maxsize=4096)  # on every eager launch; all arguments are ints
def w8a16_gemm_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """CONFIGS' entry for M, or the shape's own where SHAPE_CONFIGS has one for M's bucket. Cached: edit the
    tables before the first launch."""
    return config_for({**CONFIGS, **SHAPE_CONFIGS.get((n, k), {})}, m, n, k, sms)


def weight_left(m: int, dtype: torch.dtype = torch.bfloat16) -> bool:
    """The w-left kernel for M rows of x in `dtype` (else x-left): float32 x always takes x-left."""
    return m > X_LEFT_MAX_M and dtype != torch.float32


def default_config(m: int, n: int, k: int, dtype: torch.dtype, sms: int) -> GemmConfig:
    """The tables' config (`w8a16_gemm_config`) for 16-bit x; FLOAT32_CONFIG for float32 x."""
    if dtype == torch.float32:
        return config_for({1 << 62: FLOAT32_CONFIG}, m, n, k, sms)
    return w8a16_gemm_config(m, n, k, sms)


@triton.jit
def _x_left_kernel(a_ptr, b_ptr, c_ptr, scale_ptr, zero_ptr, bias_ptr, M, N, K, k_per_split,
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


@triton.jit
def _w_left_kernel(x_ptr, w_ptr, c_ptr, scale_ptr, zero_ptr, bias_ptr, M, N, K, k_per_split,
                   stride_xm, stride_wn, stride_cs, stride_cm,
                   HAS_ZERO: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   GROUP_N: tl.constexpr):
    """c[split] = ((w - zero) @ x^T over this split's K range * scale (+ bias on split 0))^T, program
    (tile, split): acc [BLOCK_N, BLOCK_M] float32, the converted w tile [BLOCK_N, BLOCK_K] the left operand."""
    pid_n, pid_m = grouped_tile(tl.program_id(0), N, M, BLOCK_N, BLOCK_M, GROUP_N)
    split = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask, m_mask = offs_n < N, offs_m < M
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    w_ptrs = w_ptr + offs_n.to(tl.int64)[:, None] * stride_wn + (k_start + offs_k)[None, :]  # [BN, BK]
    x_ptrs = x_ptr + offs_m.to(tl.int64)[None, :] * stride_xm + (k_start + offs_k)[:, None]  # [BK, BM]
    if HAS_ZERO:
        zero = tl.load(zero_ptr + offs_n, mask=n_mask, other=0.0)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        q = tl.load(w_ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0)
        xt = tl.load(x_ptrs, mask=k_mask[:, None] & m_mask[None, :], other=0.0)
        if HAS_ZERO:
            w = (q.to(tl.float32) - zero[:, None]).to(xt.dtype)  # masked columns meet x^T == 0
        else:
            w = q.to(xt.dtype)
        if IEEE:
            acc = tl.dot(w, xt, acc, input_precision="ieee")
        else:
            acc = tl.dot(w, xt, acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc * scale[:, None]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y + tl.where(split == 0, bias, 0.0)[:, None]
    c_ptrs = c_ptr + split * stride_cs + offs_m.to(tl.int64)[None, :] * stride_cm + offs_n[:, None]
    tl.store(c_ptrs, y.to(c_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


def w8a16_gemm(x: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, config: GemmConfig | None = None,
               w_left: bool | None = None) -> torch.Tensor:
    """x [M, K] f16/bf16/f32 (unit stride in K), w_q [N, K] int8 (unit stride in K), w_scale [N] f32,
    w_zero [N] f32 integer-valued zero points or None (symmetric), bias [N] or None
    -> [M, N] x.dtype. `config` overrides `default_config` (its split_k used as given); `w_left` the kernel
    (default `weight_left(M, x.dtype)`)."""
    check_operands(x, w_q, w_scale, bias, _FLOATS, "w8a16_gemm")
    n = w_q.shape[0]
    if w_zero is not None and (w_zero.shape != (n,) or w_zero.dtype != torch.float32 or w_zero.device != x.device):
        raise ValueError(f"w8a16_gemm: zero point must be [{n}] float32 on {x.device}, got "
                         f"{tuple(w_zero.shape)} {w_zero.dtype}")
    m, k = x.shape
    if m == 0 or n == 0:
        return torch.zeros((m, n), dtype=x.dtype, device=x.device)
    cfg = config or default_config(m, n, k, x.dtype, num_sms(x.device))
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    c = split_k_output(m, n, cfg.split_k, x.dtype, x.device)
    grid = (cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n), cfg.split_k)
    kernel = _w_left_kernel if (weight_left(m, x.dtype) if w_left is None else w_left) else _x_left_kernel
    kernel[grid](
        x, w_q, c, w_scale, w_zero if w_zero is not None else w_scale, bias if bias is not None else w_scale,
        m, n, k, k_per_split, x.stride(0), w_q.stride(0), c.stride(0), c.stride(1),
        w_zero is not None, bias is not None, x.dtype == torch.float32,
        cfg.block_m, cfg.block_n, cfg.block_k, cfg.group_m, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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
