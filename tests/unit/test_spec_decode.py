"""Speculative decoding with the MTP layer (deepserve/engine/spec_decode).

1. The verification logic with fake drafts / targets.
2. The scheduler with a fake model over a fake paged KV cache (as in test_scheduler.py) and a fake
   proposer that is right most of the time: outputs equal plain decoding, max_tokens / stop tokens
   are exact when several tokens are accepted in one step, no block leaks, no stale prefix hits.
3. The bundled tiny-deepseek-v3 (a trained MTP layer): greedy outputs token-identical with k = 1..3,
   acceptance rate > 0, abort / preemption release every block.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import CacheConfig, ConfigError, SchedulerConfig, SpeculativeConfig
from deepserve.engine.block_manager import NULL_BLOCK
from deepserve.engine.scheduler import ScheduledBatch, Scheduler
from deepserve.engine.sequence import FinishReason, Sequence
from deepserve.engine.spec_decode import DraftTokenBudget, SpecDecodeStats, accept_greedy
from deepserve.engine.spec_decode.verifier import Verifier, row_requests, sample_rows

# ----------------------------------------------------------------------------- 1. verification


@pytest.mark.parametrize("drafts, targets, run", [
    ([], [7], [7]),  # nothing to verify: the sampled token
    ([5], [5, 9], [5, 9]),  # accepted + bonus
    ([5], [4, 9], [4]),  # rejected: the main model's own choice
    ([1, 2, 3], [1, 2, 3, 4], [1, 2, 3, 4]),  # all accepted
    ([1, 2, 3], [1, 7, 3, 4], [1, 7]),  # a later match after a miss does not count
    ([1, 2, 3], [9, 2, 3, 4], [9]),
])
def test_accept_greedy(drafts, targets, run):
    assert accept_greedy(drafts, targets) == run


def test_accept_greedy_needs_one_more_target():
    with pytest.raises(ValueError):
        accept_greedy([1, 2], [1, 2])


def test_stats_count_drafts_and_accepted_per_position():
    stats = SpecDecodeStats()
    stats.record(3, 2)
    stats.record(3, 0)
    stats.record(0, 0)  # no drafts: not a verification
    stats.record(1, 1)
    assert (stats.num_verifications, stats.num_draft_tokens, stats.num_accepted_tokens) == (3, 7, 3)
    assert stats.accepted_per_position == [2, 1, 0]
    assert stats.acceptance_rate == pytest.approx(3 / 7)
    assert stats.mean_tokens_per_step == pytest.approx(2.0)


def _entry_batch(specs: list[tuple[list[int], list[int], int]],
                 params: SamplingParams = SamplingParams(temperature=0.0, max_tokens=16)) -> ScheduledBatch:
    """(tokens, drafts, num_computed) per sequence -> a batch that feeds the rest + the drafts."""
    batch = ScheduledBatch()
    for i, (tokens, drafts, computed) in enumerate(specs):
        seq = Sequence(f"r{i}", tokens, params)
        seq.num_computed_tokens, seq.spec_token_ids = computed, list(drafts)
        batch.add(seq, len(tokens) - computed + len(drafts))
    return batch


def test_rows_requests_and_runs_of_a_mixed_batch():
    # r0: a decode verifying 2 drafts; r1: a prefill of 3 (no drafts); r2: a decode verifying 1.
    batch = _entry_batch([([1, 2, 3], [4, 5], 2), ([6, 7, 8], [], 0), ([9, 10], [11], 1)])
    assert [e.num_spec_tokens for e in batch.scheduled] == [2, 0, 1]
    assert [e.input_token_ids for e in batch.scheduled] == [[3, 4, 5], [6, 7, 8], [10, 11]]
    assert sample_rows(batch.scheduled).tolist() == [0, 1, 2, 5, 6, 7]
    # Without penalties the sampler reads no token history, so none is copied.
    assert [(list(r.prompt_token_ids), list(r.output_token_ids))
            for r in row_requests(batch.scheduled[0], None)] == [([], [])] * 3
    verifier = Verifier()
    targets = [4, 5, 99, 42, 11, 12]  # r0 accepts both (+ bonus 99); r1 samples 42; r2 accepts 11
    runs = {e.seq.request_id: run for e, run, _ in verifier.runs(batch.sampling, targets, None)}
    assert runs == {"r0": [4, 5, 99], "r1": [42], "r2": [11, 12]}
    assert (verifier.stats.num_draft_tokens, verifier.stats.num_accepted_tokens) == (3, 3)


def test_row_requests_with_a_penalty_see_the_drafts_as_output():
    penalised = SamplingParams(temperature=0.0, max_tokens=16, presence_penalty=0.5)
    batch = _entry_batch([([1, 2, 3], [4, 5], 2)], penalised)
    rows = row_requests(batch.scheduled[0], None)
    assert [list(r.output_token_ids) for r in rows] == [[], [4], [4, 5]]  # prompt is [1, 2, 3]
    assert all(list(r.prompt_token_ids) == [1, 2, 3] for r in rows)


def test_speculative_config_is_validated():
    with pytest.raises(ConfigError):
        SpeculativeConfig("mtp", 0)
    with pytest.raises(ConfigError):
        SpeculativeConfig("eagle", 1)
    assert SpeculativeConfig("mtp", 3).num_lookahead_slots == 2


# ----------------------------------------------------------------------------- 2. scheduler + fakes

VOCAB = 50


def next_token(context: list) -> int:
    return int.from_bytes(hashlib.sha256(repr(context).encode()).digest()[:4], "little") % VOCAB


class FakeSpecModel:
    """Writes every fed token (drafts included) into a fake paged KV cache and samples each row from
    the context read back through the block table: a rejected draft left in a registered block, a
    stale prefix hit or a wrong position changes the tokens. Proposes drafts that are right with
    probability `hit_rate`."""

    def __init__(self, block_size: int, k: int, hit_rate: float, seed: int = 0):
        self.block_size, self.k, self.hit_rate = block_size, k, hit_rate
        self.rng, self.kv = random.Random(seed), {}

    def slot(self, seq: Sequence, pos: int) -> int:
        block = seq.block_table[pos // self.block_size]
        assert block != NULL_BLOCK
        return block * self.block_size + pos % self.block_size

    def execute(self, batch: ScheduledBatch) -> tuple[dict, dict]:
        runs, drafts = {}, {}
        for entry in batch.scheduled:
            for i, token in enumerate(entry.input_token_ids):
                self.kv[self.slot(entry.seq, entry.start + i)] = token
            if entry.is_last_chunk:
                run = self.verify(entry)
                runs[entry.seq.request_id] = run
                drafts[entry.seq.request_id] = self.propose(entry.seq.token_ids + run)
        return runs, drafts

    def verify(self, entry) -> list[int]:
        seq, end = entry.seq, entry.start + entry.num_new_tokens
        context = [self.kv[self.slot(seq, p)] for p in range(end)]
        assert context[:seq.num_tokens] == seq.token_ids, f"{seq.request_id}: KV cache disagrees"
        targets = [next_token(context[:n]) for n in range(seq.num_tokens, end + 1)]
        return accept_greedy(seq.spec_token_ids[:entry.num_spec_tokens], targets)

    def propose(self, tokens: list[int]) -> list[int]:
        drafts, context = [], list(tokens)
        for _ in range(self.k):
            right = next_token(context)
            drafts.append(right if self.rng.random() < self.hit_rate else (right + 1) % VOCAB)
            context.append(drafts[-1])
        return drafts


def reference(prompt: list[int], max_tokens: int, stop: tuple[int, ...] = ()) -> list[int]:
    out = []
    while len(out) < max_tokens:
        out.append(next_token(prompt + out))
        if out[-1] in stop:
            break
    return out


def make_scheduler(k: int, num_blocks=64, block_size=4, budget=32, max_model_len=256) -> Scheduler:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget)
    cache = CacheConfig(block_size=block_size, num_blocks=num_blocks)
    return Scheduler(config, cache, max_model_len=max_model_len, drafts=DraftTokenBudget(k, max_model_len))


def run(sched: Scheduler, model: FakeSpecModel, max_steps: int = 2000) -> dict[str, Sequence]:
    seqs = {s.request_id: s for s in list(sched.waiting) + sched.running}
    for _ in range(max_steps):
        if not sched.has_unfinished():
            break
        batch = sched.schedule()
        assert batch.num_batched_tokens <= sched.config.max_num_batched_tokens
        runs, drafts = model.execute(batch)
        sched.update(batch, runs, None, drafts)
    assert not sched.has_unfinished()
    assert sched.block_manager.usage == 0.0
    return seqs


def prompts(n: int, rng: random.Random) -> list[list[int]]:
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 30))] for _ in range(n)]


@pytest.mark.parametrize("k, hit_rate", [(1, 0.8), (2, 0.7), (3, 0.9), (3, 0.0), (3, 1.0)])
def test_fake_spec_matches_plain_decoding(k, hit_rate):
    rng = random.Random(k)
    sched, model = make_scheduler(k), FakeSpecModel(4, k, hit_rate, seed=k)
    ps = prompts(6, rng)
    for i, p in enumerate(ps):
        sched.add(Sequence(f"r{i}", p, SamplingParams(max_tokens=3 + 4 * i, temperature=0.0)))
    seqs = run(sched, model)
    for i, p in enumerate(ps):
        assert seqs[f"r{i}"].output_token_ids == reference(p, 3 + 4 * i)
        assert seqs[f"r{i}"].finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("max_tokens", range(1, 9))
def test_max_tokens_is_exact_when_runs_are_long(max_tokens):
    sched, model = make_scheduler(3), FakeSpecModel(4, 3, hit_rate=1.0)
    prompt = [3, 1, 4, 1, 5]
    sched.add(Sequence("r", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0)))
    outputs = []
    while sched.has_unfinished():
        batch = sched.schedule()
        runs, drafts = model.execute(batch)
        outputs += sched.update(batch, runs, None, drafts)
    tokens = [t for out in outputs for t in out.new_token_ids]
    assert tokens == reference(prompt, max_tokens)  # never past max_tokens
    assert outputs[-1].finish_reason == FinishReason.LENGTH
    assert sched.block_manager.usage == 0.0


def test_stop_token_inside_an_accepted_run_ends_the_request_there():
    prompt = [2, 7, 1, 8, 2, 8]
    full = reference(prompt, 12)
    stop = full[5]  # the 6th token: inside a run of up to 4
    expected = reference(prompt, 12, stop=(stop,))
    for eos in (True, False):
        sched, model = make_scheduler(3), FakeSpecModel(4, 3, hit_rate=1.0)
        params = SamplingParams(max_tokens=12, temperature=0.0,
                                stop_token_ids=[] if eos else [stop])
        sched.add(Sequence("r", prompt, params, eos_token_ids=(stop,) if eos else ()))
        seq = run(sched, model)["r"]
        assert seq.output_token_ids == expected
        assert seq.finish_reason == FinishReason.STOP


def test_prefix_cache_never_serves_rejected_drafts():
    """Requests sharing prefixes, low hit rate (many rejected drafts written into blocks), small
    blocks: the strict fake KV check fails if a registered block holds a rejected draft."""
    rng = random.Random(5)
    sched, model = make_scheduler(3, block_size=2), FakeSpecModel(2, 3, hit_rate=0.4, seed=5)
    base = prompts(1, rng)[0] + [1, 2, 3]
    for i in range(8):
        sched.add(Sequence(f"r{i}", base[:len(base) - i % 3], SamplingParams(max_tokens=10, temperature=0.0)))
    seqs = run(sched, model)
    for i in range(8):
        assert seqs[f"r{i}"].output_token_ids == reference(base[:len(base) - i % 3], 10)


def test_preemption_and_small_budget_with_drafts():
    rng = random.Random(9)
    sched, model = make_scheduler(3, num_blocks=14, budget=5), FakeSpecModel(4, 3, hit_rate=0.8, seed=9)
    ps = prompts(5, rng)
    for i, p in enumerate(ps):
        sched.add(Sequence(f"r{i}", p, SamplingParams(max_tokens=12, temperature=0.0)))
    seqs = run(sched, model)
    assert sched.num_preemptions > 0
    for i, p in enumerate(ps):
        assert seqs[f"r{i}"].output_token_ids == reference(p, 12)


def test_drafts_stop_at_max_model_len():
    sched, model = make_scheduler(3, max_model_len=12), FakeSpecModel(4, 3, hit_rate=1.0)
    prompt = [1, 2, 3, 4, 5, 6, 7]
    sched.add(Sequence("r", prompt, SamplingParams(max_tokens=50, temperature=0.0)))
    seq = run(sched, model)["r"]
    assert seq.num_tokens == 12 and seq.output_token_ids == reference(prompt, 5)


# ----------------------------------------------------------------------------- 3. tiny-deepseek-v3

PROMPTS = ["def fibonacci(n):\n", "ROMEO:\nBut soft, what light", "import os\nimport sys\n\n",
           "The quick brown fox"]
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)


def tiny(k: int | None = None, **kw) -> LLM:
    spec = {} if k is None else {"speculative": "mtp", "num_speculative_tokens": k}
    return LLM("tiny-deepseek-v3", **{"num_kv_blocks": 128, **spec, **kw})


@pytest.fixture(scope="module")
def plain():
    return tiny()


@pytest.fixture(scope="module")
def reference_outputs(plain):
    return [o.outputs[0].token_ids for o in plain.generate(PROMPTS, GREEDY)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_tiny_v3_greedy_outputs_identical_with_speculation(k, reference_outputs):
    llm = tiny(k)
    assert llm.engine.core.runner.graphs is None
    outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert outputs == reference_outputs
    stats = llm.engine.core.stats()
    spec = llm.engine.core.runner.verifier.stats
    print(f"\nk={k}: acceptance rate {stats.spec_acceptance_rate:.3f} "
          f"({stats.spec_num_accepted_tokens}/{stats.spec_num_draft_tokens}), accepted per position "
          f"{spec.accepted_per_position}, tokens per verify step {spec.mean_tokens_per_step:.2f}")
    assert stats.spec_num_draft_tokens > 0 and stats.spec_acceptance_rate > 0.2
    assert stats.kv_cache_usage == 0.0


def test_tiny_v3_mtp_shares_the_main_models_embedding_and_head():
    llm = tiny(1)
    mtp, main = llm.engine.core.runner.proposer.mtp, llm.engine.core.runner.model
    assert mtp.embed_tokens.weight is main.model.embed_tokens.weight  # the checkpoint's copies are equal
    assert mtp.shared_head.head.weight is main.lm_head.weight
    assert mtp.layer.self_attn.kv_cache.shape == main.model.layers[0].self_attn.kv_cache.shape
    # its own layers are post-processed like the main model's (before, never: two input GEMMs per step)
    assert mtp.layer.self_attn.qkv_a_proj is not None and main.model.layers[0].self_attn.qkv_a_proj is not None


def test_tiny_v3_stops_penalties_logprobs_and_sampling_match(plain):
    full = plain.generate([PROMPTS[0]], GREEDY)[0].outputs[0].token_ids
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (1, 2, 5)]
    params += [SamplingParams(max_tokens=24, temperature=0.0, stop_token_ids=[full[6]]),
               SamplingParams(max_tokens=12, temperature=0.0, repetition_penalty=1.3, logprobs=2),
               SamplingParams(max_tokens=12, temperature=0.8, seed=7)]
    prompts = [PROMPTS[0]] * len(params)
    expected = [o.outputs[0] for o in plain.generate(prompts, params)]
    got = [o.outputs[0] for o in tiny(3).generate(prompts, params)]
    assert [len(o.token_ids) for o in got[:3]] == [1, 2, 5]
    assert got[3].token_ids[-1] == full[6] and got[3].finish_reason == "stop"
    for a, b in zip(got, expected):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    for la, lb in zip(got[4].logprobs, expected[4].logprobs):
        assert [t for t, _ in la.top] == [t for t, _ in lb.top]
        assert la.logprob == pytest.approx(lb.logprob, abs=1e-4)


def test_tiny_v3_abort_and_preemption_release_every_block(reference_outputs):
    llm = tiny(2, num_kv_blocks=6, max_num_batched_tokens=64)  # 96 slots for 4 sequences
    outputs = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, GREEDY)]
    assert outputs == reference_outputs
    assert llm.engine.core.stats().num_preemptions > 0
    assert llm.engine.core.stats().kv_cache_usage == 0.0
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(f"a{i}", p, SamplingParams(max_tokens=40, temperature=0.0))
    for _ in range(4):
        engine.step()
    assert any(s.spec_token_ids for s in engine.core.scheduler.running)
    for i in range(len(PROMPTS)):
        engine.abort_request(f"a{i}")
    assert not engine.has_unfinished()
    assert engine.core.stats().kv_cache_usage == 0.0


def test_cli_flags_and_config_round_trip():
    import argparse

    from deepserve.engine.args import EngineArgs
    from deepserve.engine.messages import decode_engine_config, encode_engine_config

    ns = EngineArgs.add_cli_args(argparse.ArgumentParser()).parse_args(
        ["--model", "tiny-deepseek-v3", "--speculative", "mtp", "--num-speculative-tokens", "3"])
    config = EngineArgs.from_cli_args(ns).create_engine_config()
    assert config.speculative == SpeculativeConfig("mtp", 3)
    assert decode_engine_config(encode_engine_config(config)) == config
    plain = EngineArgs(model="tiny-deepseek-v3").create_engine_config()
    assert plain.speculative is None and decode_engine_config(encode_engine_config(plain)) == plain
