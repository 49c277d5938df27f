"""The split-K merge fused into the decode kernels ("last program merges", kernels/split_k.py) against the
two-launch path (split kernel + `merge_splits`) and the references: paged MHA/GQA and MLA decode.

The fused merge is the separate launch's `merge_group` (same tiles) over the same partials, so the two paths must agree
bit for bit (torch.equal). Every call must leave the counters zero: a second call over the same buffer
(what a CUDA-graph replay does) gives the same output. CPU: the Triton interpreter at tiny shapes, where
programs run one after another (the last split merges); GPU: real shapes, under CUDA-graph capture.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deepserve.engine.kv_cache import bind_split_counters
from deepserve.forward_context import build_forward_context, forward_context
from tests.kernels.interpret import device, load_kernel_module
from tests.kernels.kv_quant_cases import QUANT_DTYPES, quantized_case
from tests.kernels.launches import record_launches
from tests.kernels.mla_cases import make_latent_case
from tests.kernels.paged_cases import make_case, shuffled_tables, triton_attention_module

dec = load_kernel_module("paged_decode_attention")
mla = load_kernel_module("mla_decode_attention")
sk = load_kernel_module("split_k")


def _counters(batch: int, groups: int, dev=None) -> torch.Tensor:
    """Zeroed counters with a spare row and column (a buffer sized for a larger batch covers a smaller one)."""
    return torch.zeros(batch + 1, groups + 1, dtype=torch.int32, device=dev or device())


def _fused_vs_two_launches(run, counters: torch.Tensor) -> torch.Tensor:
    """run(split_counters) twice with the counters, once without: all equal, counters zero after each
    fused call. Returns the fused output."""
    two = run(None)
    fused = run(counters)
    assert torch.equal(counters, torch.zeros_like(counters))
    again = run(counters)  # the same buffer again, as a graph replay uses it
    assert torch.equal(counters, torch.zeros_like(counters))
    assert torch.equal(fused, two) and torch.equal(again, two)
    return fused


# lens (0: a graph padding row; 1; not multiples of block_n), heads, kv_heads (GQA group 1 / 4 / 7),
# num_splits (1: direct, no merge; 64: most splits empty), dtype, block_size
DENSE_CASES = [
    ([0, 1, 40], 4, 4, 2, torch.float32, 16),
    ([77], 8, 2, 5, torch.float32, 16),
    ([300, 0], 7, 1, 64, torch.float32, 16),
    ([1, 33, 5], 8, 2, 1, torch.float32, 16),
    ([9, 0, 33], 14, 2, 5, torch.float16, 8),
]


@pytest.mark.parametrize("lens, heads, kv_heads, num_splits, dtype, block_size", DENSE_CASES)
def test_paged_fused_equals_two_launches(lens, heads, kv_heads, num_splits, dtype, block_size):
    case = make_case(lens, kv_heads=kv_heads, head_dim=16, block_size=block_size, dtype=dtype, device=device())
    q = torch.randn(len(lens), heads, 16, device=device()).to(dtype)

    def run(counters):
        return dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25,
                                          num_splits=num_splits, block_n=16, split_counters=counters)

    out = _fused_vs_two_launches(run, _counters(len(lens), kv_heads))
    ref = dec.paged_decode_attention_ref(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out, ref, atol=tol, rtol=tol)
    for b, n in enumerate(lens):
        if n == 0:
            assert torch.equal(out[b], torch.zeros_like(out[b]))


@pytest.mark.parametrize("kv_dtype", QUANT_DTYPES)
def test_paged_fused_quantized_cache(kv_dtype):
    case = make_case([1, 17, 40], kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    data, scales = quantized_case(case, kv_dtype)
    q = torch.randn(3, 8, 16, device=device())

    def run(counters):
        return dec.paged_decode_attention(q, data, case.block_tables, case.seq_lens, 0.25, num_splits=3,
                                          block_n=16, kv_scales=scales, split_counters=counters)

    out = _fused_vs_two_launches(run, _counters(3, 2))
    ref = dec.paged_decode_attention_ref(q, data, case.block_tables, case.seq_lens, 0.25, kv_scales=scales)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_paged_fused_is_one_launch(monkeypatch):
    """With counters the merge kernel never launches; without, it does (the two-launch path)."""
    case = make_case([20, 7], kv_heads=1, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    q = torch.randn(2, 2, 16, device=device())
    recorders = record_launches(monkeypatch, sk, "_merge_kernel")
    dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25, num_splits=2,
                               block_n=16, split_counters=_counters(2, 1))
    assert not recorders["_merge_kernel"].launches
    dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25, num_splits=2, block_n=16)
    assert len(recorders["_merge_kernel"].launches) == 1


BAD_COUNTERS = {  # name: (counters for a batch of 2 with 2 KV heads / 2 head tiles, the error's words)
    "int64": (lambda: torch.zeros(2, 2, dtype=torch.int64, device=device()), "must be int32"),
    "other device": (lambda: torch.zeros(2, 2, dtype=torch.int32, device="meta"), "must be on"),
    "too few rows": (lambda: torch.zeros(1, 2, dtype=torch.int32, device=device()), r"cover \[2, 2\]"),
    "too few columns": (lambda: torch.zeros(2, 1, dtype=torch.int32, device=device()), r"cover \[2, 2\]"),
    "1-D": (lambda: torch.zeros(4, dtype=torch.int32, device=device()), "must be 2-D"),
    "strided": (lambda: torch.zeros(2, 4, dtype=torch.int32, device=device())[:, ::2], "must be contiguous"),
}


@pytest.mark.parametrize("name", list(BAD_COUNTERS))
def test_bad_counters_raise(name):
    make, match = BAD_COUNTERS[name]
    case = make_case([5, 9], kv_heads=2, head_dim=16, block_size=16, dtype=torch.float32, device=device())
    q = torch.randn(2, 4, 16, device=device())
    with pytest.raises(ValueError, match=match):
        dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 0.25, num_splits=2,
                                   split_counters=make())
    cache, tables, lens = make_latent_case([5, 9], 32, 8, 16, torch.float32, device())
    q_lat, q_rope = torch.randn(2, 20, 32, device=device()), torch.randn(2, 20, 8, device=device())  # 2 head tiles
    with pytest.raises(ValueError, match=match):
        mla.mla_decode_attention(q_lat, q_rope, cache, tables, lens, 0.3, num_splits=2, split_counters=make())


# ------------------------------------------------------------------------------- MLA

# lens, heads (20: two head tiles of 16, the second ragged), num_splits
MLA_CASES = [([0, 1, 40], 4, 3), ([15, 17], 20, 2), ([100, 0], 4, 64), ([1, 33], 4, 1)]


@pytest.mark.parametrize("lens, heads, num_splits", MLA_CASES)
def test_mla_fused_equals_two_launches(lens, heads, num_splits):
    cache, tables, seq_lens = make_latent_case(lens, 32, 8, 16, torch.float32, device())
    q = torch.randn(len(lens), heads, 40, device=device())
    q_lat, q_rope = q[..., :32], q[..., 32:]  # strided views, as mla.py passes them

    def run(counters):
        return mla.mla_decode_attention(q_lat, q_rope, cache, tables, seq_lens, 0.3, num_splits=num_splits,
                                        block_n=16, split_counters=counters)

    out = _fused_vs_two_launches(run, _counters(len(lens), -(-heads // 16)))
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, cache, tables, seq_lens, 0.3)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_mla_fused_quantized_cache():
    from deepserve.layers.kv_quant import quantize_kv

    cache, tables, seq_lens = make_latent_case([3, 40], 32, 8, 16, torch.float32, device())
    data, scales = quantize_kv(cache.nan_to_num(0.0), torch.int8)  # [N, bs, R + Dr], [N, bs]
    q_lat, q_rope = torch.randn(2, 4, 32, device=device()), torch.randn(2, 4, 8, device=device())

    def run(counters):
        return mla.mla_decode_attention(q_lat, q_rope, data, tables, seq_lens, 0.3, num_splits=3, block_n=16,
                                        kv_scales=scales, split_counters=counters)

    out = _fused_vs_two_launches(run, _counters(2, 1))
    ref = mla.mla_decode_attention_ref(q_lat, q_rope, data, tables, seq_lens, 0.3, kv_scales=scales)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------- layers


def test_triton_attention_binds_and_uses_counters(monkeypatch):
    """bind_split_counters gives the layer [max_num_seqs, H_kv] zeros; a decode batch that fits them runs the
    fused merge (no merge launch), a larger one the two launches; both match the unbound layer."""
    backend = triton_attention_module()
    lens, block_size = [300, 3, 17], 16  # 300: two splits (the CPU stand-in for the SM count is 4)
    tables, num_blocks = shuffled_tables(lens, block_size, torch.Generator().manual_seed(1))
    cache = torch.randn(2, num_blocks, block_size, 2, 16, device=device())
    layers = [backend.TritonAttention(8, 16, 2) for _ in range(2)]
    for layer in layers:
        layer.kv_cache = cache.clone()
    assert tuple(layers[0].split_counters.shape) == (0, 2)
    bind_split_counters(nn.ModuleList(layers[:1]), 3, device())
    counters = layers[0].split_counters
    assert counters.dtype == torch.int32 and tuple(counters.shape) == (3, 2) and not counters.any()
    recorders = record_launches(monkeypatch, sk, "_merge_kernel")
    for batch in (3, 2):
        ctx = build_forward_context([1] * batch, lens[:batch], tables[:batch], block_size, device())
        qkv = torch.randn(batch, 12, 16, device=device())
        q, k, v = qkv.split([8, 2, 2], dim=1)
        with forward_context(ctx):
            fused, plain = (layer(q, k, v) for layer in layers)
        assert torch.equal(fused, plain) and not counters.any()
    assert len(recorders["_merge_kernel"].launches) == 2  # the unbound layer's, one per step
    layers[0].split_counters = counters[:1]  # a buffer smaller than the batch: two launches, same values
    with forward_context(ctx):
        assert torch.equal(layers[0](q, k, v), plain)
    assert len(recorders["_merge_kernel"].launches) == 3


# ------------------------------------------------------------------------------- GPU


def _replays_equal(run, counters: torch.Tensor, inputs: list[torch.Tensor], fill) -> None:
    """Capture run(counters) in a CUDA graph, replay it once per input (fill(x) writes x into the captured
    input); each replay equals run(None) (two launches, eager) on that input, counters zero after each."""
    run(counters)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(counters)
    for x in inputs:
        fill(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(counters, torch.zeros_like(counters))
        assert torch.equal(out, run(None))


@pytest.mark.gpu
def test_gpu_paged_fused_graph_replays_qwen7b():
    """B=1, H=28, H_kv=4, D=128, seq_len 300, 6 splits (W-b1's graphs: a one-tile merge, so fused), bf16:
    captured, 3 replays."""
    case = make_case([300], kv_heads=4, head_dim=128, block_size=16, dtype=torch.bfloat16, device="cuda")
    q = torch.empty(1, 28, 128, dtype=torch.bfloat16, device="cuda")

    def run(counters):
        return dec.paged_decode_attention(q, case.kv_cache, case.block_tables, case.seq_lens, 128 ** -0.5,
                                          num_splits=6, split_counters=counters)

    assert sk.fused_merge_args(torch.zeros(1, 4), 6, 128, 7, q)[1]["FUSED_MERGE"]
    inputs = [torch.randn(1, 28, 128, device="cuda").to(torch.bfloat16) for _ in range(3)]
    _replays_equal(run, _counters(1, 4, "cuda"), inputs, q.copy_)


@pytest.mark.gpu
def test_gpu_mla_fused_graph_replays_v2_lite():
    """B=1, H=16, R=512, Dr=64, seq_len 300, 2 splits (a two-tile merge: the largest fused one), bf16: captured,
    3 replays."""
    cache, tables, seq_lens = make_latent_case([300], 512, 64, 16, torch.bfloat16, "cuda")
    q = torch.empty(1, 16, 576, dtype=torch.bfloat16, device="cuda")

    def run(counters):
        return mla.mla_decode_attention(q[..., :512], q[..., 512:], cache, tables, seq_lens, 192 ** -0.5,
                                        num_splits=2, split_counters=counters)

    assert sk.fused_merge_args(torch.zeros(1, 1), 2, 512, 16, q)[1]["FUSED_MERGE"]
    inputs = [torch.randn(1, 16, 576, device="cuda").to(torch.bfloat16) for _ in range(3)]
    _replays_equal(run, _counters(1, 1, "cuda"), inputs, q.copy_)
