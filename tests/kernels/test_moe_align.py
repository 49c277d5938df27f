"""Expert sorting / BLOCK_M alignment of MoE assignments against its per-expert reference."""

import pytest
import torch

from deepserve.kernels.moe_align import max_padded_length, moe_align_block_size, moe_align_block_size_ref
from tests.kernels.interpret import device

E, K = 8, 2


def _cases():
    yield "random", torch.randint(0, E, (33, K))
    yield "one_expert", torch.full((33, K), 3)
    yield "empty_experts", torch.randint(0, 2, (5, K)) * 7  # only experts 0 and 7
    yield "tiny", torch.tensor([[5, 1]])  # T*k < BLOCK_M
    yield "distinct_topk", torch.rand(40, E).topk(K).indices


def _check_against_ref(ids: torch.Tensor, block_m: int) -> None:
    got = moe_align_block_size(ids.to(device()), E, block_m)
    want = moe_align_block_size_ref(ids, E, block_m)
    used = int(want.num_tokens_post_padded)
    assert got.sorted_ids.dtype == got.expert_ids.dtype == torch.int32
    assert int(got.num_tokens_post_padded) == used
    assert got.sorted_ids.shape == (max_padded_length(ids.numel(), E, block_m),)
    assert got.expert_ids.shape == (got.sorted_ids.shape[0] // block_m,)
    assert torch.equal(got.sorted_ids[:used].cpu(), want.sorted_ids)
    assert bool((got.sorted_ids[used:] == ids.numel()).all())  # sentinel tail
    assert torch.equal(got.expert_ids[:used // block_m].cpu(), want.expert_ids)
    assert bool((got.expert_ids[used // block_m:] == -1).all())


@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("name,ids", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_matches_reference(name, ids, block_m):
    _check_against_ref(ids, block_m)


@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int32_ids_and_invariants(tokens):
    ids = torch.randint(0, E, (tokens, K), dtype=torch.int32)
    got = moe_align_block_size(ids, E, 16)
    used = int(got.num_tokens_post_padded)
    sorted_ids = got.sorted_ids[:used].long()
    real = sorted_ids[sorted_ids < ids.numel()]
    assert torch.equal(real.sort().values, torch.arange(ids.numel()))  # each assignment once
    per_block = ids.flatten().long()[sorted_ids.clamp(max=ids.numel() - 1)].view(-1, 16)  # [blocks, 16]
    is_real = (sorted_ids < ids.numel()).view(-1, 16)
    assert bool(((per_block == got.expert_ids[:used // 16, None].long()) | ~is_real).all())


def test_empty_and_bad_inputs():
    got = moe_align_block_size(torch.empty(0, K, dtype=torch.long), E, 16)
    assert got.sorted_ids.numel() == 0 and int(got.num_tokens_post_padded) == 0
    with pytest.raises(ValueError):
        moe_align_block_size(torch.zeros(4, dtype=torch.long), E, 16)
    with pytest.raises(ValueError):
        moe_align_block_size(torch.zeros(4, K), E, 16)


def test_padded_length_bound():
    assert max_padded_length(8, 256, 16) == 128  # decode: 8 experts hit, one block each at most
    assert max_padded_length(6, 64, 16) == 96
    assert max_padded_length(33 * 2, 8, 16) >= 66 + 8 * 15
