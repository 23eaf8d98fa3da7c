"""Oracle conversations: run an environment's scripted expert and record the messages, for SFT and tests."""

from __future__ import annotations

from dataclasses import dataclass

from agentrl.envs.base import Environment
from agentrl.types import Message, Task, ToolSpec


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[ToolSpec]
    reward: float
    success: bool


def oracle_conversation(env: Environment, task: Task) -> Conversation:
    """Play ``env.oracle(task)`` through the environment; one assistant message per tool call.

    The environment is closed afterwards (a remote one holds a session on its server until then).
    """
    try:
        messages = list(env.reset(task))
        reward, success = 0.0, False
        for call in env.oracle(task):
            result = env.step(call)
            messages.append({"role": "assistant", "content": "", "tool_calls": [call.to_message_entry()]})
            messages.append({"role": "tool", "name": call.name, "content": result.observation})
            if result.done:
                reward, success = float(result.reward), bool(result.info.get("success", False))
                break
        return Conversation(messages=messages, tools=env.tools(), reward=reward, success=success)
    finally:
        env.close()
