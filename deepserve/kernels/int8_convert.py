"""int8 -> float32 exactly without I2F, for kernels that stream int8 data (W8A16 weights, an int8 KV cache).

    int8_to_f32(w int8 [...], PTX) -> float32 [...], equal to w.to(tl.float32) (`int8_to_f32_ref`)
    nvidia_ptx(device) -> whether a kernel launched for `device` may carry the inline-PTX form

I2F is a low-throughput conversion on sm_90 (the CUDA guide's table: 16 per clock per SM, against 128
float32 FMAs). A kernel that converts every byte it reads is bound by it: the W8A16 decode GEMV was (run s9b,
H200: qwen-7b gate_up 3.19 -> 3.82 TB/s with this form, kernels/gemv.py).

The bits 0x4B000000 | (w + 128) are the float 2^23 + 128 + w (w + 128 in [0, 255] fills the low byte), and
subtracting 2^23 + 128 is exact. PTX (CUDA): per 4 packed bytes one xor with 0x80808080 (w + 128 as a byte),
then per byte one prmt placing it under 0x4B and one float subtract. Otherwise (the interpreter, ROCm: the PTX
form's reference): the sign-extended w + 0x4B000080 (no carry leaves the low byte), the same bits.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from deepserve import envs


@triton.jit
def int8_to_f32(w, PTX: tl.constexpr):
    """int8 [...] -> float32 [...] exactly (module docstring); PTX: the inline-assembly form (NVIDIA GPUs)."""
    if PTX:
        return tl.inline_asm_elementwise(
            asm="""{
            .reg .b32 t, m;
            xor.b32 t, $4, 0x80808080;
            mov.b32 m, 0x4B000000;
            prmt.b32 $0, t, m, 0x7440;
            prmt.b32 $1, t, m, 0x7441;
            prmt.b32 $2, t, m, 0x7442;
            prmt.b32 $3, t, m, 0x7443;
            sub.f32 $0, $0, 0f4B000080;
            sub.f32 $1, $1, 0f4B000080;
            sub.f32 $2, $2, 0f4B000080;
            sub.f32 $3, $3, 0f4B000080;
            }""",
            constraints="=r,=r,=r,=r,r", args=[w], dtype=tl.float32, is_pure=True, pack=4)
    bits = w.to(tl.int32) + 0x4B000080
    return bits.to(tl.float32, bitcast=True) - 8388736.0


def int8_to_f32_ref(w: torch.Tensor) -> torch.Tensor:
    """Pure-PyTorch reference: the plain cast."""
    return w.to(torch.float32)


def nvidia_ptx(device: torch.device) -> bool:
    """Whether a kernel may carry inline PTX: compiled for an NVIDIA GPU (not the interpreter, not ROCm)."""
    return torch.device(device).type == "cuda" and _nvidia_backend()


@functools.lru_cache(maxsize=None)
def _nvidia_backend() -> bool:
    """Asked once (Triton fixes the interpreter mode at import)."""
    return torch.version.hip is None and not envs.triton_interpret()
