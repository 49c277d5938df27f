"""Data shapes shared by the output parsers, and the tag scanner they all use.

Parsers are pure: text in, typed pieces out; no FastAPI, no engine. `Segment` is what a stage
emits (reasoning text, content text or a finished tool call); `DeltaMessage` is what one
OpenAI `delta` carries, `ParsedOutput` is a whole (non-stream) message.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, NamedTuple, Sequence


@dataclass(frozen=True)
class ToolCallDelta:
    """One entry of `delta.tool_calls`: the fields of call `index` that this chunk adds."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str | None = None  # a fragment of the JSON text; fragments concatenate

    def to_openai(self) -> dict:
        function = {k: v for k, v in (("name", self.name), ("arguments", self.arguments)) if v is not None}
        head = {"index": self.index} | ({"id": self.id, "type": "function"} if self.id is not None else {})
        return head | {"function": function}


@dataclass(frozen=True)
class ToolCall:
    """A complete tool call; `arguments` is a JSON object as text (json.loads has accepted it)."""

    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def as_delta(self, index: int) -> ToolCallDelta:
        return ToolCallDelta(index, self.id, self.name, self.arguments)


@dataclass
class DeltaMessage:
    """One streamed chunk's delta; never has both reasoning_content and content."""

    reasoning_content: str | None = None
    content: str | None = None
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def to_openai(self) -> dict:
        out: dict = {}
        if self.reasoning_content is not None:
            out["reasoning_content"] = self.reasoning_content
        if self.content is not None:
            out["content"] = self.content
        if self.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in self.tool_calls]
        return out


class ParsedOutput(NamedTuple):
    """A whole message: None where a field got no text (tool_calls: empty list)."""

    reasoning_content: str | None
    content: str | None
    tool_calls: list[ToolCall]


SegmentKind = Literal["reasoning", "content", "tool_call"]


@dataclass(frozen=True)
class Segment:
    """A piece of parsed output, in order: text of one kind, or one finished tool call."""

    kind: SegmentKind
    text: str = ""
    call: ToolCall | None = None


def partial_tag_len(text: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`.

    That suffix must be held back while streaming: the next chunk may complete the tag.
    """
    longest = min(len(text), max(len(tag) for tag in tags) - 1)
    for size in range(longest, 0, -1):
        suffix = text[-size:]
        if any(tag.startswith(suffix) for tag in tags):
            return size
    return 0


class TagHit(NamedTuple):
    before: str  # text before the tag
    tag: str | None  # the first tag found, None if no complete tag is in the text
    after: str  # text after the tag ("" when tag is None)


def find_first_tag(text: str, tags: Sequence[str]) -> TagHit:
    """The earliest complete occurrence of any of `tags` in `text` (the longest on a tie)."""
    hits = [(pos, -len(tag), tag) for tag in tags if (pos := text.find(tag)) >= 0]
    if not hits:
        return TagHit(text, None, "")
    pos, _, tag = min(hits)
    return TagHit(text[:pos], tag, text[pos + len(tag):])


def add_text(out: list[Segment], kind: SegmentKind, text: str) -> None:
    """Append text of `kind` to `out`, merged into the last segment when that has the same kind."""
    if not text:
        return
    if out and out[-1].kind == kind and kind != "tool_call":
        out[-1] = Segment(kind, out[-1].text + text)
    else:
        out.append(Segment(kind, text))
