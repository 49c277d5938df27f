"""Fused residual add + RMSNorm kernel against its reference and the RMSNorm module."""

import pytest
import torch

from deepserve.layers.norm import RMSNorm
from tests.kernels.interpret import INTERPRET, device, load_kernel_module

K = load_kernel_module("rms_norm")
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def _inputs(tokens, hidden, dtype, dev, residual=True):
    x = torch.randn(tokens, hidden, dtype=dtype, device=dev)
    res = torch.randn(tokens, hidden, dtype=dtype, device=dev) if residual else None
    w = (1 + 0.1 * torch.randn(hidden, device=dev)).to(dtype)
    return x, res, w


def _compare(x, res, w, eps=1e-6):
    got, want = K.rms_norm(x, res, w, eps), K.rms_norm_ref(x, res, w, eps)
    atol, rtol = TOL[x.dtype]
    torch.testing.assert_close(got.out, want.out, atol=atol, rtol=rtol)
    if res is None:
        assert got.residual is None
    else:
        # Same rounding on GPU; the interpreter truncates float32 -> bf16 instead (1 ulp).
        exact = x.dtype == torch.float32 or not INTERPRET
        torch.testing.assert_close(got.residual, want.residual, atol=0, rtol=0 if exact else 2 ** -7)


@pytest.mark.parametrize("tokens,hidden", [(1, 576), (3, 1536), (5, 64), (2, 100)])
@pytest.mark.parametrize("residual", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_reference(tokens, hidden, residual, dtype):
    _compare(*_inputs(tokens, hidden, dtype, device(), residual))


def test_matches_module_in_float32():
    x, res, w = _inputs(4, 576, torch.float32, device())
    norm = RMSNorm(576, eps=1e-5).to(device())
    norm.weight.data.copy_(w)
    want_out, want_res = norm(x, res)
    got = K.rms_norm(x, res, w, 1e-5)
    torch.testing.assert_close(got.out, want_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.residual, want_res, atol=0, rtol=0)
    torch.testing.assert_close(K.rms_norm(x, None, w, 1e-5).out, norm(x), atol=1e-5, rtol=1e-5)


def test_strided_rows_and_inputs_untouched():
    base = torch.randn(3, 576 + 64, device=device())  # MLA: the latent part of [c_kv | k_pe]
    x = base[:, :576]
    res = torch.randn(3, 576, device=device())
    before = (base.clone(), res.clone())
    _compare(x, res, torch.rand(576, device=device()))
    assert torch.equal(base, before[0]) and torch.equal(res, before[1])


def test_empty_and_bad_inputs():
    x, res, w = _inputs(0, 64, torch.float32, device())
    assert K.rms_norm(x, res, w, 1e-6).out.shape == (0, 64)
    with pytest.raises(ValueError):
        K.rms_norm(torch.randn(2, 64, device=device()), None, torch.ones(63, device=device()), 1e-6)
    with pytest.raises(ValueError):
        K.rms_norm(torch.randn(2, 64, device=device()).t(), None, torch.ones(2, device=device()), 1e-6)
    with pytest.raises(ValueError):
        K.rms_norm(x, res.double(), w, 1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 7, 256, 8192])
@pytest.mark.parametrize("hidden", [1536, 3584, 4096, 7168])
@pytest.mark.parametrize("residual", [True, False])
def test_gpu_real_shapes(tokens, hidden, residual):
    _compare(*_inputs(tokens, hidden, torch.bfloat16, "cuda", residual))
