"""SERVING_CONTRACT.md "Lifecycle": a client that disconnects aborts its request; within 2 s the
running/waiting counts and the KV-cache usage in /metrics are back to their baseline.

50 streaming clients (completions and chat, ignore_eos, far from done) are dropped at random points:
right after sending the request, after the response head, after a few tokens, or after a random
delay, by a raw socket reset (SO_LINGER 0) or an httpx stream closed early. Five rounds; the server
RSS must not grow from the second round on, and a normal request still works afterwards.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import struct
import time

import httpx
import pytest

from tests.e2e.conftest import rss_kib
from tests.reliability.conftest import MODEL_NAME, engine_gauges, scrape

# 16 running sequences: of 50 clients, the rest wait in the engine queue when they are dropped.
SERVER_ARGS = ["--max-num-seqs", "16"]
CLIENTS = 50
ROUNDS = 5
SETTLE_S = 2.0  # the contract's bound
RSS_GROWTH_KIB = 20 << 10
MAX_TOKENS = 400  # never reached: every client is dropped long before
MODES = ("at_once", "after_head", "after_tokens", "after_delay", "httpx")


def body(i: int) -> tuple[str, dict]:
    common = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "ignore_eos": True, "stream": True}
    if i % 2:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": f"Client {i} says hi"}]}
    return "/v1/completions", common | {"prompt": f"The quick brown fox {i}"}


def http_request(port: int, path: str, payload: dict) -> bytes:
    data = json.dumps(payload).encode()
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n")
    return head.encode() + data


class Dropped:
    """What one client saw before it went away."""

    def __init__(self, mode: str):
        self.mode = mode
        self.status_line = b""
        self.tokens = 0


async def raw_client(port: int, i: int, mode: str, rng: random.Random) -> Dropped:
    seen = Dropped(mode)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    # SO_LINGER 0: close() sends a reset at once, as a crashed or killed client does.
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    try:
        writer.write(http_request(port, *body(i)))
        await writer.drain()
        if mode == "after_delay":
            await asyncio.sleep(rng.uniform(0.0, 1.0))
        elif mode in ("after_head", "after_tokens"):
            await asyncio.wait_for(read_stream(reader, seen, 0 if mode == "after_head" else rng.randint(1, 5)), 60)
    finally:
        writer.transport.abort()
    return seen


async def read_stream(reader: asyncio.StreamReader, seen: Dropped, tokens: int) -> None:
    seen.status_line = await reader.readline()
    assert seen.status_line.startswith(b"HTTP/1.1 200"), seen.status_line
    while await reader.readline() not in (b"\r\n", b""):
        pass  # the rest of the head
    while seen.tokens < tokens:
        line = await reader.readline()
        assert line, "the server closed the stream early"
        seen.tokens += has_text(line.decode())


def has_text(line: str) -> bool:
    """An SSE event carrying generated text (not the chat role chunk): the request reached the engine."""
    if not line.startswith("data: {"):
        return False
    choices = json.loads(line[6:]).get("choices") or [{}]
    return bool(choices[0].get("text") or choices[0].get("delta", {}).get("content"))


async def httpx_client(client: httpx.AsyncClient, i: int, rng: random.Random) -> Dropped:
    """An httpx stream left after a few events (its connection is closed, not reused)."""
    seen = Dropped("httpx")
    path, payload = body(i)
    async with client.stream("POST", path, json=payload) as resp:
        assert resp.status_code == 200
        wanted = rng.randint(0, 3)
        async for line in resp.aiter_lines():
            if seen.tokens >= wanted:
                break
            seen.tokens += has_text(line)
    return seen


async def drop_clients(port: int, url: str, rng: random.Random) -> list[Dropped]:
    async with httpx.AsyncClient(base_url=url, timeout=60) as client:
        modes = [MODES[i % len(MODES)] for i in range(CLIENTS)]
        rng.shuffle(modes)
        return await asyncio.gather(*(httpx_client(client, i, rng) if mode == "httpx"
                                      else raw_client(port, i, mode, rng) for i, mode in enumerate(modes)))


def seconds_to_baseline(url: str, baseline: tuple, limit: float, stable_s: float = 0.5) -> float:
    """Seconds until /metrics shows `baseline` (then it must stay there for `stable_s`, so a late
    request cannot slip in unseen); waits past `limit` only to report what it showed instead."""
    t0 = time.monotonic()
    while (gauges := engine_gauges(url)) != baseline:
        assert time.monotonic() - t0 < limit + 10, f"gauges stuck at {gauges}, baseline {baseline}"
        time.sleep(0.05)
    took = time.monotonic() - t0
    while time.monotonic() - t0 < took + stable_s:
        assert engine_gauges(url) == baseline, f"gauges left the baseline {baseline} again"
        time.sleep(0.05)
    return took


@pytest.fixture(scope="module")
def server(serve_process):
    return serve_process(SERVER_ARGS)


def normal_request(url: str) -> dict:
    resp = httpx.post(f"{url}/v1/completions", timeout=60,
                      json={"model": MODEL_NAME, "prompt": "Paris is", "max_tokens": 8, "ignore_eos": True})
    assert resp.status_code == 200, resp.text
    return resp.json()


def test_dropped_clients_free_the_engine_and_memory(server):
    port = int(server.url.rsplit(":", 1)[1])
    normal_request(server.url)  # warm-up: the prefix cache may keep blocks; take the baseline after it
    baseline = engine_gauges(server.url)
    assert baseline[:2] == (0, 0), baseline
    rng = random.Random(1234)
    rss, waits = [], []
    for _ in range(ROUNDS):
        aborted_before = scrape(server.url).value("request_success_total", finish_reason="abort")
        dropped = asyncio.run(drop_clients(port, server.url, rng))
        waits.append(seconds_to_baseline(server.url, baseline, SETTLE_S))
        reached_engine = sum(d.tokens > 0 for d in dropped)
        aborted = scrape(server.url).value("request_success_total", finish_reason="abort") - aborted_before
        assert reached_engine <= aborted <= CLIENTS, (reached_engine, aborted)
        rss.append(rss_kib(server.pid))
    assert max(waits) < SETTLE_S, f"seconds to baseline per round: {waits}"
    assert max(rss[1:]) - rss[1] < RSS_GROWTH_KIB, f"server RSS per round (KiB): {rss}"
    out = normal_request(server.url)
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 8
    assert engine_gauges(server.url) == baseline
    assert "Traceback" not in server.log()
