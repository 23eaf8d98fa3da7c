"""Evaluate a policy on environments' test (or train) splits: per-task success rate, mean reward, n."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any, Callable

from agentrl.policy.base import Policy, SamplingParams
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episodes
from agentrl.types import Trajectory


def eval_tasks(prototypes: dict[str, Any], limit: int | None, split: str = "test") -> list:
    """The first ``limit`` tasks of each environment's ``split`` (the whole split when None).

    The train split's first tasks are the ones an SFT warm start's oracle traces begin with, so ``"train"``
    tells a model that never fit its training tasks from one that fits them and does not generalize. An
    environment without that split raises ``ValueError`` naming the splits it has.
    """
    return [task for env in prototypes.values() for task in env.tasks(split, limit)]


def run_eval_episodes(policy: Policy, chat: ChatFormat, make_env: Callable[[str], Any], tasks: list,
                      sampling: SamplingParams, limits: EpisodeLimits) -> list[Trajectory]:
    return asyncio.run(run_episodes(policy, make_env, tasks, list(range(len(tasks))), chat, sampling, limits))


class InFlightLimit:
    """A policy whose ``generate`` calls run at most ``limit`` at a time.

    A server policy gets every episode's turn at once otherwise: a whole test split queues on the HTTP client,
    and a request that waits for a connection longer than the request timeout fails.
    """

    def __init__(self, policy: Policy, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"limit must be >= 1, got {limit}")
        self.policy, self.limit = policy, limit
        self._slots: asyncio.Semaphore | None = None

    @property
    def version(self) -> int:
        return self.policy.version

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams):
        if self._slots is None:  # made in the running loop
            self._slots = asyncio.Semaphore(self.limit)
        async with self._slots:
            return await self.policy.generate(prompt_ids, sampling)

    async def load_adapter(self, path: str | None, version: int) -> None:
        await self.policy.load_adapter(path, version)


def summarize(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Aggregate ``Trajectory.summary()`` records into per-task results.

    Infrastructure failures (``env_error``/``policy_error``) are counted apart and left out of the
    success rate, which is over the episodes that produced a verdict.
    """
    by_task: dict[str, list[dict]] = defaultdict(list)
    for record in summaries:
        by_task[record["task"].split("/")[0]].append(record)
    tasks = {}
    for name, records in sorted(by_task.items()):
        scored = [r for r in records if r["status"] in ("ok", "truncated")]
        n = len(scored)
        tasks[name] = {
            "success": sum(r["success"] for r in scored) / n if n else float("nan"),
            "reward": sum(r["reward"] for r in scored) / n if n else float("nan"),
            "n": n,
            "truncated": sum(r["status"] == "truncated" for r in records),
            "infra_errors": len(records) - n,
            "task_version": records[0]["task_version"],
        }
    mean = sum(t["success"] for t in tasks.values()) / len(tasks) if tasks else float("nan")
    return {"tasks": tasks, "mean_success": mean}


def format_table(results: dict[str, Any], title: str = "") -> str:
    """A fixed-width table of per-task results."""
    lines = [title] if title else []
    lines.append(f"{'task':<14}{'success':>9}{'reward':>9}{'n':>6}{'trunc':>7}{'errors':>8}  version")
    for name, r in results["tasks"].items():
        lines.append(f"{name:<14}{r['success']:>9.3f}{r['reward']:>9.3f}{r['n']:>6}{r['truncated']:>7}"
                     f"{r['infra_errors']:>8}  {r['task_version']}")
    lines.append(f"{'mean':<14}{results['mean_success']:>9.3f}")
    return "\n".join(lines)
