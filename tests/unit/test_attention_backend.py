"""Paged MHA/GQA attention backend vs a dense causal reference.

Mixed batches (decode, chunked prefill after cached context, fresh prefill) over block tables
that are shuffled and non-contiguous, on a cache filled with NaN so any read of a slot that was
never written poisons the result.
"""

import pytest
import torch

from deepserve.forward_context import build_forward_context, forward_context
from deepserve.layers.attention import Attention

HQ, HKV, D, BLOCK, NUM_BLOCKS = 4, 2, 8, 4, 24


def dense_reference(q, k, v, scale):
    """q [S, HQ, D], k/v [S, HKV, D] full sequences -> causal attention [S, HQ, D]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    s = q.shape[0]
    scores = scores.masked_fill(torch.ones(s, s, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def make_layer():
    layer = Attention(HQ, D, HKV)
    layer.kv_cache = torch.full((2, NUM_BLOCKS, BLOCK, HKV, D), float("nan"))
    return layer


def run_step(layer, seqs, q_lens, done, tables):
    """Feed the next q_lens[i] tokens of each sequence; return each sequence's output rows."""
    s_lens = [d + n for d, n in zip(done, q_lens)]
    ctx = build_forward_context(q_lens, s_lens, tables, BLOCK)
    pick = lambda key: torch.cat([seq[key][d:s] for seq, d, s in zip(seqs, done, s_lens)])
    with forward_context(ctx):
        out = layer(pick("q"), pick("k"), pick("v"))
    return out.split(q_lens)


def random_seq(length):
    return {"q": torch.randn(length, HQ, D), "k": torch.randn(length, HKV, D), "v": torch.randn(length, HKV, D)}


def shuffled_tables(lengths):
    """Disjoint, non-contiguous, shuffled block tables (block 0 never used)."""
    perm = (torch.randperm(NUM_BLOCKS - 1) + 1).tolist()
    tables = []
    for n in lengths:
        need = (n + BLOCK - 1) // BLOCK
        tables.append(perm[:need])
        perm = perm[need:]
    return tables


def test_mixed_batch_matches_dense_causal():
    decode, chunked, fresh = random_seq(10), random_seq(11), random_seq(7)
    seqs = [decode, chunked, fresh]
    tables = shuffled_tables([10, 11, 7])
    assert any(b - a != 1 for t in tables for a, b in zip(t, t[1:]))
    layer = make_layer()
    scale = D ** -0.5
    # Step 1: the first two sequences build up context (9 and 6 tokens).
    out1 = run_step(layer, seqs[:2], [9, 6], [0, 0], tables[:2])
    for seq, out, n in zip(seqs[:2], out1, [9, 6]):
        ref = dense_reference(seq["q"][:n], seq["k"][:n], seq["v"][:n], scale)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    # Step 2: one decode token, a 5-token chunk after 6 cached tokens, a fresh 7-token prefill.
    out2 = run_step(layer, seqs, [1, 5, 7], [9, 6, 0], tables)
    for seq, out, (lo, hi) in zip(seqs, out2, [(9, 10), (6, 11), (0, 7)]):
        ref = dense_reference(seq["q"][:hi], seq["k"][:hi], seq["v"][:hi], scale)[lo:hi]
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_prefix_hit_reuses_blocks_of_another_sequence():
    """Context longer than the new tokens, with the cached part written by a different sequence."""
    layer, scale = make_layer(), D ** -0.5
    seq = random_seq(13)
    tables = shuffled_tables([13])
    run_step(layer, [seq], [8], [0], [tables[0][:2]])  # another request fills 2 full blocks
    (out,) = run_step(layer, [seq], [5], [8], tables)  # this one hits the 8-token prefix
    ref = dense_reference(seq["q"], seq["k"], seq["v"], scale)[8:]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_new_kv_written_at_slot_mapping():
    layer = make_layer()
    seq = random_seq(6)
    table = [7, 3]
    run_step(layer, [seq], [6], [0], [table])
    for pos in range(6):
        block, off = table[pos // BLOCK], pos % BLOCK
        assert torch.equal(layer.kv_cache[0, block, off], seq["k"][pos])
        assert torch.equal(layer.kv_cache[1, block, off], seq["v"][pos])
    assert torch.isnan(layer.kv_cache[:, 3, 2:]).all()  # past the end: untouched


def test_custom_scale_and_mha():
    layer = Attention(2, D, 2, scale=0.3)
    layer.kv_cache = torch.zeros(2, 4, BLOCK, 2, D)
    q, k, v = torch.randn(5, 2, D), torch.randn(5, 2, D), torch.randn(5, 2, D)
    ctx = build_forward_context([5], [5], [[2, 1]], BLOCK)
    with forward_context(ctx):
        out = layer(q, k, v)
    torch.testing.assert_close(out, dense_reference(q, k, v, 0.3), rtol=1e-5, atol=1e-5)


def test_without_cache_prefill_only():
    layer = Attention(HQ, D, HKV)
    assert layer.kv_cache.numel() == 0
    a, b = random_seq(3), random_seq(5)
    ctx = build_forward_context([3, 5], [3, 5], [[1], [2, 3]], BLOCK)
    with forward_context(ctx):
        out = layer(*(torch.cat([a[x], b[x]]) for x in "qkv"))
    for seq, part in zip([a, b], out.split([3, 5])):
        torch.testing.assert_close(part, dense_reference(seq["q"], seq["k"], seq["v"], D ** -0.5),
                                   rtol=1e-5, atol=1e-5)
    ctx = build_forward_context([1], [4], [[1]], BLOCK)
    with forward_context(ctx), pytest.raises(RuntimeError, match="kv_cache"):
        layer(a["q"][:1], a["k"][:1], a["v"][:1])


def test_needs_forward_context():
    with pytest.raises(RuntimeError, match="forward_context"):
        make_layer()(torch.randn(1, HQ, D), torch.randn(1, HKV, D), torch.randn(1, HKV, D))


def test_decode_only_batch_matches_dense_causal():
    """The batched decode path (one SDPA call for all sequences) over NaN-filled unwritten slots."""
    lengths = [5, 9, 16, 3]
    seqs = [random_seq(n) for n in lengths]
    tables = shuffled_tables(lengths)
    layer, scale = make_layer(), D ** -0.5
    run_step(layer, seqs, [n - 1 for n in lengths], [0] * 4, tables)
    outs = run_step(layer, seqs, [1] * 4, [n - 1 for n in lengths], tables)
    for seq, out, n in zip(seqs, outs, lengths):
        ref = dense_reference(seq["q"], seq["k"], seq["v"], scale)[n - 1:n]
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
