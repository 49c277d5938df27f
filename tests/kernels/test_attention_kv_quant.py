"""The two MHA/GQA backends over an 8-bit KV cache (int8 / fp8 with per-row scales).

`TritonAttention` (write kernel + paged decode/prefill kernels) against `Attention` (PyTorch:
quantise on write, dequantise on gather) over engine-like steps: chunked and fresh prefill, a mixed
batch, decode-only steps. The caches they write must be equal bit for bit (same quantiser) and the
outputs equal up to float32 rounding (the error against a float cache is bounded in
test_paged_decode_attention.py / test_paged_prefill_attention.py).
"""

import pytest
import torch

from deepserve.engine.kv_cache import allocate_kv_scales
from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.attention import Attention
from tests.kernels.kv_quant_cases import QUANT_DTYPES
from tests.kernels.paged_cases import shuffled_tables
from tests.kernels.test_attention_triton import backend

def _layers(kv_dtype, heads, kv_heads, head_dim, num_blocks, block_size, dev):
    """Triton and PyTorch backends over 8-bit caches whose unwritten rows have NaN scales."""
    layers = [backend.TritonAttention(heads, head_dim, kv_heads), Attention(heads, head_dim, kv_heads)]
    for layer in layers:
        layer.kv_cache = torch.zeros(2, num_blocks, block_size, kv_heads, head_dim, device=dev).to(kv_dtype)
        layer.kv_scales = allocate_kv_scales([layer.kv_cache])[0].fill_(float("nan"))
    return layers


def _run_steps(kv_dtype, heads, kv_heads, head_dim, block_size, dtype, dev, final_lens, steps, tol):
    tables, num_blocks = shuffled_tables(final_lens, block_size, torch.Generator().manual_seed(1))
    layers = _layers(kv_dtype, heads, kv_heads, head_dim, num_blocks, block_size, dev)
    done = [0] * len(final_lens)
    for q_lens in steps:
        seq_lens = [d + n for d, n in zip(done, q_lens)]
        ctx = build_forward_context(q_lens, seq_lens, tables, block_size, device=dev)
        qkv = torch.randn(sum(q_lens), heads + 2 * kv_heads, head_dim, device=dev).to(dtype)
        q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
        with forward_context(ctx):
            ours, ref = (layer(q, k, v) for layer in layers)
        assert not ours.isnan().any()
        torch.testing.assert_close(ours.float(), ref.float(), atol=tol, rtol=tol)
        done = seq_lens
    return layers


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_triton_and_torch_backends_agree_on_an_8bit_cache(kv_dtype):
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    steps = [[12, 7], [8, 1], [1, 1], [1, 1]]
    layers = _run_steps(kv_dtype, 4, 2, 16, 4, torch.float32, dev, [22, 10], steps, 1e-5)
    _assert_same_cache(*layers)


@pytest.mark.gpu
@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_gpu_backends_agree_on_an_8bit_cache_bf16(kv_dtype):
    """bf16 compute: the PyTorch backend rounds dequantised rows to bf16, the kernels do not."""
    steps = [[1024, 300, 1], [1000, 1, 1], [1, 1, 1], [1, 1, 1]]
    layers = _run_steps(kv_dtype, 28, 4, 128, 16, torch.bfloat16, "cuda", [2027, 303, 4], steps, 3e-2)
    _assert_same_cache(*layers)


def _assert_same_cache(triton_layer, torch_layer):
    assert torch.equal(triton_layer.kv_cache.view(torch.uint8), torch_layer.kv_cache.view(torch.uint8))
    assert torch.equal(triton_layer.kv_scales.isnan(), torch_layer.kv_scales.isnan())
    assert torch.equal(triton_layer.kv_scales.nan_to_num(), torch_layer.kv_scales.nan_to_num())
