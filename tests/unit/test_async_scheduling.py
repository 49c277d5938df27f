"""Async scheduling: the next batch is scheduled and launched before the previous one's sampled
tokens are read back. Whatever the batch does (stops by EOS, stop token or length, preemption,
prefix-cache hits, aborts, chunked prefill, requests that need the synchronous path), the tokens
must be exactly those of the synchronous engine. On CPU the "device" is the CPU, but the
scheduling logic (placeholders, device-side inputs, late stops) is the same code."""

from __future__ import annotations

import pytest

from deepserve import LLM, SamplingParams
from deepserve.config import CacheConfig, SchedulerConfig
from deepserve.engine.block_manager import BlockManager
from deepserve.engine.scheduler import Scheduler
from deepserve.engine.sequence import PLACEHOLDER_TOKEN, FinishReason, Sequence
from tests.tiny_checkpoints import make_tiny_llama

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def prompts(n: int, start: int = 0) -> list[list[int]]:
    return [[(7 * i + 3 * j) % 300 + 2 for j in range(3 + 5 * i)] for i in range(start, start + n)]


def generate(folder, mode: str, ps, params, **kw):
    llm = LLM(str(folder), num_kv_blocks=kw.pop("num_kv_blocks", 256), max_num_batched_tokens=64,
              async_scheduling=mode, **kw)
    assert llm.engine.core.async_scheduling is (mode == "on")
    outs = llm.generate(ps, params)
    stats = llm.engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0  # nothing leaked
    return [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in outs]


def test_same_tokens_as_synchronous_with_chunked_prefill_and_different_lengths(folder):
    ps = prompts(10)  # up to 48 tokens each against a 64-token budget: chunks + decodes mixed
    params = [SamplingParams(max_tokens=3 + i, temperature=0.0, ignore_eos=True) for i in range(10)]
    assert generate(folder, "on", ps, params) == generate(folder, "off", ps, params)


def test_stop_token_found_late_finishes_with_the_same_tokens(folder):
    ps = prompts(6)
    free = generate(folder, "off", ps, GREEDY)
    stop_at = free[2][0][4]  # a token request 2 really produces (5th), so it stops early
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop_token_ids=[stop_at])
    sync, overlapped = generate(folder, "off", ps, params), generate(folder, "on", ps, params)
    assert overlapped == sync
    assert sync[2][1] == "stop" and len(sync[2][0]) <= 5
    assert all(PLACEHOLDER_TOKEN not in tokens for tokens, _ in overlapped)


def test_preemption_and_prefix_hits(folder):
    shared = prompts(1, start=7)[0]
    ps = [shared + [5 + i] for i in range(8)]  # a common prefix of 38 tokens: cache hits
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    # 24 blocks of 16 cannot hold 8 sequences of ~60 tokens: preemption and recompute.
    small = dict(num_kv_blocks=24)
    assert generate(folder, "on", ps, params, **small) == generate(folder, "off", ps, params, **small)


def test_requests_that_need_the_synchronous_path_mix_in(folder):
    ps = prompts(6)
    params = [SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=2 if i == 3 else None,
                             presence_penalty=0.5 if i == 4 else 0.0) for i in range(6)]
    params[5] = SamplingParams(max_tokens=8, temperature=0.9, seed=11, ignore_eos=True)
    assert generate(folder, "on", ps, params) == generate(folder, "off", ps, params)


def test_abort_while_in_flight(folder):
    llm = LLM(str(folder), num_kv_blocks=256, max_num_batched_tokens=64, async_scheduling="on")
    engine = llm.engine
    for i, p in enumerate(prompts(4)):
        engine.add_request(f"r{i}", p, GREEDY)
    seen: dict[str, list[int]] = {}
    for _ in range(3):
        for out in engine.step():
            seen.setdefault(out.request_id, []).extend(out.outputs[0].token_ids)
    assert engine.core._in_flight is not None
    engine.abort_request("r1")
    while engine.core.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats.num_running == 0 and stats.kv_cache_usage == 0.0


# ------------------------------------------------------------------ the scheduler's two halves


def _scheduler(max_model_len: int = 64) -> Scheduler:
    cache = CacheConfig(block_size=4, num_blocks=32)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32, max_model_len=max_model_len),
                     BlockManager.from_config(cache), max_model_len)


def test_commit_holds_a_placeholder_and_resolve_writes_the_token():
    sched = _scheduler()
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0), 0.0, eos_token_ids=(9,))
    sched.add(seq)
    pending = sched.commit(sched.schedule())
    assert seq.token_ids == [1, 2, 3, PLACEHOLDER_TOKEN] and seq.num_computed_tokens == 3
    second = sched.schedule()  # the placeholder is the next input
    assert [(e.seq.request_id, e.num_new_tokens, e.start) for e in second.scheduled] == [("a", 1, 3)]
    later = sched.commit(second)
    assert seq.token_ids == [1, 2, 3, PLACEHOLDER_TOKEN, PLACEHOLDER_TOKEN]
    out, = sched.resolve(pending, [7])
    assert out.new_token_ids == [7] and not out.finished and seq.token_ids[3] == 7
    # EOS arrives for the second token: it finishes; nothing placeholder-shaped is left.
    out, = sched.resolve(later, [9])
    assert out.finished and seq.finish_reason == FinishReason.STOP and seq.token_ids == [1, 2, 3, 7, 9]
    assert not sched.has_unfinished()


def test_a_stop_drops_the_later_placeholder_and_its_result():
    sched = _scheduler()
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=5, temperature=0.0), 0.0, eos_token_ids=(9,))
    sched.add(seq)
    first = sched.commit(sched.schedule())
    second = sched.commit(sched.schedule())  # launched before the first token is known
    out, = sched.resolve(first, [9])  # EOS: the second step ran for nothing
    assert out.finished and seq.token_ids == [1, 2, 3, 9]
    assert sched.resolve(second, [5]) == []  # ignored
    assert seq.token_ids == [1, 2, 3, 9] and sched.block_manager.usage == 0.0


def test_a_pending_last_token_by_length_is_not_scheduled_again():
    sched = _scheduler()
    seq = Sequence("a", [1, 2, 3], SamplingParams(max_tokens=1, temperature=0.0), 0.0)
    sched.add(seq)
    pending = sched.commit(sched.schedule())
    assert sched.schedule().is_empty  # its only token is pending: nothing to run
    out, = sched.resolve(pending, [4])
    assert out.finished and seq.finish_reason == FinishReason.LENGTH and seq.token_ids == [1, 2, 3, 4]


@pytest.mark.parametrize("max_tokens,stop_at", [(1, 0), (5, 1)])
def test_a_request_that_stops_at_resolve_leaves_its_prompt_cached(max_tokens, stop_at):
    """A request ending at resolve() (by length on its first token, or by EOS with a later step in
    flight) registers its full prompt blocks before freeing them: the same prompt then hits them,
    as it does on the synchronous path."""
    sched = _scheduler()
    prompt = list(range(1, 10))  # 9 tokens: two full blocks of 4
    seq = Sequence("a", prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), 0.0, eos_token_ids=(99,))
    sched.add(seq)
    batches = [sched.commit(sched.schedule())]
    if stop_at:
        batches.append(sched.commit(sched.schedule()))  # launched before the EOS is known
        sched.resolve(batches[0], [50])
    out, = sched.resolve(batches[stop_at], [99])
    assert out.finished and not sched.has_unfinished()
    again = Sequence("b", prompt + [7], SamplingParams(max_tokens=1, temperature=0.0), 0.0)
    sched.add(again)
    entry, = sched.schedule().scheduled
    assert again.num_cached_tokens == 8 and entry.num_new_tokens == 2


def test_sync_and_async_cache_the_same_blocks_for_one_token_requests(folder):
    """End to end on the tiny model: after a max_tokens=1 request, the same prompt is a prefix hit
    with async scheduling on, as with it off."""
    for mode in ("off", "on"):
        llm = LLM(str(folder), block_size=4, num_kv_blocks=64, async_scheduling=mode)
        prompt = list(range(3, 40))
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
        before = llm.engine.core.block_manager.stats().prefix_hit_rate
        llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0))
        assert llm.engine.core.block_manager.stats().prefix_hit_rate > before, mode


@pytest.mark.gpu
@pytest.mark.parametrize("eager", [False, True])
def test_gpu_same_tokens_with_graphs_and_pinned_copies(folder, eager):
    """On CUDA the sampled ids come back through pinned memory and a decode batch's pending inputs
    are written into the CUDA graph's static buffers on the device."""
    ps = prompts(10)
    params = [SamplingParams(max_tokens=4 + i, temperature=0.0, ignore_eos=True) for i in range(10)]
    kw = dict(device="cuda", dtype="float32", enforce_eager=eager, max_num_seqs=16)
    assert generate(folder, "on", ps, params, **kw) == generate(folder, "off", ps, params, **kw)


def test_the_flag_and_its_defaults(folder):
    from deepserve.config import ConfigError
    from deepserve.engine.args import EngineArgs
    from deepserve.engine.engine_core import use_async_scheduling
    from deepserve.platforms import get_platform

    with pytest.raises(ConfigError, match="async_scheduling must be auto, on or off"):
        EngineArgs(model=str(folder), async_scheduling="sometimes").create_engine_config()
    config = EngineArgs(model=str(folder)).create_engine_config()
    assert not use_async_scheduling(config, get_platform("cpu"))  # auto: nothing to overlap on the CPU
    for mode, expected in (("on", True), ("off", False)):
        config = EngineArgs(model=str(folder), async_scheduling=mode).create_engine_config()
        assert use_async_scheduling(config, get_platform("cpu")) is expected
