"""Expert sorting / BLOCK_M alignment of MoE assignments against its per-expert reference.

Both implementations: the Triton kernel (interpreted on CPU: tiny shapes; the one-program path up
to _SINGLE_MAX assignments, the two-launch chunked path beyond) and the torch-ops CPU path.
"""

import functools

import pytest
import torch

from deepserve.kernels.moe_align import max_padded_length, moe_align_block_size, moe_align_block_size_ref
from tests.kernels.interpret import device, load_kernel_module

K = load_kernel_module("moe_align")
IMPLS = {"triton": K.moe_align_block_size_triton, "torch": K.moe_align_block_size_torch}
E, TOPK = 8, 2


def _cases():
    yield "random", torch.randint(0, E, (33, TOPK))
    yield "one_expert", torch.full((33, TOPK), 3)
    yield "empty_experts", torch.randint(0, 2, (5, TOPK)) * 7  # only experts 0 and 7
    yield "tiny", torch.tensor([[5, 1]])  # T*k < BLOCK_M
    yield "distinct_topk", torch.rand(40, E).topk(TOPK).indices


def _check_against_ref(align, ids: torch.Tensor, num_experts: int, block_m: int) -> None:
    got = align(ids.to(device()), num_experts, block_m)
    want = moe_align_block_size_ref(ids, num_experts, block_m)
    used = int(want.num_tokens_post_padded)
    assert got.sorted_ids.dtype == got.expert_ids.dtype == got.num_tokens_post_padded.dtype == torch.int32
    assert got.num_tokens_post_padded.shape == (1,) and int(got.num_tokens_post_padded) == used
    assert got.sorted_ids.shape == (max_padded_length(ids.numel(), num_experts, block_m),)
    assert got.expert_ids.shape == (got.sorted_ids.shape[0] // block_m,)
    assert torch.equal(got.sorted_ids[:used].cpu(), want.sorted_ids)
    assert bool((got.sorted_ids[used:] == ids.numel()).all())  # sentinel tail
    assert torch.equal(got.expert_ids[:used // block_m].cpu(), want.expert_ids)
    assert bool((got.expert_ids[used // block_m:] == -1).all())


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("block_m", [1, 4, 16])
@pytest.mark.parametrize("name,ids", list(_cases()), ids=lambda v: v if isinstance(v, str) else "")
def test_matches_reference(name, ids, block_m, impl):
    _check_against_ref(IMPLS[impl], ids, E, block_m)


@pytest.mark.parametrize("block_m", [16, 64, 128])
@pytest.mark.parametrize("tokens", [1, 3, 8])
@pytest.mark.parametrize("num_experts,top_k", [(64, 6), (256, 8)])  # V2-Lite, V3
def test_triton_decode_shapes(num_experts, top_k, tokens, block_m):
    ids = torch.rand(tokens, num_experts).topk(top_k).indices  # distinct experts per token
    _check_against_ref(K.moe_align_block_size_triton, ids, num_experts, block_m)


@pytest.mark.parametrize("name,ids", [
    ("random", torch.rand(400, 64).topk(6).indices),  # 2400 assignments: 38 chunks of 64
    ("one_expert", torch.full((200, 6), 63)),
    ("few_experts", torch.randint(0, 3, (200, 6)) * 20),
], ids=lambda v: v if isinstance(v, str) else "")
def test_triton_chunked_path(name, ids):
    """More than _SINGLE_MAX assignments: two launches over chunks, the workspace summed per chunk."""
    assert ids.numel() > K._SINGLE_MAX
    _check_against_ref(K.moe_align_block_size_triton, ids, 64, 16)


@pytest.mark.parametrize("name,ids", [
    ("random", torch.rand(300, 64).topk(6).indices),  # 1800 assignments: a 2048-key sort in one program
    ("one_expert", torch.full((200, 6), 63)),
], ids=lambda v: v if isinstance(v, str) else "")
def test_triton_single_launch_beyond_default(name, ids):
    """single_max raised past _SINGLE_MAX: the one-program sort (8 warps past 1024 keys) still matches."""
    assert ids.numel() > K._SINGLE_MAX
    _check_against_ref(functools.partial(K.moe_align_block_size_triton, single_max=4096), ids, 64, 16)


def test_triton_chunk_keyword():
    """chunk= sets the assignments per program of the two-launch path (here 8 programs)."""
    ids = torch.rand(100, 64).topk(6).indices
    _check_against_ref(functools.partial(K.moe_align_block_size_triton, single_max=0, chunk=80), ids, 64, 16)


@pytest.mark.parametrize("block_m", [1, 16, 64])
def test_triton_many_chunks(monkeypatch, block_m):
    """Small chunks (64 assignments, 10 programs) so every program places and labels a share."""
    monkeypatch.setattr(K, "_SINGLE_MAX", 32)
    monkeypatch.setattr(K, "_CHUNK", 64)
    ids = torch.randint(0, 24, (100, 6))
    ids[:40] = 5  # one crowded expert spanning several chunks
    _check_against_ref(K.moe_align_block_size_triton, ids, 24, block_m)


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("tokens", [1, 5, 33])
def test_int32_ids_and_invariants(tokens, impl):
    ids = torch.randint(0, E, (tokens, TOPK), dtype=torch.int32, device=device())
    got = IMPLS[impl](ids, E, 16)
    used = int(got.num_tokens_post_padded)
    sorted_ids = got.sorted_ids[:used].long().cpu()
    real = sorted_ids[sorted_ids < ids.numel()]
    assert torch.equal(real.sort().values, torch.arange(ids.numel()))  # each assignment once
    per_block = ids.flatten().long().cpu()[sorted_ids.clamp(max=ids.numel() - 1)].view(-1, 16)
    is_real = (sorted_ids < ids.numel()).view(-1, 16)
    assert bool(((per_block == got.expert_ids[:used // 16, None].long().cpu()) | ~is_real).all())


@pytest.mark.parametrize("impl", list(IMPLS))
def test_empty_and_bad_inputs(impl):
    got = IMPLS[impl](torch.empty(0, TOPK, dtype=torch.long, device=device()), E, 16)
    assert got.sorted_ids.numel() == 0 and int(got.num_tokens_post_padded) == 0
    with pytest.raises(ValueError):
        IMPLS[impl](torch.zeros(4, dtype=torch.long), E, 16)
    with pytest.raises(ValueError):
        IMPLS[impl](torch.zeros(4, TOPK), E, 16)


def test_dispatch_cpu_is_torch_ops():
    ids = torch.randint(0, E, (9, TOPK))
    for got, want in zip(moe_align_block_size(ids, E, 4), K.moe_align_block_size_torch(ids, E, 4)):
        assert torch.equal(got, want)


def test_padded_length_bound():
    assert max_padded_length(8, 256, 16) == 128  # decode: 8 experts hit, one block each at most
    assert max_padded_length(6, 64, 16) == 96
    assert max_padded_length(33 * 2, 8, 16) >= 66 + 8 * 15


# --- GPU, real shapes ------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("block_m", [16, 32, 64, 128])
@pytest.mark.parametrize("tokens", [1, 2, 4, 8, 64, 128])
@pytest.mark.parametrize("num_experts,top_k", [(64, 6), (256, 8)])
def test_gpu_decode(num_experts, top_k, tokens, block_m):
    ids = torch.rand(tokens, num_experts).topk(top_k).indices
    _check_against_ref(moe_align_block_size, ids, num_experts, block_m)


@pytest.mark.gpu
@pytest.mark.parametrize("num_experts,block_m", [(64, 64), (64, 128), (256, 64), (256, 128)])
def test_gpu_prefill(num_experts, block_m):
    ids = torch.rand(8192, num_experts).topk(6).indices  # 49152 assignments: the chunked path
    _check_against_ref(moe_align_block_size, ids, num_experts, block_m)
    _check_against_ref(moe_align_block_size, torch.full((8192, 6), 7), num_experts, block_m)


@pytest.mark.gpu
@pytest.mark.parametrize("tokens", [8, 512])  # one-program and chunked paths
def test_gpu_cuda_graph_replay(tokens):
    """No host synchronisation: captured once, replayed on new ids (the sentinel fill included)."""
    ids = torch.rand(tokens, 256, device="cuda").topk(8).indices
    moe_align_block_size(ids, 256, 16)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = moe_align_block_size(ids, 256, 16)
    ids.copy_(torch.randint(0, 3, ids.shape, device="cuda") * 100)  # three experts, long segments
    graph.replay()
    want = moe_align_block_size_ref(ids.cpu(), 256, 16)
    used = int(want.num_tokens_post_padded)
    assert int(got.num_tokens_post_padded) == used
    assert torch.equal(got.sorted_ids[:used].cpu(), want.sorted_ids)
    assert bool((got.sorted_ids[used:] == ids.numel()).all())
    assert torch.equal(got.expert_ids[:used // 16].cpu(), want.expert_ids)
    assert bool((got.expert_ids[used // 16:] == -1).all())
