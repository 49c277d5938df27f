"""Output parsers for DeepSeek models: reasoning (<think>) and tool calls, by name.

    get_reasoning_parser("deepseek-r1")(prompt_opens_thinking=True)  -> DeepSeekR1ReasoningParser
    get_tool_parser("deepseek-v3")(new_id=...)                         -> DeepSeekV3ToolParser
    ChatOutputParser(reasoning="deepseek-r1", tools="deepseek-v3", ...)  (chat_stream.py) composes them.

Names: reasoning "deepseek-r1" (R1, R1-0528, R1-Distill, and V3.1 / V3.2 in thinking mode: the same
tags). Tools "deepseek-v3" (V3, V3-0324, R1, R1-0528) and "deepseek-v3.1" (V3.1, V3.2: no ```json
fence, no "function" type). Modules are imported on first use.
"""

from __future__ import annotations

import importlib
from types import MappingProxyType
from typing import Any

_REASONING = MappingProxyType({
    "deepseek-r1": "deepserve.server.parsers.reasoning:DeepSeekR1ReasoningParser",
})
_TOOLS = MappingProxyType({
    "deepseek-v3": "deepserve.server.parsers.tool_calls:DeepSeekV3ToolParser",
    "deepseek-v3.1": "deepserve.server.parsers.tool_calls:DeepSeekV31ToolParser",
})


class UnknownParserError(ValueError):
    """A parser name that is not registered; the message lists the known names."""


def reasoning_parser_names() -> list[str]:
    return sorted(_REASONING)


def tool_parser_names() -> list[str]:
    return sorted(_TOOLS)


def _load(table: MappingProxyType, kind: str, name: str) -> Any:
    if name not in table:
        raise UnknownParserError(f"unknown {kind} parser {name!r}; known: {', '.join(sorted(table))}")
    module, attr = table[name].split(":")
    return getattr(importlib.import_module(module), attr)


def get_reasoning_parser(name: str) -> Any:
    """The reasoning parser class named `name` (construct with prompt_opens_thinking=...)."""
    return _load(_REASONING, "reasoning", name)


def get_tool_parser(name: str) -> Any:
    """The tool-call parser class named `name` (construct with an optional new_id factory)."""
    return _load(_TOOLS, "tool", name)
