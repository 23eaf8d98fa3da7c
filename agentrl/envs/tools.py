"""Tools from other places than a ToolEnvironment's own methods: a plain object, or explicit JSON schemas.

A :class:`Tool` is an OpenAI function schema and the callable that runs it. :func:`object_tools` derives tools
from an object's typed, docstringed methods; :func:`schema_tools` binds schemas that a suite ships to the
methods of a handler object. Either list goes to ``ToolEnvironment.__init__(tools=...)``, which checks every
call against the schema before the callable sees it.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from agentrl.envs.schema import check_tool_spec, function_schema
from agentrl.types import ToolSpec


class ToolError(Exception):
    """Raised by a tool to answer the model with an error observation (``Error: <message>``) instead of a
    result; it counts as a tool error, and the episode goes on. Any other exception is an ``env_error``."""


@dataclass(frozen=True)
class Tool:
    """One tool: its OpenAI schema, the callable that runs it with the arguments as keywords, and the schema
    the arguments are checked against (``check``, the same as ``spec`` unless given).

    A tool whose schema uses keywords agentrl does not check (an MCP server's, say) shows the model ``spec``
    and is checked against ``schema.checkable_spec(spec)``.
    """

    spec: ToolSpec
    fn: Callable[..., str]
    check: ToolSpec | None = None

    @property
    def name(self) -> str:
        return self.spec["function"]["name"]


def object_tools(obj: object, names: Iterable[str] | None = None) -> list[Tool]:
    """Tools from the typed, docstringed methods of any object, as :func:`~agentrl.envs.tool` methods are.

    Args:
        obj: the object whose methods run the tools (it keeps its own state across calls).
        names: the methods to offer; by default every public method (each must be typed and docstringed).

    Returns:
        one :class:`Tool` per method, named like it.

    Example:
        >>> class Counter:
        ...     def __init__(self):
        ...         self.n = 0
        ...     def bump(self, by: int) -> str:
        ...         '''Add to the counter.
        ...
        ...         Args:
        ...             by: how much.
        ...         '''
        ...         self.n += by
        ...         return str(self.n)
        >>> [t.spec["function"]["parameters"]["required"] for t in object_tools(Counter())]
        [['by']]
    """
    if names is None:
        names = [name for name in dir(type(obj)) if not name.startswith("_") and callable(getattr(obj, name))]
    tools = []
    for name in names:
        method = getattr(obj, name, None)
        if not callable(method):
            raise ValueError(f"{type(obj).__name__} has no method {name!r}")
        tools.append(Tool(function_schema(method, name), method))
    return tools


def schema_tools(schemas: Iterable[ToolSpec], handler: object) -> list[Tool]:
    """Bind OpenAI function-tool schemas to the methods of ``handler`` with the same names.

    Everything is checked here, before any episode: each schema (:func:`~agentrl.envs.schema.check_tool_spec`:
    the keywords used must be ones agentrl enforces), and that ``handler`` has a method per tool that takes
    every declared argument by keyword and requires no argument the schema leaves optional. A ValueError
    names the tool and the field.

    Args:
        schemas: ``[{"type": "function", "function": {"name", "description", "parameters"}}, ...]``.
        handler: the object whose method ``name(**arguments) -> str`` runs tool ``name``; it may be the
            environment itself.

    Returns:
        one :class:`Tool` per schema, in order; calls are checked against the schema as given.

    Example:
        >>> class Shelf:
        ...     def count(self, item):
        ...         return "3"
        >>> spec = {"type": "function", "function": {"name": "count", "description": "Count an item.",
        ...         "parameters": {"type": "object", "properties": {"item": {"type": "string"}},
        ...                        "required": ["item"]}}}
        >>> [t.name for t in schema_tools([spec], Shelf())]
        ['count']
    """
    tools: dict[str, Tool] = {}
    for spec in schemas:
        check_tool_spec(spec)
        name = spec["function"]["name"]
        if name in tools:
            raise ValueError(f"two tool schemas are named {name!r}")
        method = getattr(handler, name, None)
        if not callable(method):
            raise ValueError(f"tool {name!r}: {type(handler).__name__} has no method {name!r} to run it")
        _check_signature(f"tool {name!r}: method {type(handler).__name__}.{name}", method,
                         spec["function"]["parameters"])
        tools[name] = Tool(copy.deepcopy(spec), method)
    return list(tools.values())


def _check_signature(where: str, method: Callable[..., Any], params: dict[str, Any]) -> None:
    """The method must take every declared argument by keyword, and require only required ones."""
    signature = inspect.signature(method).parameters.values()
    takes_any = any(p.kind is p.VAR_KEYWORD for p in signature)
    by_keyword = {p.name for p in signature if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    untaken = [p for p in params.get("properties", {}) if p not in by_keyword]
    if untaken and not takes_any:
        raise ValueError(f"{where} does not take the argument(s) {untaken} that the schema declares")
    if params.get("additionalProperties", False) is not False and not takes_any:
        raise ValueError(f"{where} needs **kwargs: the schema allows arguments it does not declare")
    required = set(params.get("required", []))
    needed = [p.name for p in signature if p.default is p.empty and p.kind is not p.VAR_KEYWORD
              and p.kind is not p.VAR_POSITIONAL and p.name not in required]
    if needed:
        raise ValueError(f"{where} has no default for {needed}, which the schema does not require")
