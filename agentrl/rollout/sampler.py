"""TaskSampler: which task instances a training step rolls out, seeded and resumable."""

from __future__ import annotations

import random
from typing import Any

from agentrl.types import Task


class TaskSampler:
    """Draw task instances from several environments' train splits by weight.

    Each environment's train split is walked in order from a seeded random offset, so instances do not
    repeat until the split is exhausted; the state (RNG + cursors) goes into checkpoints.

    Args:
        task_sources: ``{env_name: callable(index) -> Task}`` for the train split.
        split_sizes: ``{env_name: number of train tasks}``.
        weights: ``{env_name: relative share}``.
        seed: RNG seed.

    Example:
        >>> s = TaskSampler({"a": lambda i: i}, {"a": 10}, {"a": 1.0}, seed=0)
        >>> len(s.sample(3))
        3
    """

    def __init__(self, task_sources: dict[str, Any], split_sizes: dict[str, int], weights: dict[str, float],
                 seed: int) -> None:
        self.sources, self.sizes = task_sources, split_sizes
        self.names = sorted(task_sources)
        self.weights = [weights[name] for name in self.names]
        self.rng = random.Random(seed)
        self.cursors = {name: self.rng.randrange(split_sizes[name]) for name in self.names}

    def sample(self, n: int) -> list[Task]:
        """``n`` task instances, environments chosen by weight."""
        chosen = self.rng.choices(self.names, weights=self.weights, k=n)
        tasks = []
        for name in chosen:
            tasks.append(self.sources[name](self.cursors[name]))
            self.cursors[name] = (self.cursors[name] + 1) % self.sizes[name]
        return tasks

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "cursors": dict(self.cursors)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.cursors = dict(state["cursors"])
