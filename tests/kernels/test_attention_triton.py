"""`TritonAttention` (Triton kernels) vs `Attention` (PyTorch) over several engine-like steps.

Step 1: a chunked prefill and a fresh prefill; step 2: the rest of the chunk plus a decode row
(mixed batch -> prefill kernel); steps 3-4: decode-only (-> split-K decode kernel).
"""

import pytest
import torch

from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.attention import Attention
from tests.kernels.interpret import device
from tests.kernels.paged_cases import shuffled_tables, triton_attention_module


backend = triton_attention_module()


def _layers(heads, kv_heads, head_dim, num_blocks, block_size, dtype, dev):
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=dtype, device=dev)
    ours, ref = backend.TritonAttention(heads, head_dim, kv_heads), Attention(heads, head_dim, kv_heads)
    ours.kv_cache, ref.kv_cache = cache, cache.clone()
    return ours, ref


def _step(layers, q_lens, done, tables, block_size, heads, kv_heads, head_dim, dtype, dev):
    seq_lens = [d + n for d, n in zip(done, q_lens)]
    ctx = build_forward_context(q_lens, seq_lens, tables, block_size, device=dev)
    t = sum(q_lens)
    qkv = torch.randn(t, heads + 2 * kv_heads, head_dim, device=dev).to(dtype)  # fused projection
    q, k, v = qkv.split([heads, kv_heads, kv_heads], dim=1)
    with forward_context(ctx):
        return [layer(q, k, v) for layer in layers]


def _run_steps(heads, kv_heads, head_dim, block_size, dtype, dev, final_lens, steps):
    tables, num_blocks = shuffled_tables(final_lens, block_size, torch.Generator().manual_seed(1))
    ours, ref = _layers(heads, kv_heads, head_dim, num_blocks, block_size, dtype, dev)
    done = [0] * len(final_lens)
    for q_lens in steps:
        got, want = _step([ours, ref], q_lens, done, tables, block_size, heads, kv_heads, head_dim, dtype, dev)
        yield got, want
        done = [d + n for d, n in zip(done, q_lens)]
    assert torch.equal(ours.kv_cache.isnan(), ref.kv_cache.isnan())


def test_tiny_steps_match_torch_backend():
    steps = [[12, 7], [8, 1], [1, 1], [1, 1]]
    for got, want in _run_steps(4, 2, 16, 4, torch.float32, device(), [22, 10], steps):
        assert not got.isnan().any()
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_backend_selection():
    from deepserve.layers.attention import attention_backend_cls

    assert attention_backend_cls("cuda").__name__ == "TritonAttention"
    assert attention_backend_cls("cpu") is Attention


@pytest.mark.gpu
def test_gpu_steps_match_torch_backend_bf16():
    steps = [[1024, 300, 1], [1000, 1, 1], [1, 1, 1], [1, 1, 1]]
    for got, want in _run_steps(28, 4, 128, 16, torch.bfloat16, "cuda", [2027, 303, 4], steps):
        torch.testing.assert_close(got.float(), want.float(), atol=3e-2, rtol=3e-2)
