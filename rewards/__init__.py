"""Reward functions, ``(trajectory, task) -> float``, and their name table.

A reward that cannot be computed raises; it is never turned into 0.0. Users name their own function in a
recipe as ``my_pkg.rewards:fn``.
"""

REWARDS = {
    "env_reward": "rewards.basic:env_reward",
    "success": "rewards.basic:success",
}
