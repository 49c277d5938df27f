"""The HTTP layer against a fake engine (canned token streams): validation, envelopes, SSE, n, stop."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from deepserve.engine.async_llm import EngineDeadError
from deepserve.engine.outputs import CompletionOutput, RequestOutput
from deepserve.engine.sequence import TokenLogprob
from deepserve.server.app import build_app
from deepserve.server.http_body import json_depth
from deepserve.server.config import ServerConfig

MODEL = "fake-model"


class FakeTokenizer:
    """One token per character (id = code point); the chat template tags each message."""

    def encode(self, text, add_special_tokens=True):
        return [ord(c) for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def apply_chat_template(self, messages, add_generation_prompt=True, chat_template=None, **kwargs):
        if any(m["content"] == "BOOM" for m in messages):
            raise ValueError("template exploded")
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"


class FakeEngine:
    """AsyncLLM's surface; each request streams `pieces` (one token each) as delta outputs."""

    def __init__(self, pieces=("Hello", ",", " wor", "ld", "!"), max_model_len=64, delay=0.0, fail=None):
        self.pieces = pieces
        self.tokenizer = FakeTokenizer()
        self.max_model_len = max_model_len
        self.vocab_size = 0x110000
        self.healthy = True
        self.delay = delay
        self.fail = fail
        self.calls: list[tuple[str, list[int], object]] = []
        self.closed: list[str] = []

    async def generate(self, request_id, prompt, params):
        self.calls.append((request_id, list(prompt), params))
        try:
            for i, piece in enumerate(self._pieces(params)):
                if self.fail is not None and i == 1:
                    raise self.fail
                await asyncio.sleep(self.delay)
                yield self._output(request_id, prompt, params, i, *piece)
        finally:
            self.closed.append(request_id)

    def _pieces(self, params):
        """(text, finish_reason, stop_reason) per token, honouring stop strings and max_tokens."""
        out = []
        for i, text in enumerate(self.pieces[: params.max_tokens]):
            hit = next((s for s in params.stop if s in text), None)
            if hit is not None:
                out.append((text[: text.index(hit)], "stop", hit))
                return out
            last = i == min(len(self.pieces), params.max_tokens) - 1
            reason = None if not last else ("length" if params.max_tokens <= len(self.pieces) else "stop")
            out.append((text, reason, None))
        return out

    def _output(self, request_id, prompt, params, i, text, finish, stop_reason):
        logprobs = None if params.logprobs is None else [TokenLogprob(65 + i, -0.5, [(65 + i, -0.5), (66, -1.5)])]
        comp = CompletionOutput(0, text, [65 + i], logprobs, finish, stop_reason)
        return RequestOutput(request_id, None, list(prompt), [comp], finished=finish is not None,
                             num_cached_tokens=3)

    def abort(self, request_id):
        pass


@pytest.fixture
def engine():
    return FakeEngine()


@pytest.fixture
def client(engine):
    return TestClient(build_app(engine, MODEL, ServerConfig(max_n=4)))


def chat_body(**extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], **extra}


def assert_error(resp, status, param=None, code=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"]
    assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


def sse_events(text):
    assert text.endswith("data: [DONE]\n\n")
    blocks = text.split("\n\n")[:-1]
    assert all(b.startswith("data: ") for b in blocks)
    return [json.loads(b[6:]) for b in blocks[:-1]]


# ---- plain routes ---------------------------------------------------------------------------------


def test_health_and_models(client, engine):
    assert client.get("/health").status_code == 200
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and data["data"][0]["id"] == MODEL
    engine.healthy = False
    assert_error(client.get("/health"), 503, code="engine_dead")


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize("field,value", [
    ("temperature", -0.1), ("temperature", 2.5), ("top_p", 0.0), ("top_p", 1.5), ("top_k", -2),
    ("presence_penalty", 3.0), ("frequency_penalty", -2.5), ("max_tokens", 0), ("max_completion_tokens", 0),
    ("n", 0), ("n", 5), ("n", True), ("stop", [""]), ("stop", [str(i) for i in range(17)]), ("temperature", "hot"),
    ("max_tokens", "10"), ("stream", "yes"), ("logit_bias", {"abc": 1}), ("logit_bias", {"5": 101}),
    ("logit_bias", {"-1": 1}), ("top_logprobs", 3), ("stream_options", {"include_usage": True}),
    ("messages", "hi"), ("messages", [{"role": "wizard", "content": "x"}]),
    ("messages", [{"role": "user", "content": "BOOM"}]),
])
def test_chat_field_errors(client, field, value):
    assert_error(client.post("/v1/chat/completions", json=chat_body(**{field: value})), 400, param=field)


@pytest.mark.parametrize("missing", ["model", "messages"])
def test_chat_missing_fields(client, missing):
    body = chat_body()
    del body[missing]
    assert_error(client.post("/v1/chat/completions", json=body), 400, param=missing)


def test_empty_messages_is_an_empty_prompt(client):
    assert_error(client.post("/v1/chat/completions", json=chat_body(messages=[])), 400, param="prompt")


def test_completion_echo_rejected(client):
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "echo": True})
    assert_error(resp, 400, param="echo")


@pytest.mark.parametrize("prompt", ["", [], [[]], [-1], [0x110000], 3])
def test_completion_bad_prompts(client, prompt):
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": prompt})
    assert_error(resp, 400, param="prompt")


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b"\xff\xfe", b'"text"', b"[" * 100 + b"]" * 100,
                                  b'{"a":' * 70 + b"1" + b"}" * 70])
def test_invalid_json(client, body):
    resp = client.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert_error(resp, 400, code="invalid_json")


def test_json_depth():
    assert json_depth({"a": [1, {"b": 2}]}, 64) == 3
    assert json_depth({}, 64) == 1


def test_unknown_model_is_404(client):
    resp = client.post("/v1/chat/completions", json=chat_body(model="gpt-4"))
    assert_error(resp, 404, param="model", code="model_not_found")


def test_context_length(client, engine):
    long_text = "x" * 70  # > max_model_len 64
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": long_text})
    assert_error(resp, 400, param="prompt", code="context_length_exceeded")
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x" * 40, "max_tokens": 30})
    assert_error(resp, 400, param="prompt", code="context_length_exceeded")
    resp = client.post("/v1/chat/completions", json=chat_body(max_tokens=60))
    assert_error(resp, 400, param="messages", code="context_length_exceeded")


def test_body_too_large(engine):
    small = TestClient(build_app(engine, MODEL, ServerConfig(max_request_bytes=100)))
    resp = small.post("/v1/chat/completions", json=chat_body(user="u" * 200))
    assert_error(resp, 413, code="content_too_large")


def test_wrong_method_and_unknown_route(client):
    assert client.get("/v1/chat/completions").status_code == 405
    assert "error" in client.get("/v1/nothing").json()


def test_server_still_serves_after_bad_requests(client):
    for body in (b"{", b"[]", json.dumps(chat_body(temperature=9)).encode()):
        client.post("/v1/chat/completions", content=body)
    assert client.get("/health").status_code == 200
    assert client.post("/v1/chat/completions", json=chat_body()).status_code == 200


# ---- non-stream -----------------------------------------------------------------------------------


def test_chat_non_stream(client, engine):
    resp = client.post("/v1/chat/completions", json=chat_body(temperature=0, max_tokens=32, seed=7, top_k=5,
                                                              min_p=0.1, presence_penalty=0.5,
                                                              logit_bias={"65": 2}))
    data = resp.json()
    assert resp.status_code == 200, data
    assert data["object"] == "chat.completion" and data["model"] == MODEL
    choice = data["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": "Hello, world!"}
    assert choice["finish_reason"] == "stop"
    prompt_ids = [ord(c) for c in "<user>hi<assistant>"]
    assert data["usage"] == {"prompt_tokens": len(prompt_ids), "completion_tokens": 5,
                             "total_tokens": len(prompt_ids) + 5, "prompt_tokens_details": {"cached_tokens": 3}}
    request_id, ids, params = engine.calls[0]
    assert ids == prompt_ids and request_id.startswith(data["id"])
    assert (params.temperature, params.max_tokens, params.seed, params.top_k) == (0.0, 32, 7, 5)
    assert params.logit_bias == {65: 2.0} and params.presence_penalty == 0.5 and params.min_p == 0.1


def test_chat_default_max_tokens_fills_context(client, engine):
    client.post("/v1/chat/completions", json=chat_body())
    prompt_len = len("<user>hi<assistant>")
    assert engine.calls[0][2].max_tokens == 64 - prompt_len


def test_max_completion_tokens_and_length(client, engine):
    data = client.post("/v1/chat/completions", json=chat_body(max_completion_tokens=2)).json()
    assert data["choices"][0]["message"]["content"] == "Hello,"
    assert data["choices"][0]["finish_reason"] == "length"
    assert engine.calls[0][2].max_tokens == 2


def test_stop_string(client, engine):
    data = client.post("/v1/chat/completions", json=chat_body(stop=["or"])).json()
    assert engine.calls[0][2].stop == ("or",)
    assert data["choices"][0]["message"]["content"] == "Hello, w"
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["choices"][0]["stop_reason"] == "or"


def test_completion_non_stream_defaults(client, engine):
    data = client.post("/v1/completions", json={"model": MODEL, "prompt": "Say"}).json()
    assert data["object"] == "text_completion"
    assert data["choices"][0]["text"] == "Hello, world!"
    assert engine.calls[0][1] == [ord(c) for c in "Say"]
    assert engine.calls[0][2].max_tokens == 16  # OpenAI's default for completions


def test_completion_token_prompt_and_batch(client, engine):
    data = client.post("/v1/completions", json={"model": MODEL, "prompt": [[72, 105], [33]], "n": 2}).json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    assert [call[1] for call in engine.calls] == [[72, 105], [72, 105], [33], [33]]
    assert data["usage"]["prompt_tokens"] == 3 and data["usage"]["completion_tokens"] == 20


def test_n_requests_have_suffixed_ids_and_distinct_seeds(client, engine):
    data = client.post("/v1/chat/completions", json=chat_body(n=3, seed=10)).json()
    assert len(data["choices"]) == 3
    ids = [call[0] for call in engine.calls]
    assert sorted(ids) == [f"{data['id']}-{i}" for i in range(3)]
    assert sorted(call[2].seed for call in engine.calls) == [10, 11, 12]
    assert data["usage"]["prompt_tokens"] == len("<user>hi<assistant>")  # the prompt counts once
    assert data["usage"]["completion_tokens"] == 15


def test_chat_logprobs(client):
    data = client.post("/v1/chat/completions", json=chat_body(logprobs=True, top_logprobs=2)).json()
    content = data["choices"][0]["logprobs"]["content"]
    assert len(content) == 5 and content[0]["token"] == "A" and content[0]["bytes"] == [65]
    assert [t["token"] for t in content[0]["top_logprobs"]] == ["A", "B"]


def test_completion_logprobs(client):
    data = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 1}).json()
    lp = data["choices"][0]["logprobs"]
    assert lp["tokens"][:2] == ["A", "B"] and lp["token_logprobs"][0] == -0.5
    assert lp["text_offset"][:2] == [0, 1]


def test_engine_errors(engine):
    engine.fail = EngineDeadError("engine failed")
    client = TestClient(build_app(engine, MODEL))
    assert_error(client.post("/v1/chat/completions", json=chat_body()), 503, code="engine_dead")
    engine.fail = ValueError("bad request for the engine")
    assert_error(client.post("/v1/chat/completions", json=chat_body()), 400)


# ---- streaming ------------------------------------------------------------------------------------


def test_chat_stream_framing_and_usage(client):
    resp = client.post("/v1/chat/completions", json=chat_body(stream=True, stream_options={"include_usage": True}))
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = sse_events(resp.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == "Hello, world!"
    finishes = [e["choices"][0]["finish_reason"] for e in events if e["choices"]]
    assert finishes[-1] == "stop" and all(f is None for f in finishes[:-1])
    usage = [e for e in events if "usage" in e]
    assert len(usage) == 1 and usage[0]["choices"] == [] and usage[0]["usage"]["completion_tokens"] == 5
    assert events[-1] is usage[0]


def test_stream_text_equals_non_stream(client):
    full = client.post("/v1/chat/completions", json=chat_body(stop="ld")).json()["choices"][0]["message"]
    events = sse_events(client.post("/v1/chat/completions", json=chat_body(stop="ld", stream=True)).text)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == full["content"]
    assert not any("usage" in e for e in events)


def test_completion_stream_n(client):
    resp = client.post("/v1/completions", json={"model": MODEL, "prompt": "x", "n": 2, "stream": True})
    events = sse_events(resp.text)
    by_index: dict[int, str] = {}
    for e in events:
        assert e["object"] == "text_completion"
        by_index[e["choices"][0]["index"]] = by_index.get(e["choices"][0]["index"], "") + e["choices"][0]["text"]
    assert by_index == {0: "Hello, world!", 1: "Hello, world!"}


def test_stream_engine_error_becomes_error_event(engine):
    engine.fail = EngineDeadError("engine failed")
    resp = TestClient(build_app(engine, MODEL)).post("/v1/chat/completions", json=chat_body(stream=True))
    assert resp.status_code == 200
    events = sse_events(resp.text)
    assert events[-1]["error"]["code"] == "engine_dead"


# ---- disconnect, over a real socket -----------------------------------------------------------------


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def live_server():
    import uvicorn

    engine = FakeEngine(pieces=tuple(f"t{i} " for i in range(200)), max_model_len=10_000, delay=0.02)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_app(engine, MODEL), host="127.0.0.1", port=port,
                                           log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield engine, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


@pytest.mark.parametrize("stream", [True, False])
def test_client_disconnect_aborts(live_server, stream):
    engine, url = live_server
    body = chat_body(stream=stream, max_tokens=200)
    with httpx.Client(timeout=5) as http:
        if stream:
            with http.stream("POST", f"{url}/v1/chat/completions", json=body) as resp:
                next(resp.iter_lines())
        else:
            with pytest.raises(httpx.ReadTimeout):
                http.post(f"{url}/v1/chat/completions", json=body, timeout=0.3)
    deadline = time.monotonic() + 2
    while not engine.closed and time.monotonic() < deadline:
        time.sleep(0.02)
    assert engine.closed == [engine.calls[0][0]]
