"""Parse ``<tool_call>{json}</tool_call>`` blocks out of an assistant completion.

Malformed calls are not exceptions: each becomes an error string that the episode loop hands back to the
model as a tool result, so the model can see and learn from its mistake.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

from agentrl.types import ToolCall

_BLOCK = re.compile(r"<tool_call>(.*?)(</tool_call>|$)", re.DOTALL)


@dataclass
class ParsedCompletion:
    """The assistant's free text, and its tool calls in order (a ToolCall, or an error string)."""

    content: str
    items: list[ToolCall | str] = field(default_factory=list)

    @property
    def calls(self) -> list[ToolCall]:
        return [item for item in self.items if isinstance(item, ToolCall)]

    @property
    def errors(self) -> list[str]:
        return [item for item in self.items if isinstance(item, str)]


def _parse_one(body: str) -> ToolCall | str:
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as exc:
        return f"tool call is not valid JSON ({exc.msg} at char {exc.pos}): {body[:200]!r}"
    except (ValueError, RecursionError) as exc:  # json gives up on deep nesting and on 4300+ digit integers
        return f"tool call cannot be parsed ({type(exc).__name__}: {str(exc)[:100]}): {body[:200]!r}"
    return parse_call(payload)


def parse_call(payload: Any) -> ToolCall | str:
    """Check a decoded ``{"name": str, "arguments": object | JSON string}`` call; return it or an error string.

    The one place that judges a call's shape, for completions parsed here and for calls that reach the
    env service over HTTP, so both paths give the model the same error text.

    Example:
        >>> parse_call({"name": "get", "arguments": '{"key": "a"}'})
        ToolCall(name='get', arguments={'key': 'a'})
        >>> parse_call({"name": "get", "arguments": "{"})
        "arguments of get are a string that is not valid JSON: '{'"
    """
    if not isinstance(payload, dict):
        return f"tool call must be a JSON object with 'name' and 'arguments', got {type(payload).__name__}"
    name, arguments = payload.get("name"), payload.get("arguments", {})
    if not isinstance(name, str) or not name:
        return "tool call has no 'name' string"
    if isinstance(arguments, str):  # OpenAI style: arguments as a JSON string
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):  # JSONDecodeError, or nesting / integer size json gives up on
            return f"arguments of {name} are a string that is not valid JSON: {arguments[:200]!r}"
    if not isinstance(arguments, dict):
        return f"arguments of {name} must be a JSON object, got {type(arguments).__name__}"
    return ToolCall(name=name, arguments=arguments)


def parse_completion(text: str) -> ParsedCompletion:
    """Split a completion into free text and tool calls.

    Example:
        >>> parse_completion('<tool_call>\\n{"name": "get", "arguments": {"key": "a"}}\\n</tool_call>').calls
        [ToolCall(name='get', arguments={'key': 'a'})]
    """
    items: list[ToolCall | str] = []
    for match in _BLOCK.finditer(text):
        if not match.group(2):
            items.append("tool call was not closed with </tool_call>")
        else:
            items.append(_parse_one(match.group(1).strip()))
    content = _BLOCK.sub("", text).strip()
    if "</tool_call>" in content:
        items.append("found </tool_call> without a matching <tool_call>")
    return ParsedCompletion(content=content, items=items)
