"""DeepSeek tool-call parsers (V3 and V3.1 formats) composed with the R1 reasoning parser.

A conformance table of model outputs, each parsed whole and streamed split at every character
position, one character per chunk, and at random multi-splits (hypothesis): the concatenated
deltas equal the non-stream result, which equals the expected one. Then the real DeepSeek
templates: the call format they render parses back, the markers survive skip_special_tokens,
and the tool definitions reach the prompt.
"""

import itertools
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepserve.server.parsers import UnknownParserError, get_tool_parser, tool_parser_names
from deepserve.server.parsers.base import DeltaMessage, ParsedOutput, ToolCall, ToolCallDelta
from deepserve.server.parsers.chat_stream import ChatOutputParser, collect_deltas
from deepserve.server.parsers.tool_calls import (CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP,
                                                  DeepSeekV3ToolParser, DeepSeekV31ToolParser, new_call_id,
                                                  parse_v3_body, parse_v31_body)
from deepserve.server.parsers.tool_prompt import tools_system_prompt, with_tools

R1, V3, V31 = "deepseek-r1", "deepseek-v3", "deepseek-v3.1"


def v3(name: str, args: str) -> str:
    return f"{CALL_BEGIN}function{TOOL_SEP}{name}\n```json\n{args}\n```{CALL_END}"


def v31(name: str, args: str) -> str:
    return f"{CALL_BEGIN}{name}{TOOL_SEP}{args}{CALL_END}"


def block(*calls: str, sep: str = "\n") -> str:
    return CALLS_BEGIN + sep.join(calls) + CALLS_END


PARIS, TOKYO = '{"city": "Paris"}', '{"city": "Tokyo", "days": [1, 2]}'
BAD = '{"city": "Paris",,}'
CUT = f'{CALLS_BEGIN}{CALL_BEGIN}function{TOOL_SEP}get_weather\n```json\n{{"city": "Par'
CODE = json.dumps({"code": "```py\nprint('<think>')\n```", "n": 1})
PRETTY = json.dumps({"a": {"b": [1, 2]}, "s": "x y"}, indent=2)

# (id, reasoning parser, tool parser, prompt opens thinking, output, reasoning, content, [(name, args)])
CASES = [
    ("content_only", None, V3, False, "The weather is nice.", None, "The weather is nice.", []),
    ("reasoning_content_only", R1, V3, True, "Easy.\n</think>\n\nHi!", "Easy.\n", "Hi!", []),
    ("reasoning_and_call", R1, V3, True, "Need weather.\n</think>\n\n" + block(v3("get_weather", PARIS)),
     "Need weather.\n", None, [("get_weather", PARIS)]),
    ("several_calls", None, V3, False, block(v3("get_weather", PARIS), v3("get_weather", TOKYO), v3("now", "{}")),
     None, None, [("get_weather", PARIS), ("get_weather", TOKYO), ("now", "{}")]),
    ("content_before_calls", None, V3, False, "Let me check.\n\n" + block(v3("get_weather", PARIS)),
     None, "Let me check.\n\n", [("get_weather", PARIS)]),
    ("text_after_block", None, V3, False, block(v3("now", "{}")) + " Done.", None, " Done.", [("now", "{}")]),
    ("malformed_json", None, V3, False, block(v3("get_weather", BAD)), None, block(v3("get_weather", BAD)), []),
    ("args_not_an_object", None, V3, False, block(v3("f", "[1, 2]")), None, block(v3("f", "[1, 2]")), []),
    ("bad_name", None, V3, False, block(v3("get weather", PARIS)), None, block(v3("get weather", PARIS)), []),
    ("truncated_call", R1, V3, True, "Hmm</think>" + CUT, "Hmm", CUT, []),
    ("truncated_after_block_open", None, V3, False, "Sure." + CALLS_BEGIN, None, "Sure." + CALLS_BEGIN, []),
    ("truncated_partial_marker", None, V3, False, "Sure." + CALLS_BEGIN[:5], None, "Sure." + CALLS_BEGIN[:5], []),
    ("empty_block", None, V3, False, CALLS_BEGIN + CALLS_END, None, CALLS_BEGIN + CALLS_END, []),
    ("valid_then_malformed", None, V3, False, block(v3("now", "{}"), v3("f", BAD)),
     None, "\n" + v3("f", BAD), [("now", "{}")]),
    ("malformed_then_valid", None, V3, False, block(v3("f", BAD), v3("now", "{}")),
     None, CALLS_BEGIN + v3("f", BAD), [("now", "{}")]),
    ("fences_and_tags_inside_args", None, V3, False, block(v3("run", CODE)), None, None, [("run", CODE)]),
    ("pretty_printed_args", None, V3, False, block(v3("f", PRETTY)), None, None, [("f", PRETTY)]),
    ("no_fence_tolerated", None, V3, False, block(f"{CALL_BEGIN}function{TOOL_SEP}now\n{{}}{CALL_END}"),
     None, None, [("now", "{}")]),
    ("single_call_without_block_end", None, V3, False, CALLS_BEGIN + v3("now", "{}"), None, None, [("now", "{}")]),
    ("v31_two_calls", None, V31, False, block(v31("get_weather", PARIS), v31("now", "{}"), sep=""),
     None, None, [("get_weather", PARIS), ("now", "{}")]),
    ("v31_thinking_then_call", R1, V31, True, "Look it up.</think>" + block(v31("get_weather", TOKYO)),
     "Look it up.", None, [("get_weather", TOKYO)]),
    ("v31_malformed", None, V31, False, "x" + block(v31("f", BAD)), None, "x" + block(v31("f", BAD)), []),
    ("v31_rejects_v3_format", None, V31, False, block(v3("now", "{}")), None, block(v3("now", "{}")), []),
]
IDS = [case[0] for case in CASES]


def parser(reasoning, tools, opened, requested=True) -> ChatOutputParser:
    ids = (f"call_{i}" for i in itertools.count())
    return ChatOutputParser(reasoning, tools, opened, tools_requested=requested, new_id=lambda: next(ids))


def expected(reasoning, content, calls) -> ParsedOutput:
    return ParsedOutput(reasoning, content, [ToolCall(f"call_{i}", n, a) for i, (n, a) in enumerate(calls)])


def stream(config: tuple, chunks: list[str]) -> list[DeltaMessage]:
    p = parser(*config)
    deltas = [d for chunk in chunks for d in p.feed(chunk)]
    return deltas + p.finish()


def check_deltas(deltas: list[DeltaMessage]) -> None:
    for delta in deltas:
        assert not (delta.reasoning_content is not None and delta.content is not None)
        assert delta.reasoning_content or delta.content or delta.tool_calls
        for text in (delta.reasoning_content or "", delta.content or ""):
            assert "<think>" not in text and "</think>" not in text
        for call in delta.tool_calls:  # every call arrives whole
            assert call.id and call.name and json.loads(call.arguments) is not None


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0] + sorted(cuts) + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name,reasoning,tools,opened,text,want_r,want_c,want_calls", CASES, ids=IDS)
def test_non_stream(name, reasoning, tools, opened, text, want_r, want_c, want_calls):
    assert parser(reasoning, tools, opened).parse_full(text) == expected(want_r, want_c, want_calls)


@pytest.mark.parametrize("name,reasoning,tools,opened,text,want_r,want_c,want_calls", CASES, ids=IDS)
def test_stream_every_split_and_per_char(name, reasoning, tools, opened, text, want_r, want_c, want_calls):
    want = expected(want_r, want_c, want_calls)
    for cut in range(len(text) + 1):
        deltas = stream((reasoning, tools, opened), [text[:cut], text[cut:]])
        check_deltas(deltas)
        assert collect_deltas(deltas) == want, cut
    deltas = stream((reasoning, tools, opened), list(text))
    check_deltas(deltas)
    assert collect_deltas(deltas) == want


@settings(max_examples=30, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("name,reasoning,tools,opened,text,want_r,want_c,want_calls", CASES, ids=IDS)
def test_stream_random_splits(name, reasoning, tools, opened, text, want_r, want_c, want_calls, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=16))
    deltas = stream((reasoning, tools, opened), split_at(text, cuts))
    check_deltas(deltas)
    assert collect_deltas(deltas) == expected(want_r, want_c, want_calls)


_SOUP = ["<think>", "</think>", CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP, "function", "f",
         "\n", "```json\n", "\n```", "{}", '{"a": 1}', "{", "x", " ", CALL_BEGIN[:4], "</thi"]


@settings(max_examples=300, deadline=None)
@given(parts=st.lists(st.sampled_from(_SOUP), max_size=16), tools=st.sampled_from([V3, V31]),
       opened=st.booleans(), data=st.data())
def test_fuzzed_marker_soup_streams_like_whole(parts, tools, opened, data):
    text = "".join(parts)
    whole = parser(R1, tools, opened).parse_full(text)
    deltas = stream((R1, tools, opened), split_at(text, data.draw(st.lists(st.integers(0, len(text)), max_size=10))))
    check_deltas(deltas)
    assert collect_deltas(deltas) == whole


def test_stream_deltas_name_and_arguments_in_openai_shape():
    p = parser(R1, V3, True)
    text = "Think.</think>\n\nOK." + block(v3("get_weather", PARIS), v3("now", "{}"))
    deltas = p.feed(text) + p.finish()
    assert [d.to_openai() for d in deltas] == [
        {"reasoning_content": "Think."}, {"content": "OK."},
        {"tool_calls": [
            {"index": 0, "id": "call_0", "type": "function", "function": {"name": "get_weather", "arguments": PARIS}},
            {"index": 1, "id": "call_1", "type": "function", "function": {"name": "now", "arguments": "{}"}}]}]
    assert ToolCallDelta(2, arguments="{").to_openai() == {"index": 2, "function": {"arguments": "{"}}


def test_calls_are_emitted_when_their_end_marker_arrives():
    p = parser(None, V3, False)
    assert p.feed(CALLS_BEGIN + v3("now", "{}")[:-3]) == []
    [delta] = p.feed(CALL_END[-3:])
    assert delta.tool_calls == [ToolCallDelta(0, "call_0", "now", "{}")]
    assert p.feed("\n" + v3("f", BAD)) == [DeltaMessage(content="\n" + v3("f", BAD))]
    assert p.finish() == []


def test_tools_not_requested_leaves_markers_as_content():
    text = block(v3("now", "{}"))
    assert parser(None, V3, False, requested=False).parse_full(text) == ParsedOutput(None, text, [])


def test_body_parsers():
    assert parse_v3_body(f"function{TOOL_SEP}now\n```json\n{{}}\n```") == ("now", "{}")
    assert parse_v3_body(f"now{TOOL_SEP}{{}}") is None and parse_v3_body("function now\n{}") is None
    assert parse_v31_body(f" now {TOOL_SEP} {{\"a\": 1}} ") == ("now", '{"a": 1}')
    assert parse_v31_body(f"now{TOOL_SEP}{{") is None and parse_v31_body("now {}") is None
    assert parse_v31_body(f"now{TOOL_SEP}" + "[" * 100_000) is None  # deep nesting: no RecursionError


def test_ids_default_and_injected():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(i.startswith("call_") and len(i) == 29 for i in ids)
    p = ChatOutputParser(None, V3, tools_requested=True, new_id=lambda: "call_fixed")
    assert p.parse_full(block(v3("now", "{}"))).tool_calls == [ToolCall("call_fixed", "now", "{}")]


def test_registry_names_and_error():
    assert get_tool_parser(V3) is DeepSeekV3ToolParser and get_tool_parser(V31) is DeepSeekV31ToolParser
    assert tool_parser_names() == [V3, V31]
    with pytest.raises(UnknownParserError, match="unknown tool parser 'hermes'; known: deepseek-v3, deepseek-v3.1"):
        get_tool_parser("hermes")


# ---- real DeepSeek tokenizers and chat templates ------------------------------------------------

from tests.real_tokenizers import unpack  # noqa: E402
WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from deepserve.loader.tokenizer import load_tokenizer

    made = {}

    def load(name: str):
        if name not in made:
            made[name] = load_tokenizer(unpack(name, tmp_path_factory.mktemp(name)))
        return made[name]

    return load


def _assistant_turn(tok, calls: list[tuple[str, str]]) -> str:
    """What the template renders for an assistant message with these tool calls (after <｜Assistant｜>).

    Rendered with jinja2 directly: transformers 5 drops `content: None` from messages, and these
    templates test `message['content'] is none` to find a tool-call turn (else they fail).
    """
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    tool_calls = [{"type": "function", "function": {"name": n, "arguments": a}} for n, a in calls]
    messages = [{"role": "user", "content": "Weather?"},
                {"role": "assistant", "content": None, "tool_calls": tool_calls}]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(tok.chat_template).render(
        messages=messages, bos_token="<｜begin▁of▁sentence｜>", add_generation_prompt=False)
    turn = rendered.split("<｜Assistant｜>", 1)[1]
    return turn.removeprefix("</think>").removesuffix("<｜end▁of▁sentence｜>")


@pytest.mark.parametrize("model,tools", [("deepseek-v3", V3), ("deepseek-r1", V3), ("deepseek-v3.1", V31)])
@pytest.mark.parametrize("calls", [[("get_weather", PARIS)], [("get_weather", PARIS), ("now", "{}")]])
def test_the_templates_call_format_parses_back(tokenizer, model, tools, calls):
    turn = _assistant_turn(tokenizer(model), calls)
    assert turn.startswith(CALLS_BEGIN + CALL_BEGIN)
    assert parser(None, tools, False).parse_full(turn) == expected(None, None, calls)


@pytest.mark.parametrize("model", ["deepseek-v3", "deepseek-r1", "deepseek-v3.1"])
def test_markers_are_non_special_tokens_kept_by_skip_special_tokens(tokenizer, model):
    """Tool markers and think tags are added tokens with special=false: only BOS/EOS are stripped."""
    from tokenizers.decoders import DecodeStream

    tok = tokenizer(model)
    for marker in (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, TOOL_SEP):
        assert tok.encode(marker, add_special_tokens=False) == [tok.token_to_id(marker)]
    output = "Hmm</think>\n\n" + block(v3("get_weather", PARIS), v3("now", "{}")) + "<｜end▁of▁sentence｜>"
    ids = tok.encode(output, add_special_tokens=False)
    assert tok.decode(ids, skip_special_tokens=True) == output.removesuffix("<｜end▁of▁sentence｜>")
    decoder, p, deltas = DecodeStream(skip_special_tokens=True), parser(R1, V3, True), []
    for token_id in ids:
        deltas += p.feed(decoder.step(tok.backend, token_id) or "")
    deltas += p.finish()
    assert collect_deltas(deltas) == expected("Hmm", None, [("get_weather", PARIS), ("now", "{}")])


@pytest.mark.parametrize("model", ["deepseek-v3", "deepseek-r1", "deepseek-v3.1"])
def test_templates_ignore_tools_so_the_server_injects_them(tokenizer, model):
    tok = tokenizer(model)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
    plain = tok.apply_chat_template(messages)
    assert tok.apply_chat_template(messages, tools=[WEATHER_TOOL]) == plain  # `tools` is not read
    tool_format = V31 if model == "deepseek-v3.1" else V3
    prompt = tok.apply_chat_template(with_tools(messages, [WEATHER_TOOL], tool_format), tools=[WEATHER_TOOL])
    assert "get_weather" in prompt and "Current weather of a city" in prompt
    assert json.dumps(WEATHER_TOOL["function"]["parameters"]) in prompt
    assert prompt.startswith("<｜begin▁of▁sentence｜>Be brief.\n\n## Tools") and prompt.endswith(plain[-20:])
    ids = tok.encode(prompt, add_special_tokens=False)
    assert tok.token_to_id(CALLS_BEGIN) in ids and tok.token_to_id(TOOL_SEP) in ids


def test_with_tools_adds_a_system_message_when_there_is_none():
    out = with_tools([{"role": "user", "content": "hi"}], [WEATHER_TOOL], V31)
    assert out[0] == {"role": "system", "content": tools_system_prompt([WEATHER_TOOL], V31)}
    assert out[1] == {"role": "user", "content": "hi"}
    assert v31("FUNCTION_NAME", "ARGUMENTS_JSON") in out[0]["content"]
