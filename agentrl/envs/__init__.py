"""Environment API: the protocol, the typed-method base class, other tool sources, schemas and the name lookup.

An MCP server's tools as an environment: ``agentrl.envs.mcp_env.MCPEnvironment`` (not imported here: it
loads the ``mcp`` client).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

from agentrl.envs.base import Environment, ToolEnvironment, in_test_split, tool
from agentrl.envs.schema import check_arguments, function_schema
from agentrl.envs.tools import Tool, ToolError, object_tools, schema_tools

__all__ = ["Environment", "ToolEnvironment", "tool", "in_test_split", "Tool", "ToolError", "object_tools",
           "schema_tools", "function_schema", "check_arguments", "make_env", "env_factory"]


def make_env(name: str, **kwargs):
    """Build an environment from the ``environments`` name table or a ``module:Class`` path."""
    from agentrl.resolve import resolve
    from environments import ENVIRONMENTS

    return resolve(name, ENVIRONMENTS, "environment")(**kwargs)


def env_factory(name: str, kwargs: dict[str, Any] | None = None, url: str = "") -> tuple[Any, Callable[[], Any]]:
    """An environment for task generation and a factory of fresh ones for episodes, in-process or remote.

    Args:
        name: a name in the environments table or a ``module:Class`` path; with ``url``, the name the
            environment is served under there.
        kwargs: constructor arguments (in-process only: a served environment is configured by its server).
        url: an ``agentrl serve-env`` server; empty for an in-process environment.

    Example:
        >>> prototype, make = env_factory("calculator", {"max_operand": 20})
        >>> make().task_version == prototype.task_version
        True
    """
    kwargs = dict(kwargs or {})
    if not url:
        return make_env(name, **kwargs), functools.partial(make_env, name, **kwargs)
    if kwargs:
        raise ValueError(f"environment {name!r} runs at {url}: its kwargs {kwargs} would be ignored here; "
                         "give them to the server (agentrl serve-env --env_kwargs)")
    from agentrl.envs.client import RemoteEnvironment

    prototype = RemoteEnvironment(url, name)
    return prototype, prototype.clone
