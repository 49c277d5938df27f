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
hardware-rounding switches). The row's max |v| is exact in any order, so splitting the row does not change
the scale.

Layout: the row is split. A 1-D grid of rows x segments programs; program r * segments + s owns columns
s*BLOCK .. s*BLOCK+BLOCK-1 of row r: it reads its gate / up columns once, computes v and keeps it in
registers, and publishes its max |v| in the row's slot s of a zeroed [rows, SLOTS] int32 buffer (the float's
bits + 1, so 0 means "not yet": a non-negative finite float or +inf orders as its bits, and a NaN max, which
only a segment of NaNs gives, is published as 0.0, as the unfused kernels' max skips NaNs; a relaxed atomic
max, which lands in L2). On an NVIDIA GPU it then polls the row's slots (volatile loads) until every segment
has published, takes their max, and quantises and stores the v it holds: x is read once, q written once,
one kernel (after the buffer's memset), no fence and no read-modify-write on a shared word.
The wait needs the row's other segments to be running or done. The segments of a row are consecutive
program ids, and the GPU dispatches a grid's programs in id order (observed behaviour that single-pass
scans rely on, not a documented guarantee), so when a program waits every program of a lower row has been
dispatched, and as the resident ones finish the rest of its own row gets their places. That needs room
for one row's segments at once: the one-launch form runs only while segments <= the SMs (each SM holds at
least one program; 19 segments at qwen-7b's I = 18944, 132 SMs on an H200). If a platform ever dispatched
out of order, the fix is a ticket (an atomic counter giving each program its id in start order). Elsewhere
(more segments than SMs, the interpreter, which runs programs one after another, ROCm) the same kernel runs
twice: PHASE 1 publishes, PHASE 2 reloads x and quantises.

Timed (run s15b, H200, I = 18944, bf16, `do_bench_cudagraph`, scratch sweep of 14 block / warp configs of
this kernel and of a form that met at one counter per row with an acq_rel atomic add; every output bit
equal to the unfused pair at every config; figures in benchmarks/results/gpu_quant_kernels.jsonl), e4m3 /
int8, against the previous launch (one program per row, two passes over it in 2048-column chunks: pass 2's
reloads missed L2 at large T):

    T       previous launch    this kernel (1024 columns, 2 warps at T >= 64, 4 below)
    1       8.3 / 9.0 us       3.6 / 3.5 us
    256     12.5 / 13.5        10.9 / 11.6
    2048    93.2 / 101.7       64.1 / 65.3
    8192    335.6 / 353.4      251.8 / 254.4   (3.1 TB/s counting one read of x and one write of q)

The counter form was slower (271.4 / 298.8 us at 8192), and so was the two-launch form on the GPU from 256
rows (e4m3: 14.6 vs 10.9 us at 256, 367.2 vs 251.8 at 8192). 16 columns a thread (1024 over 2 warps) was
the best at T >= 256; 2048- to 8192-column segments and more warps were slower.
Earlier layouts (runs s7d, s8a, s13d): one program per row holding the whole row in registers was slower
still (669.5 us at 8192), and pipelined or persistent per-row programs gained nothing.
Under --quantization int8 the dense MLPs with wide enough rows take kernels/int8_gemm_silu.py instead
(SiLU-and-mul in the gate_up GEMM); this kernel serves fp8, narrower int8 rows and the fallbacks.
Per call: a memset of the slot buffer and one kernel (two in the two-launch form); no host
synchronisation: CUDA-graph safe. Launched with PDL where kernels/pdl.py enables it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from deepserve.kernels.fp8_quant import Fp8Activations, hardware_cast_rounds_like_torch
from deepserve.kernels.int8_convert import nvidia_ptx
from deepserve.kernels.int8_gemm import num_sms
from deepserve.kernels.int8_quant import Int8Activations, quantize_row_values
from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.silu_and_mul import check_gate_up, silu_mul
from deepserve.kernels.sizes import next_power_of_2

_BLOCK = 1024  # columns per segment (run s15b: see above)
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)
_QMAX = {torch.int8: 127.0, torch.float8_e4m3fn: 448.0}


@triton.jit
def _chunk_v(row_ptr, inter, cols, mask):
    """The unfused silu_and_mul output at `cols` of one row, as stored (x's dtype), in float32."""
    gate = tl.load(row_ptr + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    up = tl.load(row_ptr + inter + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
    return silu_mul(gate, up).to(gate.dtype).to(tl.float32)


@triton.jit
def _silu_and_mul_quant_kernel(x_ptr, q_ptr, scale_ptr, slots_ptr, inter, segments, x_stride, q_stride,
                               QMAX: tl.constexpr, FP8: tl.constexpr, HW: tl.constexpr, BLOCK: tl.constexpr,
                               SLOTS: tl.constexpr, PHASE: tl.constexpr, PDL: tl.constexpr = False):
    """Program row * segments + seg; PHASE 0: publish the segment's max |v|, wait for the row's, quantise (one
    launch); PHASE 1: publish only; PHASE 2: reload and quantise (module docstring)."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    pid = tl.program_id(0)
    seg = pid % segments
    row = (pid // segments).to(tl.int64)
    cols = seg * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    v = _chunk_v(x_ptr + row * x_stride, inter, cols, mask)  # [BLOCK] f32, 0 where masked
    row_slots = slots_ptr + row * SLOTS
    if PHASE != 2:
        top = tl.max(tl.abs(v), axis=0)  # NaN only if every lane is: then 0.0, so bits + 1 cannot overflow
        top = tl.where(top == top, top, 0.0)
        tl.atomic_max(row_slots + seg, top.to(tl.int32, bitcast=True) + 1, sem="relaxed")  # >= 1: never "not yet"
    if PHASE != 1:
        lanes = tl.arange(0, SLOTS)
        live = lanes < segments
        got = tl.load(row_slots + lanes, mask=live, other=1, volatile=True)
        if PHASE == 0:
            while tl.min(got, axis=0) == 0:
                got = tl.load(row_slots + lanes, mask=live, other=1, volatile=True)
        amax = (tl.max(got, axis=0) - 1).to(tl.float32, bitcast=True)
        scale = tl.div_rn(tl.maximum(amax, 1e-8), QMAX)
        tl.store(q_ptr + row * q_stride + cols, quantize_row_values(v, scale, HW, FP8), mask=mask)
        if seg == 0:
            tl.store(scale_ptr + row, scale)


def _num_warps(block: int, rows: int) -> int:
    """16 columns a thread from 64 rows (1024 columns over 2 warps), 8 below (4 warps): run s15b."""
    return max(1, min(2, block // 512)) if rows >= 64 else max(1, min(4, block // 256))


def _launch(x: torch.Tensor, q_dtype: torch.dtype, block: int | None,
            one_launch: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, 2I] -> (q [T, I] q_dtype, scale [T] f32); `block`: columns per segment (a power of two);
    `one_launch`: the PHASE 0 form (default: on NVIDIA GPUs while a row has no more segments than the SMs;
    refused elsewhere, where a waiting program could stop its row's others from ever running)."""
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
    block = block or min(_BLOCK, next_power_of_2(max(inter, 1)))
    segments = triton.cdiv(inter, block)
    slots = torch.zeros((num_tokens, next_power_of_2(segments)), dtype=torch.int32, device=x.device)
    fp8 = q_dtype == torch.float8_e4m3fn
    hw = hardware_cast_rounds_like_torch(x.device) if fp8 else x.is_cuda
    can_wait = nvidia_ptx(x.device) and segments <= num_sms(x.device)  # a MIG slice reports its own SMs
    if one_launch and not can_wait:
        raise ValueError(f"the one-launch form needs an NVIDIA GPU with at least {segments} SMs")
    one_launch = can_wait if one_launch is None else one_launch
    for phase in ((0,) if one_launch else (1, 2)):
        _silu_and_mul_quant_kernel[(segments * num_tokens,)](
            x, q, scale, slots, inter, segments, x.stride(0), q.stride(0), QMAX=_QMAX[q_dtype], FP8=fp8, HW=hw,
            BLOCK=block, SLOTS=slots.shape[1], PHASE=phase, num_warps=_num_warps(block, num_tokens),
            **pdl_launch(x.device))
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
