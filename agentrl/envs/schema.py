"""Turn typed, docstringed Python methods into OpenAI function-tool schemas, and check calls against them.

The schema is derived, never hand-written: parameter types come from annotations, descriptions from the
Google-style docstring (summary line + ``Args:`` section).
"""

from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Any, Callable, Literal

from agentrl.types import ToolSpec

_SCALARS: dict[Any, str] = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _json_type(annotation: Any, where: str) -> dict[str, Any]:
    if annotation in _SCALARS:
        return {"type": _SCALARS[annotation]}
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        kinds = {type(a) for a in args}
        if len(kinds) != 1 or next(iter(kinds)) not in _SCALARS:
            raise TypeError(f"{where}: Literal values must share one scalar type, got {args}")
        return {"type": _SCALARS[next(iter(kinds))], "enum": list(args)}
    if origin in (list, tuple) and args:
        return {"type": "array", "items": _json_type(args[0], where)}
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1:
            return _json_type(rest[0], where)
    raise TypeError(f"{where}: unsupported parameter annotation {annotation!r}; use str, int, float, bool, "
                    "Literal[...], list[...] or X | None")


def _arg_docs(doc: str) -> dict[str, str]:
    """Parse the ``Args:`` section of a Google-style docstring into {name: description}."""
    out: dict[str, str] = {}
    lines = doc.splitlines()
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == "Args:")
    except StopIteration:
        return out
    current = None
    indent = None
    for line in lines[start + 1:]:
        if not line.strip():
            continue
        this_indent = len(line) - len(line.lstrip())
        if indent is None:
            indent = this_indent
        if this_indent < indent:
            break  # next section
        match = re.match(r"\s*(\w+)\s*(\([^)]*\))?:\s*(.*)", line)
        if this_indent == indent and match:
            current = match.group(1)
            out[current] = match.group(3).strip()
        elif current is not None:
            out[current] = (out[current] + " " + line.strip()).strip()
    return out


def function_schema(fn: Callable[..., Any], name: str | None = None) -> ToolSpec:
    """Derive the OpenAI function-tool schema of a typed, docstringed function or bound method.

    Args:
        fn: the function; every parameter (except ``self``) needs a type annotation.
        name: tool name; defaults to the function's name.

    Returns:
        ``{"type": "function", "function": {"name", "description", "parameters"}}``.

    Example:
        >>> def add(a: int, b: int) -> str:
        ...     '''Add two integers.
        ...
        ...     Args:
        ...         a: first term.
        ...         b: second term.
        ...     '''
        ...     return str(a + b)
        >>> function_schema(add)["function"]["parameters"]["required"]
        ['a', 'b']
    """
    name = name or fn.__name__
    doc = inspect.getdoc(fn) or ""
    if not doc:
        raise TypeError(f"tool {name!r} needs a docstring: it becomes the description the model reads")
    hints = typing.get_type_hints(fn)
    arg_docs = _arg_docs(doc)
    properties: dict[str, Any] = {}
    required: list[str] = []
    for pname, param in inspect.signature(fn).parameters.items():
        if pname == "self":
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {name!r}: *args/**kwargs cannot be described to the model")
        if pname not in hints:
            raise TypeError(f"tool {name!r}: parameter {pname!r} has no type annotation")
        prop = _json_type(hints[pname], f"tool {name!r} parameter {pname!r}")
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        properties[pname] = prop
        if param.default is inspect.Parameter.empty:
            required.append(pname)
    summary = doc.split("\n\n")[0].replace("\n", " ").strip()
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": summary,
            "parameters": {"type": "object", "properties": properties, "required": required},
        },
    }


def _matches(value: Any, schema: dict[str, Any]) -> bool:
    kind = schema["type"]
    if kind == "integer":
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind == "number":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    elif kind == "string":
        ok = isinstance(value, str)
    elif kind == "boolean":
        ok = isinstance(value, bool)
    elif kind == "array":
        ok = isinstance(value, list) and all(_matches(v, schema["items"]) for v in value)
    else:  # pragma: no cover - schemas come from _json_type
        raise ValueError(f"unknown schema type {kind}")
    return ok and ("enum" not in schema or value in schema["enum"])


def check_arguments(spec: ToolSpec, arguments: Any) -> str | None:
    """Return an error message the model can read if ``arguments`` do not fit ``spec``, else None."""
    fn = spec["function"]
    params = fn["parameters"]
    if not isinstance(arguments, dict):
        return f"arguments of {fn['name']} must be a JSON object, got {type(arguments).__name__}"
    unknown = sorted(set(arguments) - set(params["properties"]))
    if unknown:
        return f"{fn['name']} got unknown argument(s) {unknown}; it takes {sorted(params['properties'])}"
    missing = [p for p in params["required"] if p not in arguments]
    if missing:
        return f"{fn['name']} is missing required argument(s) {missing}"
    for pname, value in arguments.items():
        prop = params["properties"][pname]
        if not _matches(value, prop):
            want = prop["type"] + (f" in {prop['enum']}" if "enum" in prop else "")
            return f"{fn['name']}: argument {pname!r} must be {want}, got {value!r}"
    return None
