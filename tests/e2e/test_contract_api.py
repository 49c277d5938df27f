"""SERVING_CONTRACT.md "Compatibility" and the service endpoints, with the unchanged openai client.

The model is a tiny random Llama: its text is gibberish (often invalid UTF-8 byte runs), so the
tests check behaviour (counts, equalities, shapes), not wording.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests.e2e.conftest import MODEL_NAME

openai = pytest.importorskip("openai")

TEMPLATE = ("{% for m in messages %}{% if m['content'] == 'BOOM' %}{{ raise_exception('template says no') }}"
            "{% endif %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if tools %}<|tools|>{% for t in tools %}{{ t['function']['name'] }};{% endfor %}\n{% endif %}"
            "{% if add_generation_prompt %}<|assistant|><think>\n{% endif %}")
HELLO = [{"role": "user", "content": "Paris is the capital of France."}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def parsed_server(serve_process):
    """A second server: --chat-template override, reasoning and tool-call parsers on."""
    return serve_process(["--chat-template", TEMPLATE, "--reasoning-parser", "deepseek-r1",
                          "--tool-call-parser", "deepseek-v3"])


@pytest.fixture(scope="module")
def parsed_client(parsed_server):
    return openai.OpenAI(base_url=f"{parsed_server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def greedy(**extra) -> dict:
    return {"model": MODEL_NAME, "temperature": 0, "max_tokens": 12, **extra}


# ---- endpoints ------------------------------------------------------------------------------------


def test_models_list(client):
    models = client.models.list().data
    assert [m.id for m in models] == [MODEL_NAME]


def test_health_ready_version(server):
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{server.url}/ready").status_code == 200
    assert httpx.get(f"{server.url}/version").json()["version"]


def test_ready_was_503_while_loading_and_health_was_200(server):
    assert ("ready", 503) in server.seen_while_loading
    assert ("health", 200) in server.seen_while_loading


def test_tokenize_detokenize_roundtrip(server):
    text = "The quick brown fox 🍓 東京"
    tokens = httpx.post(f"{server.url}/tokenize", json={"model": MODEL_NAME, "prompt": text}).json()
    assert tokens["count"] == len(tokens["tokens"]) > 0 and tokens["max_model_len"] == 512
    back = httpx.post(f"{server.url}/detokenize", json={"model": MODEL_NAME, "tokens": tokens["tokens"]}).json()
    assert back["prompt"] == text
    bad = httpx.post(f"{server.url}/detokenize", json={"tokens": [-1]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


# ---- chat and completions, sync / async / stream -------------------------------------------------


def _chat_text(client, **extra) -> tuple[str, object]:
    out = client.chat.completions.create(messages=HELLO, **greedy(**extra))
    return out.choices[0].message.content, out


def _streamed_chat(client, **extra) -> tuple[list[str], list]:
    chunks = list(client.chat.completions.create(messages=HELLO, stream=True, **greedy(**extra)))
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    return deltas, chunks


def test_chat_stream_equals_non_stream_and_no_split_characters(client):
    text, full = _chat_text(client, max_tokens=40)
    deltas, chunks = _streamed_chat(client, max_tokens=40)
    assert "".join(deltas) == text
    # A delta that split a multi-byte character would add U+FFFD that the whole text does not have.
    assert sum(d.count("\ufffd") for d in deltas) == text.count("\ufffd")
    assert chunks[-1].choices[0].finish_reason == full.choices[0].finish_reason


def test_completion_stream_equals_non_stream(client):
    full = client.completions.create(prompt="Paris is", **greedy(max_tokens=40))
    chunks = list(client.completions.create(prompt="Paris is", stream=True, **greedy(max_tokens=40)))
    assert "".join(c.choices[0].text for c in chunks) == full.choices[0].text


def test_async_client_chat_and_completion(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)
        chat = await aclient.chat.completions.create(messages=HELLO, **greedy())
        comp = await aclient.completions.create(prompt="Paris", **greedy())
        stream = await aclient.chat.completions.create(messages=HELLO, stream=True, **greedy())
        deltas = [c.choices[0].delta.content or "" async for c in stream if c.choices]
        await aclient.close()
        return chat, comp, deltas

    chat, comp, deltas = asyncio.run(run())
    assert chat.choices[0].message.role == "assistant" and comp.choices[0].text
    assert "".join(deltas) == chat.choices[0].message.content


def test_include_usage_gives_exactly_one_usage_chunk(client):
    _, chunks = _streamed_chat(client, stream_options={"include_usage": True})
    with_usage = [c for c in chunks if c.usage is not None]
    assert len(with_usage) == 1 and with_usage[0] is chunks[-1] and with_usage[0].choices == []
    usage = with_usage[0].usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    _, plain = _streamed_chat(client)
    assert all(c.usage is None for c in plain)


def test_sse_framing(server):
    body = {"messages": HELLO, "stream": True, **greedy()}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as resp:
        raw = resp.read().decode()
    assert resp.headers["content-type"].startswith("text/event-stream")
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ") and "\n" not in event
        assert json.loads(event[6:])["object"] == "chat.completion.chunk"


def test_n_choices(client):
    out = client.chat.completions.create(messages=HELLO, n=3, temperature=1.0, max_tokens=5, model=MODEL_NAME)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    comp = client.completions.create(prompt=["a", "b"], n=2, max_tokens=3, model=MODEL_NAME)
    assert len(comp.choices) == 4


def test_max_tokens_and_max_completion_tokens(client):
    for key in ("max_tokens", "max_completion_tokens"):
        out = client.chat.completions.create(messages=HELLO, model=MODEL_NAME, temperature=0,
                                             extra_body={"ignore_eos": True}, **{key: 7})
        assert out.usage.completion_tokens == 7 and out.choices[0].finish_reason == "length"


def test_stop_string(client):
    text = client.completions.create(prompt="Paris is", **greedy(max_tokens=30)).choices[0].text
    position = next(i for i, ch in enumerate(text) if i > 0 and ch.isascii() and ch.isalnum())
    stop = text[position]
    out = client.completions.create(prompt="Paris is", stop=[stop], **greedy(max_tokens=30))
    assert out.choices[0].text == text[: text.index(stop)] and out.choices[0].finish_reason == "stop"


def test_seed_temperature_top_p_top_k(client):
    def sample(seed):
        return client.completions.create(prompt="Paris is", model=MODEL_NAME, max_tokens=10, temperature=1.5,
                                         top_p=0.9, seed=seed, extra_body={"top_k": 50}).choices[0].text

    assert sample(1234) == sample(1234)
    assert len({sample(s) for s in range(4)}) > 1


def test_logprobs_and_top_logprobs(client):
    out = client.chat.completions.create(messages=HELLO, logprobs=True, top_logprobs=3, **greedy(max_tokens=5))
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
    comp = client.completions.create(prompt="Paris", logprobs=2, **greedy(max_tokens=4))
    assert len(comp.choices[0].logprobs.tokens) == comp.usage.completion_tokens


def test_logit_bias_forces_a_token(client, server):
    token = httpx.post(f"{server.url}/tokenize", json={"prompt": " the", "add_special_tokens": False}).json()["tokens"]
    out = client.completions.create(prompt="Paris", logit_bias={str(token[0]): 100}, model=MODEL_NAME,
                                    max_tokens=4, temperature=1.0, extra_body={"ignore_eos": True})
    expected = httpx.post(f"{server.url}/detokenize", json={"tokens": token[:1] * 4}).json()["prompt"]
    assert out.choices[0].text == expected


def test_penalties_accepted_and_applied(client):
    base = client.completions.create(prompt="Paris is", **greedy(max_tokens=40)).choices[0].text
    pen = client.completions.create(prompt="Paris is", presence_penalty=2.0, frequency_penalty=2.0,
                                    **greedy(max_tokens=40)).choices[0].text
    assert isinstance(pen, str)
    assert pen != base or len(set(base)) == len(base)  # a repeated token in `base` must be penalised


def test_response_format_json_object_accepted(client):
    # Accepted; the output is NOT constrained to JSON (no guided decoding yet), and nothing crashes.
    out = client.chat.completions.create(messages=HELLO, response_format={"type": "json_object"}, **greedy())
    assert out.choices[0].finish_reason in ("stop", "length")


def test_usage_matches_tokenizer_and_prefix_cache(client, server):
    prompt = "The quick brown fox jumps over the lazy dog. " * 12
    count = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["count"]
    first = client.completions.create(prompt=prompt, **greedy(max_tokens=3))
    second = client.completions.create(prompt=prompt, **greedy(max_tokens=3))
    assert first.usage.prompt_tokens == second.usage.prompt_tokens == count
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.usage.prompt_tokens_details.cached_tokens < count
    chat_count = httpx.post(f"{server.url}/tokenize", json={"messages": HELLO}).json()["count"]
    assert client.chat.completions.create(messages=HELLO, **greedy()).usage.prompt_tokens == chat_count


def test_errors_map_to_openai_exceptions(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(messages=HELLO, temperature=5, model=MODEL_NAME)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(messages=HELLO, model="gpt-4")
    with pytest.raises(openai.BadRequestError) as ctx:
        client.completions.create(prompt=[1] * 600, model=MODEL_NAME)
    assert ctx.value.code == "context_length_exceeded"


def test_user_field_and_chat_template_fields(client, server):
    out = client.chat.completions.create(messages=HELLO, user="user-123", **greedy())
    assert out.choices
    with_prompt = client.chat.completions.create(messages=HELLO, **greedy()).usage.prompt_tokens
    without = client.chat.completions.create(messages=HELLO, extra_body={"add_generation_prompt": False},
                                             **greedy()).usage.prompt_tokens
    assert without < with_prompt
    cont = HELLO + [{"role": "assistant", "content": "It is"}]
    out = client.chat.completions.create(messages=cont, extra_body={"continue_final_message": True}, **greedy())
    assert out.choices[0].message.content is not None


# ---- chat template override, tools, reasoning parser -------------------------------------------------


def test_chat_template_override_and_render_error(parsed_client, parsed_server):
    tokens = httpx.post(f"{parsed_server.url}/tokenize", json={"messages": HELLO}).json()["tokens"]
    text = httpx.post(f"{parsed_server.url}/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert text.endswith("<|assistant|><think>\n")
    with pytest.raises(openai.BadRequestError) as ctx:
        parsed_client.chat.completions.create(messages=[{"role": "user", "content": "BOOM"}], **greedy())
    assert "template says no" in ctx.value.message


def test_tools_reach_the_template(parsed_client):
    plain = parsed_client.chat.completions.create(messages=HELLO, **greedy())
    tooled = parsed_client.chat.completions.create(messages=HELLO, tools=[TOOL], tool_choice="auto", **greedy())
    assert tooled.usage.prompt_tokens > plain.usage.prompt_tokens


def test_reasoning_content_split(parsed_client):
    # The template opens <think>: the (tag-less) output is reasoning, streamed and whole alike.
    full = parsed_client.chat.completions.create(messages=HELLO, **greedy(max_tokens=20))
    message = full.choices[0].message
    reasoning = getattr(message, "reasoning_content", None) or message.model_extra.get("reasoning_content")
    chunks = list(parsed_client.chat.completions.create(messages=HELLO, stream=True, **greedy(max_tokens=20)))
    streamed_reasoning, streamed_content = "", ""
    for chunk in chunks:
        delta = chunk.choices[0].delta
        extra = delta.model_extra or {}
        assert not (extra.get("reasoning_content") and delta.content)
        streamed_reasoning += extra.get("reasoning_content") or ""
        streamed_content += delta.content or ""
    assert streamed_reasoning == (reasoning or "")
    assert streamed_content == (message.content or "")
    assert "<think>" not in streamed_content and "</think>" not in streamed_content
