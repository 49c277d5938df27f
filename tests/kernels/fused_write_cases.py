"""What the tests of the fused rotary + cache-write kernels (rope_kv_write, mla_norm_rope_write) share.

A case is a NamedTuple with (at least) `cache`, `scales`, `slots` and `positions` fields: the cache holds NaN
(float) or random bytes with scales -1 (8-bit) in every slot, and the slots are shuffled over it with some -1,
so a row written where no token wants it, or a row a token should have written and did not, shows. Each run
writes into its own copy of the cache.
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import pytest
import torch

from deepserve.layers.kv_quant import is_quantized

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}  # a rounding of the output dtype
OTHER_CACHE_DTYPES = pytest.mark.parametrize(  # (model dtype, cache dtype) pairs where the two differ
    "dtype,cache_dtype", [(torch.bfloat16, torch.float16), (torch.float16, torch.float32),
                          (torch.float32, torch.bfloat16)])


def shuffled_slots(tokens: int, block_size: int, pad_every: int, gen: torch.Generator) -> tuple[int, torch.Tensor]:
    """(num_blocks, [T] int64 slots): distinct slots in about twice the blocks the tokens need, every
    pad_every-th (from the first) -1 (padding); pad_every = 0: none."""
    num_blocks = (2 * tokens + block_size - 1) // block_size + 1
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens]
    if pad_every:
        slots[::pad_every] = -1
    return num_blocks, slots


def filled_cache(shape: tuple, cache_dtype: torch.dtype, dev, gen: torch.Generator):
    """(cache [*shape] NaN in every slot, None) for a float cache; (random bytes viewed as cache_dtype, scales
    [*shape[:-1]] f32 all -1) for an 8-bit one."""
    if is_quantized(cache_dtype):
        raw = torch.randint(-128, 128, shape, generator=gen, dtype=torch.int8)
        return raw.to(dev).view(cache_dtype), torch.full(shape[:-1], -1.0, device=dev)
    return torch.full(shape, float("nan"), device=dev, dtype=cache_dtype), None


def outputs(case: NamedTuple, fn: Callable) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """fn(case with a fresh cache and scales) -> (q rotated, cache after, scales after)."""
    cache, scales = case.cache.clone(), None if case.scales is None else case.scales.clone()
    q = fn(case._replace(cache=cache, scales=scales))
    return q, cache, scales


def written_mask(slots: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[*shape] bool over the cache's (blocks, block slots): the slots some token writes."""
    written = torch.zeros(shape, dtype=torch.bool, device=slots.device).view(-1)
    written[slots[slots >= 0]] = True
    return written.view(shape)


def check_8bit_rows_close(got: torch.Tensor, got_scales: torch.Tensor, ref: torch.Tensor,
                          ref_scales: torch.Tensor) -> None:
    """Written 8-bit rows [W, ..., D] with their scales [W, ...]: scales within 1%, dequantised values within one
    step of the reference's grid (a rounding before the quantisation may move a value across a midpoint). int8:
    one scale, plus the value times the scale's relative change (one bf16 rounding of the row's amax: <= 2^-7;
    2^-6 allowed); e4m3: one step of its 3 mantissa bits (2^-3 of the value) plus one scale."""
    torch.testing.assert_close(got_scales, ref_scales, atol=0.0, rtol=1e-2)
    ref = ref.float() * ref_scales[..., None]
    relative = 2.0 ** -3 if got.dtype == torch.float8_e4m3fn else 2.0 ** -6
    step = ref_scales[..., None] + ref.abs() * relative
    assert ((got.float() * got_scales[..., None] - ref).abs() <= 1.01 * step).all()


def check_all_slots_negative_and_no_tokens(case: NamedTuple, fused: Callable, unfused: Callable,
                                           token_fields: tuple[str, ...], empty_shape: tuple) -> None:
    """Every slot -1: the cache keeps its NaN, q is still rotated as the unfused kernels rotate it; no tokens
    (token_fields cut to 0 rows): q of empty_shape."""
    q, cache, _ = outputs(case, fused)
    assert cache.isnan().all()
    assert torch.equal(q, outputs(case, unfused)[0])  # q still rotated
    empty = case._replace(**{name: getattr(case, name)[:0] for name in token_fields})
    assert fused(empty).shape == empty_shape


def int32_indices(case: NamedTuple) -> NamedTuple:
    return case._replace(positions=case.positions.int(), slots=case.slots.int())


def check_rejects(fused: Callable, bad: dict) -> None:
    """bad: {message regex: case}; fused(case) raises ValueError matching it."""
    for message, case in bad.items():
        with pytest.raises(ValueError, match=message):
            fused(case)


def graph_replay(fused: Callable, first: NamedTuple, second: NamedTuple, inputs: tuple[str, ...]):
    """fused(first) captured once in a CUDA graph (on a copy of first's cache and scales), second's `inputs`
    fields and scales copied into the captured buffers, replayed: (q out, cache after, scales after)."""
    static = first._replace(cache=first.cache.clone(), scales=None if first.scales is None else first.scales.clone())
    fused(static)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q_out = fused(static)
    for name in inputs:
        getattr(static, name).copy_(getattr(second, name))
    if static.scales is not None:
        static.scales.copy_(second.scales)
    graph.replay()
    return q_out, static.cache, static.scales
