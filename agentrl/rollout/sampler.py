"""TaskSampler: which task instances a training step rolls out, seeded and resumable."""

from __future__ import annotations

import random
from typing import Any

from agentrl.types import Task


class TaskSampler:
    """Draw task instances from several environments' train splits by weight.

    Each environment's train split is walked in order from a seeded random offset, so instances do not
    repeat until the split is exhausted; the state (RNG + cursors) goes into checkpoints.

    With ``informative_floor`` > 0 an environment's share follows its learning signal: its weight is scaled by
    a running estimate of the fraction of its groups whose rewards differ (the only groups GRPO learns from;
    see :meth:`observe`), and never by less than the floor, so an environment the policy has solved (or
    cannot yet solve at all) is still drawn now and then and can come back. An environment not yet observed
    counts as fully informative.

    Args:
        task_sources: ``{env_name: callable(index) -> Task}`` for the train split.
        split_sizes: ``{env_name: number of train tasks}``.
        weights: ``{env_name: relative share}``.
        seed: RNG seed.
        informative_floor: in ``[0, 1]``; 0 keeps the fixed ``weights``.
        informative_momentum: in ``(0, 1]``; how much one step's groups move the running estimate.

    Example:
        >>> s = TaskSampler({"a": lambda i: i}, {"a": 10}, {"a": 1.0}, seed=0)
        >>> len(s.sample(3))
        3
        >>> s = TaskSampler({"a": str, "b": str}, {"a": 9, "b": 9}, {"a": 1.0, "b": 1.0}, 0, informative_floor=0.2)
        >>> s.observe({"a": (0, 4), "b": (4, 4)}); s.current_weights()
        {'a': 0.7, 'b': 1.0}
    """

    def __init__(self, task_sources: dict[str, Any], split_sizes: dict[str, int], weights: dict[str, float],
                 seed: int, informative_floor: float = 0.0, informative_momentum: float = 0.3) -> None:
        if not 0.0 <= informative_floor <= 1.0:
            raise ValueError(f"informative_floor must be in [0, 1], got {informative_floor}")
        if not 0.0 < informative_momentum <= 1.0:
            raise ValueError(f"informative_momentum must be in (0, 1], got {informative_momentum}")
        self.sources, self.sizes = task_sources, split_sizes
        self.names = sorted(task_sources)
        self.weights = [weights[name] for name in self.names]
        self.floor, self.momentum = informative_floor, informative_momentum
        self.informative = dict.fromkeys(self.names, 1.0)  # running fraction of informative groups
        self.rng = random.Random(seed)
        self.cursors = {name: self.rng.randrange(split_sizes[name]) for name in self.names}

    def current_weights(self) -> dict[str, float]:
        """Each environment's weight now: the fixed one, scaled by its informative fraction when adaptive."""
        if not self.floor:
            return dict(zip(self.names, self.weights))
        return {name: weight * max(self.floor, self.informative[name])
                for name, weight in zip(self.names, self.weights)}

    def observe(self, groups: dict[str, tuple[int, int]]) -> None:
        """Fold one step's ``{env_name: (informative groups, groups)}`` into the running estimates.

        An environment with no groups this step keeps its estimate. Every process must observe the same
        counts (the gathered step), so that they keep drawing the same instances.
        """
        for name, (informative, total) in groups.items():
            if total:
                self.informative[name] += self.momentum * (informative / total - self.informative[name])

    def sample(self, n: int) -> list[Task]:
        """``n`` task instances, environments chosen by weight."""
        weights = self.current_weights()
        chosen = self.rng.choices(self.names, weights=[weights[name] for name in self.names], k=n)
        tasks = []
        for name in chosen:
            tasks.append(self.sources[name](self.cursors[name]))
            self.cursors[name] = (self.cursors[name] + 1) % self.sizes[name]
        return tasks

    def state_dict(self) -> dict[str, Any]:
        return {"rng": self.rng.getstate(), "cursors": dict(self.cursors), "informative": dict(self.informative)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))
        self.cursors = dict(state["cursors"])
        # a checkpoint from before adaptive weights has no estimates: every environment counts as informative
        self.informative = {name: 1.0 for name in self.names} | dict(state.get("informative", {}))
