"""moe_sum against its reference (bit for bit) and against torch's `x.sum(1)` / `x.sum(1) + addend`,
the values it replaces in fused_moe and DeepseekMoE. CPU (interpreter) at small shapes in float32 /
float16; GPU also in bf16 and at DeepSeek-V2-Lite / V3 decode and prefill shapes."""

import pytest
import torch

from tests.kernels.interpret import INTERPRET, device, load_kernel_module

K = load_kernel_module("moe_sum")
# The interpreter truncates float32 -> bf16 where a GPU rounds to nearest: bf16 on the GPU only.
DTYPES = [torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16])


def _inputs(tokens, top_k, hidden, dtype, dev):
    x = (torch.randn(tokens, top_k, hidden, device=dev) * 0.5).to(dtype)
    return x, torch.randn(tokens, hidden, device=dev).to(dtype)


def _grid_inputs(tokens, top_k, hidden, dtype, dev):
    """Multiples of 1/128 below 2 in magnitude: every float32 sum of up to 2^15 of them is exact, so
    any summation order (torch's) gives the same float32 value before the one rounding."""
    x = (torch.randint(-255, 256, (tokens, top_k, hidden), device=dev) / 128).to(dtype)
    return x, (torch.randint(-255, 256, (tokens, hidden), device=dev) / 128 + 1 / 3).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 6, 96), (5, 8, 1000), (3, 1, 16), (2, 3, 513)])
def test_matches_reference_exactly(tokens, top_k, hidden, dtype):
    x, addend = _inputs(tokens, top_k, hidden, dtype, device())
    for add in (None, addend):
        got = K.moe_sum(x, add)
        assert got.dtype == dtype and got.shape == (tokens, hidden)
        assert torch.equal(got, K.moe_sum_ref(x, add))


@pytest.mark.parametrize("dtype", DTYPES[1:])
def test_same_values_as_torch_sum_and_add(dtype):
    """torch's half/bf16 sum accumulates in float32 and rounds once; its add rounds the float32 sum
    of the two rounded operands: moe_sum gives the same bits (inputs whose float32 sums are exact)."""
    x, addend = _grid_inputs(4, 8, 300, dtype, device())
    assert torch.equal(K.moe_sum(x), x.sum(dim=1))
    assert torch.equal(K.moe_sum(x, addend), x.sum(dim=1) + addend)


def test_strided_inputs():
    """x as a view with a padded H stride and k-major layout; addend a column slice."""
    base = torch.randn(8, 3, 40, device=device())  # [k, T, H+8] storage
    x = base[:, :, :32].transpose(0, 1)  # [3, 8, 32], stride(1) > stride(0)
    wide = torch.randn(3, 50, device=device())
    addend = wide[:, 10:42]
    assert torch.equal(K.moe_sum(x, addend), K.moe_sum_ref(x.contiguous(), addend.contiguous()))


def test_empty_and_bad_inputs():
    assert K.moe_sum(torch.empty(0, 6, 32, device=device())).shape == (0, 32)
    zero_k = K.moe_sum(torch.empty(2, 0, 8, device=device()), torch.ones(2, 8, device=device()))
    assert torch.equal(zero_k, torch.ones(2, 8, device=device()))
    x = torch.randn(2, 3, 8, device=device())
    with pytest.raises(ValueError, match="addend"):
        K.moe_sum(x, torch.zeros(2, 8, dtype=torch.float16, device=device()))
    with pytest.raises(ValueError, match="addend"):
        K.moe_sum(x, torch.zeros(3, 8, device=device()))
    with pytest.raises(ValueError, match=r"\[T, k, H\]"):
        K.moe_sum(x[0])
    with pytest.raises(ValueError, match=r"\[T, k, H\]"):
        K.moe_sum(x.double())


# --- GPU, real shapes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("tokens,top_k,hidden", [(1, 8, 2048), (256, 8, 2048), (1, 9, 7168), (4096, 9, 7168)])
def test_gpu_real_shapes(tokens, top_k, hidden):
    """V2-Lite (top-6 + 2 shared) and V3 (top-8 + 1 shared) in bf16: the reference's bits, and
    torch's sum / sum + add."""
    x, addend = _inputs(tokens, top_k, hidden, torch.bfloat16, "cuda")
    for add in (None, addend):
        assert torch.equal(K.moe_sum(x, add), K.moe_sum_ref(x, add))
    x, addend = _grid_inputs(tokens, top_k, hidden, torch.bfloat16, "cuda")
    assert torch.equal(K.moe_sum(x), x.sum(dim=1))
    assert torch.equal(K.moe_sum(x, addend), x.sum(dim=1) + addend)
