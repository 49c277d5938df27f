"""The fused dense rope + KV-cache write kernel against the two kernels it replaces (rotary then kv_cache_write:
bit for bit in the rotated q, the cache bytes and the scales) and against the composed PyTorch references (bit
for bit on the interpreter, whose float32 -> bf16 cast is made to round to nearest even as the GPU's does; on a
GPU within the FMA the compiler contracts the rotation into, in both kernels alike); slots < 0 leave their rows
alone; q, k, v are strided views of one qkv projection output, as the layer passes them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pytest
import torch

from deepserve.layers.rotary import RotaryEmbedding
from tests.kernels.fused_write_cases import (OTHER_CACHE_DTYPES, TOL, check_8bit_rows_close,
                                             check_all_slots_negative_and_no_tokens, check_rejects, filled_cache,
                                             graph_replay, int32_indices, outputs, shuffled_slots, written_mask)
from tests.kernels.interpret import INTERPRET, device, load_kernel_module

ROPE = load_kernel_module("rotary")
WRITE = load_kernel_module("kv_cache_write")
F = load_kernel_module("rope_kv_write")
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 32}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}  # cos/sin scaled by 1.139


@pytest.fixture(autouse=True)
def _bf16_rounds_to_nearest_even(monkeypatch):
    """The interpreter truncates float32 -> bf16 (`_convert_float` without a rounding mode); the GPU's cvt.rn and
    torch round to nearest even. Patched for the comparisons with the PyTorch references (the fused and the
    unfused kernels go through the same cast either way)."""
    if not INTERPRET:
        return
    import triton.language as tl
    from triton.runtime import interpreter

    cast = interpreter.InterpreterBuilder.cast_impl

    def cast_rne(self, src, dst_type):
        if src.dtype.scalar != tl.float32 or dst_type.scalar != tl.bfloat16:
            return cast(self, src, dst_type)
        bits = np.ascontiguousarray(src.data, dtype=np.float32).view(np.uint32).astype(np.uint64)
        out = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)
        nan = np.isnan(src.data)
        out[nan] = ((bits[nan] >> 16) | 0x40).astype(np.uint16)  # quiet NaN, sign kept
        return interpreter.TensorHandle(out, tl.bfloat16)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "cast_impl", cast_rne)


class Case(NamedTuple):
    positions: torch.Tensor  # [T] int64
    q: torch.Tensor  # [T, H, D] strided view
    k: torch.Tensor  # [T, H_kv, D] strided view
    v: torch.Tensor  # [T, H_kv, D] strided view
    cos: torch.Tensor  # [P, R / 2] f32
    sin: torch.Tensor
    interleaved: bool
    cache: torch.Tensor  # [2, N, bs, H_kv, D]: NaN (float) or random bytes (8-bit) in every slot
    slots: torch.Tensor  # [T] int64, some -1
    scales: torch.Tensor | None  # [2, N, bs, H_kv] f32, -1 everywhere (8-bit caches)


def make_case(tokens, heads, kv_heads, head_dim, dtype, cache_dtype, interleaved, dev, rot_dim=None, scaling=None,
              block_size=4, max_pos=64, pad_every=3, seed=0) -> Case:
    """One projection output [T, 3 + (H + 2 H_kv) D + 5] holds q, k, v: all strided, none at offset 0."""
    gen = torch.Generator().manual_seed(seed)
    widths = [heads * head_dim, kv_heads * head_dim, kv_heads * head_dim]
    proj = torch.randn(tokens, 3 + sum(widths) + 5, generator=gen)
    proj[:, 3 + widths[0]:3 + widths[0] + widths[1]] *= 3.0  # k's larger range than v's
    q, k, v = proj.to(dev, dtype)[:, 3:3 + sum(widths)].split(widths, dim=1)
    rope = RotaryEmbedding(rot_dim or head_dim, max_pos, 10000.0, scaling, interleaved=interleaved)
    num_blocks, slots = shuffled_slots(tokens, block_size, pad_every, gen)
    cache, scales = filled_cache((2, num_blocks, block_size, kv_heads, head_dim), cache_dtype, dev, gen)
    positions = torch.randint(0, rope.cos.shape[0], (tokens,), generator=gen)
    return Case(positions.to(dev), q.view(tokens, heads, head_dim), k.view(tokens, kv_heads, head_dim),
                v.view(tokens, kv_heads, head_dim), rope.cos.to(dev), rope.sin.to(dev), interleaved, cache,
                slots.to(dev), scales)


def fused(c: Case) -> torch.Tensor:
    return F.rope_kv_write(c.positions, c.q, c.k, c.v, c.cos, c.sin, c.interleaved, c.cache, c.slots, c.scales)


def reference(c: Case) -> torch.Tensor:
    return F.rope_kv_write_ref(c.positions, c.q, c.k, c.v, c.cos, c.sin, c.interleaved, c.cache, c.slots, c.scales)


def unfused(c: Case) -> torch.Tensor:
    """The two launches the Triton backend made before: one rotary over q and k, then kv_cache_write."""
    q, k = ROPE.rotary_embedding(c.positions, c.q, c.k, c.cos, c.sin, c.interleaved)
    WRITE.kv_cache_write(c.cache, k, c.v, c.slots, c.scales)
    return q


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.uint8)  # NaN patterns and fp8 compared bit for bit


def _same(a: tuple, b: tuple) -> None:
    """Equal bit for bit: (q, cache, scales) of two runs."""
    assert torch.equal(_bytes(a[0]), _bytes(b[0]))
    assert torch.equal(_bytes(a[1]), _bytes(b[1]))
    assert (a[2] is None) == (b[2] is None) and (a[2] is None or torch.equal(_bytes(a[2]), _bytes(b[2])))


def check_case(case: Case) -> None:
    got = outputs(case, fused)
    assert got[0].is_contiguous() and got[0].dtype == case.q.dtype and got[0].shape == case.q.shape
    _same(got, outputs(case, unfused))
    written = written_mask(case.slots, case.cache.shape[1:3])  # [N, bs]
    assert torch.equal(_bytes(got[1][:, ~written]), _bytes(case.cache[:, ~written]))  # slot < 0 / unowned: untouched
    if got[2] is not None:
        assert torch.equal(got[2][:, ~written], case.scales[:, ~written])
    if INTERPRET:
        _same(got, outputs(case, reference))
    else:
        check_close_to_reference(case, got, written)


def check_close_to_reference(case: Case, got: tuple, written: torch.Tensor) -> None:
    """GPU: V rows exact; q and K rows within the contraction of the rotation into an FMA (a rounding of the
    output dtype; an 8-bit K row within one step of its grid)."""
    ref = outputs(case, reference)
    atol = TOL[case.q.dtype]
    torch.testing.assert_close(got[0].float(), ref[0].float(), atol=atol, rtol=atol)
    assert torch.equal(_bytes(got[1][1]), _bytes(ref[1][1]))
    if got[2] is None:
        torch.testing.assert_close(got[1][0][written].float(), ref[1][0][written].float(), atol=atol, rtol=atol)
        return
    assert torch.equal(got[2][1], ref[2][1])
    check_8bit_rows_close(got[1][0][written], got[2][0][written], ref[1][0][written], ref[2][0][written])  # [W, H_kv]


STYLES = pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
CACHES = [None, torch.int8, torch.float8_e4m3fn]


@STYLES
@pytest.mark.parametrize("cache_dtype", CACHES, ids=["float", "int8", "fp8"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_matches_unfused_kernels_and_reference(dtype, cache_dtype, interleaved):
    """H = 6, H_kv = 2, D = 16 (all rotating); the float cache in the model dtype, as the runner allocates it."""
    check_case(make_case(7, 6, 2, 16, dtype, cache_dtype or dtype, interleaved, device()))


@STYLES
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.int8, torch.float8_e4m3fn], ids=["float", "int8", "fp8"])
@pytest.mark.parametrize("rot_dim", [16, 12])
def test_partial_rotary_and_dims_not_powers_of_two(rot_dim, cache_dtype, interleaved):
    """H = 5, H_kv = 3, D = 24 with R = 16 or 12 (6 pairs): masked heads, pairs, and the unrotated tail, whose
    values join the row's amax on an 8-bit cache."""
    case = make_case(6, 5, 3, 24, torch.bfloat16, cache_dtype, interleaved, device(), rot_dim=rot_dim)
    case.k[2, 1, rot_dim:] *= 40.0  # a tail that sets its row's scale
    check_case(case)


@pytest.mark.parametrize("scaling", [LLAMA3, YARN], ids=["llama3", "yarn"])
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8])
def test_scaled_tables(scaling, cache_dtype):
    """The tables RotaryEmbedding builds for Llama-3 and YaRN scaling (positions past the original length)."""
    check_case(make_case(9, 4, 2, 16, torch.bfloat16, cache_dtype, False, device(), scaling=scaling, max_pos=128))


@OTHER_CACHE_DTYPES
def test_cache_dtype_other_than_the_inputs(dtype, cache_dtype):
    """The rotated k is rounded to k's dtype first, then to the cache's, as the two kernels store it."""
    check_case(make_case(6, 4, 2, 16, dtype, cache_dtype, True, device()))


def test_several_q_head_blocks(monkeypatch):
    """q heads in one partial block (40 heads x 8 pairs under rotary.py's bound: one block of 64 heads), then over
    several programs with the last block partial (6 heads with a bound of 2 heads a block)."""
    check_case(make_case(3, 40, 2, 16, torch.float32, torch.float32, False, device()))
    monkeypatch.setattr(F, "_MAX_PAIRS", 16)
    check_case(make_case(4, 6, 2, 16, torch.bfloat16, torch.int8, True, device()))


def test_all_slots_negative_and_no_tokens():
    case = make_case(4, 4, 2, 16, torch.float32, torch.float32, False, device(), pad_every=1)
    check_all_slots_negative_and_no_tokens(case, fused, unfused, ("q", "k", "v", "positions", "slots"), (0, 4, 16))


def test_int32_positions_and_slots():
    check_case(int32_indices(make_case(5, 4, 2, 16, torch.bfloat16, torch.int8, False, device())))


def test_rejects_bad_inputs():
    c = make_case(3, 4, 2, 16, torch.float32, torch.int8, False, device())
    bad = {
        "k .* must be \\[3, kv_heads, 16\\]": c._replace(k=c.k[:2]),
        "v must be": c._replace(v=c.v[:, :1]),
        "exceeds head_dim": c._replace(cos=c.cos.new_zeros(64, 9), sin=c.sin.new_zeros(64, 9)),
        "needs contiguous float32 kv_scales": c._replace(scales=None),
        "takes no kv_scales": c._replace(cache=c.cache.float()),
        "int64 or int32": c._replace(slots=c.slots.float()),
        "positions must be": c._replace(positions=c.positions.float()),
        "unit-stride": c._replace(q=torch.randn(16, 4, 3, device=device()).permute(2, 1, 0)),
    }
    check_rejects(fused, bad)


# ------------------------------------------------------------------ GPU: Qwen2 / Llama shapes, CUDA graphs

GPU_SHAPES = {"qwen-7b": (28, 4, None), "qwen-1.5b": (12, 2, None),
              "llama-8b": (32, 8, {**LLAMA3, "original_max_position_embeddings": 8192})}


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8, torch.float8_e4m3fn], ids=["bf16", "int8", "fp8"])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
@pytest.mark.parametrize("tokens", [1, 7, 300, 8192])
def test_gpu_real_shapes(tokens, model, cache_dtype):
    """D = 128, bf16 inputs, neox pairs, positions up to 32768, block size 16."""
    heads, kv_heads, scaling = GPU_SHAPES[model]
    check_case(make_case(tokens, heads, kv_heads, 128, torch.bfloat16, cache_dtype, False, "cuda", scaling=scaling,
                         block_size=16, max_pos=32768, pad_every=5 if tokens > 1 else 0, seed=tokens))


@pytest.mark.gpu
@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.int8], ids=["bf16", "int8"])
@pytest.mark.parametrize("model", list(GPU_SHAPES))
def test_gpu_cuda_graph_replay(model, cache_dtype):
    """Captured once, replayed over new q, k, v, positions, slots and cache written in place into the captured
    buffers (one padding slot): the replay equals the two kernels run eagerly on the new inputs."""
    heads, kv_heads, scaling = GPU_SHAPES[model]
    first, second = (make_case(8, heads, kv_heads, 128, torch.bfloat16, cache_dtype, False, "cuda", scaling=scaling,
                               block_size=16, max_pos=32768, pad_every=7, seed=seed) for seed in (1, 2))
    replayed = graph_replay(fused, first, second, ("q", "k", "v", "positions", "slots", "cache"))
    _same(replayed, outputs(second, unfused))
