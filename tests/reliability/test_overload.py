"""SERVING_CONTRACT.md "Errors", queue full: a burst of 10x the waiting cap gets 429 for the excess,
with Retry-After and code rate_limit_exceeded, each answered in under 50 ms; every accepted request
completes in full, and /metrics counts exactly the 429s as rate_limit rejections.

Two long streams hold the engine's slots (--max-num-seqs 2) during the burst, so exactly the waiting
cap is admitted; they are dropped once the refusals are in. The burst goes over connections opened
(and used once) beforehand, so each latency is the server's answer time, not connection set-up; it
ends at the kernel's arrival timestamp of the answer, not when this (possibly descheduled) process
read it. Requests are written raw and read with a minimal HTTP/1.1 parser.
"""

from __future__ import annotations

import json
import selectors
import socket
import struct
import time
from dataclasses import dataclass

import httpx
import pytest

from tests.reliability.conftest import MODEL_NAME, engine_gauges, scrape

MAX_WAITING = 4
MAX_SEQS = 2
SERVER_ARGS = ["--max-waiting-requests", str(MAX_WAITING), "--max-num-seqs", str(MAX_SEQS), "--max-model-len", "1024"]
BURST = 10 * MAX_WAITING + 4
MAX_TOKENS = 32
HOLD_TOKENS = 900  # two long requests fill the engine's slots while the burst comes
REJECT_BOUND_S = 0.050  # the contract's bound on answering a 429
# One torch thread in the engine process: with two, on a 2-core machine its second (spinning) OpenMP
# thread takes the core the HTTP server needs, and refusals wait 50-150 ms for the CPU.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
SO_TIMESTAMPNS = 35  # Linux (socket does not export it); its control messages have the same type


@dataclass
class Answer:
    index: int
    status: int
    headers: dict[str, str]
    body: dict
    seconds: float  # request sent -> first bytes of the answer arrived (kernel timestamp)


def request_parts(index: int) -> tuple[str, dict]:
    common = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "ignore_eos": True}
    if index % 2:
        return "/v1/chat/completions", common | {"messages": [{"role": "user", "content": f"hi {index}"}]}
    return "/v1/completions", common | {"prompt": f"The quick brown fox {index}"}


def request_bytes(index: int) -> bytes:
    path, payload = request_parts(index)
    data = json.dumps(payload).encode()
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\n\r\n").encode() + data


class Connection:
    """A blocking keep-alive connection whose reads carry the kernel's arrival time of the data
    (SO_TIMESTAMPNS), so a latency is the server's, not how late this loaded process got to read."""

    def __init__(self, port: int):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        self.buf = b""
        self.arrived: float | None = None  # time.time() of the first bytes after `mark()`

    def mark(self) -> None:
        self.arrived = None

    def _recv(self) -> None:
        data, ancillary, _, _ = self.sock.recvmsg(1 << 16, socket.CMSG_SPACE(16))
        assert data, "the server closed the connection"
        for level, kind, payload in ancillary:
            if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and self.arrived is None:
                sec, nsec = struct.unpack("qq", payload[:16])
                self.arrived = sec + nsec * 1e-9
        self.buf += data

    def line(self) -> bytes:
        while b"\n" not in self.buf:
            self._recv()
        line, self.buf = self.buf.split(b"\n", 1)
        return line + b"\n"

    def response(self) -> tuple[int, dict[str, str], bytes]:
        status = int(self.line().split()[1])
        headers = {}
        while (line := self.line()) != b"\r\n":
            name, value = line.decode().split(":", 1)
            headers[name.strip().lower()] = value.strip()
        size = int(headers["content-length"])  # non-stream answers are never chunked
        while len(self.buf) < size:
            self._recv()
        body, self.buf = self.buf[:size], self.buf[size:]
        return status, headers, body

    def drop(self) -> None:
        """Reset the connection (SO_LINGER 0), as a killed client does."""
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.sock.close()


def open_connection(port: int) -> Connection:
    """A keep-alive connection, used once for /health so the server has accepted it."""
    conn = Connection(port)
    conn.sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert conn.response()[0] == 200
    return conn


def hold_slot(port: int) -> Connection:
    """A long streaming request, running in the engine (its first text came) until dropped."""
    conn = Connection(port)
    payload = json.dumps({"model": MODEL_NAME, "prompt": "Paris is", "max_tokens": HOLD_TOKENS,
                          "ignore_eos": True, "stream": True}).encode()
    conn.sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: %d\r\n\r\n%s" % (len(payload), payload))
    assert conn.line().startswith(b"HTTP/1.1 200")
    while b'"text":"' not in (line := conn.line()) or b'"text":""' in line:
        pass
    return conn


def burst(port: int) -> list[Answer]:
    """Fill the engine's slots, send the burst, read the refusals, free the slots, read the rest."""
    holders = [hold_slot(port) for _ in range(MAX_SEQS)]
    connections = [open_connection(port) for _ in range(BURST)]
    requests = [request_bytes(i) for i in range(BURST)]
    sent = []
    for conn, data in zip(connections, requests):
        conn.mark()
        sent.append(time.time())
        conn.sock.sendall(data)
    answers: dict[int, Answer] = {}
    with selectors.DefaultSelector() as selector:
        for i, conn in enumerate(connections):
            selector.register(conn.sock, selectors.EVENT_READ, i)
        deadline = time.monotonic() + 30  # only reached when too many were accepted
        while len(answers) < BURST - MAX_WAITING and time.monotonic() < deadline:
            for key, _ in selector.select(timeout=1):
                selector.unregister(key.fileobj)
                answers[key.data] = answer(key.data, connections[key.data], sent[key.data])
    for conn in holders:
        conn.drop()
    for i, conn in enumerate(connections):
        if i not in answers:
            answers[i] = answer(i, conn, sent[i])
        conn.sock.close()
    return [answers[i] for i in range(BURST)]


def answer(index: int, conn: Connection, sent: float) -> Answer:
    status, headers, body = conn.response()
    return Answer(index, status, headers, json.loads(body), conn.arrived - sent)


@pytest.fixture(scope="module")
def server(serve_process):
    return serve_process(SERVER_ARGS, env=SERVER_ENV)


def warm_up(url: str) -> None:
    """One request of each kind first: the latency bound is for a running server, not its first request."""
    with httpx.Client(base_url=url, timeout=60) as client:
        for index in range(2):
            path, payload = request_parts(index)
            assert client.post(path, json=payload | {"max_tokens": 2}).status_code == 200


def test_burst_excess_gets_fast_429_and_the_rest_completes(server):
    port = int(server.url.rsplit(":", 1)[1])
    warm_up(server.url)
    rejected_before = scrape(server.url).value("request_rejected_total", reason="rate_limit")
    answers = burst(port)
    accepted = [a for a in answers if a.status == 200]
    rejected = [a for a in answers if a.status == 429]
    assert len(accepted) + len(rejected) == BURST, [(a.status, a.body) for a in answers if a.status not in (200, 429)]
    # The engine's slots are held, so no admitted request leaves the queue during the burst.
    assert len(accepted) == MAX_WAITING, len(accepted)
    for a in rejected:
        assert int(a.headers["retry-after"]) >= 1
        assert a.body["error"]["code"] == "rate_limit_exceeded" and a.body["error"]["type"], a.body
    slowest = sorted(a.seconds for a in rejected)[-3:]
    print(f"{len(accepted)} accepted, {len(rejected)} rejected; slowest 429s (s): {slowest}")
    assert max(a.seconds for a in rejected) < REJECT_BOUND_S, slowest
    for a in accepted:
        choice = a.body["choices"][0]
        assert choice["finish_reason"] == "length" and a.body["usage"]["completion_tokens"] == MAX_TOKENS, a.body
    rejected_after = scrape(server.url).value("request_rejected_total", reason="rate_limit")
    assert rejected_after - rejected_before == len(rejected)


def test_server_serves_normally_after_the_burst(server):
    resp = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                      json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4})
    assert resp.status_code == 200, resp.text
    assert engine_gauges(server.url)[:2] == (0, 0)
