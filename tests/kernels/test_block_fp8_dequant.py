"""Block-FP8 weight dequantisation kernel against its reference (same float32 products, one rounding)."""

import pytest
import torch

from deepserve.quant.block_fp8_ref import block_fp8_quantize_weight_ref
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("block_fp8_dequant")


def _check(shape, out_dtype, block=(128, 128)):
    q, scale = block_fp8_quantize_weight_ref(torch.randn(shape) * 0.02, block)
    out = K.block_fp8_dequant(q.to(device()), scale.to(device()), block, out_dtype)
    assert out.dtype == out_dtype and out.shape == shape
    assert torch.equal(out.cpu(), K.block_fp8_dequant_ref(q, scale, block, out_dtype))


@pytest.mark.parametrize("shape", [(80, 256), (192, 128), (256, 64), (130, 300), (3, 136, 200)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])  # bf16: GPU test (the interpreter
def test_matches_reference(shape, out_dtype):                              # truncates to bf16, not RNE)
    _check(shape, out_dtype)


def test_other_block_and_bad_inputs():
    _check((100, 96), torch.float16, block=(64, 32))
    q, scale = block_fp8_quantize_weight_ref(torch.randn(130, 130))
    with pytest.raises(ValueError):
        K.block_fp8_dequant(q.to(device()), scale[:1].to(device()))
    with pytest.raises(ValueError):
        K.block_fp8_dequant(q.float().to(device()), scale.to(device()))


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(1536, 7168), (576, 7168), (24576, 1536), (8, 4096, 7168), (8, 7168, 2048)])
def test_gpu_real_shapes(shape):
    q, scale = block_fp8_quantize_weight_ref(torch.randn(shape, device="cuda") * 0.02)
    out = K.block_fp8_dequant(q, scale, out_dtype=torch.bfloat16)
    assert torch.equal(out, K.block_fp8_dequant_ref(q, scale, out_dtype=torch.bfloat16))
