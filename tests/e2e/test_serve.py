"""`deepserve serve` as a real subprocess with the bundled default model, driven by the openai client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

openai = pytest.importorskip("openai")

pytestmark = pytest.mark.slow

START_DEADLINE_S = 180
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(proc: subprocess.Popen, url: str) -> None:
    deadline = time.monotonic() + START_DEADLINE_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/ready", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"server not healthy within {START_DEADLINE_S} s")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = _free_port()
    log = (tmp_path_factory.mktemp("serve") / "server.log").open("w+")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.Popen([sys.executable, "-m", "deepserve", "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--max-model-len", "1024"], stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_healthy(proc, url)
        yield proc, url
    except AssertionError:
        log.seek(0)
        print(log.read()[-5000:])
        raise
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@pytest.fixture(scope="module")
def client(server):
    _, url = server
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_models_list(client):
    assert len([m.id for m in client.models.list()]) == 1


def _model(client) -> str:
    return client.models.list().data[0].id


def test_chat_paris_and_stream_equals_non_stream(client):
    model = _model(client)
    full = client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32)
    text = full.choices[0].message.content
    assert "Paris" in text
    assert full.usage.completion_tokens > 0 and full.usage.prompt_tokens > 0

    chunks = list(client.chat.completions.create(model=model, messages=QUESTION, temperature=0, max_tokens=32,
                                                 stream=True, stream_options={"include_usage": True}))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    assert "\ufffd" not in streamed
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_unknown_model_and_bad_request(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=_model(client), messages=QUESTION, temperature=5)
    assert httpx.get(f"{server[1]}/health").status_code == 200


def test_completion(client):
    out = client.completions.create(model=_model(client), prompt="The capital of France is", max_tokens=8,
                                    temperature=0)
    assert out.choices[0].text and out.usage.completion_tokens <= 8


def test_terminates_cleanly(server):
    proc, _ = server
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
