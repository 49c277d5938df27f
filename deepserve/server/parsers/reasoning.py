"""DeepSeek-R1 reasoning: text inside <think>...</think> is reasoning_content, the rest content.

The parser is a two-state machine fed with text chunks:

    reasoning --"</think>"--> content --"<think>"--> reasoning

A tag that does not change the state (a repeated "<think>" while reasoning, a stray "</think>"
in content) is dropped, so no tag ever reaches either field. The starting state is reasoning
when the rendered prompt already opened the block (R1's template ends with "<think>\\n",
V3.1's with "<think>" in thinking mode): see `prompt_opens_thinking`. Consequences:

- output that never closes the block is all reasoning (as vLLM's R1 parser treats it);
- output with neither tag after a prompt that did not open thinking is all content;
- whitespace right after "</think>" (R1 writes "</think>\\n\\n") is dropped, so a message that
  is only reasoning + tool calls has content None.

A tag may arrive split over chunks at any character: the longest suffix that could still grow
into a tag is held back until the next chunk decides it (or `finish` releases it as text).
Removing a tag can join its neighbours into a new one ("<thi" + "</think>" + "nk>" in content);
each field therefore passes through a `_FieldGuard` that deletes tags formed that way.
"""

from __future__ import annotations

from deepserve.server.parsers.base import Segment, add_text, find_first_tag, partial_tag_len

THINK_START = "<think>"
THINK_END = "</think>"
_TAGS = (THINK_START, THINK_END)


def prompt_opens_thinking(prompt: str) -> bool:
    """True when the rendered prompt ends with "<think>" (plus whitespace): output starts reasoning."""
    return prompt.rstrip().endswith(THINK_START)


def _without_tags(text: str) -> str:
    while (hit := find_first_tag(text, _TAGS)).tag is not None:
        text = hit.before + hit.after
    return text


class _FieldGuard:
    """The text of one field, with tags formed across its pieces deleted (partial tags held)."""

    def __init__(self) -> None:
        self._held = ""

    def push(self, text: str) -> str:
        text = _without_tags(self._held + text)
        keep = partial_tag_len(text, _TAGS)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]

    def flush(self) -> str:
        text, self._held = self._held, ""
        return text


class DeepSeekR1ReasoningParser:
    """Streaming splitter of reasoning / content; `feed` chunks, then `finish` once."""

    def __init__(self, prompt_opens_thinking: bool = False):
        self._reasoning = prompt_opens_thinking
        self._held = ""  # a possible partial tag at the end of what was fed
        self._skip_space = False  # drop whitespace until content text starts (after "</think>")
        self._guards = {"reasoning": _FieldGuard(), "content": _FieldGuard()}

    def feed(self, text: str) -> list[Segment]:
        """Reasoning / content segments decided by this chunk, in order."""
        out: list[Segment] = []
        rest = self._held + text
        while (hit := find_first_tag(rest, _TAGS)).tag is not None:
            self._emit(out, hit.before)
            self._reasoning = hit.tag == THINK_START
            self._skip_space = hit.tag == THINK_END
            rest = hit.after
        keep = partial_tag_len(rest, _TAGS)
        self._emit(out, rest[:len(rest) - keep])
        self._held = rest[len(rest) - keep:]
        return out

    def finish(self) -> list[Segment]:
        """The held-back text (an unfinished tag is plain text) at the end of the output."""
        out: list[Segment] = []
        self._emit(out, self._held)
        self._held = ""
        for kind, guard in self._guards.items():
            add_text(out, kind, guard.flush())
        return out

    def _emit(self, out: list[Segment], text: str) -> None:
        if not self._reasoning and self._skip_space:
            text = text.lstrip()
            self._skip_space = not text
        kind = "reasoning" if self._reasoning else "content"
        add_text(out, kind, self._guards[kind].push(text))
