"""Rewards read from what the environment reported at the end of an episode."""

from __future__ import annotations

from agentrl.types import Task, Trajectory


def env_reward(trajectory: Trajectory, task: Task) -> float:
    """The reward the environment returned when the episode finished (0.0 if it never finished).

    Raises:
        ValueError: for an infrastructure failure, whose reward means nothing.
    """
    if not trajectory.scored:
        raise ValueError(f"{task.id}: no reward for a {trajectory.status} episode")
    return trajectory.reward


def success(trajectory: Trajectory, task: Task) -> float:
    """1.0 if the environment judged the task solved, else 0.0."""
    if not trajectory.scored:
        raise ValueError(f"{task.id}: no reward for a {trajectory.status} episode")
    return float(trajectory.success)
