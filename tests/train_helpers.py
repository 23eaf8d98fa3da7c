"""Helpers for trainer tests (importable by dotted path from a recipe)."""

from agentrl.types import Task, Trajectory


def token_sum_reward(trajectory: Trajectory, task: Task) -> float:
    """A reward a random-init model varies on: the sum of its sampled token ids, modulo 3."""
    return float(sum(sum(turn.completion_ids) for turn in trajectory.turns) % 3)
