"""The MLA latent cache in 8 bits (`--kv-cache-dtype int8|fp8`): the absorbed decode kernel over an
int8 / float8_e4m3fn cache with one float32 scale per row [latent | rope].

  * vs the reference over the dequantised cache (the same math, only fp32 rounding order differs: tight);
  * vs the float cache, within a bound derived from the stored rows' actual quantisation error:
    per head h, with dx = x - x' (x' = q * s, the dequantised row),
        |d score[h, s]| <= scale * sum_d |q[h, d]| |dx[s, d]| =: delta[h]  (max over keys s)
        |d o[h]|        <= max_s |d latent[s]|  +  (exp(2 delta[h]) - 1) * max_s |latent'[s]|
    (values: a convex combination moves by at most the largest value error; probabilities: scores
    moved by at most delta change the softmax by at most exp(2 delta) - 1 in L1).
CPU: the Triton interpreter at tiny shapes (fp32 / fp16 queries). GPU: V2-Lite shapes, bf16 queries.
"""

from __future__ import annotations

import pytest
import torch

from deepserve.layers.kv_quant import dequantize_kv, quantize_kv
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.mla_cases import make_latent_case
from tests.kernels.paged_cases import long_context_lens

mla = load_kernel_module("mla_decode_attention")

CACHE_DTYPES = [torch.int8, torch.float8_e4m3fn]


def quantized_latent_case(lengths, rank, rope_dim, block_size, cache_dtype, dev, rope_gain=4.0):
    """(float cache [N, bs, R + Dr] f32, its 8-bit copy, scales [N, bs] f32, block_tables, seq_lens). Slots no
    sequence owns stay NaN in the float cache and get NaN scales in the 8-bit one (a stray read poisons)."""
    cache, tables, lens = make_latent_case(lengths, rank, rope_dim, block_size, torch.float32, "cpu")
    cache[..., rank:] *= rope_gain  # the rope key's larger range sets the rows' scales
    q, scales = quantize_kv(cache, cache_dtype)  # NaN rows: NaN scale
    return cache.to(dev), q.to(dev), scales.to(dev), tables.to(dev), lens.to(dev)


def _queries(batch, heads, rank, rope_dim, dtype, dev, seed=1):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, rank + rope_dim, generator=gen).to(dev, dtype)
    return q[..., :rank], q[..., rank:]  # strided views, as mla.py passes them


def derived_bound(q_lat, q_rope, cache, q_cache, scales, tables, lens, scale):
    """[B, H] the bound of the module docstring on |o(8-bit cache) - o(float cache)| per head."""
    rank, block_size = q_lat.shape[-1], cache.shape[1]
    deq = dequantize_kv(q_cache, scales, torch.float32)
    q_abs = torch.cat([q_lat, q_rope], dim=-1).float().abs()  # [B, H, R + Dr]
    bound = torch.zeros(q_lat.shape[:2], device=q_lat.device)
    for b, n in enumerate(lens.tolist()):
        blocks = tables[b, : (n + block_size - 1) // block_size].long()
        x, x8 = cache[blocks].flatten(0, 1)[:n], deq[blocks].flatten(0, 1)[:n]  # [S, R + Dr]
        dx = (x - x8).abs()
        delta = scale * (q_abs[b] @ dx.T).amax(dim=-1)  # [H]
        bound[b] = dx[:, :rank].amax() + torch.expm1(2 * delta) * x8[:, :rank].abs().amax()
    return bound


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("num_splits", [1, 3])
def test_8bit_cache_matches_dequantised_reference_fp32(cache_dtype, num_splits):
    cache, q_cache, scales, tables, lens = quantized_latent_case([1, 15, 16, 17, 40], 32, 8, 16, cache_dtype, device())
    q_lat, q_rope = _queries(5, 4, 32, 8, torch.float32, device())
    out = mla.mla_decode_attention(q_lat, q_rope, q_cache, tables, lens, 0.3, num_splits=num_splits, block_n=16,
                                   kv_scales=scales)
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, q_cache, tables, lens, 0.3, kv_scales=scales)
    assert out.shape == (5, 4, 32) and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    float_out = mla.mla_decode_attention_ref(q_lat, q_rope, cache, tables, lens, 0.3)
    err = (out - float_out).abs().amax(dim=-1)  # [B, H]
    bound = derived_bound(q_lat, q_rope, cache, q_cache, scales, tables, lens, 0.3)
    assert (err <= bound).all(), (err, bound)
    assert err.amax() > 0  # the 8-bit cache did change something


def test_8bit_cache_fp16_queries_two_head_tiles_block_8():
    cache, q_cache, scales, tables, lens = quantized_latent_case([3, 9, 33], 32, 16, 8, torch.int8, device())
    q_lat, q_rope = _queries(3, 20, 32, 16, torch.float16, device())
    out = mla.mla_decode_attention(q_lat, q_rope, q_cache, tables, lens, 0.3, block_n=16, kv_scales=scales)
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, q_cache, tables, lens, 0.3, kv_scales=scales)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)  # the fp16 kernel test's tolerance


def test_8bit_cache_zero_length_rows_give_zeros():
    _, q_cache, scales, tables, lens = quantized_latent_case([5, 20], 32, 8, 16, torch.int8, device())
    lens[0] = 0
    q_lat, q_rope = _queries(2, 4, 32, 8, torch.float32, device())
    for splits in (1, 2):
        out = mla.mla_decode_attention(q_lat, q_rope, q_cache, tables, lens, 0.3, num_splits=splits, block_n=16,
                                       kv_scales=scales)
        assert torch.equal(out[0], torch.zeros_like(out[0])) and not out.isnan().any()


def test_8bit_cache_rejects_missing_scales():
    _, q_cache, scales, tables, lens = quantized_latent_case([3], 32, 8, 16, torch.int8, device())
    q_lat, q_rope = _queries(1, 4, 32, 8, torch.float32, device())
    with pytest.raises(ValueError, match="kv_scales"):
        mla.mla_decode_attention(q_lat, q_rope, q_cache, tables, lens, 0.3)
    with pytest.raises(ValueError, match="kv_scales"):
        mla.mla_decode_attention(q_lat, q_rope, q_cache.float(), tables, lens, 0.3, kv_scales=scales)


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_gpu_v2_lite_shapes_8bit(cache_dtype, batch):
    lens = long_context_lens(batch)
    cache, q_cache, scales, tables, lens_t = quantized_latent_case(lens, 512, 64, 16, cache_dtype, "cuda")
    q_lat, q_rope = _queries(batch, 16, 512, 64, torch.bfloat16, "cuda")
    scale = 192 ** -0.5
    out = mla.mla_decode_attention(q_lat, q_rope, q_cache, tables, lens_t, scale, kv_scales=scales)
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, q_cache, tables, lens_t, scale, kv_scales=scales)
    torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)  # the bf16 kernel test's tolerance
    float_out = mla.mla_decode_attention_ref(q_lat.float(), q_rope.float(), cache, tables, lens_t, scale)
    bound = derived_bound(q_lat, q_rope, cache, q_cache, scales, tables, lens_t, scale)
    assert ((out.float() - float_out).abs().amax(dim=-1) <= bound + 2e-2).all()  # + the bf16 output rounding


# ------------------------------------------------------------------ MLAAttention over an 8-bit cache

def _layer_runs(layer, lengths, query_lens, routes, cache_dtype, block_size=16, seed=3):
    """layer(...) once per route (Triton on/off, mode) from the same 8-bit cache (NaN scales outside the
    sequences); returns [(output, cache after, scales after)]."""
    from deepserve.forward_context import build_forward_context, forward_context

    _, q_cache, scales, tables, _ = quantized_latent_case(lengths, layer.kv_lora_rank, layer.rope_dim, block_size,
                                                          cache_dtype, "cpu", rope_gain=1.0)
    ctx = build_forward_context(query_lens, lengths, [[b for b in row if b] for row in tables.tolist()], block_size,
                                device="cpu")
    x = torch.randn(sum(query_lens), layer.o_proj.weight.shape[0], generator=torch.Generator().manual_seed(seed))
    runs = []
    for on_triton, mode in routes:
        layer.kv_cache, layer.kv_scales = q_cache.clone(), scales.clone()
        layer.attention_mode = mode
        layer._on_triton = lambda t, flag=on_triton: flag  # Triton (interpreted on CPU) or PyTorch
        with forward_context(ctx), torch.no_grad():
            runs.append((layer(ctx.positions, x), layer.kv_cache, layer.kv_scales))
    return runs


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
def test_layer_decode_routes_agree_over_an_8bit_cache(cache_dtype):
    """Decode batch: Triton writer + decode kernel, the batched PyTorch absorb path and the per-sequence naive
    loop read the same dequantised rows; both writers store the same bytes and scales."""
    from tests.kernels.mla_cases import mla_layer

    lens = [1, 15, 16, 17, 40]
    runs = _layer_runs(mla_layer("absorb"), lens, [1] * len(lens),
                       [(True, "absorb"), (False, "auto"), (False, "naive")], cache_dtype)
    (triton_out, tc, ts), (torch_out, pc, ps), (naive, _, _) = runs
    assert not triton_out.isnan().any()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch_out, naive, atol=1e-5, rtol=1e-5)
    assert torch.equal(tc.view(torch.int8), pc.view(torch.int8)) and torch.equal(ts.nan_to_num(-1), ps.nan_to_num(-1))


def test_layer_mixed_batch_over_an_8bit_cache():
    """A prefill + decode batch: the Triton route (writer, decode kernel for the decode rows, gathered and
    dequantised context rows for the prefill kernel) equals the PyTorch per-sequence loop."""
    from tests.kernels.mla_cases import mla_layer

    (triton_out, _, _), (torch_out, _, _) = _layer_runs(mla_layer("auto"), [20, 9, 33], [5, 1, 33],
                                                        [(True, "auto"), (False, "auto")], torch.int8)
    assert not triton_out.isnan().any()
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)
