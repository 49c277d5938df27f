"""KV-cache write kernel vs its PyTorch reference: exact, skips slot < 0, leaves other slots alone;
for an int8 / fp8 cache, bit for bit in data and scales, with the round trip's error bounded."""

import pytest
import torch

from deepserve.layers.kv_quant import QUANT_MAX, dequantize_kv, quantize_kv
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.kv_quant_cases import QUANT_DTYPES, round_trip_bound
from tests.kernels.triton36 import triton_3_6_semantics

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


# ------------------------------------------------------------------------------- 8-bit caches


def _bits(t):
    """Exact comparison key: the raw bytes (fp8 has no torch.equal on every build; NaN == NaN)."""
    return t.view(torch.uint8) if t.element_size() == 1 else t.view(torch.int32)


def _quant_case(num_tokens, kv_heads, head_dim, num_blocks, block_size, dtype, dev, pad_every=0, input_dtype=None):
    cache, k, v, slots = _case(num_tokens, kv_heads, head_dim, num_blocks, block_size, torch.float32, dev, pad_every)
    data = torch.full(cache.shape, 55, dtype=torch.int8, device=dev).view(dtype) if dtype == torch.int8 else \
        torch.full(cache.shape, float("nan"), device=dev).to(dtype)  # sentinel rows nobody writes
    scales = torch.full(cache.shape[:-1], float("nan"), device=dev)
    k, v = k * 3.0, v * 0.01  # rows of different magnitudes
    k[0, 0] = 0.0  # an all-zero row: scale 1e-8 / QMAX, q = 0
    v[-1, -1, :3] = -v[-1, -1, :3].abs() - 1.0  # a row whose amax is negative
    if input_dtype is not None:
        k, v = k.to(input_dtype), v.to(input_dtype)
    return data, scales, k, v, slots


def _check_quantized(data, scales, k, v, slots):
    want_data, want_scales = data.clone(), scales.clone()
    kvw.kv_cache_write_ref(want_data, k, v, slots, want_scales)
    kvw.kv_cache_write(data, k, v, slots, scales)
    assert torch.equal(_bits(data), _bits(want_data))  # bit for bit, untouched rows keep their sentinel
    assert torch.equal(_bits(scales), _bits(want_scales))


def test_round_trip_error_is_bounded_and_the_grid_is_used():
    """quantize_kv: each row's amax lands on +-QMAX, and |x - q s| stays within the derived bound."""
    x = torch.randn(64, 4, 128) * torch.logspace(-3, 2, 64)[:, None, None]  # 5 decades of row scales
    x[0, 0] = 0.0
    x[1, 1, 7] = 300.0  # an outlier element
    for dtype in QUANT_DTYPES:
        q, s = quantize_kv(x, dtype)
        assert q.dtype == dtype and s.shape == x.shape[:-1] and s.dtype == torch.float32
        err = (x - dequantize_kv(q, s, torch.float32)).abs()
        assert (err <= round_trip_bound(x, s, dtype)).all()
        assert torch.equal(q[0, 0].float(), torch.zeros(128))
        assert (q.float().abs().amax(-1)[1:] == QUANT_MAX[dtype]).all()
        # the bounds are nearly attained: half a grid step s (int8), 2^-4 relative (fp8, normal range)
        normal = x.abs() >= s[..., None] * 2.0 ** -6
        worst = (err / s[..., None]).amax() if dtype == torch.int8 else (err / x.abs())[normal].amax()
        assert worst > 0.9 * (0.5 if dtype == torch.int8 else 2.0 ** -4), worst


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_quantized_write_matches_reference_bit_for_bit(dtype):
    _check_quantized(*_quant_case(11, 2, 16, 4, 4, dtype, device(), pad_every=4))
    _check_quantized(*_quant_case(5, 3, 24, 3, 4, dtype, device()))  # heads, dim not powers of two
    _check_quantized(*_quant_case(6, 2, 32, 3, 4, dtype, device(), input_dtype=torch.float16))


@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_quantized_write_under_triton_3_6_semantics(dtype, monkeypatch):
    """3.6 negates as 0 - x: the e4m3 rounding must keep signs (and -0.0) by bit operations."""
    triton_3_6_semantics(monkeypatch)
    data, scales, k, v, slots = _quant_case(8, 2, 16, 4, 4, dtype, device())
    k[1, 0, :4] = torch.tensor([-0.0, -1e-9, -2.0, 2.0])  # rounds to -0.0 / negative grid points
    _check_quantized(data, scales, k, v, slots)


def test_quantized_write_rejects_missing_or_wrong_scales():
    data, scales, k, v, slots = _quant_case(3, 2, 16, 2, 4, torch.int8, device())
    with pytest.raises(ValueError, match="needs contiguous float32 kv_scales"):
        kvw.kv_cache_write(data, k, v, slots)
    with pytest.raises(ValueError, match="needs contiguous float32 kv_scales"):
        kvw.kv_cache_write(data, k, v, slots, scales[:, :, :, :1])
    with pytest.raises(ValueError, match="takes no kv_scales"):
        kvw.kv_cache_write(torch.zeros(data.shape, device=device()), k, v, slots, scales)


@pytest.mark.gpu
@pytest.mark.parametrize("num_tokens", [1, 256, 8192])
@pytest.mark.parametrize("dtype", QUANT_DTYPES)
def test_gpu_qwen7b_shapes_quantized(num_tokens, dtype):
    _check_quantized(*_quant_case(num_tokens, 4, 128, 1024, 16, dtype, "cuda", pad_every=7,
                                  input_dtype=torch.bfloat16))
