"""SiLU-and-mul kernel against its reference."""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("silu_and_mul")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}  # the interpreter truncates to bf16


def _compare(x):
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(K.silu_and_mul(x), K.silu_and_mul_ref(x), atol=atol, rtol=rtol)


@pytest.mark.parametrize("tokens,inter", [(1, 576), (3, 1536), (2, 1100), (4, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(tokens, inter, dtype):
    _compare(4 * torch.randn(tokens, 2 * inter, dtype=dtype, device=device()))


def test_strided_rows():
    base = torch.randn(3, 2 * 96 + 16, device=device())
    _compare(base[:, : 2 * 96])


def test_empty_and_bad_inputs():
    assert K.silu_and_mul(torch.randn(0, 8, device=device())).shape == (0, 4)
    with pytest.raises(ValueError):
        K.silu_and_mul(torch.randn(2, 7, device=device()))
    with pytest.raises(ValueError):
        K.silu_and_mul(torch.randn(8, 2, device=device()).t())


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 33, 8192])
@pytest.mark.parametrize("inter", [18944, 14336, 1408, 8960])
def test_gpu_real_shapes(tokens, inter):
    _compare(torch.randn(tokens, 2 * inter, dtype=torch.bfloat16, device="cuda"))
