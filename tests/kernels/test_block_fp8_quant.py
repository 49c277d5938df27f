"""Per-token-group FP8 activation quantisation kernel against its reference: the same bits.

The kernel rounds onto the e4m3 grid itself, so the interpreter (CPU) and the GPU must both give
exactly the reference's scales and fp8 values (see the kernel's docstring)."""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module
from tests.kernels.triton36 import triton_3_6_semantics

K = load_kernel_module("block_fp8_quant")


def _assert_same(x, group_size=128):
    q, scale = K.block_fp8_quant(x, group_size)
    q_ref, scale_ref = K.block_fp8_quant_ref(x.cpu(), group_size)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale.cpu(), scale_ref)
    assert torch.equal(q.cpu().view(torch.uint8), q_ref.view(torch.uint8))


@pytest.mark.parametrize("m,k", [(1, 128), (3, 256), (5, 200), (2, 64), (4, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_reference_bit_for_bit(m, k, dtype):
    x = torch.randn(m, k) * torch.logspace(-4, 2, k)  # groups of very different ranges
    x[0, : min(k, 40)] = 0  # a (partly) zero group
    _assert_same(x.to(dtype).to(device()))


def test_ties_subnormals_and_carries():
    """Values whose e4m3 rounding is a tie, a subnormal, or carries into the next binade."""
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid) & (grid >= 0)].unique()  # sorted e4m3 values
    mids = (grid[:-1] + grid[1:]) / 2
    values = torch.cat([mids, -mids, grid[:20] * 1.0001, torch.tensor([-0.0, 127.9, -15.99, 447.0])])
    values = torch.cat([values, torch.zeros(-values.numel() % 127)]).view(-1, 127)
    x = torch.cat([torch.full((values.shape[0], 1), 448.0), values], dim=1)  # scale 448 / 448 = 1 exactly
    _assert_same(x.to(device()))


@pytest.mark.skipif(not INTERPRET, reason="models Triton 3.6 in the interpreter")
def test_sign_of_zero_with_triton_3_6_negation(monkeypatch):
    """Triton 3.6 compiles unary minus as 0 - x (-(+0.0) = +0.0); -0.0 and negatives that round to
    zero must still give -0.0 (0x80), as torch's cast does: a GPU run caught this at M = 32, 512."""
    triton_3_6_semantics(monkeypatch)
    row = torch.zeros(128)
    row[0] = 448.0  # scale exactly 1
    row[1:5] = torch.tensor([-0.0, -1e-4, -2.0 ** -11, -2.0 ** -10])  # all round to -0.0
    row[5] = 2.0 ** -11  # +0.0
    _assert_same(torch.stack([row, -row]).to(device()))
    assert K.block_fp8_quant(row[None].to(device())).q.view(torch.uint8)[0, 1:6].tolist() == [128] * 4 + [0]


def test_strided_rows_empty_and_bad_inputs():
    base = torch.randn(3, 300, device=device())
    _assert_same(base[:, :256])
    q, s = K.block_fp8_quant(torch.randn(0, 256, device=device()))
    assert q.shape == (0, 256) and s.shape == (0, 2)
    with pytest.raises(ValueError):
        K.block_fp8_quant(torch.randn(4, 8, device=device()).t())
    with pytest.raises(ValueError):
        K.block_fp8_quant(torch.randn(2, 256, device=device()), group_size=100)


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 512])
@pytest.mark.parametrize("k", [7168, 1536, 2048, 16384, 18432])
def test_gpu_real_shapes(m, k):
    _assert_same(torch.randn(m, k, dtype=torch.bfloat16, device="cuda") * 3)
