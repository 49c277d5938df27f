"""Scheduler: token budget, chunked prefill, decode-first order, preemption + recompute, abort, stops.

The "model" is a fake over a fake paged KV cache: every new token's slot stores the token id, and
the next token is a hash of the whole context read back through the block table. A wrong block
table, a stale prefix hit or a miscounted position changes the tokens it produces.
"""

from __future__ import annotations

import hashlib
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepserve.config import CacheConfig, SchedulerConfig
from deepserve.engine.block_manager import NULL_BLOCK
from deepserve.engine.scheduler import ScheduledBatch, Scheduler
from deepserve.engine.sequence import FinishReason, Sequence, SequenceStatus, TokenLogprob
from deepserve.sampling_params import SamplingParams

VOCAB = 50


def next_token(context: list) -> int:
    return int.from_bytes(hashlib.sha256(repr(context).encode()).digest()[:4], "little") % VOCAB


class FakeModel:
    def __init__(self, block_size: int, strict: bool = True):
        self.block_size, self.strict, self.kv = block_size, strict, {}

    def slot(self, seq: Sequence, pos: int) -> int:
        block = seq.block_table[pos // self.block_size]
        assert block != NULL_BLOCK
        return block * self.block_size + pos % self.block_size

    def execute(self, batch: ScheduledBatch) -> dict[str, int]:
        for entry in batch.scheduled:
            for pos in range(entry.start, entry.start + entry.num_new_tokens):
                self.kv[self.slot(entry.seq, pos)] = entry.seq.token_ids[pos]
        return {e.seq.request_id: self.sample(e.seq) for e in batch.scheduled if e.is_last_chunk}

    def sample(self, seq: Sequence) -> int:
        context = [self.kv.get(self.slot(seq, pos)) for pos in range(seq.num_tokens)]
        assert not self.strict or context == seq.token_ids, f"{seq.request_id}: KV cache disagrees"
        return next_token(context)


def make_scheduler(num_blocks=64, block_size=4, budget=32, max_num_seqs=8, max_model_len=256,
                   chunked=True, prefix=True) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                             enable_chunked_prefill=chunked)
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=prefix)
    return Scheduler(config, cache, max_model_len=max_model_len)


def make_seq(rid, prompt, max_tokens=8, eos=(), **params) -> Sequence:
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens, **params), eos_token_ids=eos)


def run(sched: Scheduler, model: FakeModel, max_steps: int = 1000):
    """Drive to completion, checking the budget and max_num_seqs every step; returns the tokens
    per request id and the batches."""
    tokens: dict[str, list[int]] = {}
    batches = []
    for _ in range(max_steps):
        if not sched.has_unfinished():
            return tokens, batches
        batch = sched.schedule()
        check_batch(sched, batch)
        batches.append(batch)
        for out in sched.update(batch, model.execute(batch)):
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
    raise AssertionError("did not finish")


def check_batch(sched: Scheduler, batch: ScheduledBatch) -> None:
    counts = [n for _, n, *_ in batch.scheduled]
    assert batch.num_batched_tokens == sum(counts) <= sched.config.max_num_batched_tokens
    assert all(n >= 1 for n in counts)
    assert len(batch.scheduled) <= sched.config.max_num_seqs >= len(sched.running)
    assert len({id(seq) for seq, _, *_ in batch.scheduled}) == len(batch.scheduled)


# ----- budget, chunking, order -----------------------------------------------------------------

def test_token_budget_is_honoured_every_step():
    sched, rng = make_scheduler(budget=16), random.Random(0)
    for i in range(12):
        sched.add(make_seq(f"r{i}", [rng.randrange(VOCAB) for _ in range(rng.randint(1, 40))]))
    tokens, batches = run(sched, FakeModel(4))
    assert len(tokens) == 12 and all(len(t) == 8 for t in tokens.values())
    assert max(b.num_batched_tokens for b in batches) == 16


def test_long_prompt_is_chunked_over_several_steps():
    sched = make_scheduler(budget=16)
    sched.add(make_seq("a", range(40), max_tokens=2))
    model = FakeModel(4)
    chunks, outputs = [], []
    while sched.has_unfinished():
        batch = sched.schedule()
        chunks.append([(s.request_id, n) for s, n, *_ in batch.scheduled])
        outputs.append(len(sched.update(batch, model.execute(batch))))
    assert chunks == [[("a", 16)], [("a", 16)], [("a", 8)], [("a", 1)]]
    assert outputs == [0, 0, 1, 1]  # a token only once the prompt's end is reached


def test_running_decodes_come_before_new_prefills():
    sched, model = make_scheduler(budget=16), FakeModel(4)
    sched.add(make_seq("a", range(5)))
    batch = sched.schedule()
    sched.update(batch, model.execute(batch))
    sched.add(make_seq("b", range(30)))
    batch = sched.schedule()
    assert [(s.request_id, n) for s, n, *_ in batch.scheduled] == [("a", 1), ("b", 15)]


def test_chunked_prefill_continues_ahead_of_waiting_requests():
    sched, model = make_scheduler(budget=10), FakeModel(4)
    sched.add(make_seq("a", range(25)))
    sched.add(make_seq("b", range(3)))
    first = sched.schedule()
    sched.update(first, model.execute(first))
    second = sched.schedule()
    assert [(s.request_id, n) for s, n, *_ in first.scheduled] == [("a", 10)]
    assert [(s.request_id, n) for s, n, *_ in second.scheduled] == [("a", 10)]


def test_max_num_seqs_is_honoured():
    sched, model = make_scheduler(max_num_seqs=2, budget=64), FakeModel(4)
    for i in range(5):
        sched.add(make_seq(f"r{i}", [i, 1, 2], max_tokens=3))
    batch = sched.schedule()
    assert len(batch.scheduled) == 2 and len(sched.waiting) == 3
    tokens, _ = run(sched, model)
    assert len(tokens) == 5


def test_without_chunking_a_prompt_waits_until_it_fits_whole():
    sched, model = make_scheduler(budget=16, max_model_len=16, chunked=False), FakeModel(4)
    sched.add(make_seq("a", range(10)))
    sched.add(make_seq("b", range(20, 30)))
    first = sched.schedule()
    sched.update(first, model.execute(first))
    second = sched.schedule()
    assert [(s.request_id, n) for s, n, *_ in first.scheduled] == [("a", 10)]
    assert [(s.request_id, n) for s, n, *_ in second.scheduled] == [("a", 1), ("b", 10)]


def test_without_chunking_the_budget_must_cover_max_model_len():
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        make_scheduler(budget=16, max_model_len=32, chunked=False)


# ----- prefix cache ----------------------------------------------------------------------------

def test_prefix_hits_count_as_computed():
    sched, model = make_scheduler(budget=64), FakeModel(4)
    sched.add(make_seq("a", range(10), max_tokens=1))
    run(sched, model)
    sched.add(make_seq("b", list(range(9)) + [42], max_tokens=1))
    batch = sched.schedule()
    (seq, n, *_), = batch.scheduled
    assert seq.num_computed_tokens == seq.num_cached_tokens == 8 and n == 2
    out, = sched.update(batch, model.execute(batch))
    assert out.num_cached_tokens == 8 and sched.stats().cache.prefix_hit_tokens == 8


# ----- preemption ------------------------------------------------------------------------------

def test_last_running_sequence_is_preempted_when_blocks_run_out():
    sched, model = make_scheduler(num_blocks=5, block_size=2, budget=64, prefix=False), FakeModel(2)
    a, b = make_seq("a", range(3), max_tokens=20), make_seq("b", range(10, 13), max_tokens=20)
    sched.add(a)
    sched.add(b)
    for _ in range(50):
        batch = sched.schedule()
        if batch.preempted:
            break
        sched.update(batch, model.execute(batch))
    assert batch.preempted == [b] and [s for s, _, *_ in batch.scheduled] == [a]
    assert b.status == SequenceStatus.WAITING and sched.waiting[0] is b
    assert b.num_computed_tokens == 0 and b.block_table == [] and b.num_preemptions == 1
    assert sched.stats().num_preemptions == 1 and sched.running == [a]


def test_a_sequence_that_cannot_grow_alone_preempts_itself():
    sched, model = make_scheduler(num_blocks=3, block_size=2, budget=64, prefix=False), FakeModel(2)
    a = make_seq("a", range(3), max_tokens=20)
    sched.add(a)
    for _ in range(2):
        batch = sched.schedule()
        sched.update(batch, model.execute(batch))
    batch = sched.schedule()  # a's 5th token needs a 3rd block; only 2 exist
    assert batch.preempted == [a] and batch.is_empty and sched.waiting[0] is a


@pytest.mark.parametrize("prefix", [True, False])
def test_preemption_and_recompute_give_the_same_tokens(prefix):
    rng = random.Random(1)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 20))] for _ in range(10)]
    prompts += [prompts[0][:5] + [1, 2, 3]]  # a shared prefix

    def generate(num_blocks):
        sched = make_scheduler(num_blocks=num_blocks, block_size=4, budget=24, prefix=prefix)
        for i, prompt in enumerate(prompts):
            sched.add(make_seq(f"r{i}", prompt, max_tokens=12))
        tokens, _ = run(sched, FakeModel(4))
        return tokens, sched.stats().num_preemptions

    roomy, roomy_preemptions = generate(num_blocks=200)
    tight, tight_preemptions = generate(num_blocks=10)
    assert roomy_preemptions == 0 and tight_preemptions > 0
    assert tight == roomy


# ----- abort and stop conditions ---------------------------------------------------------------

def test_abort_frees_blocks_of_waiting_and_running_requests():
    sched, model = make_scheduler(max_num_seqs=1), FakeModel(4)
    sched.add(make_seq("a", range(10)))
    sched.add(make_seq("b", range(10)))
    batch = sched.schedule()
    sched.update(batch, model.execute(batch))
    out = sched.abort("a")
    assert out.finish_reason == FinishReason.ABORT and out.new_token_ids == []
    assert sched.abort("b").finished and sched.abort("b") is None
    assert not sched.has_unfinished() and sched.block_manager.usage == 0.0


def test_abort_between_schedule_and_update_is_skipped():
    sched, model = make_scheduler(), FakeModel(4)
    sched.add(make_seq("a", range(5)))
    sched.add(make_seq("b", range(7)))
    batch = sched.schedule()
    sampled = model.execute(batch)
    sched.abort("a")
    assert [o.request_id for o in sched.update(batch, sampled)] == ["b"]


def step_with(sched: Scheduler, token: int, logprob: TokenLogprob | None = None):
    batch = sched.schedule()
    lps = {s.request_id: logprob for s, _, *_ in batch.scheduled} if logprob else None
    return sched.update(batch, {s.request_id: token for s, _, *_ in batch.scheduled}, lps)


@pytest.mark.parametrize("params, token, reason, stop_reason", [
    (dict(eos=(7,)), 7, FinishReason.STOP, None),
    (dict(stop_token_ids=(9,)), 9, FinishReason.STOP, 9),
    (dict(eos=(7,), max_tokens=1), 7, FinishReason.STOP, None),
    (dict(max_tokens=1), 3, FinishReason.LENGTH, None),
])
def test_stop_conditions(params, token, reason, stop_reason):
    sched = make_scheduler()
    sched.add(make_seq("a", [1, 2, 3], **params))
    out, = step_with(sched, token)
    assert (out.new_token_ids, out.finish_reason, out.stop_reason) == ([token], reason, stop_reason)
    assert not sched.has_unfinished() and sched.block_manager.usage == 0.0


def test_ignore_eos_keeps_going_until_max_tokens():
    sched = make_scheduler()
    sched.add(make_seq("a", [1, 2, 3], eos=(7,), ignore_eos=True, max_tokens=3))
    reasons = [step_with(sched, 7)[0].finish_reason for _ in range(3)]
    assert reasons == [None, None, FinishReason.LENGTH]


def test_max_model_len_stops_generation():
    sched = make_scheduler(max_model_len=6)
    sched.add(make_seq("a", [1, 2, 3, 4], max_tokens=100))
    outs = [step_with(sched, 5)[0] for _ in range(2)]
    assert outs[-1].finish_reason == FinishReason.LENGTH and not sched.has_unfinished()


def test_logprobs_are_attached_to_the_output():
    sched = make_scheduler()
    sched.add(make_seq("a", [1, 2, 3]))
    lp = TokenLogprob(4, -0.5, [(4, -0.5)])
    out, = step_with(sched, 4, lp)
    assert out.new_logprobs == [lp] and sched.running[0].logprobs == [lp]


def test_sampled_tokens_may_come_as_a_list_aligned_with_the_batch():
    sched = make_scheduler(budget=8)
    sched.add(make_seq("a", range(3)))
    sched.add(make_seq("b", range(20)))  # gets a 5-token chunk: no sample
    batch = sched.schedule()
    assert [e.seq.request_id for e in batch.sampling] == ["a"]
    assert [o.new_token_ids for o in sched.update(batch, [11])] == [[11]]
    batch = sched.schedule()
    assert [o.new_token_ids for o in sched.update(batch, [12, -1])] == [[12]]


def test_add_rejects_requests_it_could_never_serve():
    sched = make_scheduler(num_blocks=4, block_size=4, max_model_len=64)
    sched.add(make_seq("a", [1]))
    for seq in (make_seq("a", [1]), make_seq("e", []), make_seq("big", range(65)),
                make_seq("huge", range(13))):
        with pytest.raises(ValueError):
            sched.add(seq)


# ----- property: random traffic through the scheduler ------------------------------------------

@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num_blocks=st.integers(12, 30), budget=st.integers(1, 24), max_num_seqs=st.integers(1, 6),
       chunked=st.booleans(), prefix=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_random_traffic_keeps_the_cache_consistent(num_blocks, budget, max_num_seqs, chunked, prefix, seed):
    """FakeModel checks every context it reads back; at the end every block is free or evictable."""
    sched = make_scheduler(num_blocks=num_blocks, block_size=2, budget=budget if chunked else 24,
                           max_num_seqs=max_num_seqs, max_model_len=24, chunked=chunked, prefix=prefix)
    model, rng, live = FakeModel(2), random.Random(seed), set()
    for i in range(300):
        op = rng.choice(["add", "add", "step", "step", "step", "abort"])
        if op == "add":
            tail = [rng.randrange(3) for _ in range(rng.randrange(4))]
            prompt = [1, 2, 3, 4, 5, 6][: rng.randint(1, 6)] + tail
            sched.add(make_seq(f"r{i}", prompt, max_tokens=rng.randint(1, 12), eos=(0,)))
            live.add(f"r{i}")
        elif op == "abort" and live:
            rid = rng.choice(sorted(live))
            assert sched.abort(rid).finished
            live.discard(rid)
        else:
            batch = sched.schedule()
            check_batch(sched, batch)
            outputs = sched.update(batch, model.execute(batch))
            live.difference_update(o.request_id for o in outputs if o.finished)
    for rid in sorted(live):
        sched.abort(rid)
    assert not sched.has_unfinished()
    assert sched.block_manager.num_free_blocks == sched.block_manager.num_blocks
