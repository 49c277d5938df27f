"""SERVING_CONTRACT.md "Errors": one test per row, against a real `deepserve serve` on loopback.

After every test, `_still_serving` checks that /health answers 200 and a normal request succeeds.
The 401 row is in test_contract_security.py, the draining 503 row in test_contract_lifecycle.py.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest

from tests.e2e.conftest import MODEL_NAME, rss_kib

# One sequence at a time makes "waiting" easy to produce; the limits apply to the 429 tests only.
SERVER_ARGS = ["--max-num-seqs", "1", "--max-n", "4", "--max-waiting-requests", "2", "--max-waiting-tokens", "300"]
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


def chat(**extra) -> dict:
    return {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4, **extra}


def completion(**extra) -> dict:
    return {"model": MODEL_NAME, "prompt": "Paris is", "max_tokens": 4, **extra}


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


@pytest.fixture(autouse=True)
def _still_serving(http):
    yield
    assert http.get("/health").status_code == 200
    resp = http.post(CHAT, json=chat())
    assert resp.status_code == 200, resp.text


def assert_error(resp: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param is not None:
        assert err["param"] == param, err
    if code is not None:
        assert err["code"] == code, err
    return err


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{",
                                  b'{"a":' * 65 + b"1" + b"}" * 65, b"[" * 100_000 + b"]" * 100_000])
def test_body_not_json_not_object_or_too_deep(http, body):
    resp = http.post(CHAT, content=body, headers={"content-type": "application/json"})
    assert_error(resp, 400, code="invalid_json")


@pytest.mark.parametrize("path,body,param", [
    (CHAT, {"messages": [{"role": "user", "content": "x"}]}, "model"),
    (CHAT, {"model": MODEL_NAME}, "messages"),
    (COMPLETIONS, {"model": MODEL_NAME}, "prompt"),
    (CHAT, chat(temperature="hot"), "temperature"),
    (CHAT, chat(max_tokens="10"), "max_tokens"),
    (CHAT, chat(stream="yes"), "stream"),
    (CHAT, chat(messages="hello"), "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "x"}]), "messages"),
    (CHAT, chat(n=True), "n"),
    (CHAT, chat(user=5), "user"),
    (CHAT, chat(metadata="x"), "metadata"),
    (CHAT, chat(tools="x"), "tools"),
    (COMPLETIONS, completion(prompt=3), "prompt"),
    (COMPLETIONS, completion(echo="no"), "echo"),
])
def test_missing_fields_and_wrong_types(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param=param)


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.01), ("temperature", 2.01), ("top_p", 0.0), ("top_p", 1.01), ("presence_penalty", 2.5),
    ("presence_penalty", -2.5), ("frequency_penalty", 2.01), ("frequency_penalty", -3), ("top_k", -2),
])
def test_sampling_ranges(http, field, value):
    assert_error(http.post(CHAT, json=chat(**{field: value})), 400, param=field)


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -1), ("max_completion_tokens", 0), ("n", 0), ("n", 5),
    ("stop", [str(i) for i in range(17)]), ("stop", [""]), ("stop", ""),
])
def test_multiplier_bounds(http, field, value):
    assert_error(http.post(CHAT, json=chat(**{field: value})), 400, param=field)


def test_context_length_exceeded(http):
    resp = http.post(COMPLETIONS, json=completion(prompt=[5] * 600))
    assert_error(resp, 400, code="context_length_exceeded")
    resp = http.post(COMPLETIONS, json=completion(prompt=[5] * 500, max_tokens=20))
    assert_error(resp, 400, code="context_length_exceeded")
    resp = http.post(CHAT, json=chat(max_tokens=600))
    assert_error(resp, 400, code="context_length_exceeded")


@pytest.mark.parametrize("path,body", [
    (COMPLETIONS, completion(prompt="")), (COMPLETIONS, completion(prompt=[])), (COMPLETIONS, completion(prompt=[[]])),
    (CHAT, chat(messages=[])), (COMPLETIONS, completion(prompt=[-1])), (COMPLETIONS, completion(prompt=[10**6])),
    (COMPLETIONS, completion(prompt=[[1, 2], [320]])),
])
def test_empty_prompt_and_bad_token_ids(http, path, body):
    assert_error(http.post(path, json=body), 400, param="prompt")


@pytest.mark.parametrize("bias", [{"abc": 1}, {"1.5": 1}, {"320": 1}, {"-1": 1}, {"5": 100.5}, {"5": -101}])
def test_logit_bias(http, bias):
    assert_error(http.post(CHAT, json=chat(logit_bias=bias)), 400, param="logit_bias")


@pytest.mark.parametrize("extra", [{"top_logprobs": 2}, {"logprobs": True, "top_logprobs": 21}])
def test_top_logprobs(http, extra):
    assert_error(http.post(CHAT, json=chat(**extra)), 400, param="top_logprobs")


def test_stream_options_without_stream(http):
    resp = http.post(CHAT, json=chat(stream_options={"include_usage": True}))
    assert_error(resp, 400, param="stream_options")


def test_unknown_model(http):
    assert_error(http.post(CHAT, json=chat(model="gpt-4")), 404, param="model", code="model_not_found")
    assert_error(http.post(COMPLETIONS, json=completion(model="nope")), 404, code="model_not_found")


def test_body_too_large_by_length_and_chunked(http):
    big = json.dumps(chat(user="u" * (17 << 20))).encode()
    assert_error(http.post(CHAT, content=big, headers={"content-type": "application/json"}), 413,
                 code="content_too_large")

    def chunks():
        yield b'{"model": "tiny", "user": "'
        for _ in range(17 * 16):
            yield b"u" * 65536
        yield b'"}'

    resp = http.post(CHAT, content=chunks(), headers={"content-type": "application/json"})
    assert "content-length" not in {k.lower() for k in resp.request.headers}
    assert_error(resp, 413, code="content_too_large")


def _raw_request(port: int, head: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(head)
            return sock.recv(65536)
        except (ConnectionResetError, BrokenPipeError):
            return b""


def test_oversized_headers_431_and_memory_flat(http, server):
    port = int(server.url.rsplit(":", 1)[1])
    for size in (20 << 10, 64 << 10, 1 << 20):  # one read or many: 431 (or a closed connection)
        head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Big: " + b"a" * size + b"\r\n\r\n"
        reply = _raw_request(port, head)
        assert reply == b"" or reply.startswith(b"HTTP/1.1 431"), reply[:100]
    for _ in range(20):
        _raw_request(port, head)
    before = rss_kib(server.pid)
    for _ in range(200):
        _raw_request(port, head)
    assert rss_kib(server.pid) - before < 8 << 10  # KiB: within a few MB


def _occupy(http: httpx.Client, ready: threading.Event, stop: threading.Event) -> threading.Thread:
    """A long streaming generation holding the only engine slot until `stop` (then disconnects)."""

    def run():
        with http.stream("POST", COMPLETIONS, json=completion(max_tokens=480, ignore_eos=True,
                                                              stream=True)) as resp:
            for _ in resp.iter_lines():
                ready.set()
                if stop.is_set():
                    break

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    return thread


def _queued(base_url: str, body: dict) -> threading.Thread:
    def run():
        with httpx.Client(base_url=base_url, timeout=60) as client:
            client.post(COMPLETIONS, json=body)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _engine_waiting(http: httpx.Client, count: int, holder: threading.Thread) -> bool:
    """Whether the engine reports `count` waiting requests (/metrics, read at request time) while the holder
    still runs: the queued ones are then in its queue, past admission and tokenisation, and the server counts
    them as waiting. False once the holder has ended first (its generation takes ~0.7 s of the tiny model)."""
    while holder.is_alive():
        for line in http.get("/metrics").text.splitlines():
            if line.startswith("deepserve:num_requests_waiting{") and float(line.rsplit(" ", 1)[1]) >= count:
                return True
        time.sleep(0.01)
    return False


def _refused_while_full(http: httpx.Client, server, limit: str) -> httpx.Response | None:
    """Fill the queue behind a holder, then send a prompt over max_model_len once: its response, or None when
    the queue was not full while the holder ran (the holder ended before the queued requests were in, or
    during the send: the response is then not a 429 and the holder is gone)."""
    ready, stop = threading.Event(), threading.Event()
    holder = _occupy(http, ready, stop)
    if limit == "requests":  # two short waiting requests fill --max-waiting-requests 2
        waiting = [_queued(server.url, completion(max_tokens=2)) for _ in range(2)]
    else:  # one waiting prompt of 320 tokens passes --max-waiting-tokens 300
        waiting = [_queued(server.url, completion(prompt=[5] * 320, max_tokens=2))]
    try:  # a client of its own: the holder's thread streams on `http`
        with httpx.Client(base_url=server.url, timeout=30) as client:
            if not _engine_waiting(client, len(waiting), holder):
                return None
            # This prompt is over max_model_len: were it tokenised first, the answer would be a 400.
            resp = client.post(COMPLETIONS, json=completion(prompt="x " * 5000, stream=True))
        return resp if resp.status_code == 429 or holder.is_alive() else None
    finally:
        stop.set()
        for thread in [holder, *waiting]:
            thread.join(60)


@pytest.mark.parametrize("limit", ["requests", "tokens"])
def test_queue_full_429_before_tokenisation(http, server, limit):
    """A full queue is refused with a 429 and Retry-After before the prompt is read. The queue is full only
    while the holder runs (~0.7 s of the tiny model's tokens): a setup in which the queue did not fill in that
    time is run again, at most 3 times; a response other than the 429 while it was full fails the test."""
    for _ in range(3):
        resp = _refused_while_full(http, server, limit)
        if resp is not None:
            break
    else:
        raise AssertionError("the queue never filled while the holder ran (3 setups)")
    assert_error(resp, 429, code="rate_limit_exceeded")
    assert int(resp.headers["retry-after"]) >= 1


def test_wrong_method_405(http):
    for method, path in (("GET", CHAT), ("GET", COMPLETIONS), ("POST", "/v1/models"), ("DELETE", "/health")):
        assert_error(http.request(method, path), 405)


@pytest.mark.parametrize("text", ["🍓🦀👩‍👩‍👧", "東京は日本の首都です", "שלום עולם مرحبا",
                                  "e\u0301a\u0308\u20dd", "nul\u0000byte", "\u202eoverride\ufeff"])
def test_unusual_text_in_prompts_is_fine(http, text):
    resp = http.post(CHAT, json=chat(messages=[{"role": "user", "content": text}]))
    assert resp.status_code == 200, resp.text
    resp = http.post(COMPLETIONS, json=completion(prompt=text, stop=[text[:2]]))
    assert resp.status_code == 200, resp.text
