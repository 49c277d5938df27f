"""KV-cache write kernel vs its PyTorch reference: exact, skips slot < 0, leaves other slots alone."""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

kvw = load_kernel_module("kv_cache_write")


def _case(num_tokens, kv_heads, head_dim, num_blocks, block_size, cache_dtype, dev, pad_every=0):
    cache = torch.full((2, num_blocks, block_size, kv_heads, head_dim), float("nan"), dtype=cache_dtype, device=dev)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(dev)
    if pad_every:
        slots[::pad_every] = -1
    fused = torch.randn(num_tokens, 3 * kv_heads, head_dim, device=dev)  # k, v as views of one projection
    return cache, fused[:, kv_heads: 2 * kv_heads], fused[:, 2 * kv_heads:], slots


def _check_against_ref(cache, k, v, slots):
    expected = cache.clone()
    kvw.kv_cache_write_ref(expected, k, v, slots)
    kvw.kv_cache_write(cache, k, v, slots)
    assert torch.equal(cache.isnan(), expected.isnan())  # untouched slots keep their NaN
    assert torch.equal(cache.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_tiny_strided_inputs_with_padding(cache_dtype):
    _check_against_ref(*_case(11, 2, 16, 4, 4, cache_dtype, device(), pad_every=4))


def test_tiny_heads_and_dim_not_powers_of_two():
    _check_against_ref(*_case(5, 3, 24, 3, 4, torch.float32, device()))


def test_all_padding_and_empty():
    cache, k, v, slots = _case(3, 1, 16, 2, 4, torch.float32, device())
    slots.fill_(-1)
    kvw.kv_cache_write(cache, k, v, slots)
    assert cache.isnan().all()
    kvw.kv_cache_write(cache, k[:0], v[:0], slots[:0])


def test_rejects_shape_mismatch():
    cache, k, v, slots = _case(3, 2, 16, 2, 4, torch.float32, device())
    with pytest.raises(ValueError, match="k must be"):
        kvw.kv_cache_write(cache, k[:, :1], v, slots)
    with pytest.raises(ValueError, match="disagree"):
        kvw.kv_cache_write(cache, k, v, slots[:2])


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
@pytest.mark.parametrize("input_dtype", [torch.bfloat16, torch.float32])
def test_gpu_qwen7b_shapes_bf16(num_tokens, input_dtype):
    cache, k, v, slots = _case(num_tokens, 4, 128, 1024, 16, torch.bfloat16, "cuda", pad_every=7)
    if input_dtype == torch.bfloat16:
        k, v = k.bfloat16(), v.bfloat16()
    _check_against_ref(cache, k, v, slots)
