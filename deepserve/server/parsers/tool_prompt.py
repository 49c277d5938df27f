"""Tool definitions as system-prompt text, for DeepSeek chat templates that ignore `tools`.

None of the DeepSeek templates shipped in tokenizer_config.json (V3, R1, V3.1, R1-Distill)
reads the `tools` variable: apply_chat_template(messages, tools=...) renders the same prompt as
without tools. The model only knows its tools if the server writes them into the system
message, together with the call format the matching tool parser reads back.
"""

from __future__ import annotations

import json
from types import MappingProxyType
from typing import Any, Mapping, Sequence

from deepserve.server.parsers.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, TOOL_SEP

_CALL_FORMATS = MappingProxyType({
    "deepseek-v3": f"{CALL_BEGIN}function{TOOL_SEP}FUNCTION_NAME\n```json\nARGUMENTS_JSON\n```{CALL_END}",
    "deepseek-v3.1": f"{CALL_BEGIN}FUNCTION_NAME{TOOL_SEP}ARGUMENTS_JSON{CALL_END}",
})


def _describe(tool: Mapping[str, Any]) -> str:
    function = tool.get("function", tool)
    parameters = json.dumps(function.get("parameters", {}), ensure_ascii=False)
    return (f"### {function['name']}\nDescription: {function.get('description', '')}\n"
            f"Parameters: {parameters}")


def tools_system_prompt(tools: Sequence[Mapping[str, Any]], tool_parser: str) -> str:
    """System-prompt text listing `tools` (OpenAI tool dicts) and the call format of `tool_parser`."""
    call = _CALL_FORMATS[tool_parser]
    listing = "\n\n".join(_describe(tool) for tool in tools)
    return (f"## Tools\nYou can call these functions:\n\n{listing}\n\n"
            f"To call functions, answer with exactly this block (one call per {CALL_BEGIN}...{CALL_END}, "
            f"ARGUMENTS_JSON a JSON object matching the function's Parameters):\n"
            f"{CALLS_BEGIN}{call}{CALLS_END}")


def with_tools(messages: Sequence[Mapping[str, Any]], tools: Sequence[Mapping[str, Any]],
               tool_parser: str) -> list[dict[str, Any]]:
    """`messages` with the tools text appended to the first system message (or a new one first)."""
    text = tools_system_prompt(tools, tool_parser)
    out = [dict(m) for m in messages]
    system = next((m for m in out if m.get("role") == "system"), None)
    if system is None:
        return [{"role": "system", "content": text}] + out
    system["content"] = f"{system.get('content') or ''}\n\n{text}".lstrip()
    return out
