"""The engine core in its own process (spawn, ZMQ ipc/tcp, msgpack) under AsyncLLM, on a tiny random
Llama: output parity with the offline LLM, abort frees the KV cache, kill -9 fails requests fast,
shutdown leaves no process or socket file, load errors reach the parent, and the engine process
never outlives its parent."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepserve.engine.args import EngineArgs
from deepserve.engine.async_llm import AsyncLLM, EngineDeadError
from deepserve.engine.core_client import EngineCoreClient, EngineProcessConfig, EngineStartError
from deepserve.loader.errors import LoadError
from deepserve.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_llama

ENGINE_ARGS = dict(device="cpu", num_kv_blocks=64, max_model_len=256, max_num_seqs=8)
PROMPTS = ["The quick brown fox", "Paris is the capital of", "Émile a mangé 3 crêpes", "東京は"]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
WATCH = EngineProcessConfig(watchdog_interval_s=0.1, ready_timeout_s=120)


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return make_tiny_llama(Path(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def config(folder):
    return EngineArgs(model=str(folder), **ENGINE_ARGS).create_engine_config()


class Runner:
    """One event loop kept across tests, so one engine process serves several of them."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()

    def __call__(self, coro, timeout=60):
        return self.loop.run_until_complete(asyncio.wait_for(coro, timeout))

    def close(self):
        self.loop.run_until_complete(asyncio.sleep(0.01))  # let cancelled tasks finish
        self.loop.close()


@pytest.fixture(scope="module")
def shared(config):
    runner = Runner()
    llm = AsyncLLM.from_config(config, WATCH)
    runner(llm.start(), timeout=120)
    yield runner, llm
    llm.shutdown(timeout=10)
    runner.close()


def start(config, process=WATCH) -> tuple[Runner, AsyncLLM]:
    runner, llm = Runner(), AsyncLLM.from_config(config, process)
    runner(llm.start(), timeout=120)
    return runner, llm


async def collect(llm, request_id, prompt, params=GREEDY):
    return [o async for o in llm.generate(request_id, prompt, params)]


def token_ids(outputs) -> list[int]:
    return [t for o in outputs for t in o.outputs[0].token_ids]


def no_child(pid: int) -> bool:
    return pid not in {p.pid for p in multiprocessing.active_children()}


def pid_gone(pid: int) -> bool:
    """No such process, or only a zombie left for a reaper that is not ours."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (FileNotFoundError, ProcessLookupError):
        return True


def wait_for(predicate, timeout: float) -> float:
    """Seconds until predicate() held; fails after `timeout`."""
    t0 = time.monotonic()
    while not predicate():
        assert time.monotonic() - t0 < timeout, f"not within {timeout} s"
        time.sleep(0.02)
    return time.monotonic() - t0


def test_greedy_matches_offline_llm_token_for_token(folder, shared):
    from deepserve import LLM

    offline = LLM(str(folder), **ENGINE_ARGS).generate(PROMPTS, GREEDY)
    runner, llm = shared

    async def all_at_once():
        return await asyncio.gather(*(collect(llm, f"p{i}", p) for i, p in enumerate(PROMPTS)))

    served = runner(all_at_once())
    assert [token_ids(outs) for outs in served] == [o.outputs[0].token_ids for o in offline]
    assert ["".join(o.outputs[0].text for o in outs) for outs in served] == [o.outputs[0].text for o in offline]
    assert llm.client.pid != os.getpid() and llm.num_in_flight == 0


def test_abort_frees_the_engines_kv_cache(shared):
    runner, llm = shared

    async def abort_midway():
        agen = llm.generate("long", PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True))
        for _ in range(3):
            await agen.__anext__()
        assert llm.stats().kv_cache_usage > 0 and llm.stats().num_running == 1
        await agen.aclose()
        t0 = time.monotonic()
        while not (llm.stats().kv_cache_usage == 0 and llm.stats().num_running == 0
                   and llm.stats().num_waiting == 0):
            assert time.monotonic() - t0 < 2, llm.stats()
            await asyncio.sleep(0.02)

    runner(abort_midway())
    assert llm.healthy and llm.num_in_flight == 0


def test_stats_count_tokens_and_request_stats_reach_the_hook(shared):
    runner, llm = shared
    finished = []
    llm.on_request_finished = finished.append
    try:
        outs = runner(collect(llm, "counted", PROMPTS[1], SamplingParams(max_tokens=5, temperature=0.0,
                                                                         ignore_eos=True)))
    finally:
        llm.on_request_finished = None
    (stats,) = finished
    assert stats.finish_reason == "length" and stats.num_generated_tokens == 5 == len(token_ids(outs))
    assert stats.num_prompt_tokens == len(outs[0].prompt_token_ids)
    assert stats.arrival_time <= stats.first_scheduled_time <= stats.first_token_time <= stats.finish_time
    assert llm.stats().prefix_queried_tokens > 0


def test_kill_9_fails_in_flight_requests_fast(config):
    runner, llm = start(config)
    deaths = []
    llm.on_engine_death = deaths.append

    async def kill_midway():
        agen = llm.generate("doomed", PROMPTS[0], SamplingParams(max_tokens=250, temperature=0.0, ignore_eos=True))
        await agen.__anext__()
        os.kill(llm.client.pid, signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(EngineDeadError, match="exit code -9"):
            async for _ in agen:
                pass
        return time.monotonic() - t0

    try:
        assert runner(kill_midway()) < 2.0
        assert not llm.healthy and llm.dead.is_set() and len(deaths) == 1
        with pytest.raises(EngineDeadError):
            runner(collect(llm, "late", "hi"))
    finally:
        llm.shutdown(timeout=5)
        runner.close()


def test_shutdown_leaves_no_process_and_no_socket_file(config):
    runner, llm = start(config)
    pid, ipc_dir = llm.client.pid, llm.client.ipc_dir
    assert ipc_dir and len(os.listdir(ipc_dir)) == 2
    runner(collect(llm, "one", "hi"))
    llm.shutdown(timeout=10)
    runner.close()
    assert llm.client._worker.exitcode == 0  # left by Shutdown, not killed
    assert pid_gone(pid) and no_child(pid)
    assert not os.path.exists(ipc_dir)


def test_loopback_tcp_transport(config):
    runner, llm = start(config, EngineProcessConfig(transport="tcp", ready_timeout_s=120))
    pid = llm.client.pid
    try:
        assert llm.client.ipc_dir is None
        assert len(token_ids(runner(collect(llm, "tcp", PROMPTS[2])))) == GREEDY.max_tokens
    finally:
        llm.shutdown(timeout=10)
        runner.close()
    assert pid_gone(pid) and no_child(pid)


def test_load_error_reaches_the_parent(tmp_path, config):
    import dataclasses

    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes(Path(config.model, name).read_bytes())
    broken = dataclasses.replace(config, model=str(tmp_path))  # no weights in it
    client = EngineCoreClient(broken, process=WATCH)
    with pytest.raises(LoadError, match="safetensors"):
        asyncio.run(client.start())
    assert pid_gone(client.pid) and no_child(client.pid) and not os.path.exists(client.ipc_dir)


def test_unexpected_load_failure_reports_message_and_exit_code(config):
    import dataclasses

    broken = dataclasses.replace(config, load_format="dummy", device="no-such-device")
    client = EngineCoreClient(broken, process=WATCH)
    with pytest.raises(EngineStartError) as info:
        asyncio.run(client.start())
    assert "no-such-device" in str(info.value) and info.value.exitcode == 1
    assert pid_gone(client.pid) and no_child(client.pid)


PARENT_SCRIPT = textwrap.dedent("""
    import asyncio, sys, time
    from deepserve.engine.args import EngineArgs
    from deepserve.engine.core_client import EngineCoreClient

    async def main():
        config = EngineArgs(model=sys.argv[1], device="cpu", num_kv_blocks=16, max_model_len=128).create_engine_config()
        client = EngineCoreClient(config)
        await client.start()
        print(client.pid, client.ipc_dir, flush=True)
        await asyncio.sleep(120)

    asyncio.run(main())
""")


def test_engine_exits_when_its_parent_is_killed(folder):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    parent = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, str(folder)], stdout=subprocess.PIPE,
                              stderr=subprocess.DEVNULL, env=env, text=True)
    try:
        pid, ipc_dir = parent.stdout.readline().split()
        engine_pid = int(pid)
        assert not pid_gone(engine_pid) and os.path.isdir(ipc_dir)
        parent.kill()
        parent.wait(10)
        wait_for(lambda: pid_gone(engine_pid), timeout=5)
        assert not os.path.exists(ipc_dir)  # the orphaned engine removed the sockets its parent left
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
