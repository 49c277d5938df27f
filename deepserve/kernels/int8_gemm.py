"""W8A8 GEMM: int8 x int8 -> int32 on tensor cores, the dequantising epilogue fused.

    int8_gemm(x_q [M, K] int8, x_scale [M] f32, w_q [N, K] int8, w_scale [N] f32, bias [N] | None,
              out_dtype) -> y [M, N] out_dtype
    y = acc * x_scale[:, None] * w_scale[None, :] (+ bias),   acc = x_q @ w_q^T exact in int32

Weight layout: [N, K] row-major (K contiguous), the layout the checkpoint has and the one both
operands of the int8 tensor-core instructions want (Hopper's int8 wgmma takes K-major operands only;
`torch._int_mm` is also fastest with `w_q.t()`, a column-major [K, N], the "TN" case of cuBLASLt).

Tiling: program (m-block, n-block, k-split) in grouped order (GROUP_M m-blocks share n-blocks in L2).
Block sizes come from `int8_gemm_config(M, N, K, num_sms)` chosen by M on the host: small M
(decode) is weight-bandwidth bound and wants many programs (narrow N blocks, split-K); large M
(prefill) is compute bound and wants 128x128 tiles. With S > 1 splits of K each split writes its scaled
float32 partial (split 0 adds the bias) to an [S, M, N] workspace and counts itself in on a
per-tile counter; the last of a tile's splits to arrive sums the partials in split order (float32,
deterministic: the same bits whichever split is last), rounds once to out_dtype and stores the tile,
then sets the counter back to 0 (`serial_store`). No sum or cast kernel follows the GEMM (at M = 256
those were 2 kernels per split linear, 112 of a qwen-7b decode step's 490 and 0.52 ms of a 10.4 ms
step, run s6h5); the counters come from `torch.zeros` per launch, a fill kernel, so a split linear
still costs one kernel besides the GEMM (28 fills of 0.8 us in run s7c's decode step).
The epilogue's order of float32 operations is the one of
`int8_gemm_ref` and of `Int8W8A8Method` on CPU: (float(acc) * x_scale) * w_scale + bias, each
rounded to float32; the launch passes `enable_fp_fusion=False` so that the GPU compiler does not
contract the last multiply and the bias add into one FMA (one rounding fewer than the reference).
The launch has no host synchronisation (CUDA-graph safe). `benchmarks/gpu_quant.py --tune` prints
measured alternatives to the table.
"""

from __future__ import annotations

from typing import NamedTuple

import functools

import torch
import triton
import triton.language as tl
try:  # host-side TMA descriptors (Triton 3.3+); without them the pointer kernel runs every config
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

from deepserve.kernels.pdl import pdl_launch, pdl_wait
from deepserve.kernels.sizes import bucket, cdiv


class GemmConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    split_k: int = 1
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False  # int8 only: operands through TMA descriptors (sm_90 / sm_100; `_int8_gemm_tma_kernel`)
    persistent: bool = False  # with tma: at most one program per SM walking the tiles; no split-K


# max M -> config (split_k here is the most splits allowed; `int8_gemm_config` picks <= it).
# Measured on an H200 (`benchmarks/gpu_quant.py --tune`: summed time of qwen-7b's four linears, CUDA-graph
# replays over cold weights). M <= 64: run s5e1, 0.109 ms. M <= 256, 2048 and above: run s6h3, where the
# TMA variant won at every M: 0.1575 ms at M = 256 (the best pointer config, 128 x 64 split-K 4, took
# 0.1685 in s6h2), 0.734 ms at M = 2048, 2.987 ms at M = 8192 (256 x 128 tiles; the best pointer config,
# 128 x 128, took 3.196 ms in s6h2; bf16 cuBLAS 5.22 ms there). The M <= 16 entry is a first estimate.
CONFIGS: dict[int, GemmConfig] = {
    16: GemmConfig(16, 64, 256, split_k=4, group_m=1, num_warps=4, num_stages=4),
    64: GemmConfig(64, 64, 128, split_k=2, group_m=8, num_warps=4, num_stages=4),
    256: GemmConfig(64, 128, 128, split_k=2, group_m=8, num_warps=4, num_stages=4, tma=True),
    2048: GemmConfig(128, 128, 128, split_k=1, group_m=8, num_warps=8, num_stages=3, tma=True),
    1 << 62: GemmConfig(256, 128, 128, split_k=1, group_m=8, num_warps=8, num_stages=4, tma=True),
}


# (N, K) -> {max M: GemmConfig} for linear shapes tuned apart, laid over CONFIGS (`int8_gemm_config`).
# qwen-7b's four linears at M <= 256 (its decode batches), run s7b (`gpu_quant.py --tune`, each linear's
# best of 68 configs, CUDA-graph replays over cold weights): 0.1388 ms summed against 0.1520 for
# CONFIGS[256] on all four, the split-K sum already inside the kernel. qkv and o want 64 x 64 tiles, down
# (K = 18944) keeps 64 x 128 split-K, gate_up (N = 37888) 128-row tiles. qkv and gate_up ran unsplit in
# the tune (144 and more tiles: `pick_split_k` gives 1 on 132 SMs), so their entries say split_k=1.
SHAPE_CONFIGS: dict[tuple[int, int], dict[int, GemmConfig]] = {
    (4608, 3584): {256: GemmConfig(64, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4, tma=True)},
    (37888, 3584): {256: GemmConfig(128, 64, 128, split_k=1, group_m=8, num_warps=8, num_stages=3, tma=True)},
    (3584, 3584): {256: GemmConfig(64, 64, 128, split_k=1, group_m=8, num_warps=4, num_stages=4, tma=True)},
}


def pick_split_k(cfg: GemmConfig, m: int, n: int, k: int, num_sms: int) -> int:
    """Enough programs to cover the SMs: split K only while the tiles are fewer than the SMs, and
    keep at least 4 K-steps per split (shared by the W8A16 kernel)."""
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    if cfg.split_k <= 1 or tiles >= num_sms:
        return 1
    most = max(1, k // (4 * cfg.block_k))
    return max(1, min(cfg.split_k, cdiv(num_sms, tiles), most))


def config_for(table: dict[int, GemmConfig], m: int, n: int, k: int, num_sms: int) -> GemmConfig:
    """The entry with the smallest max-M >= m, its split_k resolved for this shape."""
    cfg = bucket(table, m)
    return cfg._replace(split_k=pick_split_k(cfg, m, n, k, num_sms))


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a nominal 132 elsewhere: only block choice uses it)."""
    if device.type != "cuda":
        return 132
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.lru_cache(maxsize=4096)  # on every eager launch; all arguments are ints
def int8_gemm_config(m: int, n: int, k: int, sms: int) -> GemmConfig:
    """CONFIGS' entry for M, or the shape's own where SHAPE_CONFIGS has one for M's bucket. Cached: the
    tables are read once per (M, N, K, SMs), so edit them before the first launch."""
    return config_for({**CONFIGS, **SHAPE_CONFIGS.get((n, k), {})}, m, n, k, sms)


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Program id -> (m-block, n-block), GROUP_M m-blocks walking the n-blocks together."""
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_size = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (pid % per_group) % group_size, (pid % per_group) // group_size


@triton.jit
def _int8_gemm_kernel(a_ptr, b_ptr, c_ptr, ws_ptr, lock_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                      k_per_split, num_splits, stride_am, stride_bn, stride_cm, stride_ws, stride_wm,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr = False,
                      FP8: tl.constexpr = False, PDL: tl.constexpr = False):
    """c = (a @ b^T) * a_scale * b_scale (+ bias), program (tile, split) over one split's K range
    (`serial_store` finishes split tiles). FP8: a, b float8_e4m3fn, accumulated in float32 (`fp8_gemm`);
    else int8 into int32."""
    pdl_wait(PDL)  # first: wait for the previous kernel; no early trigger (kernels/pdl.py)
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
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32 if FP8 else tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = offs_k < k_end - k0
        a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0 if FP8 else 0)
        b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0 if FP8 else 0)
        # out_dtype must name the accumulator: Triton <= 3.6 defaults it to float32 and asserts
        # acc's dtype equals it (later releases infer it from acc)
        # FP8: max_num_imprecise_acc=0 keeps a float32 sum on sm_90 (Triton's default there lets the
        # tensor cores accumulate in reduced precision: a GPU test at M=256, K=3584 broke the bound);
        # Triton 3.6 then emits mma.sync rather than wgmma, so this kernel is a correct reference
        # point, not the fp8 method's path (torch._scaled_mm is)
        acc = tl.dot(a, b, acc, out_dtype=tl.float32 if FP8 else tl.int32, max_num_imprecise_acc=0 if FP8 else None)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    y = scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, split, HAS_BIAS)
    serial_store(y, c_ptr, ws_ptr, lock_ptr, tl.program_id(0), split, num_splits, offs_m, offs_n, M, N, stride_cm,
                 stride_ws, stride_wm, SPLIT)


@triton.jit
def scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, split, HAS_BIAS: tl.constexpr):
    """The epilogue's float32 values: float(acc) * a_scale[m] * b_scale[n] (+ bias[n] on split 0)."""
    m_mask, n_mask = offs_m < M, offs_n < N
    a_scale = tl.load(a_scale_ptr + offs_m, mask=m_mask, other=0.0)
    b_scale = tl.load(b_scale_ptr + offs_n, mask=n_mask, other=0.0)
    y = acc.to(tl.float32) * a_scale[:, None] * b_scale[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        y = y + tl.where(split == 0, bias, 0.0)[None, :]
    return y


@triton.jit
def serial_store(y, c_ptr, ws_ptr, lock_ptr, tile, split, num_splits, offs_m, offs_n, M, N, stride_cm, stride_ws,
                 stride_wm, SPLIT: tl.constexpr):
    """Store a tile's float32 values y [BLOCK_M, BLOCK_N] into c (c's dtype). SPLIT: y is split `split`'s
    partial of `num_splits`; it goes to ws[split], and the last split of the tile to arrive (lock[tile]
    counts arrivals) stores ws[0] + ws[1] + ... in split order, then resets lock[tile] to 0. Ordering: a
    barrier puts every thread's partial store before the counter's release (one thread's acq_rel atomic,
    gpu scope); a barrier after it puts the other threads' loads after that thread's acquire (Triton's
    lowering of a scalar atomic also broadcasts the result through shared memory behind a barrier); the
    acquire makes the other splits' partials visible, the loads (.cg) read them from L2."""
    m_mask, n_mask = offs_m < M, offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    rows = offs_m.to(tl.int64)[:, None]
    if not SPLIT:
        tl.store(c_ptr + rows * stride_cm + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)
    else:
        ws_ptrs = ws_ptr + rows * stride_wm + offs_n[None, :]
        plane = tl.cast(stride_ws, tl.int64)  # splits x M x N may pass 2^31
        tl.store(ws_ptrs + split * plane, y, mask=mask)
        tl.debug_barrier()
        arrived = tl.atomic_add(lock_ptr + tile, 1, sem="acq_rel", scope="gpu")
        tl.debug_barrier()
        if arrived == num_splits - 1:
            total = tl.load(ws_ptrs, mask=mask, other=0.0, cache_modifier=".cg")
            for s in range(1, num_splits):
                total += tl.load(ws_ptrs + s * plane, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(c_ptr + rows * stride_cm + offs_n[None, :], total.to(c_ptr.dtype.element_ty), mask=mask)
            tl.atomic_xchg(lock_ptr + tile, 0, sem="relaxed", scope="gpu")


@triton.jit
def _int8_gemm_tma_kernel(a_desc, b_desc, c_ptr, ws_ptr, lock_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, M, N, K,
                          k_per_split, num_splits, stride_cm, stride_ws, stride_wm, HAS_BIAS: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          GROUP_M: tl.constexpr, SPLIT: tl.constexpr = False, PERSISTENT: tl.constexpr = False,
                          PDL: tl.constexpr = False):
    """`_int8_gemm_kernel` (int8 only) with both operands loaded by TMA: a_desc over x_q [M, K] in
    [BLOCK_M, BLOCK_K] boxes, b_desc over w_q [N, K] in [BLOCK_N, BLOCK_K] boxes. The copy engine
    zero-fills boxes past M, N and K, so the loop has no masks (k_per_split is a multiple of BLOCK_K:
    only the last split's last box runs past K). PERSISTENT (one split): the grid is at most one
    program per SM, each walking the tiles pid, pid + programs, ... (`GemmConfig.persistent`)."""
    pdl_wait(PDL)  # first: wait for the previous kernel; no early trigger (kernels/pdl.py)
    if PERSISTENT:
        num_tiles = tl.cdiv(M, BLOCK_M) * tl.cdiv(N, BLOCK_N)
        for tile in range(tl.program_id(0), num_tiles, tl.num_programs(0)):
            _tma_tile(a_desc, b_desc, c_ptr, ws_ptr, lock_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, tile, 0, 1, M, N,
                      K, k_per_split, stride_cm, stride_ws, stride_wm, HAS_BIAS, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M,
                      False)
    else:
        _tma_tile(a_desc, b_desc, c_ptr, ws_ptr, lock_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, tl.program_id(0),
                  tl.program_id(1), num_splits, M, N, K, k_per_split, stride_cm, stride_ws, stride_wm, HAS_BIAS,
                  BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, SPLIT)


@triton.jit
def _tma_tile(a_desc, b_desc, c_ptr, ws_ptr, lock_ptr, a_scale_ptr, b_scale_ptr, bias_ptr, tile, split, num_splits,
              M, N, K, k_per_split, stride_cm, stride_ws, stride_wm, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SPLIT: tl.constexpr):
    """One output tile [BLOCK_M, BLOCK_N] (grouped order) over one split's K range, scaled and stored."""
    pid_m, pid_n = grouped_tile(tile, M, N, BLOCK_M, BLOCK_N, GROUP_M)
    k_start = split * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    off_m, off_n = pid_m * BLOCK_M, pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for k0 in range(k_start, k_end, BLOCK_K):
        a = a_desc.load([off_m, k0])  # [BM, BK] int8
        b = b_desc.load([off_n, k0])  # [BN, BK] int8
        acc = tl.dot(a, b.T, acc, out_dtype=tl.int32)
    offs_m = off_m + tl.arange(0, BLOCK_M)
    offs_n = off_n + tl.arange(0, BLOCK_N)
    y = scaled(acc, a_scale_ptr, b_scale_ptr, bias_ptr, offs_m, offs_n, M, N, split, HAS_BIAS)
    serial_store(y, c_ptr, ws_ptr, lock_ptr, tile, split, num_splits, offs_m, offs_n, M, N, stride_cm, stride_ws,
                 stride_wm, SPLIT)


def check_operands(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                   x_dtypes: tuple[torch.dtype, ...], what: str, w_dtype: torch.dtype = torch.int8) -> None:
    """Shared by the 8-bit GEMMs: x [M, K], w [N, K] w_dtype (unit stride in K), w_scale [N] f32, bias [N]."""
    if x.dim() != 2 or x.dtype not in x_dtypes or x.stride(1) != 1:
        raise ValueError(f"{what}: x must be [M, K] {x_dtypes} with unit stride in K, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if w.dim() != 2 or w.dtype != w_dtype or w.stride(1) != 1 or w.shape[1] != x.shape[1]:
        raise ValueError(f"{what}: weight must be [N, K={x.shape[1]}] {w_dtype} with unit stride in K, got "
                         f"{tuple(w.shape)} {w.dtype} strides {w.stride()}")
    n = w.shape[0]
    if w_scale.shape != (n,) or w_scale.dtype != torch.float32:
        raise ValueError(f"{what}: weight scale must be [{n}] float32, got {tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point()):
        raise ValueError(f"{what}: bias must be [{n}] float, got {tuple(bias.shape)} {bias.dtype}")
    if len({t.device for t in (x, w, w_scale, bias) if t is not None}) != 1:
        raise ValueError(f"{what}: all tensors must be on one device")


def int8_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16,
              config: GemmConfig | None = None) -> torch.Tensor:
    """x_q [M, K] int8 (unit stride in K), x_scale [M] f32, w_q [N, K] int8 (unit stride in K),
    w_scale [N] f32, bias [N] float or None -> [M, N] out_dtype. `config` overrides the table."""
    check_operands(x_q, w_q, w_scale, bias, (torch.int8,), "int8_gemm")
    return scaled_gemm(x_q, x_scale, w_q, w_scale, bias, out_dtype, config, fp8=False, what="int8_gemm")


def check_x_scale(x_q: torch.Tensor, x_scale: torch.Tensor, what: str) -> None:
    """x_scale must be [M] float32 on x_q's device (shared by the 8-bit GEMMs' launches)."""
    if x_scale.shape != (x_q.shape[0],) or x_scale.dtype != torch.float32 or x_scale.device != x_q.device:
        raise ValueError(f"{what}: x_scale must be [{x_q.shape[0]}] float32 on {x_q.device}, got "
                         f"{tuple(x_scale.shape)} {x_scale.dtype}")


def empty_gemm(m: int, n: int, bias: torch.Tensor | None, out_dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """[M, N] out_dtype of a GEMM with M, N or K = 0 (no launch): K = 0 makes every product 0, so the
    epilogue leaves the bias (or zeros)."""
    y = torch.zeros((m, n), dtype=torch.float32, device=device)
    return (y if bias is None else y + bias.float()).to(out_dtype)


def scaled_gemm(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype, config: GemmConfig | None, fp8: bool,
                what: str) -> torch.Tensor:
    """The launch shared by `int8_gemm` and `kernels/fp8_gemm.fp8_gemm` (operands already checked):
    the x_scale check, the table's config, split-K partials and their sum."""
    check_x_scale(x_q, x_scale, what)
    (m, k), n = x_q.shape, w_q.shape[0]
    if m == 0 or n == 0 or k == 0:
        return empty_gemm(m, n, bias, out_dtype, x_q.device)
    sms = num_sms(x_q.device)
    cfg = config or int8_gemm_config(m, n, k, sms)
    tma = cfg.tma and not fp8 and tma_ok(x_q, w_q)
    persistent = tma and cfg.persistent
    if persistent:
        cfg = cfg._replace(split_k=1)
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = cdiv(k, k_per_split)  # every split gets K columns (a config may ask more than K allows)
    c = torch.empty((m, n), dtype=out_dtype, device=x_q.device)
    tiles = cdiv(m, cfg.block_m) * cdiv(n, cfg.block_n)
    ws, locks = split_k_workspace(m, n, splits, tiles, c)
    grid = (min(tiles, sms), 1) if persistent else (tiles, splits)
    bias_arg = bias if bias is not None else w_scale
    blocks = dict(HAS_BIAS=bias is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
                  GROUP_M=cfg.group_m, SPLIT=splits > 1, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
                  enable_fp_fusion=False)  # no FMA in the epilogue: the reference rounds the product first
    strides = (c.stride(0), ws.stride(0), ws.stride(1))
    if tma:
        a_desc = TensorDescriptor.from_tensor(x_q, [cfg.block_m, cfg.block_k])
        b_desc = TensorDescriptor.from_tensor(w_q, [cfg.block_n, cfg.block_k])
        _int8_gemm_tma_kernel[grid](a_desc, b_desc, c, ws, locks, x_scale, w_scale, bias_arg, m, n, k, k_per_split,
                                    splits, *strides, **blocks, PERSISTENT=persistent, **pdl_launch(x_q.device))
    else:
        _int8_gemm_kernel[grid](x_q, w_q, c, ws, locks, x_scale, w_scale, bias_arg, m, n, k, k_per_split, splits,
                                x_q.stride(0), w_q.stride(0), *strides, FP8=fp8, **blocks, **pdl_launch(x_q.device))
    return c


def split_k_workspace(m: int, n: int, splits: int, tiles: int, c: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(ws [splits, M, N] float32, locks [tiles] int32 zeros) of a split-K launch; unsplit, c stands in for
    both (the kernel never touches them)."""
    if splits == 1:
        return c.view(1, *c.shape), c
    return (torch.empty((splits, m, n), dtype=torch.float32, device=c.device),
            torch.zeros(tiles, dtype=torch.int32, device=c.device))


def tma_ok(x_q: torch.Tensor, w_q: torch.Tensor) -> bool:
    """Whether both operands can go through TMA descriptors: a CUDA device of the sm_90 / sm_100 families
    (`_tma_device`), or the CPU interpreter (tests); 16-byte aligned bases and row strides (int8: K and
    the row strides multiples of 16). Otherwise the pointer kernel runs the same config."""
    if TensorDescriptor is None or (x_q.is_cuda and not _tma_device(x_q.device.index or 0)):
        return False
    return tma_rows_ok(x_q, w_q)


def tma_rows_ok(*tensors: torch.Tensor) -> bool:
    """TMA's rule for row-major operands: 16-byte aligned bases and row strides (int8: K and the row
    strides multiples of 16)."""
    return all(t.data_ptr() % 16 == 0 and t.stride(0) % 16 == 0 for t in tensors)


@functools.lru_cache(maxsize=None)
def _tma_device(index: int) -> bool:
    """NVIDIA compute capability 9.x or 10.x (H100/H200, B200: ~227 KB of shared memory per block, which
    the 256 x 128 x 128 tiles at 4 stages need, 196,640 B). Not sm_120 (consumer Blackwell: ~99 KB) and
    not ROCm. Asked once per device (it sits on every launch)."""
    return torch.version.hip is None and torch.cuda.get_device_capability(index)[0] in (9, 10)


def int8_gemm_ref(x_q: torch.Tensor, x_scale: torch.Tensor, w_q: torch.Tensor, w_scale: torch.Tensor,
                  bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Pure-PyTorch reference: exact integer products (float64 holds |acc| <= 127^2 K exactly), then
    the float32 epilogue in the kernel's order, one rounding to out_dtype."""
    acc = (x_q.double() @ w_q.double().t()).float()  # [M, N], exact, rounded to float32 once
    y = acc * x_scale.float()[:, None] * w_scale.float()[None, :]
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype)
