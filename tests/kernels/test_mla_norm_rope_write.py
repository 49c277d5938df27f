"""The fused MLA norm + rope + cache-write kernel against the three kernels it replaces (bit for bit: q_pe
rotated, cache bytes, scales) and against the composed PyTorch references (close); slots < 0 leave their rows
alone; kv and q_pe are strided views of one projection output, as the layer passes them."""

from __future__ import annotations

from typing import NamedTuple

import pytest
import torch

from deepserve.layers.rotary import RotaryEmbedding
from tests.kernels.fused_write_cases import (OTHER_CACHE_DTYPES, TOL, check_8bit_rows_close,
                                             check_all_slots_negative_and_no_tokens, check_rejects, filled_cache,
                                             graph_replay, int32_indices, outputs, shuffled_slots, written_mask)
from tests.kernels.interpret import device, load_kernel_module

M = load_kernel_module("mla_norm_rope_write")
NORM = load_kernel_module("rms_norm")
ROPE = load_kernel_module("rotary")
WRITE = load_kernel_module("mla_cache_write")
EPS = 1e-6
EIGHT_BIT = (torch.int8, torch.float8_e4m3fn)


class Case(NamedTuple):
    kv: torch.Tensor  # [T, R + Dr] strided view
    weight: torch.Tensor  # [R]
    q_pe: torch.Tensor  # [T, h, Dr] strided view
    positions: torch.Tensor  # [T] int64
    cos: torch.Tensor  # [P, Dr / 2] f32
    sin: torch.Tensor
    interleaved: bool
    cache: torch.Tensor  # [N, bs, R + Dr]: NaN (float) or random bytes (8-bit) in every slot
    slots: torch.Tensor  # [T] int64, some -1
    scales: torch.Tensor | None  # [N, bs] f32, -1 everywhere (8-bit caches)


def make_case(tokens, rank, rope_dim, heads, dtype, cache_dtype, interleaved, dev, nope_dim=8, block_size=4,
              max_pos=64, weight_dtype=None, pad_every=3, seed=0) -> Case:
    """One projection output [T, 5 + h (Dn + Dr) + R + Dr + 3] holds q [T, h, Dn + Dr] and kv: both strided."""
    gen = torch.Generator().manual_seed(seed)
    q_width = heads * (nope_dim + rope_dim)
    proj = torch.randn(tokens, 5 + q_width + rank + rope_dim + 3, generator=gen)
    proj[:, 5 + q_width + rank:] *= 4.0  # the rope key's larger range (it sets an 8-bit row's scale)
    proj = proj.to(dev, dtype)
    q_pe = proj[:, 5:5 + q_width].view(tokens, heads, nope_dim + rope_dim)[..., nope_dim:]  # [T, h, Dr]
    kv = proj[:, 5 + q_width:5 + q_width + rank + rope_dim]  # [T, R + Dr]
    weight = (torch.rand(rank, generator=gen) + 0.5).to(dev, weight_dtype or dtype)
    rope = RotaryEmbedding(rope_dim, max_pos, 10000.0, interleaved=interleaved)
    num_blocks, slots = shuffled_slots(tokens, block_size, pad_every, gen)
    cache, scales = filled_cache((num_blocks, block_size, rank + rope_dim), cache_dtype, dev, gen)
    positions = torch.randint(0, max_pos, (tokens,), generator=gen)
    return Case(kv, weight, q_pe, positions.to(dev), rope.cos.to(dev), rope.sin.to(dev), interleaved, cache,
                slots.to(dev), scales)


def fused(c: Case) -> torch.Tensor:
    return M.mla_norm_rope_write(c.kv, c.weight, EPS, c.q_pe, c.positions, c.cos, c.sin, c.interleaved, c.cache,
                                 c.slots, c.scales)


def reference(c: Case) -> torch.Tensor:
    return M.mla_norm_rope_write_ref(c.kv, c.weight, EPS, c.q_pe, c.positions, c.cos, c.sin, c.interleaved,
                                     c.cache, c.slots, c.scales)


def unfused(c: Case) -> torch.Tensor:
    """The three launches MLAAttention made before: rms_norm, one rotary over q_pe and k_pe, mla_cache_write."""
    rank = c.weight.shape[0]
    latent = NORM.rms_norm(c.kv[:, :rank], None, c.weight, EPS).out
    q, k = ROPE.rotary_embedding(c.positions, c.q_pe, c.kv[:, rank:].unsqueeze(1), c.cos, c.sin, c.interleaved)
    scaled = {} if c.scales is None else {"kv_scales": c.scales}
    WRITE.mla_cache_write(c.cache, latent, k.squeeze(1), c.slots, **scaled)
    return q


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)  # NaN patterns and fp8 compared bit for bit


def _dequantised(cache: torch.Tensor, scales: torch.Tensor | None) -> torch.Tensor:
    return cache.float() if scales is None else cache.float() * scales[..., None]


def check_case(case: Case) -> None:
    got_q, got_cache, got_scales = outputs(case, fused)
    want_q, want_cache, want_scales = outputs(case, unfused)
    assert got_q.is_contiguous() and got_q.dtype == case.q_pe.dtype and got_q.shape == case.q_pe.shape
    assert torch.equal(_bytes(got_q), _bytes(want_q))
    assert torch.equal(_bytes(got_cache), _bytes(want_cache))
    assert (got_scales is None) or torch.equal(got_scales, want_scales)
    written = written_mask(case.slots, case.cache.shape[:2])  # [N, bs]
    assert torch.equal(_bytes(got_cache[~written]), _bytes(case.cache[~written]))  # slot < 0 / unowned: untouched
    assert not _dequantised(got_cache[written], None if got_scales is None else got_scales[written]).isnan().any()
    check_close_to_reference(case, got_q, got_cache, got_scales, written)


def check_close_to_reference(case: Case, got_q, got_cache, got_scales, written) -> None:
    """The composed PyTorch references: q_pe and float cache rows within rounding; 8-bit rows within one step of
    their grid (a rounding of the norm may move a value across a grid midpoint)."""
    ref_q, ref_cache, ref_scales = outputs(case, reference)
    atol = TOL[case.q_pe.dtype]
    torch.testing.assert_close(got_q.float(), ref_q.float(), atol=atol, rtol=atol)
    if got_scales is None:
        atol = max(atol, TOL.get(case.cache.dtype, atol))
        torch.testing.assert_close(got_cache[written].float(), ref_cache[written].float(), atol=atol, rtol=atol)
        return
    check_8bit_rows_close(got_cache[written], got_scales[written],  # [W, R + Dr], [W]
                          ref_cache[written], ref_scales[written])


@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
@pytest.mark.parametrize("cache_dtype", [None, torch.int8, torch.float8_e4m3fn], ids=["float", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_matches_unfused_kernels(dtype, cache_dtype, interleaved):
    """R = 32, Dr = 16, h = 3; the float cache is in the model dtype (as the runner allocates it)."""
    check_case(make_case(7, 32, 16, 3, dtype, cache_dtype or dtype, interleaved, device()))


@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8], ids=["float", "int8"])
@pytest.mark.parametrize("interleaved", [True, False], ids=["interleaved", "neox"])
def test_dims_not_powers_of_two(interleaved, cache_dtype):
    """R = 24, Dr = 12 (6 pairs), h = 5, bf16 inputs: masked tails in the latent, the pairs and the heads."""
    check_case(make_case(5, 24, 12, 5, torch.bfloat16, cache_dtype, interleaved, device(), nope_dim=6))


@OTHER_CACHE_DTYPES
def test_cache_dtype_other_than_the_inputs(dtype, cache_dtype):
    check_case(make_case(6, 32, 16, 3, dtype, cache_dtype, True, device()))


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_float32_norm_weight_on_bf16_inputs(cache_dtype):
    """rms_norm returns promote(bf16, f32) = f32: the latent reaches the cache without a bf16 rounding."""
    check_case(make_case(5, 32, 16, 3, torch.bfloat16, cache_dtype, True, device(), weight_dtype=torch.float32))


def test_several_head_blocks(monkeypatch):
    """q_pe heads over several programs, the last block partial: 40 heads x 16 pairs (rotary.py's bound), and
    3 heads with a bound of 2 heads a block."""
    check_case(make_case(3, 32, 32, 40, torch.float32, torch.float32, True, device(), nope_dim=4))
    monkeypatch.setattr(M, "_MAX_PAIRS", 16)
    check_case(make_case(4, 32, 16, 3, torch.bfloat16, torch.int8, False, device()))


def test_all_slots_negative_and_no_tokens():
    case = make_case(4, 16, 8, 2, torch.float32, torch.float32, True, device(), pad_every=1)
    check_all_slots_negative_and_no_tokens(case, fused, unfused, ("kv", "q_pe", "positions", "slots"), (0, 2, 8))


def test_int32_positions_and_slots():
    check_case(int32_indices(make_case(5, 32, 16, 3, torch.bfloat16, torch.int8, True, device())))


def test_rejects_bad_inputs():
    c = make_case(3, 16, 8, 2, torch.float32, torch.int8, True, device())
    bad = {
        "must be \\[3, 16 \\+ 8\\]": c._replace(kv=c.kv[:, :20]),
        "q_pe's tokens": c._replace(q_pe=c.q_pe[:2]),
        "whole rope key": c._replace(cos=c.cos[:, :2], sin=c.sin[:, :2]),
        "needs contiguous float32 kv_scales": c._replace(scales=None),
        "takes no kv_scales": c._replace(cache=c.cache.float()),
        "int64 or int32": c._replace(slots=c.slots.float()),
        "positions must be": c._replace(positions=c.positions.float()),
        "weight must be": c._replace(weight=c.weight.int()),
        "unit-stride": c._replace(kv=torch.randn(24, 3, device=device()).t()),
    }
    check_rejects(fused, bad)


@pytest.mark.parametrize("mode", ["absorb", "auto"])
def test_layer_triton_route_writes_the_cache_of_the_pytorch_route(mode):
    """MLAAttention.forward with Triton forced (interpreted): ONE fused call writes the new tokens' rows; the
    cache and the output match the PyTorch route (kv_a_layernorm, rotary module, indexed write)."""
    from deepserve.forward_context import build_forward_context, forward_context
    from tests.kernels.mla_cases import make_latent_case, mla_layer

    layer = mla_layer(mode)
    lengths, query_lens = [5, 17, 40], ([1, 1, 1] if mode == "absorb" else [5, 1, 33])
    cache, tables, _ = make_latent_case(lengths, layer.kv_lora_rank, layer.rope_dim, 16, torch.float32, "cpu")
    ctx = build_forward_context(query_lens, lengths, [[b for b in row if b] for row in tables.tolist()], 16)
    x = torch.randn(sum(query_lens), layer.o_proj.weight.shape[0])
    runs = []
    for on_triton in (True, False):
        layer.kv_cache, layer._on_triton = cache.clone(), (lambda t, flag=on_triton: flag)
        with forward_context(ctx), torch.no_grad():
            runs.append((layer(ctx.positions, x), layer.kv_cache))
    (triton_out, triton_cache), (torch_out, torch_cache) = runs
    width = layer.kv_lora_rank + layer.rope_dim
    new_rows = ctx.slot_mapping  # [T], all >= 0; the rows held random values before
    assert not torch.isclose(triton_cache.view(-1, width)[new_rows], cache.view(-1, width)[new_rows]).any()
    assert torch.equal(triton_cache.isnan(), torch_cache.isnan())
    torch.testing.assert_close(triton_cache.nan_to_num(), torch_cache.nan_to_num(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(triton_out, torch_out, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------ GPU: DeepSeek shapes, CUDA graphs

@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn])
@pytest.mark.parametrize("heads", [16, 128], ids=["v2-lite", "v3"])
@pytest.mark.parametrize("tokens", [1, 7, 300])
def test_gpu_deepseek_shapes(tokens, heads, cache_dtype):
    """R = 512, Dr = 64, Dn = 128, bf16 inputs, DeepSeek's interleaved pairs, positions up to 32768."""
    check_case(make_case(tokens, 512, 64, heads, torch.bfloat16, cache_dtype, True, "cuda", nope_dim=128,
                         block_size=64, max_pos=32768, pad_every=5 if tokens > 1 else 0, seed=tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
@pytest.mark.parametrize("heads", [16, 128], ids=["v2-lite", "v3"])
def test_gpu_cuda_graph_replay(heads, cache_dtype):
    """Captured once, replayed over new kv, q_pe, positions, slots and norm weight written in place into
    the captured buffers: the replay equals the unfused kernels run eagerly on the new inputs (each case
    draws its own norm weight: leaving the captured one in place failed on an H200)."""
    first = make_case(8, 512, 64, heads, torch.bfloat16, cache_dtype, True, "cuda", nope_dim=128, block_size=64,
                      max_pos=32768, seed=1)
    second = make_case(8, 512, 64, heads, torch.bfloat16, cache_dtype, True, "cuda", nope_dim=128, block_size=64,
                       max_pos=32768, seed=2)
    q_out, cache, scales = graph_replay(fused, first, second, ("kv", "q_pe", "positions", "slots", "cache", "weight"))
    want_q, want_cache, want_scales = outputs(second, unfused)
    assert torch.equal(_bytes(q_out), _bytes(want_q))
    assert torch.equal(_bytes(cache), _bytes(want_cache))
    assert scales is None or torch.equal(scales, want_scales)
