"""Environment API: the protocol, the typed-method base class, schema derivation and the name lookup."""

from agentrl.envs.base import Environment, ToolEnvironment, tool
from agentrl.envs.schema import check_arguments, function_schema

__all__ = ["Environment", "ToolEnvironment", "tool", "function_schema", "check_arguments", "make_env"]


def make_env(name: str, **kwargs):
    """Build an environment from the ``environments`` name table or a ``module:Class`` path."""
    from agentrl.resolve import resolve
    from environments import ENVIRONMENTS

    return resolve(name, ENVIRONMENTS, "environment")(**kwargs)
