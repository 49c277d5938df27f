"""GEMV for decode: a few activation rows times a dense weight, bound by the weight's bytes.

    gemv(x [M, K] bf16/f16/f32 (unit stride in K, rows may be strided), w [N, K] x's dtype contiguous,
         bias [N] float | None) -> y [M, N] x.dtype,   1 <= M <= GEMV_MAX_M
    y[m, n] = round(sum_k f32(x[m, k]) * f32(w[n, k]) + f32(bias[n]))     float32 sums, one rounding
    gemv(x, w [2I, K] = [gate | up], bias, gated=True) -> h [M, I] = silu_and_mul(y), bit for bit
    gemv(x, w [N, K] int8 or float8_e4m3fn, bias, w_scale=[N] f32) -> y * w_scale before the bias (W8A16)
    Without a config, int8 w with bf16 / f16 rows (K % 16 == 0) on an NVIDIA GPU goes to kernels/gemv_dp4a.py
    (dp4a on the rows' int16 form, which rounds elements below 2^-7 of their 16-column group's largest: its
    docstring); this module's kernel (x exact in float32) takes the rest (float32 rows, e4m3 w, other K, the
    interpreter, ROCm) and any call with a GemvConfig.

At batch-1 decode every linear layer is a GEMV whose time is the time to stream its weight once;
cuBLAS reaches ~78% of an H200's HBM bandwidth on the big qwen-7b ones and much less on small ones.

Kernel: program (n-block, k-split) owns BLOCK_N rows of w and all M rows of x (BLOCK_M =
next_power_of_2(M)). It walks its K range in BLOCK_K chunks; a chunk is one [BLOCK_N, BLOCK_K] weight
tile (16-byte loads along K; rows clamped to N-1, so no load in the loop is masked) times the
[BLOCK_M, BLOCK_K] x chunk, in float32. Each thread holds VEC = 16 / itemsize consecutive columns per
row it loads; their products are summed in registers (`_chunk_sums`, no data leaves the thread) and
added to a float32 [BLOCK_M, BLOCK_N, BLOCK_K / VEC] accumulator. The cross-thread reduction over K
runs once, after the loop. Keeping VEC columns per accumulator instead of one cuts the accumulator
VEC-fold (8x for bf16), so a thread can keep more weight bytes in flight for the same registers. Chunk 0
is peeled off the loop and loaded masked (all columns when K's range holds a whole chunk; a shorter range
is chunk 0 alone); a K range that is not a multiple of BLOCK_K ends with one masked chunk. SPLIT_K = 1: the program adds
the bias and stores x.dtype. SPLIT_K > 1: each split stores its float32 partial (split 0 with the
bias) into [S, M, N], and a second launch sums the splits in order (deterministic, no atomics) and
rounds once; the table prefers wider chunks to splits (no second launch), `--sweep` times both.

Bandwidth comes from bytes in flight. Triton 3.6 does not software-pipeline these loads (loads that
feed no tl.dot: the sm_90 code is the same for every num_stages, so the config has no num_stages), so a
program has one tile in flight at a time; the grid streams about N * BLOCK_K * SPLIT_K * itemsize
bytes per memory round trip while it is no larger than what the SMs hold at once, and resident
programs x tile bytes beyond that. With BLOCK_K = VEC * 32 * num_warps (1024 for bf16 at 4 warps)
the x chunk's layout equals the weight tile's (no layout conversion in the loop, checked in the
Triton 3.6 sm_90 IR); other BLOCK_K values pay one small shared-memory exchange of x per chunk.
Double-buffering the loop by hand (chunk k+1's loads issued before chunk k's sums, carried in
registers) lost: int8 weights ran at about half speed (run s9d), bf16 within noise.

PDL (kernels/pdl.py): with `static_weight=True` (the linear methods: a layer's weight) a program
requests its first weight chunk BEFORE the wait for the previous kernel, so with programmatic dependent
launch the resident programs stream weights while the kernel before them (a norm, the attention)
finishes. Everything else (x, scale, bias, the output, the split partials) is touched after the wait.
The only kernel that can still be running then is the one launched just before (it lets this one launch
after its own wait, so every earlier kernel has completed): that kernel must not write w. Weights are
written at load time; a caller that builds w just before the call keeps the default (False). Run s9h
(H200, same run, W-b1 qwen-7b W8A16, two pairs): 2.5012 / 2.4981 ms per token with the prefetch, 2.5163 /
2.5162 without. Kernel level (runs s9b / s9c, two runs, not one A/B): int8 qkv 7.35 -> 6.14 us and o
6.19 -> 5.59 us at the same configs.

int8 weights (W8A16, `w_scale` given; bf16 / f16 rows on NVIDIA GPUs go to kernels/gemv_dp4a.py, which was
1.09-1.13x faster at M = 1 on qwen-7b's shapes in run s17e): a weight is converted to float32 exactly without I2F, a
low-throughput conversion (the CUDA guide's table: 16 per clock per SM on compute capability 9.0, against
128 float32 FMAs) that bounded this kernel (`kernels/int8_convert.py`). Run s9b (H200, same run,
table configs, cold weights): a qwen-7b decode step's four linears 2.262 ms with I2F, 2.201 ms with the
integer-add form, 2.084 ms with the PTX form. gate_up went from 3.19 to 3.82 TB/s at the best configs.
e4m3 weights (the fp8 method's decode rows, quant/fp8.py): Triton's own conversion to float32 (exact), the
1-byte table (INT8_TABLE) as for int8, its register limits included (Triton 3.6 sm_90 code: no spill at them).
W-b1 qwen-7b (run s16e, H200): 2.3601 ms per token with e4m3 weights, 2.4425 with int8 (this kernel then).

Gated (`gated=True`, the dense MLP's gate_up at decode: `LinearMethod.apply_gated`): program j owns output
columns jH..jH+H-1 (H = BLOCK_N / 2), i.e. gate rows jH.. and up rows I+jH.. of the weight, so its
epilogue holds both halves of each column: it rounds them to x's dtype (gemv's output), then applies
`silu_and_mul`'s `silu_mul` and stores h [M, I]. The [M, 2I] product never goes to memory and the
SiLU-and-mul launch is gone; one K split only (the epilogue needs whole sums). Timed only together with the
decode attention's changes of the same session (run s10g, H200, W-b1 qwen-7b against be6adbd in one call):
bf16 3.658 vs 3.755 ms per token, W8A16 2.500 / 2.502 vs 2.515 / 2.516.

The table (`gemv_config`, keyed by N and K ranges, chosen on the host from the shapes alone, so a
captured CUDA graph always replays the same launch) holds the configs `benchmarks/kernels_gemv.py
--sweep` found fastest on an H200 at M = 1. No host synchronisation, no allocation but
the output (and the split partials): CUDA-graph safe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_convert import int8_to_f32, nvidia_ptx
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.silu_and_mul import silu_mul
from deepserve.kernels.sizes import cdiv, next_power_of_2

GEMV_MAX_M = 4  # the most rows of x the kernel takes (the accumulator grows with them)
SCALED_W_DTYPES = (torch.int8, torch.float8_e4m3fn)  # weights that come with a w_scale per row
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_ANY = 1 << 62
_ACC_ROWS = 32  # BLOCK_M * BLOCK_N cap: float32 accumulators per thread per BLOCK_K / (VEC * threads)


class GemvConfig(NamedTuple):
    block_n: int  # weight rows per program
    block_k: int  # columns per chunk (a multiple of VEC = 16 / itemsize)
    split_k: int = 1  # most K splits (fewer when K is short); > 1 adds a float32 sum launch
    num_warps: int = 4
    maxnreg: int | None = None  # registers a thread may take (NVIDIA: ptxas .maxnreg): fewer, more programs an SM


# (largest N, largest K, config at M = 1); the first entry covering the shape wins. Picked from the M = 1
# sweeps of run s9c (H200, `benchmarks/kernels_gemv.py --sweep [--weights int8]`, qwen-7b and V2-Lite decode
# shapes, CUDA-graph replays over cold weights, run_ids fdd7cbcad7a5 bf16 and 21104ced4144 int8) by
# `benchmarks/gemv_table.py`: per entry, the candidate whose fitted config (`fit_config`) has the least time
# summed over the entry's shapes x their calls per decode step, keeping >= 2 programs per SM. A step's
# linears, these tables against the previous ones in the same sweep: qwen-7b bf16 3.360 vs 3.490 ms (LM
# head included), V2-Lite 0.344 vs 0.361 ms.
TABLE: tuple[tuple[int, int, GemvConfig], ...] = (
    (4096, 4096, GemvConfig(4, 1024, 1, 4)),  # qwen-7b/o, v2-lite/q_kv_a, v2-lite/o
    (4096, _ANY, GemvConfig(2, 2048, 1, 8)),  # qwen-7b/down, v2-lite/dense_down
    (8192, _ANY, GemvConfig(4, 1024, 1, 4)),  # qwen-7b/qkv
    (_ANY, _ANY, GemvConfig(8, 2048, 1, 8)),  # qwen-7b/gate_up, qwen-7b/lm_head, v2-lite/dense_gate_up, v2-lite/lm_head
)
# int8 weights (W8A16; BLOCK_K in 2-byte columns, so the kernel's int8 chunk is twice it), same method and
# run: a step's linears (LM head in bf16, not here) qwen-7b 1.894 vs 2.072 ms, V2-Lite 0.206 vs 0.244 ms.
# Then the register limits (`maxnreg`, ptxas's .maxnreg; M = 1 only: `fit_config`), from run s16c (H200, a
# sweep of block_n x num_warps x maxnreg at qwen-7b's shapes, gate_up gated as decode runs it; records in
# kernels_gemv.jsonl): qkv's (8, 1024, 1, 4) took 128 registers a thread, so 4 programs an SM: its 576
# programs needed 1.09 waves of the 528 that fit; limited to 96 (no spill in Triton 3.6's sm_90 code) 5 fit,
# one wave: 8.07 -> 6.39 us. down 20.47 -> 19.88 us with a limit of 80 (ptxas then takes 72 registers, 64
# without the option: within 3%, maybe noise), gate_up 35.92 -> 35.18 us with 8 rows a program (95
# registers); o kept (5.31 us). The step's four linears: 1.954 -> 1.863 ms. In the engine (run s16d, W-b1
# qwen-7b W8A16, same call): 2.4204 ms per token against 2.4743 for the previous table (tree 06360d9). Only the
# table's own launches take a limit, and only with 2-byte x, ungated (`gemv`); `kernels_gemv.py --sweep --weights
# int8` times limited candidates, so `gemv_table.py` can pick them again.
INT8_TABLE: tuple[tuple[int, int, GemvConfig], ...] = (
    (4096, 4096, GemvConfig(4, 1024, 1, 4)),  # qwen-7b/o, v2-lite/q_kv_a, v2-lite/o
    (4096, _ANY, GemvConfig(4, 1024, 1, 4, 80)),  # qwen-7b/down, v2-lite/dense_down
    (8192, _ANY, GemvConfig(8, 1024, 1, 4, 96)),  # qwen-7b/qkv
    (_ANY, _ANY, GemvConfig(8, 256, 1, 1)),  # qwen-7b/gate_up, v2-lite/dense_gate_up
)


def gemv_config(m: int, n: int, k: int, dtype: torch.dtype) -> GemvConfig:
    """The table's entry for (N, K), fitted to the shape (`fit_config`)."""
    table = INT8_TABLE if dtype.itemsize == 1 else TABLE  # int8 or e4m3 weights
    return fit_config(next(c for max_n, max_k, c in table if n <= max_n and k <= max_k), m, k, dtype)


def fit_config(cfg: GemvConfig, m: int, k: int, dtype: torch.dtype) -> GemvConfig:
    """A table entry fitted to the shape: BLOCK_K no wider than K needs (num_warps scaled with it),
    BLOCK_N cut so that BLOCK_M * BLOCK_N <= 32 accumulators per column group, and the register limit only at
    the M = 1 and full BLOCK_K it was measured at (more rows of x or a narrower tile change the registers a
    thread needs; a limit below them spills)."""
    vec = _vec(dtype)
    # the tables' BLOCK_K counts 2-byte columns: a chunk keeps its bytes (what is in flight) for other
    # widths, so int8 weights take twice the columns at the same warps (VEC * 32 * num_warps, no layout
    # conversion).
    wide = cfg.block_k * 2 // dtype.itemsize
    block_k = max(min(wide, next_power_of_2(max(k, 1))), vec * 32)
    num_warps = max(1, cfg.num_warps * block_k // wide)
    block_n = max(1, min(cfg.block_n, _ACC_ROWS // _block_m(m)))
    maxnreg = cfg.maxnreg if _block_m(m) == 1 and block_k == wide else None
    return cfg._replace(block_n=block_n, block_k=block_k, num_warps=num_warps, maxnreg=maxnreg)


def _vec(dtype: torch.dtype) -> int:
    """Elements in one 16-byte load."""
    return 16 // dtype.itemsize


def _block_m(m: int) -> int:
    return next_power_of_2(max(m, 1))


@triton.jit
def _chunk_sums(x, w, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                PTX: tl.constexpr):
    """x [BM, 1, BK] * w [1, BN, BK] in float32, summed over each run of VEC columns -> [BM, BN, BK / VEC]."""
    if w.dtype == tl.int8:
        wf = int8_to_f32(w, PTX)
    else:
        wf = w.to(tl.float32)
    prod = x.to(tl.float32) * wf
    return tl.sum(tl.reshape(prod, (BLOCK_M, BLOCK_N, BLOCK_K // VEC, VEC)), axis=3)


@triton.jit
def _program_rows(block, N, BLOCK_N: tl.constexpr, GATED: tl.constexpr):
    """The weight rows of row block `block` [BLOCK_N] (clamped to N - 1: the last block re-reads a row, unstored)
    and which of them are real. GATED (w = [gate | up], N = 2I): the program's H = BLOCK_N / 2 output columns
    jH..jH+H-1, i.e. gate rows jH..jH+H-1, then the up rows I+jH..I+jH+H-1."""
    r = tl.arange(0, BLOCK_N)
    if GATED:
        inter = N // 2
        col = block * (BLOCK_N // 2) + r % (BLOCK_N // 2)
        return tl.minimum(col, inter - 1) + (r // (BLOCK_N // 2)) * inter, col < inter
    rows = block * BLOCK_N + r
    return tl.minimum(rows, N - 1), rows < N


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, k_per_split, stride_xm,
                 HAS_BIAS: tl.constexpr, ALIGNED: tl.constexpr, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, VEC: tl.constexpr,
                 scale_ptr=None, HAS_SCALE: tl.constexpr = False, PTX: tl.constexpr = False,
                 PREFETCH_W: tl.constexpr = False, GATED: tl.constexpr = False, PDL: tl.constexpr = False):
    """out[split, m, n] = sum over this split's K range of x[m, k] * w[n, k] (* scale[n] for int8 / e4m3 w)
    (+ bias on split 0). PREFETCH_W: the first weight chunk is loaded before the PDL wait (module docstring).
    GATED (one split): out [M, N / 2] = silu_and_mul of that output rounded to out's dtype (`_gated_store`)."""
    split = tl.program_id(1)
    rows, n_ok = _program_rows(tl.program_id(0), N, BLOCK_N, GATED)  # [BN]
    offs_m = tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    w_offs = rows.to(tl.int64) * K  # [BN]
    x_offs = tl.minimum(offs_m, M - 1).to(tl.int64) * stride_xm  # [BM]
    if ALIGNED:  # K and stride_xm are multiples of VEC: rows start 16-byte aligned (vector loads)
        w_offs = tl.multiple_of(w_offs, VEC)
        x_offs = tl.multiple_of(x_offs, VEC)
    k_start = split * k_per_split
    k_end = k_start + tl.minimum(k_per_split, K - k_start)
    w_rows = w_ptr + w_offs[None, :, None] + offs_k[None, None, :]  # [1, BN, BK] at k = 0
    x_rows = x_ptr + x_offs[:, None, None] + offs_k[None, None, :]  # [BM, 1, BK]
    # chunk 0 (full, or the whole range when it is shorter): its weights are requested before the wait
    first = tl.minimum(k_end - k_start, BLOCK_K)
    if ALIGNED:
        first = tl.multiple_of(first, VEC)
    first_ok = (offs_k < first)[None, None, :]
    if PREFETCH_W:  # a static weight: nothing on the stream writes it (module docstring)
        w = tl.load(w_rows + k_start, mask=first_ok, other=0.0)
    pdl_prologue(PDL)  # everything else only after the previous kernel (kernels/pdl.py)
    if not PREFETCH_W:
        w = tl.load(w_rows + k_start, mask=first_ok, other=0.0)
    x = tl.load(x_rows + k_start, mask=first_ok, other=0.0)
    acc = _chunk_sums(x, w, BLOCK_M, BLOCK_N, BLOCK_K, VEC, PTX)
    k_full = k_start + (k_end - k_start) // BLOCK_K * BLOCK_K  # whole chunks end here
    for k0 in range(k_start + BLOCK_K, k_full, BLOCK_K):
        x = tl.load(x_rows + k0)
        w = tl.load(w_rows + k0)
        acc += _chunk_sums(x, w, BLOCK_M, BLOCK_N, BLOCK_K, VEC, PTX)
    if k_full < k_end and k_full > k_start:  # a partial last chunk that is not chunk 0
        tail = k_end - k_full
        if ALIGNED:
            tail = tl.multiple_of(tail, VEC)
        k_ok = (offs_k < tail)[None, None, :]
        x = tl.load(x_rows + k_full, mask=k_ok, other=0.0)
        w = tl.load(w_rows + k_full, mask=k_ok, other=0.0)
        acc += _chunk_sums(x, w, BLOCK_M, BLOCK_N, BLOCK_K, VEC, PTX)
    y = tl.sum(acc, axis=2)  # [BM, BN] float32
    if HAS_SCALE:  # int8 weights (W8A16): one float32 scale per output row
        y = y * tl.load(scale_ptr + rows, mask=n_ok, other=0.0)[None, :]
    if HAS_BIAS:
        bias = tl.load(bias_ptr + rows, mask=n_ok, other=0.0).to(tl.float32)
        y += tl.where(split == 0, bias, 0.0)[None, :]
    if GATED:
        _gated_store(y.to(out_ptr.dtype.element_ty), out_ptr, tl.program_id(0), offs_m, M, N // 2, BLOCK_N // 2)
    else:
        out = out_ptr + (split * M + offs_m[:, None]).to(tl.int64) * N + rows[None, :]  # [BM, BN]
        tl.store(out, y.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & n_ok[None, :])


@triton.jit
def _gated_store(y, out_ptr, block, offs_m, M, inter, HALF: tl.constexpr):
    """y [BM, 2 HALF] in out's dtype: row block `block`'s gate columns, then its up columns (`_program_rows`).
    out[m, jH + i] = silu_and_mul's value for them (kernels/silu_and_mul.py `silu_mul`, same roundings)."""
    gate, up = tl.split(tl.permute(tl.reshape(y, (y.shape[0], 2, HALF)), (0, 2, 1)))  # [BM, H] each
    h = silu_mul(gate, up.to(tl.float32)).to(out_ptr.dtype.element_ty)
    cols = block * HALF + tl.arange(0, HALF)
    out = out_ptr + offs_m.to(tl.int64)[:, None] * inter + cols[None, :]
    tl.store(out, h, mask=(offs_m < M)[:, None] & (cols < inter)[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLITS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """out[i] = round(sum_s part[s, i]), the splits added in order (deterministic), one rounding."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    total = tl.load(part_ptr + offs, mask=ok, other=0.0)
    for s in tl.static_range(1, SPLITS):
        total += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, total.to(out_ptr.dtype.element_ty), mask=ok)


def _sum_splits(part: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[S, M, N] float32 -> [M, N] dtype in one launch (torch's sum + cast would be two)."""
    splits, m, n = part.shape
    out = torch.empty((m, n), dtype=dtype, device=part.device)
    block = min(1024, next_power_of_2(m * n))
    _sum_splits_kernel[(cdiv(m * n, block),)](part, out, m * n, SPLITS=splits, BLOCK=block, num_warps=4,
                                                     **pdl_launch(part.device))
    return out


def _check(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None, w_scale: torch.Tensor | None = None) -> None:
    if x.dim() != 2 or x.dtype not in _DTYPES or (x.shape[1] > 1 and x.stride(1) != 1):
        raise ValueError(f"gemv: x must be [M, K] of {_DTYPES} with unit stride in K, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    if x.shape[0] > GEMV_MAX_M:
        raise ValueError(f"gemv: at most {GEMV_MAX_M} rows, got {x.shape[0]}")
    w_dtypes = SCALED_W_DTYPES if w_scale is not None else (x.dtype,)
    if w.dim() != 2 or w.dtype not in w_dtypes or not w.is_contiguous() or w.shape[1] != x.shape[1]:
        raise ValueError(f"gemv: w must be [N, K={x.shape[1]}] of {w_dtypes} contiguous, got "
                         f"{tuple(w.shape)} {w.dtype} strides {w.stride()}")
    check_scale_bias("gemv", x, w, w_scale, bias)


def check_scale_bias(fn: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None,
                     bias: torch.Tensor | None) -> None:
    """w_scale (if any) [N] float32 and bias (if any) [N] float, unit stride, all on x's device; N = w.shape[0].
    ValueError naming `fn` otherwise (the GEMVs' shared argument check)."""
    n = w.shape[0]
    if w_scale is not None and (w_scale.shape != (n,) or w_scale.dtype != torch.float32 or w_scale.stride(0) != 1):
        raise ValueError(f"{fn}: w_scale must be [{n}] float32 with unit stride, got "
                         f"{tuple(w_scale.shape)} {w_scale.dtype}")
    if bias is not None and (bias.shape != (n,) or not bias.is_floating_point() or bias.stride(0) != 1):
        raise ValueError(f"{fn}: bias must be [{n}] float with unit stride, got {tuple(bias.shape)} {bias.dtype}")
    if len({t.device for t in (x, w, bias, w_scale) if t is not None}) != 1:
        raise ValueError(f"{fn}: x, w, bias and w_scale must be on one device")


def _check_config(cfg: GemvConfig, vec: int) -> None:
    sizes = (cfg.block_n, cfg.block_k, cfg.num_warps)
    if any(s < 1 or s & (s - 1) for s in sizes) or cfg.block_k % vec or cfg.split_k < 1 or not (
            cfg.maxnreg is None or 24 <= cfg.maxnreg <= 255):
        raise ValueError(f"gemv: block sizes and num_warps must be powers of two, block_k a multiple of "
                         f"{vec}, split_k >= 1, maxnreg None or 24..255; got {cfg}")


def gemv(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None, w_scale: torch.Tensor | None = None,
         static_weight: bool = False, gated: bool = False) -> torch.Tensor:
    """x [M, K] bf16/f16/f32 (unit stride in K), w [N, K] x.dtype contiguous, bias [N] float or None
    -> [M, N] x.dtype. With w_scale [N] float32, w is int8 (symmetric W8A16) or float8_e4m3fn (the fp8 method's
    decode rows): y = (x @ w^T) * w_scale (+ bias), the weight values exact in float32, the scale applied to
    the float32 sum; int8 w with bf16 / f16 rows on an NVIDIA GPU and no config: kernels/gemv_dp4a.py's y (x in
    its int16 form). `config`
    overrides the table (benchmarks, tests). static_weight=True promises that the kernel launched just
    before this one on the stream does not write w (a layer's weight: written at load time), so under
    PDL its first chunk is read before the wait; a w computed by the previous kernel needs False.
    gated=True (w a merged [gate | up] weight, N = 2I even) -> [M, I]: silu_and_mul (kernels/silu_and_mul.py)
    of that output, bit for bit, in the same launch (one K split; the gate_up output is never stored)."""
    _check(x, w, bias, w_scale)
    if config is None and _dp4a_applies(x, w, w_scale):  # int8 weights, 2-byte x, NVIDIA: kernels/gemv_dp4a.py
        from deepserve.kernels.gemv_dp4a import run_dp4a

        return run_dp4a(x, w, w_scale, bias, None, static_weight, gated)  # checked above (no second check)
    (m, k), n = x.shape, w.shape[0]
    if gated and n % 2:
        raise ValueError(f"gemv: a gated weight [gate | up] has an even number of rows, got {n}")
    if m == 0 or n == 0 or k == 0:
        out = torch.zeros((m, n), dtype=torch.float32, device=x.device)
        out = (out if bias is None else out + bias.float()).to(x.dtype)
        return _silu_and_mul_rows(out) if gated else out
    vec = _vec(w.dtype)  # 16-byte loads of the weight (16 int8, 8 bf16 columns)
    cfg = config or gemv_config(m, n, k, w.dtype)
    if config is None and (x.element_size() != 2 or gated):  # the table's register limits hold where measured:
        cfg = cfg._replace(maxnreg=None)  # 2-byte x, ungated (float32 x needs more registers a thread)
    _check_config(cfg, vec)
    if gated:  # the gate and up rows of a column in one program, one split (the epilogue needs the whole sum)
        if cfg.split_k > 1:
            raise ValueError(f"gemv: gated=True runs one K split (its epilogue needs whole sums), got {cfg}; "
                             f"run gemv and silu_and_mul instead (`gated_applies`)")
        cfg = cfg._replace(block_n=max(2, cfg.block_n))
    k_per_split = cdiv(cdiv(k, cfg.split_k), cfg.block_k) * cfg.block_k
    splits = cdiv(k, k_per_split)
    shape = (m, n // 2) if gated else (splits, m, n)
    out = torch.empty(shape, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)
    aligned = k % vec == 0 and (m == 1 or x.stride(0) % vec == 0)
    ptx = nvidia_ptx(x.device)
    _gemv_kernel[(cdiv(n, cfg.block_n), splits)](
        x, w, bias if bias is not None else w, out, m, n, k, k_per_split, x.stride(0),
        HAS_BIAS=bias is not None, ALIGNED=aligned, BLOCK_M=_block_m(m), BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, VEC=vec, scale_ptr=w_scale, HAS_SCALE=w_scale is not None,
        PTX=w_scale is not None and ptx, PREFETCH_W=static_weight, GATED=gated,
        num_warps=cfg.num_warps, **({"maxnreg": cfg.maxnreg} if ptx and cfg.maxnreg else {}), **pdl_launch(x.device))
    if gated:
        return out
    return out[0] if splits == 1 else _sum_splits(out, x.dtype)


def _dp4a_applies(x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor | None) -> bool:
    from deepserve.kernels.gemv_dp4a import dp4a_applies

    return dp4a_applies(x, w, w_scale)


def gated_applies(m: int, n: int, k: int, dtype: torch.dtype) -> bool:
    """Whether `gemv(..., gated=True)` runs the table's config for this shape: N even and no K split (a split
    config would change the sums' order, so gated would no longer equal gemv then silu_and_mul)."""
    return n % 2 == 0 and gemv_config(m, n, k, dtype).split_k == 1


def _silu_and_mul_rows(y: torch.Tensor) -> torch.Tensor:
    """y [M, 2I] -> silu(gate) * up [M, I] in eager torch (empty shapes only: no launch for nothing)."""
    gate, up = y.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()).to(y.dtype).float() * up.float()).to(y.dtype)


def gemv_ref(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None,
             w_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Pure-PyTorch reference: the float32 matmul of the float32 casts (* w_scale for int8 / e4m3 w) (+ float32
    bias), one rounding to x.dtype. [M, K], [N, K], [N] -> [M, N]."""
    y = x.float() @ w.float().t()
    if w_scale is not None:
        y = y * w_scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
