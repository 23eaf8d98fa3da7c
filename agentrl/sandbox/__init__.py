"""A process sandbox for environments that run model-written commands: see :mod:`agentrl.sandbox.sandbox`."""

from agentrl.sandbox.sandbox import RunResult, Sandbox, SandboxLimits, SandboxUnavailable

__all__ = ["RunResult", "Sandbox", "SandboxLimits", "SandboxUnavailable"]
