"""Advantages: the GRPO group baseline, then per-task normalisation across steps.

GRPO (Shao et al. 2024, DeepSeekMath) scores each sample against the other samples drawn for the same
prompt. AgentRL (Zhang et al. 2025) then standardises advantages per task so that tasks with different
reward scales contribute comparable gradients when trained together.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    valid: Tensor,
    scale_by_std: bool = False,
    eps: float = 1e-6,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """GRPO group-relative advantages (Shao et al. 2024): reward minus the mean of its group.

    Args:
        rewards: ``[N]`` float rewards.
        group_ids: ``[N]`` long; samples with the same id were drawn for the same prompt (any values).
        valid: ``[N]`` bool; False marks infrastructure failures, which never enter a group's statistics.
        scale_by_std: also divide by the group's population std + ``eps`` (the original GRPO recipe).
        eps: added to the std when ``scale_by_std``.

    Returns:
        ``(advantages [N], informative [N] bool, stats)``. ``informative[i]`` is True iff sample i is valid
        and the valid rewards of its group are not all equal (``torch.isclose`` of the group's max and
        min). Other samples get advantage exactly 0. stats: ``adv/informative_frac`` (over all N samples),
        ``adv/all_equal_groups`` (groups with at least one valid sample and no reward spread).
    """
    if not (rewards.dim() == group_ids.dim() == valid.dim() == 1):
        raise ValueError("rewards, group_ids and valid must be 1-D")
    if not (rewards.shape == group_ids.shape == valid.shape):
        raise ValueError(f"shape mismatch: {rewards.shape}, {group_ids.shape}, {valid.shape}")
    n = rewards.shape[0]
    r = rewards.float() if not rewards.is_floating_point() else rewards
    valid = valid.bool()
    if n == 0:
        return r.clone(), valid.clone(), {"adv/informative_frac": 0.0, "adv/all_equal_groups": 0.0}

    # Dense group index 0..G-1 whatever the ids are.
    _, inv = torch.unique(group_ids, return_inverse=True)
    g = int(inv.max().item()) + 1
    v = valid.to(r.dtype)
    count = torch.zeros(g, dtype=r.dtype, device=r.device).index_add_(0, inv, v)
    safe_count = count.clamp(min=1.0)  # groups with no valid sample: their members are masked anyway
    mean = torch.zeros_like(count).index_add_(0, inv, r * v) / safe_count
    # Invalid rewards may be garbage (NaN); keep them out of every reduction.
    centred = torch.where(valid, r - mean[inv], torch.zeros_like(r))

    inf = torch.full_like(count, math.inf)
    gmax = (-inf).scatter_reduce(0, inv, torch.where(valid, r, -math.inf), "amax")
    gmin = inf.scatter_reduce(0, inv, torch.where(valid, r, math.inf), "amin")
    has_valid = count > 0
    all_equal = has_valid & torch.isclose(torch.where(has_valid, gmax, 0.0), torch.where(has_valid, gmin, 0.0))
    informative = valid & has_valid[inv] & ~all_equal[inv]

    adv = centred
    if scale_by_std:
        var = torch.zeros_like(count).index_add_(0, inv, centred * centred) / safe_count
        adv = centred / (var.sqrt()[inv] + eps)
    adv = torch.where(informative, adv, torch.zeros_like(adv))
    stats = {
        "adv/informative_frac": informative.float().mean().item(),
        "adv/all_equal_groups": float(all_equal.sum().item()),
    }
    return adv, informative, stats


class TaskAdvantageStats:
    """Running per-task mean/variance of advantages, for task advantage normalisation (AgentRL, Zhang et al. 2025).

    ``momentum=1.0`` is pure per-batch per-task standardisation (as in AgentRL); smaller values smooth the
    statistics across steps (``run = (1 - momentum) * run + momentum * batch``; the first batch of a task
    initialises them).

    Variance floor: when a task's running variance is below ``eps**2`` (e.g. the task's first batch had a
    single informative sample) its advantages are only centred, not scaled. Dividing by ``sqrt(var) + eps``
    there would multiply float noise by up to ``1/eps`` and hand one task a huge gradient.
    """

    def __init__(self, momentum: float = 0.1, eps: float = 1e-6) -> None:
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"momentum must be in (0, 1], got {momentum}")
        self.momentum = momentum
        self.eps = eps
        # task -> {"mean": float, "var": float, "count": int (informative samples seen), "steps": int}
        self.tasks: dict[str, dict[str, Any]] = {}

    def normalize(self, advantages: Tensor, tasks: list[str], informative: Tensor) -> tuple[Tensor, dict[str, float]]:
        """Update each present task's running statistics, then standardise its informative advantages.

        Args:
            advantages: ``[N]`` float advantages (e.g. from :func:`group_advantages`).
            tasks: ``N`` task names.
            informative: ``[N]`` bool; only these samples update statistics or change value.

        Returns:
            ``(normalised [N], stats)``; non-informative samples are exactly 0. Per task present, stats hold
            ``adv/<task>/mean`` and ``adv/<task>/std`` (running, after the update) and ``adv/<task>/n``
            (informative samples of the task in this batch).
        """
        if advantages.dim() != 1 or len(tasks) != advantages.shape[0] or informative.shape != advantages.shape:
            raise ValueError("advantages, tasks and informative must all have length N")
        out = torch.zeros_like(advantages)
        stats: dict[str, float] = {}
        flags = informative.bool().tolist()
        by_task: dict[str, list[int]] = {}
        for i, (task, flag) in enumerate(zip(tasks, flags)):
            if flag:
                by_task.setdefault(task, []).append(i)
        for task in sorted(by_task):
            idx = torch.tensor(by_task[task], dtype=torch.long, device=advantages.device)
            values = advantages[idx]
            run = self._update(task, values)
            std = math.sqrt(run["var"])
            scale = std + self.eps if run["var"] >= self.eps**2 else 1.0
            out[idx] = ((values.double() - run["mean"]) / scale).to(advantages.dtype)
            stats[f"adv/{task}/mean"] = run["mean"]
            stats[f"adv/{task}/std"] = std
            stats[f"adv/{task}/n"] = float(len(by_task[task]))
        return out, stats

    def _update(self, task: str, values: Tensor) -> dict[str, Any]:
        """Fold one batch's population mean/variance of ``values`` into the task's running statistics."""
        v = values.detach().double()
        mean = v.mean().item()
        var = ((v - mean) ** 2).mean().item()
        run = self.tasks.get(task)
        if run is None:
            run = self.tasks[task] = {"mean": mean, "var": var, "count": 0, "steps": 0}
        else:
            m = self.momentum
            run["mean"] = (1.0 - m) * run["mean"] + m * mean
            run["var"] = (1.0 - m) * run["var"] + m * var
        run["count"] += int(v.numel())
        run["steps"] += 1
        return run

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable per-task statistics (momentum and eps are configuration, not state)."""
        return {"tasks": {t: dict(s) for t, s in self.tasks.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore statistics saved by :meth:`state_dict`."""
        self.tasks = {
            str(t): {
                "mean": float(s["mean"]),
                "var": float(s["var"]),
                "count": int(s["count"]),
                "steps": int(s["steps"]),
            }
            for t, s in state["tasks"].items()
        }


def compute_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    valid: Tensor,
    tasks: list[str],
    task_stats: TaskAdvantageStats | None,
    scale_by_std: bool = False,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Group baseline (GRPO), then per-task normalisation (AgentRL) when ``task_stats`` is given.

    Args:
        rewards: ``[N]`` float. group_ids: ``[N]`` long. valid: ``[N]`` bool. tasks: ``N`` task names.
        task_stats: running per-task statistics, updated in place; None skips task normalisation.
        scale_by_std: divide by the group std too (see :func:`group_advantages`).

    Returns:
        ``(advantages [N], informative [N] bool, stats)`` with both stages' stats merged.
    """
    adv, informative, stats = group_advantages(rewards, group_ids, valid, scale_by_std=scale_by_std)
    if task_stats is not None:
        adv, task_stats_log = task_stats.normalize(adv, tasks, informative)
        stats.update(task_stats_log)
    return adv, informative, stats
