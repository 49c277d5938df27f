"""Block-scaled FP8 GEMM kernel against its reference.

Both are compared with the exact value sum_kb (q_a . q_w)[kb] * a_scale[kb] * w_scale[kb], computed
in float64 (fp8 products and 128-term sums of them are exact there). The kernel rounds in float32 at
most 127 times inside a block's dot, twice for the two scales and once accumulating, per block; the
reference rounds each dequantised operand once and K - 1 times in its matmul. So both stay within
(K + 3 * ceil(K / 128)) * 2^-24 * sum_k |a_k w_k| of it (the standard float32 summation bound).
On the GPU the tensor cores add the fp8 products of one 128-deep block with reduced precision (~14
bits kept, DeepSeek-V3 report sec. 3.3.2) before the scaled float32 accumulation; that test allows
2^-10 of sum_k |a_k w_k| for it, plus half a bf16 ulp of the output.
"""

import pytest
import torch

from deepserve.quant.block_fp8_ref import (block_fp8_dequant_ref, block_fp8_quant_ref,
                                           block_fp8_quantize_weight_ref, expand_group_scales)
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("block_fp8_gemm")


def _operands(m, n, k, block=(128, 128), dev="cpu"):
    x = torch.randn(m, k, device=dev) * 2
    w = torch.randn(n, k, device=dev) * torch.rand(n, 1, device=dev) * 0.05
    a_q, a_s = block_fp8_quant_ref(x, block[1])
    w_q, w_s = block_fp8_quantize_weight_ref(w, block)
    return a_q, a_s, w_q, w_s


def _exact(a_q, a_s, w_q, w_s, block):
    """The exact result in float64: [M, N]."""
    (m, k), n, bk = a_q.shape, w_q.shape[0], block[1]
    w_s_rows = w_s.double().repeat_interleave(block[0], 0)[:n]  # [N, Kb]
    out = torch.zeros(m, n, dtype=torch.float64, device=a_q.device)
    for kb in range(-(-k // bk)):
        cols = slice(kb * bk, (kb + 1) * bk)
        dot = a_q[:, cols].double() @ w_q[:, cols].double().t()  # [M, N], exact
        out += dot * a_s[:, kb].double()[:, None] * w_s_rows[:, kb][None, :]
    return out


GPU_REL = 2.0 ** -10  # tensor-core accumulation within a 128-deep block (module docstring)


def _bound(ops, block):
    """The float32 summation bound in the interpreter; the GPU's reduced-precision fp8 MMA bound
    where the kernel runs on CUDA (these tests also run there, at their small shapes)."""
    k = ops[0].shape[1]
    rel = GPU_REL if device().type == "cuda" else (k + 3 * -(-k // block[1])) * 2.0 ** -24
    return rel * _abs_sum(*ops, block)


def _abs_sum(a_q, a_s, w_q, w_s, block):
    """sum_k |a_k w_k| per output: [M, N] f64."""
    a = (a_q.double() * expand_group_scales(a_s, a_q.shape[1], block[1]).double()).abs()
    return a @ block_fp8_dequant_ref(w_q, w_s, block).double().abs().t()


@pytest.mark.parametrize("m,n,k", [(1, 80, 256), (3, 192, 128), (16, 64, 200), (33, 256, 384),
                                   (70, 130, 256), (5, 576, 128)])
def test_matches_reference(m, n, k):
    block = (128, 128)
    ops = _operands(m, n, k, block)
    out = K.block_fp8_gemm(*(t.to(device()) for t in ops), block, out_dtype=torch.float32).cpu()
    exact, bound = _exact(*ops, block), _bound(ops, block)
    assert ((out.double() - exact).abs() <= bound).all()
    ref_bound = (k + 3 * -(-k // 128)) * 2.0 ** -24 * _abs_sum(*ops, block)  # the reference: f32 on CPU
    assert ((K.block_fp8_gemm_ref(*ops, block, out_dtype=torch.float32).double() - exact).abs() <= ref_bound).all()


@pytest.mark.parametrize("config", [K.GemmConfig(16, 32, 4, 1), K.GemmConfig(32, 64, 4, 1, 1),
                                    K.GemmConfig(64, 16, 4, 1, 2)])
def test_tile_configs_and_other_block(config):
    block = (64, 128)  # a weight scale per 64 rows: BLOCK_N 32 / 16 split a scale block, 64 spans one
    ops = _operands(40, 150, 300, block)
    out = K.block_fp8_gemm(*(t.to(device()) for t in ops), block, torch.float32, config).cpu()
    assert ((out.double() - _exact(*ops, block)).abs() <= _bound(ops, block)).all()


def test_out_dtype_empty_and_bad_inputs():
    ops = [t.to(device()) for t in _operands(4, 64, 128)]
    assert K.block_fp8_gemm(*ops, out_dtype=torch.float16).dtype == torch.float16
    empty = _operands(0, 64, 128)
    assert K.block_fp8_gemm(*(t.to(device()) for t in empty)).shape == (0, 64)
    a_q, a_s, w_q, w_s = ops
    with pytest.raises(TypeError):
        K.block_fp8_gemm(a_q.float(), a_s, w_q, w_s)
    with pytest.raises(ValueError):
        K.block_fp8_gemm(a_q, a_s, w_q, w_s[:, :0])
    with pytest.raises(ValueError):
        K.block_fp8_gemm(a_q, a_s, w_q[:, :64], w_s)


# V3 linears (N, K): q_a 1536x7168, kv_a 576x7168 (a partial N block), q_b 24576x1536 (128 heads x
# 192), an expert's gate|up 4096x7168 and down 7168x2048, o_proj 7168x16384.
V3_SHAPES = [(1536, 7168), (576, 7168), (24576, 1536), (4096, 7168), (7168, 2048), (7168, 16384)]


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 32, 512])
@pytest.mark.parametrize("n,k", V3_SHAPES)
def test_gpu_real_shapes(m, n, k):
    block = (128, 128)
    ops = _operands(m, n, k, block, dev="cuda")
    ref = _exact(*ops, block)
    abs_sum = _abs_sum(*ops, block)
    out32 = K.block_fp8_gemm(*ops, block, out_dtype=torch.float32)
    assert ((out32.double() - ref).abs() <= GPU_REL * abs_sum).all()
    out = K.block_fp8_gemm(*ops, block, out_dtype=torch.bfloat16)
    assert ((out.double() - ref).abs() <= GPU_REL * abs_sum + 2.0 ** -9 * ref.abs()).all()
