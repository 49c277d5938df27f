"""Per-head GEMV for absorbed MLA at decode: a few rows of each head times that head's own matrix.

    head_gemv(x [T, h, K] bf16/f16/f32 (any strides), w [h, K, N] x's dtype (unit stride in K or in N),
              out [T, h, N] x's dtype (any strides) | None) -> y [T, h, N] (new: contiguous), T <= HEAD_GEMV_MAX_T
    y[t, h, n] = round(sum_k f32(x[t, h, k]) * f32(w[h, k, n]))        float32 sums, one rounding

The absorbed MLA decode (layers/mla.py) multiplies each head by its slice of kv_b_proj.weight
[h * (Dn + Dv), R] (row-major), in the two layouts this kernel takes:
  * q_nope [T, h, Dn] @ W_UK -> q_latent [T, h, R]: w = W_UK [h, K=Dn, N=R], unit stride in N;
  * o_lat [T, h, R] @ W_UV^T -> [T, h, Dv]: w = W_UV.transpose(1, 2) [h, K=R, N=Dv], unit stride in K.
At batch-1 decode each is ~2 MB of bf16 weights (V2-Lite: h=16, Dn=Dv=128, R=512; V3: h=128, 16 MB),
which cuBLAS's batched GEMM takes 3.1-3.5 us to stream on an H200 (~600 GB/s: latency, not bandwidth).

Grid (N blocks, heads). A program owns BLOCK_N output columns of one head for all T rows (BLOCK_T =
next_power_of_2(T) rows, clamped to T - 1: padding rows re-read the last row and are not stored). It
loads its [BLOCK_K, BLOCK_N] weight tiles as [1, BK, BN] with 16-byte vectors along whichever of K or N
is the unit-stride one (K_CONTIG picks the pointer form, so the unit stride is a literal, not a runtime
value the compiler must discover), multiplies them by the x chunk [BT, BK, 1] in float32 and sums over
K into a [BT, BN] float32 accumulator: each weight tile is read once for every row. K and N are
constexprs (head dims: one compile per model), so the chunk loop is unrolled (at most _MAX_CHUNKS) and
all of a program's loads can be in flight at once: one memory round trip per program.

Block sizes (`head_gemv_config`, from the shapes alone, so a captured CUDA graph always replays the same
launch): tiles of _TILE_BYTES = 8 KB (512 16-byte vectors, 4 per thread at 4 warps).
  * unit stride in N (W_UK): BLOCK_N = 64 bytes of a row (32 bf16 columns, 4 lanes of 16 B), BLOCK_K =
    the rest of the tile (128 rows): V2-Lite 16 N-blocks x 16 heads = 256 programs, about 2 per SM of
    an H200's 132, V3 2048;
  * unit stride in K (W_UV): BLOCK_K = all of K up to the tile (512 columns, 1 KB rows), BLOCK_N = the
    rest (8 rows): again 256 / 2048 programs.
All programs of V2-Lite's grid are resident at once (2 MB / 132 SMs = 16 KB in flight per SM), so the
kernel should take about one memory round trip after its launch. First choices: its GPU tests pass on an
H200 (run s5final). V2-Lite W-b1 with PDL off: 2.238 ms/token before it (s5e2), 2.237 with it (s5final),
so alone it saved nothing measurable; with PDL on, 2.062 (its launches, unlike the bmm's, take part in
PDL; that this is where the gain comes from is a guess). Not timed alone: benchmarks/kernels_head_gemv.py
times it against the torch path (--sweep: alternatives). Compiled for
sm_90 with Triton 3.9 (no GPU here; the GPU machines run 3.6): every thread issues its four 16-byte weight
loads (ld.global.v4) before any arithmetic, 32-46 registers at T <= 2, 64-72 at T = 4, no spills.

HEAD_GEMV_MAX_T = 4 rows: the float32 products of one chunk (BLOCK_T x 32 per thread) and the per-row
cross-warp reductions grow with T while the weight bytes do not; at 4 rows a program still does ~128
FMAs per thread against a ~1 us memory round trip, in router_gemv's 4-row register budget. Larger decode
batches keep cuBLAS's batched GEMM, whose tensor cores amortise its fixed cost over the rows. Unmeasured:
benchmarks/kernels_head_gemv.py times T = 1, 2, 4 (lower the bound if T = 4 loses).

No host synchronisation; the output (unless given) is the only allocation: CUDA-graph safe.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2

HEAD_GEMV_MAX_T = 4  # most rows of x (the module docstring says why)
_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_TILE_BYTES = 8192  # weight bytes per chunk of a program
_ROW_BYTES = 64  # contiguous bytes per tile row when N is the unit-stride dim
_MAX_CHUNKS = 16  # unrolled K chunks per program


class HeadGemvConfig(NamedTuple):
    block_n: int  # output columns per program
    block_k: int  # K per chunk
    num_warps: int = 4


@triton.jit
def _head_gemv_kernel(x_ptr, w_ptr, y_ptr, T, stride_xt, stride_xh, stride_xk, stride_wh, stride_w,
                      stride_yt, stride_yh, stride_yn, K: tl.constexpr, N: tl.constexpr, K_CONTIG: tl.constexpr,
                      ALIGNED: tl.constexpr, EVEN: tl.constexpr, VEC: tl.constexpr, BLOCK_T: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr = False):
    """y[t, head, n-block] = x[t, head, :] @ w[head, :, n-block] for the BLOCK_T rows; stride_w is w's
    non-unit stride within a head (of N when K_CONTIG, else of K); EVEN: the blocks divide K and N (no
    masked weight load)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    head = tl.program_id(1).to(tl.int64)
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    offs_k = tl.arange(0, BLOCK_K)  # [BK]
    offs_t = tl.arange(0, BLOCK_T)  # [BT]
    w_head = head * stride_wh
    if K_CONTIG:  # w[head] is K-contiguous: vectors along K, rows of N strided
        k_offs = offs_k
        n_offs = offs_n.to(tl.int64) * stride_w
        if ALIGNED:
            n_offs = tl.multiple_of(n_offs, VEC)
    else:  # N-contiguous: vectors along N, rows of K strided
        k_offs = offs_k.to(tl.int64) * stride_w
        n_offs = offs_n
        if ALIGNED:
            k_offs = tl.multiple_of(k_offs, VEC)
    w_tile = w_ptr + w_head + k_offs[None, :, None] + n_offs[None, None, :]  # [1, BK, BN] at k = 0
    rows = tl.minimum(offs_t, T - 1).to(tl.int64) * stride_xt + head * stride_xh  # [BT]
    x_rows = x_ptr + rows[:, None, None] + offs_k[None, :, None] * stride_xk  # [BT, BK, 1] at k = 0
    n_ok = (offs_n < N)[None, None, :]  # [1, 1, BN]
    acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
    for c in tl.static_range((K + BLOCK_K - 1) // BLOCK_K):
        k_ok = (offs_k < K - c * BLOCK_K)[None, :, None]  # [1, BK, 1]
        x = tl.load(x_rows + c * BLOCK_K * stride_xk, mask=k_ok, other=0.0)
        if K_CONTIG:
            w_chunk = w_tile + c * BLOCK_K
        else:
            w_chunk = w_tile + c * BLOCK_K * stride_w
        if EVEN:
            w = tl.load(w_chunk)
        else:
            w = tl.load(w_chunk, mask=k_ok & n_ok, other=0.0)
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32), axis=1)  # [BT, BK, BN] -> [BT, BN]
    y = y_ptr + offs_t.to(tl.int64)[:, None] * stride_yt + head * stride_yh + offs_n[None, :] * stride_yn
    tl.store(y, acc.to(y_ptr.dtype.element_ty), mask=(offs_t < T)[:, None] & (offs_n < N)[None, :])


def head_gemv_config(k: int, n: int, k_contig: bool, dtype: torch.dtype) -> HeadGemvConfig:
    """Block sizes for x [T, h, K] @ w [h, K, N], the same for every T (the module docstring says why)."""
    tile = _TILE_BYTES // dtype.itemsize  # elements
    k2, n2 = next_power_of_2(max(k, 1)), next_power_of_2(max(n, 1))
    if k_contig:
        block_k = min(k2, tile)
        block_n = min(n2, max(1, tile // block_k))
    else:
        block_n = min(n2, max(_ROW_BYTES // dtype.itemsize, tile // k2))
        block_k = min(k2, max(1, tile // block_n))
    block_k = max(block_k, next_power_of_2(cdiv(k, _MAX_CHUNKS)))
    return HeadGemvConfig(block_n, block_k)


def head_gemv_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """Whether `head_gemv` takes x @ w, the device aside: 1..HEAD_GEMV_MAX_T rows, x [T, h, K] and
    w [h, K, N] of one float dtype, w with unit stride in K or in N."""
    if x.dim() != 3 or w.dim() != 3 or x.dtype not in _DTYPES or w.dtype != x.dtype:
        return False
    if x.shape[1:] != w.shape[:2] or not 1 <= x.shape[0] <= HEAD_GEMV_MAX_T:
        return False
    return w.stride(1) == 1 or w.stride(2) == 1


def _check(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None) -> None:
    if x.dim() != 3 or w.dim() != 3 or x.shape[1:] != w.shape[:2]:
        raise ValueError(f"head_gemv: x must be [T, h, K] and w [h, K, N]; got {tuple(x.shape)} and {tuple(w.shape)}")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"head_gemv: x and w must share one dtype of {_DTYPES}; got {x.dtype} and {w.dtype}")
    if w.stride(1) != 1 and w.stride(2) != 1:
        raise ValueError(f"head_gemv: w must have unit stride in K or N; got strides {w.stride()}")
    if x.shape[0] > HEAD_GEMV_MAX_T:
        raise ValueError(f"head_gemv: at most {HEAD_GEMV_MAX_T} rows, got {x.shape[0]}")
    shape = (x.shape[0], x.shape[1], w.shape[2])
    if out is not None and (tuple(out.shape) != shape or out.dtype != x.dtype):
        raise ValueError(f"head_gemv: out must be {list(shape)} {x.dtype}; got {tuple(out.shape)} {out.dtype}")
    if len({t.device for t in (x, w, out) if t is not None}) != 1:
        raise ValueError("head_gemv: x, w and out must be on one device")


def _check_config(cfg: HeadGemvConfig) -> None:
    if any(s < 1 or s & (s - 1) for s in cfg):
        raise ValueError(f"head_gemv: block sizes and num_warps must be powers of two; got {cfg}")


def _aligned(w: torch.Tensor, k_contig: bool, vec: int) -> bool:
    """Every tile row of w starts 16-byte aligned (the hints allow full-width vector loads)."""
    row_stride = w.stride(2) if k_contig else w.stride(1)
    return w.data_ptr() % 16 == 0 and row_stride % vec == 0 and (w.shape[0] == 1 or w.stride(0) % vec == 0)


def head_gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
              config: HeadGemvConfig | None = None) -> torch.Tensor:
    """x [T, h, K] bf16/f16/f32 (any strides), w [h, K, N] x's dtype with unit stride in K or in N
    -> out [T, h, N] x's dtype (given: any strides; else new and contiguous), 1 <= T <= HEAD_GEMV_MAX_T
    (T = 0 returns the empty output). One launch, float32 sums, one rounding. `config` overrides
    `head_gemv_config` (benchmarks, tests)."""
    _check(x, w, out)
    (t, heads, k), n = x.shape, w.shape[2]
    if out is None:
        out = torch.empty((t, heads, n), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    if k == 0:
        return out.zero_()
    k_contig = w.stride(1) == 1 and not (w.stride(2) == 1 and k == 1)  # a one-row K is N-contiguous
    cfg = config or head_gemv_config(k, n, k_contig, w.dtype)
    _check_config(cfg)
    vec = 16 // w.dtype.itemsize
    _head_gemv_kernel[(cdiv(n, cfg.block_n), heads)](
        x, w, out, t, x.stride(0), x.stride(1), x.stride(2), w.stride(0), w.stride(2) if k_contig else w.stride(1),
        out.stride(0), out.stride(1), out.stride(2), K=k, N=n, K_CONTIG=k_contig, ALIGNED=_aligned(w, k_contig, vec),
        EVEN=k % cfg.block_k == 0 and n % cfg.block_n == 0, VEC=vec, BLOCK_T=next_power_of_2(t),
        BLOCK_K=cfg.block_k, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, **pdl_launch(x.device))
    return out


def head_gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: the float32 batched product of the float32 casts, one rounding to x.dtype.
    x [T, h, K], w [h, K, N] -> [T, h, N] contiguous."""
    return torch.einsum("thk,hkn->thn", x.float(), w.float()).to(x.dtype)
