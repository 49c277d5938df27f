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

Programs walk rows (row = program, + programs, ...), at most 2 per SM, two passes over each row in
chunks of BLOCK columns (rows of any width; qwen-7b has I = 18944): pass 1 computes v chunk by chunk and
keeps the running max |v|; pass 2, last chunk first (the most recently read), reloads the row's gate / up
chunks with an evict-first hint, recomputes v, quantises and stores it. Few resident rows keep the reloads
in L2 (2 x 132 rows of 76 KB: 20 MB of the H200's 50 MB).
Measured (run s7c, H200, PDL off, profile of a qwen-7b int8 step) with the first layout, one program per
row in chunks of 2048 columns over 8 warps: 406.7 us at 8192 rows (1.9 TB/s counting one read of x: up to
8 rows of 76 KB resident per SM, 80 MB in flight, so pass 2 missed the L2) and 20.2 us at 256 rows
(ten chunks a pass, each waiting a full memory latency); unfused silu_and_mul + int8_quant took about
the same (s6h5). Chunks of 8192 columns over 16 warps: three chunks a pass. NOT YET TIMED.
Triton 3.9 AOT for sm_90 (no GPU here): every variant (int8 / fp8, HW on / off, PDL on / off) compiles;
v takes the instructions of silu_and_mul's kernel (ex2.approx, div.full, the bf16 product as
mul.bf16(x2)), so the same bits.
No host synchronisation: CUDA-graph safe. Launched with PDL where kernels/pdl.py enables it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.fp8_quant import Fp8Activations, hardware_cast_rounds_like_torch, quantize_fp8_values
from deepserve.kernels.int8_gemm import num_sms
from deepserve.kernels.int8_quant import Int8Activations, quantize_int8_values
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.silu_and_mul import check_gate_up, silu_mul

_BLOCK = 8192  # columns per chunk: three chunks a pass at qwen-7b's I = 18944
_ROWS_PER_SM = 2  # resident rows per SM (programs = min(rows, 2 x SMs)): pass 2's reloads stay in L2
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _chunk_v(row_ptr, inter, cols, mask, EVICT: tl.constexpr):
    """The unfused silu_and_mul output at `cols` of one row, as stored (x's dtype), in float32."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy=EVICT)
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0, eviction_policy=EVICT).to(tl.float32)
    return silu_mul(gate, up).to(gate.dtype).to(tl.float32)


@triton.jit
def _quantize(v, scale, FP8: tl.constexpr, HW: tl.constexpr):
    """fp8_quant's (FP8) or int8_quant's element step, their own jit functions; HW: their GPU rounding
    switch (HW_CAST, HW_ROUND)."""
    if FP8:
        q = quantize_fp8_values(v, scale, HW)
    else:
        q = quantize_int8_values(v, scale, HW).to(tl.int8)
    return q


@triton.jit(do_not_specialize=["num_rows"])  # the token count: one compile for every batch
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, num_rows, inter, x_stride, q_stride, QMAX: tl.constexpr,
                               FP8: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr,
                               PDL: tl.constexpr = False):
    """Rows program, program + programs, ...: pass 1 the row's max |v|, pass 2 (last chunk first) quantise
    and store."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    x_step, q_step = tl.cast(x_stride, tl.int64), tl.cast(q_stride, tl.int64)  # 64-bit row offsets
    for row in range(tl.program_id(0), num_rows, tl.num_programs(0)):
        _quantize_row(x_ptr + row * x_step, q_ptr + row * q_step, scale_ptr + row, inter, QMAX, FP8, HW, BLOCK)


@triton.jit
def _quantize_row(row_ptr, q_row_ptr, scale_ptr, inter, QMAX: tl.constexpr, FP8: tl.constexpr, HW: tl.constexpr,
                  BLOCK: tl.constexpr):
    """One row: its scale from max |v| over the chunks, then q chunk by chunk (last chunk first)."""
    amax = tl.zeros([BLOCK], dtype=tl.float32)  # lane-wise max over the chunks; masked lanes hold v = 0
    for start in range(0, inter, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(_chunk_v(row_ptr, inter, cols, cols < inter, "")))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), QMAX)
    num_chunks = tl.cdiv(inter, BLOCK)
    for i in range(0, num_chunks):
        cols = (num_chunks - 1 - i) * BLOCK + tl.arange(0, BLOCK)  # last chunk first: the most recently read
        mask = cols < inter
        q = _quantize(_chunk_v(row_ptr, inter, cols, mask, "evict_first"), scale, FP8, HW)
        tl.store(q_row_ptr + cols, q, mask=mask)
    tl.store(scale_ptr, scale)


def _launch(x: torch.Tensor, q_dtype: torch.dtype, block: int | None,
            programs: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> (q [T, I] q_dtype, scale [T] f32); `block`: columns per chunk (power of two);
    `programs`: how many walk the rows (default min(T, 2 per SM))."""
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
    block = block or min(_BLOCK, triton.next_power_of_2(max(inter, 1)))
    fp8 = q_dtype == torch.float8_e4m3fn
    hw = hardware_cast_rounds_like_torch(x.device) if fp8 else x.is_cuda
    programs = min(num_tokens, programs or _ROWS_PER_SM * num_sms(x.device))
    _silu_and_mul_quant_kernel[(programs,)](
        x, q, scale, num_tokens, inter, x.stride(0), q.stride(0), QMAX=_QMAX[q_dtype], FP8=fp8, HW=hw,
        BLOCK=block, num_warps=max(1, min(16, block // 512)), **pdl_launch(x.device))
    return q, scale


def silu_and_mul_int8_quant(x: torch.Tensor, block: int | None = None, programs: int | None = None) -> Int8Activations:
    """x [T, 2I] f16/bf16/f32 -> (q [T, I] int8, scale [T] f32, None), = int8_quant(silu_and_mul(x))."""
    return Int8Activations(*_launch(x, torch.int8, block, programs), None)


def silu_and_mul_fp8_quant(x: torch.Tensor, block: int | None = None, programs: int | None = None) -> Fp8Activations:
    """x [T, 2I] f16/bf16/f32 -> (q [T, I] e4m3, scale [T] f32), = fp8_quant(silu_and_mul(x))."""
    return Fp8Activations(*_launch(x, torch.float8_e4m3fn, block, programs))


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
