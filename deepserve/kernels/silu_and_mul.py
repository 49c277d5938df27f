"""SiLU-and-multiply over a merged [gate | up] projection: [T, 2I] -> silu(gate) * up, [T, I].

Rounding follows the eager module (`deepserve.layers.activation.SiluAndMul`): silu is computed in
float32 and rounded to the input dtype, then multiplied by `up` and rounded again.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from deepserve.kernels.pdl import pdl_launch, pdl_prologue
from deepserve.kernels.sizes import cdiv, next_power_of_2

_BLOCK = 1024


@triton.jit
def silu_mul(gate, up):
    """gate in x's dtype, up float32 -> silu(gate) * up in float32 (silu rounded to gate's dtype first).
    Shared with kernels/silu_and_mul_quant.py, whose quantised rows must match this kernel's bit for bit."""
    g = gate.to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(gate.dtype).to(tl.float32)
    return act * up


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, inter, x_stride, out_stride, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """Program (row, chunk): BLOCK columns of one row."""
    pdl_prologue(PDL)  # first: wait for the previous kernel (kernels/pdl.py)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    gate = tl.load(x_ptr + row * x_stride + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * x_stride + inter + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, silu_mul(gate, up).to(out_ptr.dtype.element_ty), mask=mask)


def check_gate_up(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2 or not x.is_floating_point():
        raise ValueError(f"x must be [num_tokens, 2 * intermediate] float, got {tuple(x.shape)} {x.dtype}")
    if x.stride(1) != 1:
        raise ValueError("x must be unit-stride in its last dim")


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] bf16/f16/f32 (rows may be strided) -> [T, I] same dtype, contiguous."""
    check_gate_up(x)
    num_tokens, inter = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_tokens, inter), dtype=x.dtype, device=x.device)
    if num_tokens == 0 or inter == 0:
        return out
    block = min(_BLOCK, next_power_of_2(inter))
    grid = (num_tokens, cdiv(inter, block))
    _silu_and_mul_kernel[grid](x, out, inter, x.stride(0), out.stride(0), BLOCK=block,
                               num_warps=4 if block >= 512 else 2, **pdl_launch(x.device))
    return out


def silu_and_mul_ref(x: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: the eager module's math."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
