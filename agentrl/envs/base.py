"""The Environment protocol and ToolEnvironment, the small base that derives tools from typed methods.

An environment instance serves one episode at a time: ``reset(task)`` returns the opening messages,
``step(call)`` runs one tool call. Tools are methods marked with :func:`tool`; their JSON schemas are
derived from annotations and docstrings. Task generation (seeded train/test splits with a version) and the
oracle (a scripted expert) live on the same class so one definition serves training, evaluation and SFT.
"""

from __future__ import annotations

import hashlib
import random
from typing import Any, Callable, ClassVar, Iterable, Protocol, runtime_checkable

from agentrl.envs.schema import check_arguments, function_schema
from agentrl.envs.tools import Tool, ToolError
from agentrl.types import Message, StepResult, Task, ToolCall, ToolSpec

TRUNCATION_MARKER = "\n...[output truncated]"


def truncate(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters with :data:`TRUNCATION_MARKER` appended, or unchanged if it fits.

    Example:
        >>> truncate("abcdef", 3) == "abc" + TRUNCATION_MARKER
        True
    """
    return text if len(text) <= limit else text[:limit] + TRUNCATION_MARKER


def tool(fn: Callable[..., str]) -> Callable[..., str]:
    """Mark a method as a tool the model can call. It must be typed, docstringed and return a string."""
    fn.__agentrl_tool__ = True  # type: ignore[attr-defined]
    return fn


@runtime_checkable
class Environment(Protocol):
    """What the rollout engine needs from an environment (in-process or remote)."""

    name: str

    def tools(self) -> list[ToolSpec]: ...

    def reset(self, task: Task) -> list[Message]: ...

    def step(self, call: ToolCall) -> StepResult: ...

    def close(self) -> None: ...


def in_test_split(content: str, share: int = 10) -> bool:
    """Whether a task whose defining content is ``content`` belongs to the test split (1 in ``share``).

    Deciding by content, not by index, keeps the splits disjoint: a ``make_task`` draws until membership
    matches the split it builds. sha256, because Python's ``hash()`` is salted per process.

    Example:
        >>> in_test_split("17+25") == in_test_split("17+25")
        True
    """
    return int(hashlib.sha256(content.encode()).hexdigest(), 16) % share == 0


def task_rng(*parts: Any) -> random.Random:
    """A Random seeded from a stable hash of ``parts`` (Python's ``hash`` is salted per process)."""
    digest = hashlib.sha256("/".join(map(str, parts)).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


class ToolEnvironment:
    """Base for environments whose tools are typed methods.

    Subclasses set ``name``, ``version`` and ``system_prompt``, mark tools with :func:`tool`, call
    :meth:`finish` from the tool that ends the episode, and implement ``make_task`` and ``oracle``.
    More tools can come from elsewhere through ``tools`` (:func:`~agentrl.envs.tools.object_tools`,
    :func:`~agentrl.envs.tools.schema_tools`). Bad calls (unknown tool, wrong arguments) are not
    exceptions: they come back as error observations, as does a :class:`~agentrl.envs.tools.ToolError`
    a tool raises. Any other exception from a tool is recorded by the rollout engine as an ``env_error``
    episode.

    Args:
        tools: tools besides the :func:`tool` methods; their names must differ from those.

    Example:
        >>> class Echo(ToolEnvironment):
        ...     name, version, system_prompt = "echo", "echo-v1", "Repeat the word."
        ...     @tool
        ...     def say(self, word: str) -> str:
        ...         '''Say a word.
        ...
        ...         Args:
        ...             word: the word.
        ...         '''
        ...         self.finish(reward=float(word == self.task.data["word"]), success=word == self.task.data["word"])
        ...         return "ok"
        >>> [t["function"]["name"] for t in Echo().tools()]
        ['say']
    """

    name: ClassVar[str]
    version: ClassVar[str]
    system_prompt: ClassVar[str]
    split_sizes: ClassVar[dict[str, int]] = {"train": 100_000, "test": 200}
    max_observation_chars: ClassVar[int] = 2000
    # True when calls wait on something outside Python (a browser, a subprocess, the network): the rollout
    # engine then calls reset/step/close in a worker thread so other episodes go on meanwhile.
    blocking: ClassVar[bool] = False

    def __init__(self, tools: Iterable[Tool] = ()) -> None:
        methods = [Tool(function_schema(getattr(self, attr), attr), getattr(self, attr))
                   for attr in dir(type(self)) if getattr(getattr(type(self), attr), "__agentrl_tool__", False)]
        self._tools: dict[str, Tool] = {}
        self.add_tools([*methods, *tools])
        self.task: Task | None = None
        self.done = False
        self.reward: float | None = None
        self.info: dict[str, Any] = {}
        # Results record the task version; subclasses whose constructor arguments change the task
        # distribution overwrite it with one that names them (see CalculatorEnv).
        self.task_version: str = self.version

    def add_tools(self, tools: Iterable[Tool]) -> None:
        """Offer more tools (an environment whose tools are known only once it runs adds them then)."""
        added = dict(self._tools)
        for item in tools:
            if item.name in added:
                raise ValueError(f"{type(self).__name__}: two tools are named {item.name!r}")
            added[item.name] = item
        self._tools = added

    def replace_tool(self, item: Tool) -> None:
        """Offer ``item`` in place of the tool of the same name, keeping the tools' order (for a setting that
        changes what a tool takes, e.g. clicking by label instead of by id)."""
        if item.name not in self._tools:
            raise ValueError(f"{type(self).__name__}: there is no tool {item.name!r} to replace")
        self._tools = {name: item if name == item.name else old for name, old in self._tools.items()}

    # --- episode side -------------------------------------------------------------------------
    def tools(self) -> list[ToolSpec]:
        return [item.spec for item in self._tools.values()]

    def reset(self, task: Task) -> list[Message]:
        if task.env != self.name:
            raise ValueError(f"{self.name} cannot run task {task.id}")
        self.task, self.done, self.reward = task, False, None
        self.info = {"tool_errors": 0, "tool_calls": 0}
        return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": task.prompt}]

    def finish(self, reward: float, success: bool) -> None:
        """End the episode with a reward; called from inside the tool that completes the task."""
        self.done, self.reward = True, float(reward)
        self.info["success"] = bool(success)

    def error(self, message: str) -> StepResult:
        """A bad call's error observation (truncated like any output: a call can quote a huge argument)."""
        self.info["tool_errors"] += 1
        message = truncate(message, self.max_observation_chars)
        return StepResult(observation=f"Error: {message}", info={"tool_error": message})

    def step(self, call: ToolCall) -> StepResult:
        if self.task is None:
            raise RuntimeError(f"{self.name}: step() before reset()")
        self.info["tool_calls"] += 1
        if self.done:
            return self.error("the episode is already finished")
        if call.name not in self._tools:
            return self.error(f"unknown tool {call.name!r}; available tools: {sorted(self._tools)}")
        chosen = self._tools[call.name]
        problem = check_arguments(chosen.check or chosen.spec, call.arguments)
        if problem:
            return self.error(problem)
        try:
            observation = chosen.fn(**call.arguments)
        except ToolError as exc:
            return self.error(str(exc))
        if not isinstance(observation, str):
            raise TypeError(f"tool {call.name} returned {type(observation).__name__}, not str")
        observation = truncate(observation, self.max_observation_chars)
        if not self.done:
            return StepResult(observation=observation)
        return StepResult(observation=observation, reward=self.reward, done=True, info=dict(self.info))

    def close(self) -> None:
        """Release resources (nothing for in-memory environments)."""

    # --- task side ----------------------------------------------------------------------------
    def tasks(self, split: str, n: int | None = None, start: int = 0) -> list[Task]:
        """Tasks ``start .. start+n`` of a split; deterministic for a given version."""
        if split not in self.split_sizes:
            raise ValueError(f"{self.name} has splits {sorted(self.split_sizes)}, not {split!r}")
        size = self.split_sizes[split]
        stop = size if n is None else min(size, start + n)
        return [self.task_at(split, i) for i in range(start, stop)]

    def task_at(self, split: str, index: int) -> Task:
        return self.make_task(task_rng(self.version, split, index), split, index)

    def make_task(self, rng: random.Random, split: str, index: int) -> Task:
        """Build one task from a seeded ``rng``. Train and test must not share task content."""
        raise NotImplementedError

    def oracle(self, task: Task) -> list[ToolCall]:
        """The scripted expert's tool calls for ``task`` (it may read ``task.data``)."""
        raise NotImplementedError
