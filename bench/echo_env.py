"""EchoEnv: the trivial environment of the load benchmark; its one tool returns its argument.

Served by ``bench/env_load.py`` through the ``module:Class`` fallback (``--env bench.echo_env:EchoEnv``), so the
benchmark measures the service, not a tool. Episodes never end by themselves: the benchmark closes them.
"""

from __future__ import annotations

import random

from agentrl.envs.base import ToolEnvironment, tool
from agentrl.types import Task, ToolCall


class EchoEnv(ToolEnvironment):
    """One tool, ``echo``, that returns its text; a task is a word to echo.

    Example:
        >>> env = EchoEnv()
        >>> _ = env.reset(env.task_at("test", 0))
        >>> env.step(ToolCall("echo", {"text": "hi"})).observation
        'hi'
    """

    name = "echo"
    version = "echo-v1"
    system_prompt = "Echo the word with the echo tool."

    @tool
    def echo(self, text: str) -> str:
        """Return the text unchanged.

        Args:
            text: anything.
        """
        return text

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        word = f"{split}-{index}-{rng.randrange(10**6)}"
        return Task(env=self.name, split=split, index=index, prompt=f"Echo {word}.", data={"word": word},
                    version=self.version)

    def oracle(self, task: Task) -> list[ToolCall]:
        return [ToolCall("echo", {"text": task.data["word"]})]
