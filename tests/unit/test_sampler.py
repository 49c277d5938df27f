"""Sampler: masks against per-row references, penalties against the formulas, logprobs, seeds."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deepserve.layers.sampler import (Sampler, SamplingBatch, SamplingRequest, apply_min_p, apply_top_k,
                                      apply_top_p, make_generator, token_counts)
from deepserve.sampling_params import SamplingParams

VOCAB = 32


def batch_of(requests, vocab=VOCAB):
    return SamplingBatch.build(requests, vocab)


def req(prompt=(), output=(), seeded=False, **params):
    p = SamplingParams(**params)
    return SamplingRequest(p, list(prompt), list(output), make_generator(p) if seeded else None)


def distinct_logits(rows, vocab=VOCAB, seed=0):
    """Random logits with no ties inside a row (so masks are unambiguous)."""
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(vocab, generator=g).float() * 0.37 + torch.rand(1, generator=g)
                        for _ in range(rows)])


# ----------------------------------------------------------------------------- mask references


def ref_top_k(row: list[float], k: int) -> set[int]:
    if k <= 0 or k >= len(row):
        return set(range(len(row)))
    return set(sorted(range(len(row)), key=lambda i: -row[i])[:k])


def ref_probs(row: list[float]) -> list[float]:
    m = max(row)
    e = [math.exp(x - m) for x in row]
    return [x / sum(e) for x in e]


def ref_top_p(row: list[float], p: float) -> set[int]:
    probs = ref_probs(row)
    keep, mass = set(), 0.0
    for i in sorted(range(len(row)), key=lambda i: -probs[i]):
        if mass >= p and p < 1.0:
            break
        keep.add(i)
        mass += probs[i]
    return keep


def ref_min_p(row: list[float], p: float) -> set[int]:
    probs = ref_probs(row)
    return {i for i, q in enumerate(probs) if q >= p * max(probs)}


def kept(masked: torch.Tensor) -> list[set[int]]:
    return [set(torch.nonzero(torch.isfinite(r)).flatten().tolist()) for r in masked]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(-1, VOCAB + 3), min_size=1, max_size=6), st.integers(0, 1000))
def test_top_k_matches_reference(ks, seed):
    logits = distinct_logits(len(ks), seed=seed)
    masked = apply_top_k(logits, torch.tensor(ks))
    for row, k, got in zip(logits.tolist(), ks, kept(masked)):
        assert got == ref_top_k(row, k)
    assert torch.equal(masked[torch.isfinite(masked)], logits[torch.isfinite(masked)])


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.05, 0.3, 0.5, 0.77, 0.9, 0.99, 1.0]), min_size=1, max_size=6),
       st.integers(0, 1000))
def test_top_p_matches_reference(ps, seed):
    logits = distinct_logits(len(ps), seed=seed) * 0.5
    got = kept(apply_top_p(logits, torch.tensor(ps)))
    for row, p, keep in zip(logits.tolist(), ps, got):
        assert keep == ref_top_p(row, p)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.33, 0.8, 1.0]), min_size=1, max_size=6),
       st.integers(0, 1000))
def test_min_p_matches_reference(ps, seed):
    logits = distinct_logits(len(ps), seed=seed) * 0.3
    got = kept(apply_min_p(logits, torch.tensor(ps)))
    for row, p, keep in zip(logits.tolist(), ps, got):
        assert keep == ref_min_p(row, p)


def test_top_p_always_keeps_top_token():
    logits = torch.tensor([[5.0, 0.0, 0.0, 0.0]])
    assert kept(apply_top_p(logits, torch.tensor([1e-6]))) == [{0}]


# ----------------------------------------------------------------------------- penalties, bias


def test_penalties_match_formulas():
    prompt, output = [1, 2, 3], [3, 4, 4, 5, 5, 5]
    params = dict(repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.25,
                  temperature=0.0, logprobs=0)
    logits = torch.randn(1, VOCAB) * 3
    batch = batch_of([req(prompt, output, **params)])
    got = Sampler.process_logits(logits, batch)[0]
    want = logits[0].clone()
    for t in range(VOCAB):
        x = want[t].item()
        if t in prompt or t in output:
            x = x / 1.3 if x > 0 else x * 1.3
        c = output.count(t)
        want[t] = x - 0.5 * (c > 0) - 0.25 * c
    torch.testing.assert_close(got, want)


def test_penalty_rows_are_independent():
    logits = torch.randn(2, VOCAB)
    batch = batch_of([req([1], [2], repetition_penalty=2.0, temperature=0.0, logprobs=0),
                      req([1], [2], temperature=0.0, logprobs=0)])
    got = Sampler.process_logits(logits, batch)
    torch.testing.assert_close(got[1], logits[1])
    assert not torch.allclose(got[0], logits[0])


def test_token_counts():
    counts = token_counts([[0, 2, 2], [], [5]], 6)
    assert counts.tolist() == [[1, 0, 2, 0, 0, 0], [0] * 6, [0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("temperature", [0.0, 1.0, 2.5])
def test_logit_bias_forces_token(temperature):
    logits = torch.randn(3, VOCAB) * 5
    batch = batch_of([req(temperature=temperature, logit_bias={7: 100.0}, seed=i) for i in range(3)])
    out = Sampler()(logits, batch)
    assert out.token_ids.tolist() == [7, 7, 7]


def test_logit_bias_out_of_vocab_is_ignored():
    logits = torch.randn(1, VOCAB)
    out = Sampler()(logits, batch_of([req(temperature=0.0, logit_bias={VOCAB + 5: 100.0})]))
    assert out.token_ids.tolist() == [logits.argmax(-1).item()]


# ----------------------------------------------------------------------------- greedy, logprobs


def test_all_greedy_is_argmax_fast_path():
    logits = torch.randn(5, VOCAB)
    batch = batch_of([req(temperature=0.0) for _ in range(5)])
    assert batch.is_plain_greedy
    out = Sampler()(logits, batch)
    assert torch.equal(out.token_ids, logits.argmax(-1)) and out.logprobs is None


def test_greedy_rows_in_mixed_batch_take_argmax():
    logits = torch.randn(4, VOCAB)
    batch = batch_of([req(temperature=0.0), req(temperature=1.0, top_k=3),
                      req(temperature=0.0, top_p=0.1), req(temperature=0.7)])
    out = Sampler()(logits, batch)
    assert out.token_ids[0] == logits[0].argmax() and out.token_ids[2] == logits[2].argmax()
    assert out.token_ids[1].item() in logits[1].topk(3).indices.tolist()


def test_logprobs_are_log_softmax_of_processed_logits():
    logits = torch.randn(3, VOCAB)
    requests = [req([1, 2], [2, 3], logprobs=5, temperature=0.8, repetition_penalty=1.5,
                    frequency_penalty=0.3, logit_bias={4: 2.0}, seed=1, seeded=True),
                req(logprobs=None, temperature=0.0),
                req(logprobs=0, temperature=0.0, presence_penalty=1.0, output=[9])]
    batch = batch_of(requests)
    out = Sampler()(logits, batch)
    expected = Sampler.process_logits(logits, batch).log_softmax(-1)
    assert out.logprobs[1] is None
    for row in (0, 2):
        lp = out.logprobs[row]
        assert lp.token_id == out.token_ids[row].item()
        assert lp.logprob == pytest.approx(expected[row, lp.token_id].item(), abs=1e-6)
        values, ids = expected[row].topk(requests[row].params.logprobs)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=1e-6)
    assert out.logprobs[2].top == []


def test_logprobs_ignore_temperature_and_masks():
    logits = torch.randn(1, VOCAB)
    out = Sampler()(logits, batch_of([req(logprobs=3, temperature=0.3, top_k=2, top_p=0.5)]))
    expected = logits.log_softmax(-1)[0]
    assert out.logprobs[0].logprob == pytest.approx(expected[out.token_ids[0]].item(), abs=1e-6)


# ----------------------------------------------------------------------------- sampling, seeds


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    n = 20000
    logits = probs.log().expand(n, 4).contiguous()
    out = Sampler()(logits, batch_of([req(temperature=1.0)] * n, vocab=4))
    freq = torch.bincount(out.token_ids, minlength=4).float() / n
    torch.testing.assert_close(freq, probs, atol=0.015, rtol=0)


def test_sampled_tokens_respect_masks():
    logits = distinct_logits(200)
    out = Sampler()(logits, batch_of([req(temperature=5.0, top_k=4)] * 200))
    allowed = logits.topk(4).indices
    assert all(t in a for t, a in zip(out.token_ids.tolist(), allowed.tolist()))


def run_steps(requests, logits_per_step):
    """Sample several steps with the given requests; returns the tokens per step per row."""
    sampler = Sampler()
    return [sampler(logits, batch_of(requests)).token_ids.tolist() for logits in logits_per_step]


def test_seeded_sampling_is_reproducible_alone_and_in_any_batch():
    steps = [torch.randn(4, VOCAB) for _ in range(5)]
    params = dict(temperature=1.0, top_p=0.95, seed=1234)
    alone = run_steps([req(seeded=True, **params)], [s[:1] for s in steps])
    again = run_steps([req(seeded=True, **params)], [s[:1] for s in steps])
    assert alone == again
    mixed = run_steps([req(seeded=True, **params), req(temperature=1.0), req(temperature=0.0),
                       req(seeded=True, temperature=0.5, seed=7)], steps)
    assert [row[0] for row in mixed] == [row[0] for row in alone]
    last = run_steps([req(temperature=2.0), req(seeded=True, **params)], [s[[1, 0]] for s in steps])
    assert [row[1] for row in last] == [row[0] for row in alone]


def test_seeded_stream_continues_across_steps():
    logits = torch.zeros(1, VOCAB)  # uniform: a frozen stream would repeat the same token
    tokens = run_steps([req(seeded=True, temperature=1.0, seed=3)], [logits] * 8)
    assert len({t[0] for t in tokens}) > 1


def test_different_seeds_differ():
    logits = torch.zeros(1, VOCAB)
    a = run_steps([req(seeded=True, temperature=1.0, seed=1)], [logits] * 8)
    b = run_steps([req(seeded=True, temperature=1.0, seed=2)], [logits] * 8)
    assert a != b


def test_make_generator_without_seed_is_none():
    assert make_generator(SamplingParams()) is None


def test_logits_shape_checked():
    with pytest.raises(ValueError):
        Sampler()(torch.randn(2, VOCAB), batch_of([req()]))
