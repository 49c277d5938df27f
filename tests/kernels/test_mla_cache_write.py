"""MLA latent-cache write kernel vs its PyTorch reference: exact, skips slot < 0, leaves other slots alone."""

import pytest
import torch

from tests.kernels.interpret import device, load_kernel_module

mcw = load_kernel_module("mla_cache_write")


def _case(num_tokens, rank, rope_dim, num_blocks, block_size, cache_dtype, dev, pad_every=0):
    cache = torch.full((num_blocks, block_size, rank + rope_dim), float("nan"), dtype=cache_dtype, device=dev)
    slots = torch.randperm(num_blocks * block_size)[:num_tokens].to(dev)
    if pad_every:
        slots[::pad_every] = -1
    entries = torch.randn(num_tokens, rank + 3 + rope_dim, device=dev)  # strided views of one tensor
    return cache, entries[:, :rank], entries[:, rank + 3:], slots


def _check_against_ref(cache, latent, rope, slots):
    expected = cache.clone()
    mcw.mla_cache_write_ref(expected, latent, rope, slots)
    mcw.mla_cache_write(cache, latent, rope, slots)
    assert torch.equal(cache.isnan(), expected.isnan())  # untouched slots keep their NaN
    assert torch.equal(cache.nan_to_num(0.0), expected.nan_to_num(0.0))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.float16])
def test_tiny_strided_inputs_with_padding(cache_dtype):
    _check_against_ref(*_case(11, 32, 8, 4, 4, cache_dtype, device(), pad_every=4))


def test_tiny_dims_not_powers_of_two():
    _check_against_ref(*_case(5, 24, 6, 3, 4, torch.float32, device()))


def test_all_padding_and_empty():
    cache, latent, rope, slots = _case(3, 16, 8, 2, 4, torch.float32, device())
    slots.fill_(-1)
    mcw.mla_cache_write(cache, latent, rope, slots)
    assert cache.isnan().all()
    mcw.mla_cache_write(cache, latent[:0], rope[:0], slots[:0])


def test_rejects_bad_inputs():
    cache, latent, rope, slots = _case(3, 16, 8, 2, 4, torch.float32, device())
    with pytest.raises(ValueError, match="R \\+ Dr"):
        mcw.mla_cache_write(cache, latent, rope[:, :4], slots)
    with pytest.raises(ValueError, match="int64 or int32"):
        mcw.mla_cache_write(cache, latent, rope, slots.float())


@pytest.mark.gpu
def test_gpu_deepseek_shapes_bf16():
    _check_against_ref(*_case(300, 512, 64, 64, 16, torch.bfloat16, "cuda", pad_every=7))
