"""SERVING_CONTRACT.md "Lifecycle": draining on SIGTERM, and the engine process dying.

Each test owns its server (it ends it). /ready 503 while loading is checked in test_contract_api.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import MODEL_NAME, child_pids, pid_alive

LONG = {"model": MODEL_NAME, "prompt": "Paris is", "max_tokens": 480, "ignore_eos": True, "stream": True}
# DRAIN_LONG needs ~1000 decode steps (seconds even for the tiny model), far beyond the 1 s drain
# timeout; SHORT needs 5 more steps after its first token.
DRAIN_LONG = LONG | {"max_tokens": 1000}
SHORT = {"model": MODEL_NAME, "prompt": "The quick", "max_tokens": 6, "ignore_eos": True, "stream": True}


class StreamReader(threading.Thread):
    """Reads one SSE completion stream; `started` is set at the first event."""

    def __init__(self, url: str, body: dict):
        super().__init__(daemon=True)
        self.url, self.body = url, body
        self.started = threading.Event()
        self.events: list[dict] = []
        self.status: int | None = None
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.url}/v1/completions", json=self.body, timeout=60) as resp:
                self.status = resp.status_code
                for line in resp.iter_lines():
                    if line.startswith("data: {"):
                        self.events.append(json.loads(line[6:]))
                        self.started.set()
        except httpx.HTTPError as exc:
            self.error = exc
        self.started.set()

    def finish_reason(self) -> str | None:
        reasons = [e["choices"][0]["finish_reason"] for e in self.events if e.get("choices")]
        return next((r for r in reversed(reasons) if r), None)


def engine_pids(server_pid: int) -> list[int]:
    """The engine process(es): spawned multiprocessing children of the server."""
    found = []
    for pid in child_pids(server_pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            found.append(pid)
    return found


def test_sigterm_drains_then_exits_zero_without_children(serve_process):
    server = serve_process(["--drain-timeout", "1", "--max-num-seqs", "4", "--max-model-len", "1024"])
    children = child_pids(server.pid)
    long, short = StreamReader(server.url, DRAIN_LONG), StreamReader(server.url, SHORT)
    long.start()
    assert long.started.wait(30)
    short.start()
    assert short.started.wait(30)
    signalled = time.monotonic()
    server.proc.send_signal(signal.SIGTERM)
    ready = httpx.get(f"{server.url}/ready", timeout=5)
    assert ready.status_code == 503 and time.monotonic() - signalled < 2
    refused = httpx.post(f"{server.url}/v1/completions", json=SHORT | {"stream": False}, timeout=5)
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    short.join(30)
    long.join(30)
    assert short.finish_reason() == "length"  # finished within the drain timeout
    assert long.finish_reason() == "abort"  # cut at the drain timeout
    assert server.proc.wait(timeout=20) == 0
    deadline = time.monotonic() + 10
    while any(pid_alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in children if pid_alive(pid)]


def test_engine_death_fails_fast_and_exits_nonzero(serve_process):
    server = serve_process()
    engines = engine_pids(server.pid)
    if not engines:
        pytest.skip("the engine runs inside the server process (no engine process to kill)")
    stream = StreamReader(server.url, LONG)
    stream.start()
    assert stream.started.wait(30)
    killed = time.monotonic()
    for pid in engines:
        os.kill(pid, signal.SIGKILL)
    stream.join(15)
    assert not stream.is_alive() and time.monotonic() - killed < 15
    assert stream.error is not None or any("error" in e for e in stream.events)
    health = []
    while server.proc.poll() is None and time.monotonic() - killed < 15:
        try:
            health.append(httpx.get(f"{server.url}/health", timeout=2).status_code)
        except httpx.HTTPError:
            break
        time.sleep(0.05)
    assert 503 in health
    assert server.proc.wait(timeout=15) != 0
