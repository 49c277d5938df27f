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


# --- 8-bit cache (--kv-cache-dtype int8 | fp8): one float32 scale per row [latent | rope] ---

def _quant_case(num_tokens, rank, rope_dim, num_blocks, block_size, cache_dtype, dev, pad_every=0, seed=0):
    gen = torch.Generator().manual_seed(seed)
    cache = torch.zeros(num_blocks, block_size, rank + rope_dim, dtype=torch.float32).to(dev, cache_dtype)
    scales = torch.full((num_blocks, block_size), -1.0, device=dev)  # -1: a slot nobody wrote
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:num_tokens].to(dev)
    if pad_every:
        slots[::pad_every] = -1
    entries = torch.randn(num_tokens, rank + 3 + rope_dim, generator=gen).to(dev)
    entries[:, rank + 3:] *= 8.0  # the rope key's larger range: it sets the row's scale
    entries[1] = 0.0  # an all-zero row: scale 1e-8 / QMAX, zeros stored
    return cache, scales, entries[:, :rank], entries[:, rank + 3:], slots


def _check_quant_against_ref(cache, scales, latent, rope, slots):
    expected, expected_scales = cache.clone(), scales.clone()
    mcw.mla_cache_write_ref(expected, latent, rope, slots, expected_scales)
    mcw.mla_cache_write(cache, latent, rope, slots, scales)
    assert torch.equal(cache.view(torch.int8), expected.view(torch.int8))  # bit for bit (fp8 compared as bytes)
    assert torch.equal(scales, expected_scales)


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("src_dtype", [torch.float32, torch.bfloat16])
def test_8bit_cache_matches_reference_bit_for_bit(cache_dtype, src_dtype):
    cache, scales, latent, rope, slots = _quant_case(11, 32, 8, 4, 4, cache_dtype, device(), pad_every=4)
    _check_quant_against_ref(cache, scales, latent.to(src_dtype), rope.to(src_dtype), slots)
    assert (scales.view(-1)[slots[slots >= 0]] > 0).all() and (scales == -1.0).sum() == 16 - 8  # others untouched


def test_8bit_cache_dims_not_powers_of_two():
    _check_quant_against_ref(*_quant_case(5, 24, 6, 3, 4, torch.int8, device()))


@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_8bit_reference_is_the_per_token_quantiser_on_the_whole_row(cache_dtype):
    from deepserve.quant.fp8 import quantize_per_token_fp8_ref
    from deepserve.quant.int8 import quantize_per_token_ref

    cache, scales, latent, rope, slots = _quant_case(6, 16, 8, 2, 4, cache_dtype, "cpu")
    mcw.mla_cache_write_ref(cache, latent, rope, slots, scales)
    quant = quantize_per_token_ref if cache_dtype == torch.int8 else quantize_per_token_fp8_ref
    q, s = quant(torch.cat([latent, rope], dim=-1))
    assert torch.equal(cache.view(-1, 24)[slots].view(torch.int8), q.view(torch.int8))
    assert torch.equal(scales.view(-1)[slots], s)


def test_8bit_cache_rejects_missing_or_bad_scales():
    cache, scales, latent, rope, slots = _quant_case(3, 16, 8, 2, 4, torch.int8, device())
    with pytest.raises(ValueError, match="needs contiguous float32 kv_scales"):
        mcw.mla_cache_write(cache, latent, rope, slots)
    with pytest.raises(ValueError, match="needs contiguous float32 kv_scales"):
        mcw.mla_cache_write(cache, latent, rope, slots, scales[:, :2])
    with pytest.raises(ValueError, match="takes no kv_scales"):
        mcw.mla_cache_write(cache.float(), latent, rope, slots, scales)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.int8, torch.float8_e4m3fn])
def test_gpu_deepseek_shapes_8bit(cache_dtype):
    cache, scales, latent, rope, slots = _quant_case(300, 512, 64, 64, 16, cache_dtype, "cuda", pad_every=7)
    _check_quant_against_ref(cache, scales, latent.bfloat16(), rope.bfloat16(), slots)
