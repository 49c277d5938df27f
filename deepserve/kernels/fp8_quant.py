"""Per-token dynamic FP8 (e4m3) quantisation of activations, for the FP8 W8A8 linear method.

    fp8_quant(x [T, K] f16/bf16/f32) -> Fp8Activations(q [T, K] float8_e4m3fn, scale [T] f32)
    rms_norm_fp8_quant(x, residual, weight, eps) -> Fp8NormActivations(q, scale, x + residual or None)
        RMSNorm (with the residual add) fused with the quantisation, for the FP8 linear reading a pre-norm
        layer's norm (layers/decoder.py): int8_quant's row kernel with its FP8 flag (int8_quant.py documents
        the norm's arithmetic); the normalised rows never go to memory

Per row t (the math of `deepserve.quant.fp8.quantize_per_token_fp8_ref`, bit for bit):

    scale_t = max(max_k |x_tk|, 1e-8) / 448,    q_tk = e4m3(clamp(x_tk / scale_t, -448, 448))

e4m3() rounds to nearest, ties to even, as torch's cast, keeping the sign of zero. On sm_90+ GPUs that is
the hardware conversion (HW_CAST); below sm_90 and under the interpreter the kernel rounds onto the e4m3
grid itself
in float32 (spacing 2^(e-3) for a value in [2^e, 2^(e+1)), 2^-9 below 2^-6, the subnormals) with
`int8_quant.round_half_even`, then casts a value the format holds exactly; this gives the same bits
on any backend (the Triton interpreter's own float32 -> fp8 cast rounds ties up and drops carries).

One program per row (K <= 65536), tiled as `int8_quant.row_tiling` says, like int8_quant:
  * up to 8192 columns the whole row in registers (BLOCK = next_power_of_2(K)): x is read once.
    Measured on an H200 (run s6h2, benchmarks/gpu_quant.py): at K = 18944 this took 0.464 ms for
    8192 rows (the bytes alone ~0.11 ms) and 15.1 us for 256 rows (~4.5 us at K = 3584), which is
    why wider rows take the second kernel;
  * wider rows (`_fp8_quant_wide_kernel`): a loop over chunks of 4096 columns (8 warps), pass 1 for
    max |x|, pass 2 (last chunk first, the re-reads expected in L2) to quantise and store; the same
    per-element arithmetic (`quantize_fp8_values`), so the same bits. H200 (run s6h4, 18944 bf16
    columns): 0.179 ms for 8192 rows, 9.7 us for 256 (the whole-row kernel, run s6h2: 0.464 ms / 15.1 us).
    Threshold, chunk and warps are first estimates, not tuned (see int8_quant's docstring).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from deepserve.kernels.int8_quant import check_row_inputs, launch_row_quant, quantize_fp8_values, row_tiling
from deepserve.kernels.pdl import pdl_launch, pdl_prologue

_MAX_HIDDEN = 65536
_FLOATS = (torch.float16, torch.bfloat16, torch.float32)


class Fp8Activations(NamedTuple):
    q: torch.Tensor  # [T, K] float8_e4m3fn
    scale: torch.Tensor  # [T] f32: row t ~ q[t] * scale[t]


class Fp8NormActivations(NamedTuple):
    q: torch.Tensor  # [T, K] float8_e4m3fn of the normalised rows
    scale: torch.Tensor  # [T] f32
    residual: torch.Tensor | None  # [T, K] x.dtype: x + residual (with a residual), else None


@triton.jit
def _fp8_quant_kernel(x_ptr, q_ptr, scale_ptr, hidden, x_stride, q_stride, BLOCK: tl.constexpr,
                      HW_CAST: tl.constexpr = False, PDL: tl.constexpr = False):
    """One program per row, the whole row [BLOCK] in registers."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden
    v = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0).to(tl.float32)
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(v), axis=0), 1e-8), 448.0)
    q = quantize_fp8_values(v, scale, HW_CAST)
    tl.store(q_ptr + row * q_stride + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


@triton.jit
def _fp8_quant_wide_kernel(x_ptr, q_ptr, scale_ptr, hidden, x_stride, q_stride, CHUNK: tl.constexpr,
                           HW_CAST: tl.constexpr = False, PDL: tl.constexpr = False):
    """One program per row, looping over it in chunks [CHUNK]: the max pass, then the quantise pass
    last chunk first. The values of `_fp8_quant_kernel`, bit for bit."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, CHUNK)
    x_row = x_ptr + row * x_stride
    amax = tl.zeros([CHUNK], dtype=tl.float32)  # lane-wise max over the chunks; 0 is the masked lanes' value
    for start in range(0, hidden, CHUNK):
        v = tl.load(x_row + start + cols, mask=start + cols < hidden, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    scale = tl.div_rn(tl.maximum(tl.max(amax, axis=0), 1e-8), 448.0)
    num_chunks = tl.cdiv(hidden, CHUNK)
    for i in range(0, num_chunks):
        start = (num_chunks - 1 - i) * CHUNK  # last chunk first: the most recently read
        mask = start + cols < hidden
        v = tl.load(x_row + start + cols, mask=mask, other=0.0, eviction_policy="evict_first").to(tl.float32)
        q = quantize_fp8_values(v, scale, HW_CAST)
        tl.store(q_ptr + row * q_stride + start + cols, q, mask=mask)
    tl.store(scale_ptr + row, scale)


def hardware_cast_rounds_like_torch(device: torch.device) -> bool:
    """Whether Triton's float32 -> e4m3 conversion on `device` is the hardware one that rounds to nearest
    even like torch's cast: CUDA compute capability 9.0+. Below (sm_89: L4, L40S) Triton converts through
    float16 with truncation, which moves about 0.4% of values by one e4m3 step, so the kernel rounds
    itself there (and on the interpreter). Depends on the device only: CUDA-graph safe."""
    return device.type == "cuda" and _capability(torch.device(device).index or 0) >= (9, 0)


@functools.lru_cache(maxsize=None)
def _capability(index: int) -> tuple[int, int]:
    """CUDA compute capability of device `index`, asked once (this sits on every fp8 linear's path)."""
    return torch.cuda.get_device_capability(index)


def fp8_quant(x: torch.Tensor, *, whole_row_max: int | None = None, chunk: int | None = None) -> Fp8Activations:
    """x [T, K] f16/bf16/f32 (unit stride in K; rows may be strided) -> (q [T, K] e4m3, scale [T] f32).
    whole_row_max / chunk: `int8_quant.row_tiling` (defaults: rows up to 8192 whole, wider in chunks
    of 4096)."""
    if x.dim() != 2 or x.dtype not in _FLOATS or x.stride(1) != 1:
        raise ValueError(f"x must be [num_tokens, hidden] f16/bf16/f32 with unit stride in hidden, got "
                         f"{tuple(x.shape)} {x.dtype} strides {x.stride()}")
    num_tokens, hidden = x.shape
    if hidden > _MAX_HIDDEN:
        raise ValueError(f"hidden {hidden} exceeds {_MAX_HIDDEN}")
    tiling = row_tiling(hidden, whole_row_max, chunk)
    q = torch.empty((num_tokens, hidden), dtype=torch.float8_e4m3fn, device=x.device)
    scale = torch.empty(num_tokens, dtype=torch.float32, device=x.device)
    if num_tokens == 0:
        return Fp8Activations(q, scale)
    args = (x, q, scale, hidden, x.stride(0), q.stride(0))
    flags = dict(HW_CAST=hardware_cast_rounds_like_torch(x.device), num_warps=tiling.num_warps)
    if tiling.wide:
        _fp8_quant_wide_kernel[(num_tokens,)](*args, CHUNK=tiling.block, **flags, **pdl_launch(x.device))
    else:
        _fp8_quant_kernel[(num_tokens,)](*args, BLOCK=tiling.block, **flags, **pdl_launch(x.device))
    return Fp8Activations(q, scale)


def rms_norm_fp8_quant(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, *,
                       whole_row_max: int | None = None, chunk: int | None = None) -> Fp8NormActivations:
    """x [T, H], residual like x or None, weight [H] -> (q [T, H] e4m3 of the normalised rows, scale [T] f32,
    x + residual [T, H] x.dtype or None): kernels/rms_norm.py's output quantised as fp8_quant does, in one
    launch of int8_quant's row kernel with its FP8 flag (the same norm arithmetic as rms_norm_int8_quant,
    so the same caveat: rows held whole give rms_norm's bits, `int8_quant.norm_matches_rms_norm`).
    Inputs are not modified. whole_row_max / chunk: as `fp8_quant`."""
    check_row_inputs(x, residual, weight)  # rms_norm's row checks (hidden <= 65536 included)
    return Fp8NormActivations(*launch_row_quant(x, residual, weight, eps, True,
                                                row_tiling(x.shape[1], whole_row_max, chunk), fp8=True,
                                                hardware=hardware_cast_rounds_like_torch(x.device)))


def rms_norm_fp8_quant_ref(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor,
                           eps: float) -> Fp8NormActivations:
    """Pure-PyTorch reference: `kernels.rms_norm.rms_norm_ref`, then the per-token e4m3 quantisation."""
    from deepserve.kernels.rms_norm import rms_norm_ref
    from deepserve.quant.fp8 import quantize_per_token_fp8_ref

    out, new_residual = rms_norm_ref(x, residual, weight, eps)
    return Fp8NormActivations(*quantize_per_token_fp8_ref(out), new_residual)


def fp8_quant_ref(x: torch.Tensor) -> Fp8Activations:
    """Pure-PyTorch reference: `deepserve.quant.fp8.quantize_per_token_fp8_ref`."""
    from deepserve.quant.fp8 import quantize_per_token_fp8_ref

    return Fp8Activations(*quantize_per_token_fp8_ref(x))
