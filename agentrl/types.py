"""Shared nouns of agentrl: messages, tool calls, tasks, turns and trajectories.

Messages are plain OpenAI-style dicts (``{"role": ..., "content": ...}``); an assistant message's
``tool_calls`` hold ``{"type": "function", "function": {"name": str, "arguments": dict}}`` with the
arguments as a dict (the Qwen2.5 chat template serialises them itself).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

Message = dict[str, Any]
ToolSpec = dict[str, Any]  # OpenAI function-tool JSON: {"type": "function", "function": {...}}
Status = Literal["ok", "truncated", "env_error", "policy_error"]
# Statuses whose reward says something about the policy. Infrastructure failures are excluded
# from advantage statistics and from the loss.
SCORED_STATUSES = ("ok", "truncated")


@dataclass
class ToolCall:
    """One function call the model asked for."""

    name: str
    arguments: dict[str, Any]

    def to_message_entry(self) -> dict[str, Any]:
        return {"type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class StepResult:
    """What an environment answers to one tool call.

    ``observation`` is the tool message content the model sees; ``reward`` is set when ``done``.
    """

    observation: str
    reward: float | None = None
    done: bool = False
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Task:
    """One task instance: the same definition serves training and evaluation.

    Args:
        env: environment name (also the task name used in metrics).
        split: ``"train"`` or ``"test"``.
        index: position in the split.
        prompt: the user message.
        data: environment-specific ground truth (answers, world state); never shown to the model.
        version: task-generator version string, written into every result.
    """

    env: str
    split: str
    index: int
    prompt: str
    data: dict[str, Any]
    version: str

    @property
    def id(self) -> str:
        return f"{self.env}/{self.split}/{self.index}"


@dataclass
class Turn:
    """One policy turn, token-faithful.

    ``prompt_ids`` are exactly the ids sent to the policy, ``completion_ids`` exactly the ids it sampled
    (with ``logprobs`` their behaviour log-probabilities), ``version`` the adapter version that produced
    them. ``observation_ids`` are the env/tool tokens appended after this turn (loss-masked).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    version: int
    observation_ids: list[int] = field(default_factory=list)


@dataclass
class Trajectory:
    """One episode: the turns, the messages they stand for, reward and status."""

    task: Task
    group_id: int
    turns: list[Turn] = field(default_factory=list)
    messages: list[Message] = field(default_factory=list)
    tools: list[ToolSpec] = field(default_factory=list)
    reward: float = 0.0
    success: bool = False
    status: Status = "ok"
    error: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def scored(self) -> bool:
        return self.status in SCORED_STATUSES

    def token_view(self) -> tuple[list[int], list[int], list[float]]:
        """Return ``(input_ids, loss_mask, behaviour_logprobs)`` over the whole episode.

        Built from the recorded ids only (never re-tokenised). Each turn's prompt must extend the previous
        turn's prompt + completion + observation exactly; a violation raises, because it would mean the
        policy saw different tokens from the ones we train on.
        """
        ids: list[int] = []
        mask: list[int] = []
        logprobs: list[float] = []
        for turn in self.turns:
            if turn.prompt_ids[: len(ids)] != ids:
                raise ValueError(f"{self.task.id}: turn prompt does not extend the recorded tokens")
            new_prompt = turn.prompt_ids[len(ids):]
            ids += new_prompt + turn.completion_ids
            mask += [0] * len(new_prompt) + [1] * len(turn.completion_ids)
            logprobs += [0.0] * len(new_prompt) + list(turn.logprobs)
            ids += turn.observation_ids
            mask += [0] * len(turn.observation_ids)
            logprobs += [0.0] * len(turn.observation_ids)
        return ids, mask, logprobs

    def summary(self) -> dict[str, Any]:
        """A JSON-able record for logs and results files."""
        return {
            "task": self.task.id,
            "task_version": self.task.version,
            "group": self.group_id,
            "reward": self.reward,
            "success": self.success,
            "status": self.status,
            "error": self.error,
            "turns": len(self.turns),
            "versions": sorted({t.version for t in self.turns}),
        }
