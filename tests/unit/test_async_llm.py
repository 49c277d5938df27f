"""AsyncLLM over a fake step-based LLMEngine: hand-off, streaming, abort, errors, idle, shutdown."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from deepserve.engine.async_llm import AsyncLLM, EngineDeadError
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.sampling_params import SamplingParams


class FakeLLMEngine:
    """Each request produces max_tokens one-character delta outputs, one per step()."""

    def __init__(self, fail_at_step=None):
        self.requests: dict[str, list] = {}
        self.aborted: list[str] = []
        self.steps = 0
        self.idle_checks = 0
        self.fail_at_step = fail_at_step
        self.thread_ids: set[int] = set()

    def add_request(self, request_id, prompt, params):
        self.thread_ids.add(threading.get_ident())
        if not prompt:
            raise ValueError("empty prompt")
        self.requests[request_id] = [prompt, params.max_tokens, 0]

    def abort_request(self, request_id):
        self.aborted.append(request_id)
        self.requests.pop(request_id, None)

    def has_unfinished(self):
        self.idle_checks += 1
        return bool(self.requests)

    def step(self):
        self.thread_ids.add(threading.get_ident())
        self.steps += 1
        if self.fail_at_step is not None and self.steps >= self.fail_at_step:
            raise RuntimeError("CUDA exploded")
        time.sleep(0.001)
        outputs = []
        for request_id, state in list(self.requests.items()):
            state[2] += 1
            done = state[2] >= state[1]
            comp = CompletionOutput(0, chr(ord("a") + state[2] - 1), [state[2]], None, "length" if done else None)
            outputs.append(RequestOutput(request_id, None, [1, 2], [comp], finished=done))
            if done:
                del self.requests[request_id]
        return outputs


@pytest.fixture
def llm():
    engine = AsyncLLM(FakeLLMEngine())
    engine.start()
    yield engine
    engine.shutdown()


async def collect(llm, request_id, n, prompt="p"):
    return [o async for o in llm.generate(request_id, prompt, SamplingParams(max_tokens=n))]


def test_constructor_starts_nothing():
    before = threading.active_count()
    llm = AsyncLLM(FakeLLMEngine())
    assert threading.active_count() == before and not llm.healthy
    with pytest.raises(RuntimeError, match="start"):
        asyncio.run(collect(llm, "r", 1))


def test_generate_streams_deltas_in_order(llm):
    outs = asyncio.run(collect(llm, "r1", 4))
    assert "".join(o.outputs[0].text for o in outs) == "abcd"
    assert [o.finished for o in outs] == [False, False, False, True]
    assert llm.engine.thread_ids == {llm._thread.ident}  # only the engine thread touches the engine


def test_concurrent_requests(llm):
    async def main():
        return await asyncio.gather(*(collect(llm, f"r{i}", 3 + i) for i in range(5)))

    results = asyncio.run(main())
    assert ["".join(o.outputs[0].text for o in outs) for outs in results] == ["abcdefg"[: 3 + i] for i in range(5)]
    assert llm.num_in_flight == 0


def test_closing_the_iterator_aborts(llm):
    async def main():
        agen = llm.generate("r", "p", SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        await agen.aclose()

    asyncio.run(main())
    deadline = time.monotonic() + 2
    while "r" not in llm.engine.aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.engine.aborted == ["r"] and not llm.engine.requests


def test_cancelling_the_consumer_aborts(llm):
    async def main():
        task = asyncio.ensure_future(collect(llm, "r", 10_000))
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    deadline = time.monotonic() + 2
    while llm.engine.requests and time.monotonic() < deadline:
        time.sleep(0.01)
    assert llm.engine.aborted == ["r"]


def test_bad_request_fails_alone(llm):
    with pytest.raises(ValueError, match="empty prompt"):
        asyncio.run(collect(llm, "bad", 2, prompt=""))
    assert llm.healthy
    assert len(asyncio.run(collect(llm, "good", 2))) == 2


def test_duplicate_request_id_rejected(llm):
    async def main():
        agen = llm.generate("same", "p", SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        with pytest.raises(ValueError, match="already in flight"):
            await collect(llm, "same", 1)
        await agen.aclose()

    asyncio.run(main())


def test_engine_failure_reaches_every_request_and_health():
    llm = AsyncLLM(FakeLLMEngine(fail_at_step=3))
    llm.start()

    async def main():
        return await asyncio.gather(*(collect(llm, f"r{i}", 100) for i in range(3)), return_exceptions=True)

    results = asyncio.run(main())
    assert all(isinstance(r, EngineDeadError) for r in results)
    assert not llm.healthy
    with pytest.raises(EngineDeadError):
        asyncio.run(collect(llm, "late", 1))
    llm.shutdown()


def test_idle_thread_sleeps(llm):
    asyncio.run(collect(llm, "r", 2))
    checks = llm.engine.idle_checks
    time.sleep(0.3)
    assert llm.engine.idle_checks - checks <= 2  # woken by nothing: no busy spin
    assert llm.healthy


def test_shutdown_joins_and_fails_in_flight():
    llm = AsyncLLM(FakeLLMEngine())
    llm.start()

    async def main():
        agen = llm.generate("r", "p", SamplingParams(max_tokens=10_000))
        await agen.__anext__()
        await asyncio.to_thread(llm.shutdown)
        with pytest.raises(EngineDeadError):
            async for _ in agen:
                pass

    asyncio.run(main())
    assert not llm._thread.is_alive() and not llm.healthy
