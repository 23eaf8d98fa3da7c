"""The env service's wire format: API version, and tasks, step results and tool calls as JSON.

Shared by the server (``agentrl.envs.server``) and the client (``agentrl.envs.client``) so both sides agree
on every field. Nothing here imports an HTTP library.
"""

from __future__ import annotations

from typing import Any

from agentrl.rollout.toolcalls import parse_call
from agentrl.types import StepResult, Task, ToolCall

# The HTTP API's version, in every response body. It changes when a route, a field or a meaning changes in a
# way an existing client would misread; the client refuses a server that speaks another version.
API_VERSION = "1"


def task_to_json(task: Task) -> dict[str, Any]:
    """A task as JSON, ground truth (``data``) included: the trainer's reward functions may read it.

    Example:
        >>> task_to_json(Task("echo", "test", 0, "Say hi.", {"word": "hi"}, "echo-v1"))["index"]
        0
    """
    return {"env": task.env, "split": task.split, "index": task.index, "prompt": task.prompt,
            "data": task.data, "version": task.version}


def task_from_json(data: dict[str, Any]) -> Task:
    """The inverse of :func:`task_to_json`."""
    return Task(env=data["env"], split=data["split"], index=data["index"], prompt=data["prompt"],
                data=data["data"], version=data["version"])


def step_result_to_json(result: StepResult) -> dict[str, Any]:
    return {"observation": result.observation, "reward": result.reward, "done": result.done, "info": result.info}


def step_result_from_json(data: dict[str, Any]) -> StepResult:
    return StepResult(observation=data["observation"], reward=data["reward"], done=data["done"], info=data["info"])


def call_to_openai(call: ToolCall, call_id: str) -> dict[str, Any]:
    """A call in OpenAI's format; the arguments stay a JSON object (the server also takes a JSON string)."""
    return {"id": call_id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def call_from_openai(item: Any) -> ToolCall | str:
    """An OpenAI-format tool call → a ToolCall, or the error text the model should see.

    The ``function`` part is checked by the same code that parses calls out of completions in-process, so a
    malformed call gets the same error text on both paths.

    Example:
        >>> call_from_openai({"type": "function", "function": {"name": "get", "arguments": '{"key": "a"}'}})
        ToolCall(name='get', arguments={'key': 'a'})
        >>> call_from_openai([1]).endswith("got list")
        True
    """
    shape = 'a JSON object like {"type": "function", "function": {"name": ..., "arguments": ...}}'
    if not isinstance(item, dict):
        return f"tool call must be {shape}, got {type(item).__name__}"
    if item.get("type", "function") != "function" or not isinstance(item.get("function"), dict):
        return f"tool call must be {shape}"
    return parse_call(item["function"])
