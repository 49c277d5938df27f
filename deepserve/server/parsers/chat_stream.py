"""One chat choice's output -> reasoning_content / content / tool_calls, streamed or whole.

    parser = ChatOutputParser("deepseek-r1", "deepseek-v3", prompt_opens_thinking(prompt),
                              tools_requested=bool(request.tools))
    for text in deltas_from_engine:          # streaming
        for delta in parser.feed(text): send(delta.to_openai())
    for delta in parser.finish(): send(...)  # once, when the choice finishes
    parsed = parser.parse_full(full_text)    # non-stream (uses its own fresh state)

The reasoning stage runs first on the raw text; its content goes through the tool stage (only
when a tool parser is named and the request asked for tools). Each returned DeltaMessage carries
one kind: reasoning_content, content, or tool_calls (each call whole, with id, name and
arguments). The deltas of a stream, concatenated (`collect_deltas`), equal `parse_full` of the
same text, however the text was chunked.
"""

from __future__ import annotations

from typing import Iterable

from deepserve.server.parsers import get_reasoning_parser, get_tool_parser
from deepserve.server.parsers.base import DeltaMessage, ParsedOutput, Segment, ToolCall, add_text
from deepserve.server.parsers.tool_calls import IdFactory, new_call_id


class ChatOutputParser:
    """Stateful parser of one choice; `reasoning` / `tools` are registry names or None (off)."""

    def __init__(self, reasoning: str | None, tools: str | None, prompt_opens_thinking: bool = False,
                 tools_requested: bool = False, new_id: IdFactory = new_call_id):
        self._config = (reasoning, tools, prompt_opens_thinking, tools_requested, new_id)
        self._reasoning = get_reasoning_parser(reasoning)(prompt_opens_thinking) if reasoning else None
        self._tools = get_tool_parser(tools)(new_id) if tools and tools_requested else None
        self._num_calls = 0

    def feed(self, delta_text: str) -> list[DeltaMessage]:
        """Deltas this chunk of output text decides (possibly none; text may be held back)."""
        first = self._reasoning.feed(delta_text) if self._reasoning else [Segment("content", delta_text)]
        return self._deltas(self._through_tools(first))

    def finish(self) -> list[DeltaMessage]:
        """Deltas of everything held back; call once, when the output has ended."""
        return self._deltas(self._finish_segments())

    def parse_full(self, text: str) -> ParsedOutput:
        """The whole message of `text` (non-stream), by a fresh parser with this one's settings."""
        fresh = ChatOutputParser(*self._config)
        return collect_deltas(fresh.feed(text) + fresh.finish())

    def _finish_segments(self) -> list[Segment]:
        first = self._reasoning.finish() if self._reasoning else []
        tail = self._tools.finish() if self._tools else []
        return _merged(self._through_tools(first) + tail)

    def _through_tools(self, segments: list[Segment]) -> list[Segment]:
        if self._tools is None:
            return segments
        out: list[Segment] = []
        for segment in segments:
            out += self._tools.feed(segment.text) if segment.kind == "content" else [segment]
        return _merged(out)

    def _deltas(self, segments: list[Segment]) -> list[DeltaMessage]:
        out: list[DeltaMessage] = []
        for segment in segments:
            if segment.kind == "tool_call":
                self._add_call(out, segment.call)
            elif segment.text:
                field = "reasoning_content" if segment.kind == "reasoning" else "content"
                out.append(DeltaMessage(**{field: segment.text}))
        return out

    def _add_call(self, out: list[DeltaMessage], call: ToolCall) -> None:
        """A finished call joins the previous delta if that one carries tool calls only."""
        delta = call.as_delta(self._num_calls)
        self._num_calls += 1
        if out and out[-1].tool_calls:
            out[-1].tool_calls.append(delta)
        else:
            out.append(DeltaMessage(tool_calls=[delta]))


def _merged(segments: Iterable[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for segment in segments:
        if segment.kind == "tool_call":
            out.append(segment)
        else:
            add_text(out, segment.kind, segment.text)
    return out


def collect_deltas(deltas: Iterable[DeltaMessage]) -> ParsedOutput:
    """Concatenate streamed deltas into a whole message (argument fragments joined per index)."""
    reasoning, content, calls = [], [], {}
    for delta in deltas:
        reasoning.append(delta.reasoning_content or "")
        content.append(delta.content or "")
        for part in delta.tool_calls:
            old = calls.get(part.index, ToolCall("", "", ""))
            calls[part.index] = ToolCall(part.id or old.id, part.name or old.name,
                                         old.arguments + (part.arguments or ""))
    return ParsedOutput("".join(reasoning) or None, "".join(content) or None,
                        [calls[i] for i in sorted(calls)])
