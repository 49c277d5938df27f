"""AsyncLLM over the in-process transport ("inproc": the engine loop in a thread, same messages as
the engine process) with a fake token-level core: streaming, abort, errors, stop strings, stats,
engine death, idle, shutdown. The real engine process is tested in tests/reliability/."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from deepserve.engine.args import EngineArgs
from deepserve.engine.async_llm import AsyncLLM, EngineDeadError
from deepserve.engine.core_client import EngineProcessConfig
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.sequence import FinishReason
from deepserve.engine.stats import RequestStats
from deepserve.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_llama

INPROC = EngineProcessConfig(transport="inproc", watchdog_interval_s=0.05)
FIRST_TOKEN = 40  # the fake emits FIRST_TOKEN, FIRST_TOKEN + 1, ...


@dataclass
class FakeStats:
    num_running: int
    num_waiting: int
    num_preemptions: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0


@dataclass
class FakeBlockManager:
    num_blocks: int = 8
    prefix_queried_tokens: int = 12
    prefix_hit_tokens: int = 4

    def stats(self):
        return self


class FakeCore:
    """Token ids in and out; one token per request per step; max_tokens ends a request."""

    def __init__(self, config, fail_at_step=None):
        self.config = config
        self.block_manager = FakeBlockManager()
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.idle_checks = 0
        self.fail_at_step = fail_at_step
        self.thread_ids: set[int] = set()

    def add_request(self, request_id, prompt_token_ids, params):
        self.thread_ids.add(threading.get_ident())
        if 0 in prompt_token_ids:
            raise ValueError("token 0 is not welcome")
        self.requests[request_id] = [len(prompt_token_ids), params.max_tokens, 0]

    def abort_requests(self, request_ids):
        self.aborted.extend(request_ids)
        return [EngineOutput(r, [], finish_reason=FinishReason.ABORT) for r in request_ids
                if self.requests.pop(r, None) is not None]

    def has_unfinished(self):
        self.idle_checks += 1
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("CUDA exploded")
        time.sleep(0.002)
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[2] += 1
            done = state[2] >= state[1]
            outputs.append(EngineOutput(request_id, [FIRST_TOKEN + state[2] - 1],
                                        finish_reason=FinishReason.LENGTH if done else None,
                                        num_prompt_tokens=state[0], num_cached_tokens=0))
            if done:
                del self.requests[request_id]
        return outputs

    def stats(self):
        return FakeStats(len(self.requests), 0, kv_cache_usage=0.1 * len(self.requests))


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    folder = make_tiny_llama(Path(tmp_path_factory.mktemp("tiny")))
    return EngineArgs(model=str(folder), device="cpu", num_kv_blocks=16, max_model_len=256).create_engine_config()


def make_llm(config, **fake_kwargs) -> tuple[AsyncLLM, FakeCore]:
    core = FakeCore(config, **fake_kwargs)
    return AsyncLLM.from_config(config, INPROC, core_factory=lambda: core), core


def run(llm: AsyncLLM, body):
    """Start `llm`, await body(llm), always shut down; the body's result."""
    async def main():
        await llm.start()
        try:
            return await body(llm)
        finally:
            llm.shutdown(timeout=5)

    return asyncio.run(asyncio.wait_for(main(), 30))


async def collect(llm, request_id, n, prompt=(5, 6, 7), **kw):
    return [o async for o in llm.generate(request_id, list(prompt), SamplingParams(max_tokens=n, **kw))]


def expected_text(llm, n):
    return llm.tokenizer.decode(list(range(FIRST_TOKEN, FIRST_TOKEN + n)))


async def wait_until(predicate, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


def test_constructor_starts_nothing(config):
    before = threading.active_count()
    llm, _ = make_llm(config)
    assert threading.active_count() == before and not llm.healthy
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(collect(llm, "r", 1))
    assert llm.vocab_size == 320 and llm.max_model_len == 256 and llm.tokenizer is not None


def test_generate_streams_deltas_in_order(config):
    llm, core = make_llm(config)
    outs = run(llm, lambda llm: collect(llm, "r1", 4))
    assert [t for o in outs for t in o.outputs[0].token_ids] == [40, 41, 42, 43]
    assert "".join(o.outputs[0].text for o in outs) == expected_text(llm, 4)
    assert [o.finished for o in outs] == [False, False, False, True]
    assert outs[-1].outputs[0].finish_reason == "length"
    assert threading.get_ident() not in core.thread_ids and len(core.thread_ids) == 1


def test_string_prompt_is_tokenized_here(config):
    llm, _ = make_llm(config)

    async def body(llm):
        outs = [o async for o in llm.generate("r", "Paris is", SamplingParams(max_tokens=2))]
        return outs[0].prompt_token_ids

    assert run(llm, body) == llm.tokenizer.encode("Paris is")


def test_concurrent_requests(config):
    llm, _ = make_llm(config)

    async def body(llm):
        results = await asyncio.gather(*(collect(llm, f"r{i}", 3 + i) for i in range(5)))
        return results, llm.num_in_flight

    results, in_flight = run(llm, body)
    assert [len([t for o in outs for t in o.outputs[0].token_ids]) for outs in results] == [3, 4, 5, 6, 7]
    assert in_flight == 0


def test_closing_the_iterator_aborts_in_the_engine(config):
    llm, core = make_llm(config)

    async def body(llm):
        agen = llm.generate("r", [5], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        await agen.aclose()
        await wait_until(lambda: "r" in core.aborted and not core.requests)

    run(llm, body)


def test_cancelling_the_consumer_aborts(config):
    llm, core = make_llm(config)

    async def body(llm):
        task = asyncio.ensure_future(collect(llm, "r", 10_000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await wait_until(lambda: core.aborted == ["r"] and not core.requests)
        return llm.num_in_flight

    assert run(llm, body) == 0


def test_request_refused_by_the_engine_fails_alone(config):
    llm, _ = make_llm(config)

    async def body(llm):
        with pytest.raises(ValueError, match="not welcome"):
            await collect(llm, "bad", 2, prompt=(0, 1))
        with pytest.raises(ValueError, match="empty prompt"):
            await collect(llm, "empty", 2, prompt=())
        assert llm.healthy
        return len(await collect(llm, "good", 2))

    assert run(llm, body) == 2


def test_duplicate_request_id_rejected(config):
    llm, _ = make_llm(config)

    async def body(llm):
        agen = llm.generate("same", [5], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        with pytest.raises(ValueError, match="already in flight"):
            await collect(llm, "same", 1)
        await agen.aclose()

    run(llm, body)


def test_stop_string_finishes_here_and_aborts_in_the_engine(config):
    llm, core = make_llm(config)
    stop = expected_text(llm, 3)[-1]  # a character of the third token

    async def body(llm):
        outs = await collect(llm, "r", 10_000, stop=[stop])
        await wait_until(lambda: core.aborted == ["r"] and not core.requests)
        return outs

    outs = run(llm, body)
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "stop"
    assert outs[-1].outputs[0].stop_reason == stop
    assert stop not in "".join(o.outputs[0].text for o in outs)


def test_request_stats_and_engine_stats(config):
    llm, _ = make_llm(config)
    finished: list[RequestStats] = []
    llm.on_request_finished = finished.append

    async def body(llm):
        agen = llm.generate("slow", [5], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        running = llm.stats().num_running
        assert (llm.stats().prefix_queried_tokens, llm.stats().prefix_hit_tokens) == (12, 4)
        await collect(llm, "fast", 5, prompt=(5, 6, 7, 8))
        await agen.aclose()
        return running

    assert run(llm, body) >= 1
    fast, slow = finished
    assert (fast.request_id, fast.finish_reason, slow.request_id, slow.finish_reason) == \
        ("fast", "length", "slow", "abort")
    assert fast.num_prompt_tokens == 4 and fast.num_generated_tokens == 5 and fast.num_cached_tokens == 0
    assert fast.arrival_time <= fast.first_scheduled_time <= fast.first_token_time <= fast.finish_time
    assert len(fast.token_times) == 5 and fast.time_to_first_token >= 0 and fast.time_per_output_token >= 0
    assert fast.queue_time is not None and fast.e2e_latency >= fast.time_to_first_token


def test_num_waiting_requests(config):
    llm, _ = make_llm(config)

    async def body(llm):
        agens = [llm.generate(f"r{i}", [5], SamplingParams(max_tokens=10_000)) for i in range(3)]
        for agen in agens:
            await agen.__anext__()
        await wait_until(lambda: llm.stats().num_running == 3)
        waiting = llm.num_waiting_requests()
        for agen in agens:
            await agen.aclose()
        return waiting

    assert run(llm, body) == 0


def test_engine_failure_reaches_every_request_and_health(config):
    llm, _ = make_llm(config, fail_at_step=3)
    deaths = []
    llm.on_engine_death = deaths.append

    async def body(llm):
        results = await asyncio.gather(*(collect(llm, f"r{i}", 100) for i in range(3)), return_exceptions=True)
        assert all(isinstance(r, EngineDeadError) for r in results), results
        assert "CUDA exploded" in str(results[0])
        assert not llm.healthy and llm.dead.is_set() and len(deaths) == 1
        with pytest.raises(EngineDeadError):
            await collect(llm, "late", 1)

    run(llm, body)


def test_idle_engine_sleeps(config):
    llm, core = make_llm(config)

    async def body(llm):
        await collect(llm, "r", 2)
        checks = core.idle_checks
        await asyncio.sleep(0.6)
        return core.idle_checks - checks

    assert run(llm, body) <= 4  # one look per idle poll (0.5 s): no busy spin


def test_shutdown_joins_and_fails_in_flight(config):
    llm, _ = make_llm(config)

    async def body(llm):
        agen = llm.generate("r", [5], SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        llm.shutdown(timeout=5)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass
        assert not llm.healthy and not llm.dead.is_set()  # a requested stop is not a death
        return llm.client._worker

    worker = run(llm, body)
    assert not worker.is_alive()
