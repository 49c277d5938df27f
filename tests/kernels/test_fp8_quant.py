"""Per-token FP8 (e4m3) activation quantisation against its reference, bit for bit: the kernel
rounds onto the e4m3 grid itself (ties to even), so it must agree with torch's cast everywhere,
including the ties, the carries into the next binade and the subnormals tested below."""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("fp8_quant")


def _assert_exact(x):
    got, want = K.fp8_quant(x), K.fp8_quant_ref(x)
    assert got.q.dtype == torch.float8_e4m3fn and got.scale.dtype == torch.float32
    assert torch.equal(got.q.view(torch.uint8), want.q.view(torch.uint8))  # sign of zero included
    assert torch.equal(got.scale, want.scale)


@pytest.mark.parametrize("tokens,hidden", [(1, 64), (5, 100), (33, 96), (2, 1537)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_exactly(tokens, hidden, dtype):
    # columns spanning six decades, so each row reaches the subnormal range of its scale
    x = torch.randn(tokens, hidden, device=device()) * torch.logspace(-4, 2, hidden, device=device())
    _assert_exact(x.to(dtype))


def _grid_cases() -> torch.Tensor:
    """Every positive finite e4m3 value, the midpoints between neighbours and one float32 ulp either
    side of each midpoint; both signs; then 448 so that the row's scale is exactly 1."""
    values = torch.arange(0, 127, dtype=torch.uint8).view(torch.float8_e4m3fn).float()  # 0 .. 448
    mids = (values[:-1] + values[1:]) / 2
    around = torch.cat([mids, torch.nextafter(mids, mids + 1), torch.nextafter(mids, mids - 1), values])
    return torch.cat([around, -around, torch.tensor([-0.0, 448.0])])


def test_ties_carries_and_subnormals():
    x = _grid_cases().to(device())[None, :]
    assert K.fp8_quant(x).scale.item() == 1.0
    _assert_exact(x)


def test_zero_rows_and_strided_rows():
    base = torch.randn(3, 160, device=device())
    base[1] = 0.0
    _assert_exact(base[:, :128])


def test_empty_and_bad_inputs():
    out = K.fp8_quant(torch.randn(0, 32, device=device()))
    assert out.q.shape == (0, 32) and out.scale.shape == (0,)
    with pytest.raises(ValueError):
        K.fp8_quant(torch.randn(8, 4, device=device()).t())
    with pytest.raises(ValueError):
        K.fp8_quant(torch.randn(4, device=device()))


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [1, 16, 256, 4096])
@pytest.mark.parametrize("hidden", [3584, 18944])
def test_gpu_real_shapes(tokens, hidden):
    _assert_exact((2 * torch.randn(tokens, hidden, device="cuda")).bfloat16())
    if tokens == 1:
        _assert_exact(_grid_cases().cuda()[None, :])
