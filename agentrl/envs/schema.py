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


# --- checking arguments against a JSON schema -------------------------------------------------------
# The part of JSON Schema that check_arguments enforces. Explicit schemas (schema_tools) may use only these and
# the annotations below. An MCP server's schemas may use anything: checkable_spec drops the rest, and dropping
# a keyword only lets more through, so the server still refuses what it must.
CHECKED_KEYWORDS = frozenset({
    "type", "enum", "const", "anyOf", "properties", "required", "additionalProperties", "patternProperties",
    "items", "prefixItems", "minItems", "maxItems", "minLength", "maxLength", "pattern", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum"})
ANNOTATIONS = frozenset({"title", "description", "default", "examples", "format", "$comment", "$schema", "$id",
                         "deprecated", "readOnly", "writeOnly"})
_TYPES = ("string", "integer", "number", "boolean", "array", "object", "null")
_BOUNDS = {"minimum": (lambda v, b: v >= b, ">="), "maximum": (lambda v, b: v <= b, "<="),
           "exclusiveMinimum": (lambda v, b: v > b, ">"), "exclusiveMaximum": (lambda v, b: v < b, "<")}


def _kinds(schema: dict[str, Any]) -> list[str]:
    kinds = schema.get("type", [])
    return [kinds] if isinstance(kinds, str) else kinds


def _is_type(value: Any, kind: str) -> bool:
    if kind in ("integer", "number") and isinstance(value, bool):
        return False
    python = {"string": str, "integer": int, "number": (int, float), "boolean": bool, "array": list,
              "object": dict, "null": type(None)}[kind]
    return isinstance(value, python)


def _equal(a: Any, b: Any) -> bool:
    # In JSON true is not 1; in Python it is.
    return isinstance(a, bool) == isinstance(b, bool) and a == b


def _want(schema: dict[str, Any]) -> str:
    """What a schema asks for, as an error message says it: ``string in ['fast', 'slow']``."""
    if "const" in schema:
        return repr(schema["const"])
    text = " or ".join(_kinds(schema))
    if "enum" in schema:
        text = f"{text} in {schema['enum']}" if text else f"one of {schema['enum']}"
    if not text and "anyOf" in schema:
        text = " or ".join(_want(option) for option in schema["anyOf"])
    return text or "something else"


def _value_problem(value: Any, schema: dict[str, Any], path: str) -> str | None:
    """Why ``value`` does not fit ``schema`` (``path`` names it, e.g. ``items[2].sku``), or None."""
    kinds = _kinds(schema)
    if ((kinds and not any(_is_type(value, kind) for kind in kinds))
            or ("enum" in schema and not any(_equal(value, option) for option in schema["enum"]))
            or ("const" in schema and not _equal(value, schema["const"]))
            or ("anyOf" in schema and all(_value_problem(value, option, path) for option in schema["anyOf"]))):
        return f"argument {path!r} must be {_want(schema)}, got {value!r}"
    if _is_type(value, "number"):
        for key, (fits, words) in _BOUNDS.items():
            if key in schema and not fits(value, schema[key]):
                return f"argument {path!r} must be {words} {schema[key]}, got {value!r}"
    if isinstance(value, (str, list)):
        low, high, unit = (("minLength", "maxLength", "characters") if isinstance(value, str)
                           else ("minItems", "maxItems", "items"))
        if len(value) < schema.get(low, 0):
            return f"argument {path!r} must have at least {schema[low]} {unit}, got {len(value)}"
        if len(value) > schema.get(high, len(value)):
            return f"argument {path!r} must have at most {schema[high]} {unit}, got {len(value)}"
    if isinstance(value, str) and "pattern" in schema and not re.search(schema["pattern"], value):
        return f"argument {path!r} must match the pattern {schema['pattern']!r}, got {value!r}"
    if isinstance(value, list):
        prefix = schema.get("prefixItems", [])
        for i, item in enumerate(value):
            problem = _value_problem(item, prefix[i] if i < len(prefix) else schema.get("items", {}), f"{path}[{i}]")
            if problem:
                return problem
    if isinstance(value, dict):
        return _object_problem(value, schema, path)
    return None


def _declared(key: str, schema: dict[str, Any]) -> bool:
    return key in schema.get("properties", {}) or any(re.search(p, key) for p in schema.get("patternProperties", {}))


def _key_problem(key: str, value: Any, schema: dict[str, Any], path: str) -> str | None:
    """Check one key of an object against every schema the object's schema applies to it."""
    subs = [schema["properties"][key]] if key in schema.get("properties", {}) else []
    subs += [sub for pattern, sub in schema.get("patternProperties", {}).items() if re.search(pattern, key)]
    extra = schema.get("additionalProperties", True)
    if not subs and isinstance(extra, dict):
        subs = [extra]
    return next((problem for sub in subs if (problem := _value_problem(value, sub, path))), None)


def _object_problem(value: dict, schema: dict[str, Any], path: str) -> str | None:
    if schema.get("additionalProperties", True) is False:
        unknown = sorted(key for key in value if not _declared(key, schema))
        if unknown:
            return f"argument {path!r} has unknown key(s) {unknown}; allowed: {sorted(schema.get('properties', {}))}"
    missing = [key for key in schema.get("required", []) if key not in value]
    if missing:
        return f"argument {path!r} is missing required key(s) {missing}"
    return next((problem for key, item in value.items()
                 if (problem := _key_problem(key, item, schema, f"{path}.{key}"))), None)


def check_arguments(spec: ToolSpec, arguments: Any) -> str | None:
    """Return an error message the model can read if ``arguments`` do not fit ``spec``, else None.

    Enforces the JSON-Schema keywords in :data:`CHECKED_KEYWORDS`, in nested objects and arrays too. Arguments
    become keyword arguments, so an argument the tool does not declare is refused unless its parameters say
    ``"additionalProperties": true`` (or give a schema for them).

    Example:
        >>> spec = {"type": "function", "function": {"name": "buy", "description": "Buy.", "parameters": {
        ...     "type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}, "required": ["qty"]}}}
        >>> check_arguments(spec, {"qty": 0})
        "buy: argument 'qty' must be >= 1, got 0"
    """
    name, params = spec["function"]["name"], spec["function"]["parameters"]
    if not isinstance(arguments, dict):
        return f"arguments of {name} must be a JSON object, got {type(arguments).__name__}"
    if params.get("additionalProperties", False) is False:
        unknown = sorted(key for key in arguments if not _declared(key, params))
        if unknown:
            return f"{name} got unknown argument(s) {unknown}; it takes {sorted(params.get('properties', {}))}"
    missing = [key for key in params.get("required", []) if key not in arguments]
    if missing:
        return f"{name} is missing required argument(s) {missing}"
    problem = next((problem for key, value in arguments.items()
                    if (problem := _key_problem(key, value, params, key))), None)
    return f"{name}: {problem}" if problem else None


# --- checking explicit schemas up front ---------------------------------------------------------------
_TOOL_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # what OpenAI accepts as a function name
_SHAPE = ('{"type": "function", "function": {"name": ..., "description": ..., '
          '"parameters": {"type": "object", "properties": {...}, "required": [...]}}}')


def check_tool_spec(spec: Any) -> None:
    """Raise ValueError, naming the tool and the field, unless ``spec`` is an OpenAI function-tool schema
    that :func:`check_arguments` can enforce in full (keywords from :data:`CHECKED_KEYWORDS`, plus
    :data:`ANNOTATIONS`).

    Example:
        >>> check_tool_spec({"type": "function", "function": {"name": "f", "description": "F.",
        ...     "parameters": {"type": "object", "properties": {}, "required": ["x"]}}})
        Traceback (most recent call last):
        ...
        ValueError: tool 'f': parameters: 'required' names ['x'], which 'properties' does not declare
    """
    if not isinstance(spec, dict) or spec.get("type") != "function" or not isinstance(spec.get("function"), dict):
        raise ValueError(f"a tool schema must look like {_SHAPE}; got {str(spec)[:200]}")
    fn = spec["function"]
    if not isinstance(fn.get("name"), str) or not _TOOL_NAME.fullmatch(fn["name"]):
        raise ValueError(f"a tool's name must be 1-64 letters, digits, '_' or '-', got {fn.get('name')!r}")
    where = f"tool {fn['name']!r}"
    unknown = sorted(set(fn) - {"name", "description", "parameters", "strict"})
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; a tool schema looks like {_SHAPE}")
    if not isinstance(fn.get("description"), str) or not fn["description"].strip():
        raise ValueError(f"{where}: 'description' must be a non-empty string: it is what the model reads")
    params = fn.get("parameters")
    if not isinstance(params, dict) or params.get("type") != "object":
        raise ValueError(f"{where}: 'parameters' must be a JSON schema with \"type\": \"object\", got {params!r}")
    _check_schema(params, f"{where}: parameters")


def _check_schema(schema: Any, where: str) -> None:
    if not isinstance(schema, dict):
        raise ValueError(f"{where} must be a JSON schema (an object), got {schema!r}")
    unknown = sorted(set(schema) - CHECKED_KEYWORDS - ANNOTATIONS)
    if unknown:
        raise ValueError(f"{where}: unsupported keyword(s) {unknown}; agentrl checks arguments against "
                         f"{sorted(CHECKED_KEYWORDS)} and ignores {sorted(ANNOTATIONS)}")
    kinds = _kinds(schema)
    if not isinstance(kinds, list) or ("type" in schema and not kinds) or any(k not in _TYPES for k in kinds):
        raise ValueError(f"{where}: 'type' must be one of {list(_TYPES)} or a list of them, got {schema['type']!r}")
    for key in ("enum", "anyOf", "prefixItems"):
        if key in schema and (not isinstance(schema[key], list) or not schema[key]):
            raise ValueError(f"{where}: {key!r} must be a non-empty list, got {schema[key]!r}")
    for key in ("minLength", "maxLength", "minItems", "maxItems"):
        if key in schema and (not isinstance(schema[key], int) or isinstance(schema[key], bool) or schema[key] < 0):
            raise ValueError(f"{where}: {key!r} must be a non-negative integer, got {schema[key]!r}")
    for key in _BOUNDS:
        if key in schema and not _is_type(schema[key], "number"):
            raise ValueError(f"{where}: {key!r} must be a number, got {schema[key]!r}")
    patterns = list(schema.get("patternProperties", {})) + ([schema["pattern"]] if "pattern" in schema else [])
    for pattern in patterns:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as exc:
            raise ValueError(f"{where}: {pattern!r} is not a regular expression ({exc})") from None
    _check_subschemas(schema, where)


def _check_subschemas(schema: dict[str, Any], where: str) -> None:
    for key in ("properties", "patternProperties"):
        if not isinstance(schema.get(key, {}), dict):
            raise ValueError(f"{where}: {key!r} must be an object of schemas, got {schema[key]!r}")
        for name, sub in schema.get(key, {}).items():
            _check_schema(sub, f"{where}.{key}.{name}" if key == "properties" else f"{where}.{key}[{name!r}]")
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(r, str) for r in required):
        raise ValueError(f"{where}: 'required' must be a list of property names, got {required!r}")
    undeclared = [r for r in required if not _declared(r, schema)]
    if undeclared:
        raise ValueError(f"{where}: 'required' names {undeclared}, which 'properties' does not declare")
    if not isinstance(schema.get("additionalProperties", True), bool):
        _check_schema(schema["additionalProperties"], f"{where}.additionalProperties")
    if "items" in schema:
        _check_schema(schema["items"], f"{where}.items")
    for i, sub in enumerate(schema.get("prefixItems", [])):
        _check_schema(sub, f"{where}.prefixItems[{i}]")
    for i, sub in enumerate(schema.get("anyOf", [])):
        _check_schema(sub, f"{where}.anyOf[{i}]")


def checkable_spec(spec: ToolSpec) -> ToolSpec:
    """``spec`` with the parameter keywords :func:`check_arguments` does not enforce dropped (``$ref``,
    ``oneOf``, ...), for checking arguments against someone else's schema (an MCP server's): the check then
    refuses only what the full schema refuses. Raises ValueError if what is left is malformed.

    Example:
        >>> spec = {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
        ...     "properties": {"x": {"oneOf": [{"type": "string"}], "title": "X"}}}}}
        >>> checkable_spec(spec)["function"]["parameters"]["properties"]
        {'x': {'title': 'X'}}
    """
    fn = spec["function"]
    params = _checkable(fn["parameters"])
    _check_schema(params, f"tool {fn['name']!r}: parameters")
    return {**spec, "function": {**fn, "parameters": params}}


def _checkable(schema: Any) -> dict[str, Any]:
    if not isinstance(schema, dict):
        return {}
    out = {k: v for k, v in schema.items() if k in CHECKED_KEYWORDS | ANNOTATIONS}
    for key in ("properties", "patternProperties"):
        if isinstance(schema.get(key), dict):
            out[key] = {name: _checkable(sub) for name, sub in schema[key].items()}
    for key in ("anyOf", "prefixItems"):
        if isinstance(schema.get(key), list):
            out[key] = [_checkable(sub) for sub in schema[key]]
    if isinstance(schema.get("additionalProperties"), dict):
        out["additionalProperties"] = _checkable(schema["additionalProperties"])
    if "items" in schema:  # the old array form of items lists per-position schemas: not checked
        out.pop("items")
        if isinstance(schema["items"], dict):
            out["items"] = _checkable(schema["items"])
    if isinstance(out.get("required"), list):
        out["required"] = [r for r in out["required"] if isinstance(r, str) and _declared(r, out)]
    return out
