"""DeepSeek tool calls: the special-token block the chat templates write, parsed into ToolCalls.

The block (spelling from the tokenizer_config.json chat templates; each marker is one token):

    deepseek-v3 (V3, V3-0324, R1, R1-0528, R1-Distill templates):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
        ```json
        ARGS
        ```<｜tool▁call▁end｜>
        <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>
    deepseek-v3.1 (V3.1, V3.2):
        <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>NAME<｜tool▁sep｜>ARGS<｜tool▁call▁end｜>
        <｜tool▁call▁begin｜>...<｜tool▁call▁end｜><｜tool▁calls▁end｜>

Text before the block is content. A call becomes a ToolCall only when its <｜tool▁call▁end｜> has
arrived and its body parses (a name, ARGS a JSON object); it is then emitted whole, in one
segment. A call that does not parse, or is cut off by the end of the output, is given back as
content, raw (markers included, with the block's opening marker when no call of the block has
succeeded yet). Nothing here raises on model output. Emitting each call whole, rather than
name first and argument fragments after, is what lets a malformed or truncated call fall back
to content in a stream exactly as in a full parse: streamed bytes cannot be taken back.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Callable, NamedTuple

from deepserve.server.parsers.base import Segment, ToolCall, add_text, find_first_tag, partial_tag_len

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"

_NAME = re.compile(r"[\w.\-]{1,128}")
_BLOCK_TAGS = (CALL_BEGIN, CALLS_END)

IdFactory = Callable[[], str]


def new_call_id() -> str:
    """An OpenAI-style tool call id: "call_" + 24 random hex digits."""
    return f"call_{secrets.token_hex(12)}"


class CallBody(NamedTuple):
    name: str
    arguments: str  # JSON object text


def _checked(name: str, arguments: str) -> CallBody | None:
    """The call if `name` is a plain identifier and `arguments` a JSON object, else None."""
    name, arguments = name.strip(), arguments.strip()
    if not _NAME.fullmatch(name):
        return None
    try:
        value = json.loads(arguments)
    except (ValueError, RecursionError):
        return None
    return CallBody(name, arguments) if isinstance(value, dict) else None


def _unfence(text: str) -> str:
    """ARGS out of "```json\\nARGS\\n```" (a missing fence is tolerated)."""
    text = text.strip()
    if len(text) >= 6 and text.startswith("```") and text.endswith("```"):
        inner = text[3:-3]
        return inner[4:] if inner.startswith("json") else inner
    return text


def parse_v3_body(body: str) -> CallBody | None:
    """'function<｜tool▁sep｜>NAME\\n```json\\nARGS\\n```' -> CallBody, or None."""
    kind, sep, rest = body.partition(TOOL_SEP)
    name, newline, arguments = rest.partition("\n")
    if not sep or not kind.strip() or not newline:
        return None
    return _checked(name, _unfence(arguments))


def parse_v31_body(body: str) -> CallBody | None:
    """'NAME<｜tool▁sep｜>ARGS' -> CallBody, or None."""
    name, sep, arguments = body.partition(TOOL_SEP)
    return _checked(name, arguments) if sep else None


class DeepSeekToolParser:
    """Streaming tool-call extractor; `feed` content chunks, then `finish` once.

    States: "text" (content, watching for the block), "block" (between calls), "call" (buffering
    one call's body until its end marker).
    """

    parse_body: Callable[[str], CallBody | None] = staticmethod(parse_v3_body)

    def __init__(self, new_id: IdFactory = new_call_id):
        self._new_id = new_id
        self._state = "text"
        self._held = ""  # fed text not decided yet: a partial marker, or a call's body so far
        self._raw = ""  # block text that becomes content if the block fails
        self._block_ok = False  # a call of the current block has succeeded

    def feed(self, text: str) -> list[Segment]:
        """Content segments and finished tool calls decided by this chunk, in order."""
        out: list[Segment] = []
        self._held += text
        while self._step(out):
            pass
        return out

    def finish(self) -> list[Segment]:
        """End of output: anything undecided (a truncated call, a lone marker) as raw content."""
        opener = CALL_BEGIN if self._state == "call" else ""
        leftover = self._raw + opener + self._held
        self._state, self._raw, self._held = "text", "", ""
        return [Segment("content", leftover)] if leftover.strip() else []

    def _step(self, out: list[Segment]) -> bool:
        """Advance over `_held` once; False when it needs more text."""
        if self._state == "text":
            return self._step_text(out)
        if self._state == "block":
            return self._step_block(out)
        return self._step_call(out)

    def _step_text(self, out: list[Segment]) -> bool:
        hit = find_first_tag(self._held, (CALLS_BEGIN,))
        if hit.tag is None:
            keep = partial_tag_len(self._held, (CALLS_BEGIN,))
            add_text(out, "content", self._held[:len(self._held) - keep])
            self._held = self._held[len(self._held) - keep:]
            return False
        add_text(out, "content", hit.before)
        self._state, self._raw, self._block_ok, self._held = "block", CALLS_BEGIN, False, hit.after
        return True

    def _step_block(self, out: list[Segment]) -> bool:
        hit = find_first_tag(self._held, _BLOCK_TAGS)
        if hit.tag is None:
            keep = partial_tag_len(self._held, _BLOCK_TAGS)
            self._between_calls(out, self._held[:len(self._held) - keep])
            self._held = self._held[len(self._held) - keep:]
            return False
        self._between_calls(out, hit.before)
        self._held = hit.after
        if hit.tag == CALL_BEGIN:
            self._state = "call"
        else:
            self._close_block(out)
        return True

    def _between_calls(self, out: list[Segment], text: str) -> None:
        """Separators are kept aside (dropped if the block succeeds); other text is content."""
        stripped = text.rstrip()
        if not stripped:
            self._raw += text
            return
        add_text(out, "content", self._raw + stripped)
        self._raw = text[len(stripped):]

    def _close_block(self, out: list[Segment]) -> None:
        if not self._block_ok:
            add_text(out, "content", self._raw + CALLS_END)
        self._state, self._raw = "text", ""

    def _step_call(self, out: list[Segment]) -> bool:
        hit = find_first_tag(self._held, (CALL_END,))
        if hit.tag is None:
            return False
        body = type(self).parse_body(hit.before)
        if body is None:
            add_text(out, "content", self._raw + CALL_BEGIN + hit.before + CALL_END)
        else:
            out.append(Segment("tool_call", call=ToolCall(self._new_id(), body.name, body.arguments)))
            self._block_ok = True
        self._state, self._raw, self._held = "block", "", hit.after
        return True


class DeepSeekV3ToolParser(DeepSeekToolParser):
    """V3 / R1 format: 'function<｜tool▁sep｜>NAME' + a ```json fenced ARGS."""

    parse_body = staticmethod(parse_v3_body)


class DeepSeekV31ToolParser(DeepSeekToolParser):
    """V3.1 format: 'NAME<｜tool▁sep｜>ARGS', no fence."""

    parse_body = staticmethod(parse_v31_body)
