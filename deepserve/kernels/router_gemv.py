"""MoE router logits for a few tokens: a GEMV-shaped GEMM with a float32 output.

    router_logits(x [T, H] bf16/f16/f32 (rows may be strided, unit stride in H),
                  w [E, H] same dtype (rows may be strided, unit stride in H)) -> logits [T, E] f32

    logits[t, e] = sum_h f32(x[t, h]) * f32(w[e, h])         float32 accumulation

What `torch.mm(x, w.t(), out_dtype=torch.float32)` computes for the router (`layers/moe.py`
TopKRouter.logits), for the decode sizes where cuBLAS is far from the bytes it reads: at T=1 on an
H200 its GEMV for V2-Lite's gate (E=64 x H=2048 bf16, 256 KB) takes 5.1 us, where the bytes need
~0.1 us. The router uses it for T <= `SMALL_T` (layers/moe.py) only; the kernel itself takes any T.

Grid (expert blocks, token blocks). A program computes a [BLOCK_T, BLOCK_E] tile of logits: for each
H chunk it loads the BLOCK_E weight rows once for its BLOCK_T tokens, multiplies in float32
([BT, BE, BH]) and reduces the chunk over H into a [BT, BE] float32 accumulator. The chunk loop is
unrolled (HIDDEN is a constexpr: one value per model), so all of a program's loads can be in flight
at once: at decode a program is one round trip to memory, not one per chunk.

Block sizes (`gemv_config`, from the shape alone, so a CUDA graph captured for a batch size always
replays the same launch):
  * BLOCK_E: the smallest power of two giving <= 128 expert blocks (~one per SM of an H100/H200):
    E=64 -> 1 (64 programs, 4 KB of weights each at H=2048), E=256 -> 2 (128 programs, 28 KB at
    H=7168). More, smaller programs: at T=1 the time is memory latency, not bandwidth.
  * BLOCK_T: next_power_of_2(T), at most 4. Token blocks re-read the weights (from L2: 256 KB and
    3.7 MB both fit) and expert blocks re-read x; L2 traffic is 2*H*E*T*(1/BLOCK_E + 1/BLOCK_T)
    bytes (bf16), the grid is (E/BLOCK_E) * (T/BLOCK_T) programs.
  * BLOCK_H: BLOCK_T*BLOCK_E*BLOCK_H <= 4096 float32 products per chunk (32 per thread at 4 warps),
    at most next_power_of_2(H), and large enough for at most 16 unrolled chunks.
These are first choices, not tuned on a GPU: benchmarks/kernels_moe.py --router --tune times
alternatives (the `config` argument).

Rounding: half and bf16 products are exact in float32; each output is a float32 sum whose order
differs from cuBLAS's, so the two agree within float32 accumulation error (gamma_H * sum |x w|).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2

_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_MAX_EXPERT_BLOCKS = 128
_MAX_BLOCK_T = 4
_TILE = 4096  # float32 products per chunk: BLOCK_T * BLOCK_E * BLOCK_H
_MAX_CHUNKS = 16  # unrolled H chunks per program


class GemvConfig(NamedTuple):
    block_t: int
    block_e: int
    block_h: int
    num_warps: int = 4


@triton.jit
def _router_gemv_kernel(x_ptr, w_ptr, out_ptr, num_tokens, num_experts, stride_xt, stride_we,
                        HIDDEN: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
                        BLOCK_H: tl.constexpr, PDL: tl.constexpr = False):
    """out[t, e] for BLOCK_T tokens x BLOCK_E experts; each weight chunk loaded once for all tokens."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BT]
    e = tl.program_id(0) * BLOCK_E + tl.arange(0, BLOCK_E)  # [BE]
    h = tl.arange(0, BLOCK_H)[None, None, :]  # [1, 1, BH]
    t_ok = (t < num_tokens)[:, None, None]  # [BT, 1, 1]
    e_ok = (e < num_experts)[None, :, None]  # [1, BE, 1]
    x_rows = x_ptr + t.to(tl.int64)[:, None, None] * stride_xt  # [BT, 1, 1]
    w_rows = w_ptr + e.to(tl.int64)[None, :, None] * stride_we  # [1, BE, 1]
    acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
    for c in tl.static_range((HIDDEN + BLOCK_H - 1) // BLOCK_H):
        col = c * BLOCK_H + h
        h_ok = col < HIDDEN
        xv = tl.load(x_rows + col, mask=t_ok & h_ok, other=0.0).to(tl.float32)  # [BT, 1, BH]
        wv = tl.load(w_rows + col, mask=e_ok & h_ok, other=0.0).to(tl.float32)  # [1, BE, BH]
        acc += tl.sum(xv * wv, axis=2)
    out = out_ptr + t.to(tl.int64)[:, None] * num_experts + e[None, :]  # [BT, BE]
    tl.store(out, acc, mask=(t < num_tokens)[:, None] & (e < num_experts)[None, :])


def _pow2_floor(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def gemv_config(num_tokens: int, num_experts: int, hidden: int) -> GemvConfig:
    """Block sizes for a [T, H] x [E, H]^T router GEMV (the module docstring says why)."""
    block_e = next_power_of_2(cdiv(max(num_experts, 1), _MAX_EXPERT_BLOCKS))
    block_t = min(next_power_of_2(max(num_tokens, 1)), _MAX_BLOCK_T)
    block_h = min(next_power_of_2(max(hidden, 1)), _pow2_floor(_TILE // (block_t * block_e)))
    block_h = max(block_h, next_power_of_2(cdiv(hidden, _MAX_CHUNKS)))
    return GemvConfig(block_t, block_e, block_h)


def _check(x: torch.Tensor, w: torch.Tensor) -> None:
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"x must be [T, H] and w [E, H] with the same H; got {tuple(x.shape)} and "
                         f"{tuple(w.shape)}")
    if x.dtype not in _DTYPES or w.dtype != x.dtype:
        raise ValueError(f"x and w must share one dtype of {_DTYPES}; got {x.dtype} and {w.dtype}")
    if x.device != w.device:
        raise ValueError(f"x and w must be on one device; got {x.device} and {w.device}")
    if x.shape[1] > 1 and (x.stride(1) != 1 or w.stride(1) != 1):
        raise ValueError(f"x and w must be unit-stride in H; got strides {x.stride()} and {w.stride()}")


def _check_config(config: GemvConfig) -> None:
    sizes = (config.block_t, config.block_e, config.block_h, config.num_warps)
    if any(s < 1 or s & (s - 1) for s in sizes):
        raise ValueError(f"config block sizes and num_warps must be powers of two; got {config}")


def router_logits(x: torch.Tensor, w: torch.Tensor, config: GemvConfig | None = None) -> torch.Tensor:
    """x [T, H] bf16/f16/f32 (unit stride in H), w [E, H] x's dtype (unit stride in H) -> [T, E] f32,
    accumulated in float32. `config`: block sizes (default `gemv_config`). One launch, no host
    synchronisation; the output is the only allocation."""
    _check(x, w)
    (num_tokens, hidden), num_experts = x.shape, w.shape[0]
    config = config or gemv_config(num_tokens, num_experts, hidden)
    _check_config(config)
    out = torch.empty(num_tokens, num_experts, dtype=torch.float32, device=x.device)
    if out.numel() == 0:
        return out
    if hidden == 0:
        return out.zero_()
    grid = (cdiv(num_experts, config.block_e), cdiv(num_tokens, config.block_t))
    _router_gemv_kernel[grid](
        x, w, out, num_tokens, num_experts, x.stride(0), w.stride(0),
        HIDDEN=hidden, BLOCK_T=config.block_t, BLOCK_E=config.block_e, BLOCK_H=config.block_h,
        num_warps=config.num_warps, **pdl_launch(x.device))
    return out


def router_logits_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: the float32 matmul of the float32 casts, [T, E] f32."""
    return x.float() @ w.float().t()
