"""kernels/int8_convert.py: int8 -> float32 without I2F equals the plain cast for every int8 value.

CPU: the interpreter's integer-add form. GPU: the inline-PTX form (the one the W8A16 GEMV and the int8 KV cache
reads compile to) and the integer form, both against torch's cast; nvidia_ptx's answer per device.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("int8_convert")


@triton.jit
def _convert_kernel(x_ptr, out_ptr, N: tl.constexpr, PTX: tl.constexpr):
    i = tl.arange(0, N)
    tl.store(out_ptr + i, K.int8_to_f32(tl.load(x_ptr + i), PTX))


def _all_int8(dev: torch.device) -> torch.Tensor:
    """Every int8 value, shuffled (4 packed bytes per register in the PTX form: mixed signs in one word)."""
    values = torch.arange(-128, 128, dtype=torch.int16)[torch.randperm(256, generator=torch.Generator().manual_seed(0))]
    return values.to(torch.int8).to(dev)


def _convert(x: torch.Tensor, ptx: bool) -> torch.Tensor:
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _convert_kernel[(1,)](x, out, N=x.numel(), PTX=ptx)
    return out


def test_integer_form_equals_the_cast_for_every_value():
    x = _all_int8(device())
    out = _convert(x, ptx=False)
    assert torch.equal(out, K.int8_to_f32_ref(x))
    assert torch.equal(_convert(torch.zeros(256, dtype=torch.int8, device=x.device), False),
                       torch.zeros(256, device=x.device))


def test_nvidia_ptx_only_on_a_compiled_cuda_device():
    assert not K.nvidia_ptx(torch.device("cpu"))
    if torch.cuda.is_available():
        assert K.nvidia_ptx(torch.device("cuda", 0)) is (torch.version.hip is None)


@pytest.mark.gpu
def test_ptx_form_equals_the_cast_for_every_value_gpu():
    x = _all_int8(torch.device("cuda"))
    assert torch.equal(_convert(x, ptx=True), K.int8_to_f32_ref(x))
    sixteen = x.repeat(16)  # 4096 values: every lane, several packed words each
    assert torch.equal(_convert(sixteen, ptx=True), sixteen.float())
