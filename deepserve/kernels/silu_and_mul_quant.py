"""SiLU-and-mul fused with the per-token activation quantisation of the W8A8 linear after it (the dense
MLP's down projection under --quantization int8 / fp8):

    silu_and_mul_int8_quant(x [T, 2I]) -> Int8Activations(q [T, I] int8, scale [T] f32, None)
    silu_and_mul_fp8_quant(x [T, 2I])  -> Fp8Activations(q [T, I] float8_e4m3fn, scale [T] f32)

x is the merged [gate | up] projection, f16/bf16/f32, rows may be strided (unit stride in the last dim).
The results are bit for bit those of the unfused kernels, `int8_quant(silu_and_mul(x))` and
`fp8_quant(silu_and_mul(x))`, on the GPU and under the interpreter: each element is
v = silu_mul(gate, up) (kernels/silu_and_mul.py's own jit function) rounded to x's dtype, as the unfused
path stores it, then quantised by int8_quant's / fp8_quant's own per-element jit functions
(`quantize_int8_values` / `quantize_fp8_values`: IEEE divisions, ties-to-even rounding, the same
hardware-rounding switches). The row's max |v| is exact in any order, so chunking does not change the
scale. What is saved: the [T, I] activation written by silu_and_mul and read back by the quantisation,
and one launch (decode steps run a few hundred tokens, where launches count).

One program per row, two passes over it in chunks of BLOCK columns (rows of any width; qwen-7b has
I = 18944): pass 1 computes v chunk by chunk and keeps the running max |v|; pass 2, last chunk first
(the most recently read), reloads the row's gate / up chunks with an evict-first hint, recomputes v,
quantises and stores it. The reloads are expected to hit L2 (a guess: a 2I-wide bf16 row is 76 KB at
qwen-7b's I; a few resident rows per SM x 132 SMs is 20-40 MB of the H200's 50 MB L2).
Timed (run s7d, H200, I = 18944, bf16, `triton.testing.do_bench_cudagraph` from a one-off script not
kept in the repo; the figures are in benchmarks/results/gpu_quant_kernels.jsonl): this launch (2048-column
chunks, one program per row, 8 warps) 17.5 us at 256 rows and 402.2 us at 8192, unfused silu_and_mul +
int8_quant 17.8 / 424.9 us: the fusion saves a launch and 5% at 8192 rows, not the write and read of the
activation it was meant to save (1.5 TB/s counting one read of x; with up to 8 rows of 76 KB resident per
SM, 80 MB in flight, pass 2's reloads seem to miss the 50 MB L2: inferred, not profiled). Programs walking the
rows at 2 per SM in 8192-column chunks over 16 warps (L2-resident reloads, fewer latency rounds) were
slower: 27.4 / 578.7 us (99 registers: one 16-warp program per SM). What would help: a row split over
several programs with the row max combined between them (two launches, or a last-arriving program).

A whole-row layout (one program per row holding it in registers, x read once; 32 warps at I = 18944) was
slower than this launch: 669.5 vs 402.2 us at 8192 rows, 21.9 vs 16.5 us at 256 (run s8a,
benchmarks/results/gpu_quant_kernels.jsonl); removed. Under --quantization int8 the dense MLPs with wide
enough rows now take kernels/int8_gemm_silu.py instead (SiLU-and-mul in the gate_up GEMM); this kernel
serves fp8, narrower int8 rows and the fallbacks.
Also tried and not kept (run s13d, H200, e4m3 at I = 18944, do_bench_cudagraph): each pass's chunk loads
software-pipelined (`tl.range(num_stages=2..4)`: Triton 3.6 turns them into cp.async once I is 16-divisible)
and persistent programs (1, 2 or 4 per SM walking the rows, so that pass 2's reloads stay in L2), over
1024-4096-column chunks and 4 or 8 warps: 96 launch configs, none faster than this launch beyond noise
(12.8 us at 256 rows, 91.2 vs 94.1 us at 2048 with 4096-column chunks, 327.8 vs 327.2 us at 8192).
Triton 3.9 AOT for sm_90 (no GPU here): every variant (int8 / fp8, HW on / off, PDL on / off) compiles;
bf16 / f32 at BLOCK 2048, 8 warps: 40 registers, no local memory; v takes the instructions of
silu_and_mul's kernel (ex2.approx, div.full, the bf16 product as mul.bf16(x2)), so the same bits.
No host synchronisation: CUDA-graph safe. Launched with PDL where kernels/pdl.py enables it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.fp8_quant import Fp8Activations, hardware_cast_rounds_like_torch
from deepserve.kernels.int8_quant import Int8Activations, quantize_row_values
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.silu_and_mul import check_gate_up, silu_mul
from deepserve.kernels.sizes import next_power_of_2

_BLOCK = 2048  # columns per chunk (timed against 8192 over 16 warps: see above)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _chunk_v(row_ptr, inter, cols, mask, EVICT: tl.constexpr):
    """The unfused silu_and_mul output at `cols` of one row, as stored (x's dtype), in float32."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=EVICT)
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return silu_mul(gate, up).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, inter, x_stride, q_stride, QMAX: tl.constexpr,
                               FP8: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr,
                               PDL: tl.constexpr = False):
    """One program per row: pass 1 the row's max |v|, pass 2 (last chunk first) quantise and store."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    row_ptr = x_ptr + row * x_stride
    amax = tl.zeros([BLOCK], dtype=tl.float32)  # lane-wise max over the chunks; masked lanes hold v = 0
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_chunk_v(row_ptr, inter, cols, cols < inter, "")))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), QMAX)
    num_chunks = tl.cdiv(inter, BLOCK)
    for i in range(0, num_chunks):
        cols = (num_chunks - 1 - i) * BLOCK + tl.arange(0, BLOCK)  # last chunk first: the most recently read
        mask = cols < inter
        q = quantize_row_values(_chunk_v(row_ptr, inter, cols, mask, "evict_first"), scale, HW, FP8)
        tl.store(q_ptr + row * q_stride + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def _launch(x: torch.Tensor, q_dtype: torch.dtype, block: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> (q [T, I] q_dtype, scale [T] f32); `block`: columns per chunk (power of two)."""
    check_gate_up(x)
    if x.dtype not in _FLOATS:
        raise ValueError(f"x must be f16/bf16/f32, got {x.dtype}")
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    q = torch.empty((num_tokens, inter), dtype=q_dtype, device=x.device)
    scale = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return q, scale
    if block is not None and (block < 1 or block & (block - 1)):
        raise ValueError(f"block must be a positive power of two, got {block}")
    fp8 = q_dtype == torch.float8_e4m3fn
    hw = hardware_cast_rounds_like_torch(x.device) if fp8 else x.is_cuda
    block = block or min(_BLOCK, next_power_of_2(max(inter, 1)))
    _silu_and_mul_quant_kernel[(num_tokens,)](
        x, q, scale, inter, x.stride(0), q.stride(0), QMAX=_QMAX[q_dtype], FP8=fp8, HW=hw, BLOCK=block,
        num_warps=max(1, min(8, block // 256)), **pdl_launch(x.device))
    return q, scale


def silu_and_mul_int8_quant(x: torch.Tensor, block: int | None = None) -> Int8Activations:
    """x [T, 2I] f16/bf16/f32 -> (q [T, I] int8, scale [T] f32, None), = int8_quant(silu_and_mul(x))."""
    return Int8Activations(*_launch(x, torch.int8, block), None)


def silu_and_mul_fp8_quant(x: torch.Tensor, block: int | None = None) -> Fp8Activations:
    """x [T, 2I] f16/bf16/f32 -> (q [T, I] e4m3, scale [T] f32), = fp8_quant(silu_and_mul(x))."""
    return Fp8Activations(*_launch(x, torch.float8_e4m3fn, block))


def silu_and_mul_int8_quant_ref(x: torch.Tensor) -> Int8Activations:
    """Pure-PyTorch reference: `int8_quant_ref(silu_and_mul_ref(x))` (silu_and_mul_ref keeps x's dtype)."""
    from deepserve.kernels.int8_quant import int8_quant_ref
    from deepserve.kernels.silu_and_mul import silu_and_mul_ref

    return int8_quant_ref(silu_and_mul_ref(x))


def silu_and_mul_fp8_quant_ref(x: torch.Tensor) -> Fp8Activations:
    """Pure-PyTorch reference: `fp8_quant_ref(silu_and_mul_ref(x))`."""
    from deepserve.kernels.fp8_quant import fp8_quant_ref
    from deepserve.kernels.silu_and_mul import silu_and_mul_ref

    return fp8_quant_ref(silu_and_mul_ref(x))
