"""Group advantages and per-task normalisation against hand-computed values."""

import json
import math

import pytest
import torch

from agentrl.algo.advantages import TaskAdvantageStats, compute_advantages, group_advantages

SQRT3 = 1.7320508  # sqrt(3)
INV_SQRT3 = 0.5773503  # 1 / sqrt(3)


def close(actual, expected, atol=1e-5):
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def test_two_groups_one_all_equal():
    rewards = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv, informative, stats = group_advantages(rewards, groups, torch.ones(8, dtype=torch.bool))
    # group 0 mean 0.5; group 1 has no spread
    close(adv, [0.5, -0.5, 0.5, -0.5, 0.0, 0.0, 0.0, 0.0])
    assert informative.tolist() == [True] * 4 + [False] * 4
    assert stats == {"adv/informative_frac": 0.5, "adv/all_equal_groups": 1.0}


def test_invalid_samples_excluded_from_group_mean():
    # group 7: valid rewards 1, 0, 0 (mean 1/3); the invalid 5.0 must not move it.
    # group 3: valid rewards equal (1, 1); only the invalid sample differs -> not informative.
    rewards = torch.tensor([1.0, 0.0, 0.0, 5.0, 1.0, 1.0, float("nan")])
    groups = torch.tensor([7, 7, 7, 7, 3, 3, 3])
    valid = torch.tensor([True, True, True, False, True, True, False])
    adv, informative, stats = group_advantages(rewards, groups, valid)
    close(adv, [2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0, 0.0])
    assert informative.tolist() == [True, True, True, False, False, False, False]
    assert stats["adv/all_equal_groups"] == 1.0
    assert stats["adv/informative_frac"] == pytest.approx(3 / 7)


def test_nearly_equal_rewards_not_informative():
    adv, informative, _ = group_advantages(
        torch.tensor([0.3, 0.1 + 0.2]), torch.tensor([0, 0]), torch.tensor([True, True])
    )
    assert informative.tolist() == [False, False]
    assert adv.tolist() == [0.0, 0.0]


def test_scale_by_std():
    # mean 0.25, population var (0.75^2 + 3 * 0.25^2) / 4 = 0.1875, std = sqrt(3) / 4
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0])
    groups, valid = torch.zeros(4, dtype=torch.long), torch.ones(4, dtype=torch.bool)
    adv, informative, _ = group_advantages(rewards, groups, valid, scale_by_std=True)
    close(adv, [SQRT3, -INV_SQRT3, -INV_SQRT3, -INV_SQRT3])
    assert informative.all()


def test_task_normalisation_different_scales():
    # task a rewards 0/1, task b rewards 0/10; group 2 (task b) is all-equal.
    rewards = torch.tensor([1.0, 0.0, 10.0, 0.0, 0.0, 0.0, 10.0, 10.0])
    groups = torch.tensor([0, 0, 1, 1, 1, 1, 2, 2])
    tasks = ["a", "a", "b", "b", "b", "b", "b", "b"]
    stats_obj = TaskAdvantageStats(momentum=1.0)
    adv, informative, stats = compute_advantages(rewards, groups, torch.ones(8, dtype=torch.bool), tasks, stats_obj)
    # group advantages: a -> [0.5, -0.5] (std 0.5); b -> [7.5, -2.5, -2.5, -2.5] (std 5 * sqrt(3) / 2)
    close(adv, [1.0, -1.0, SQRT3, -INV_SQRT3, -INV_SQRT3, -INV_SQRT3, 0.0, 0.0])
    for task in ("a", "b"):
        sel = torch.tensor([t == task for t in tasks]) & informative
        assert adv[sel].mean().item() == pytest.approx(0.0, abs=1e-6)
        assert adv[sel].std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert stats["adv/a/std"] == pytest.approx(0.5)
    assert stats["adv/b/std"] == pytest.approx(4.3301270)
    assert stats["adv/b/n"] == 4.0
    assert stats["adv/informative_frac"] == 0.75


def test_running_statistics_momentum_half():
    ts = TaskAdvantageStats(momentum=0.5)
    # call 1: batch mean 1, var 1 -> running (1, 1)
    out1, _ = ts.normalize(torch.tensor([2.0, 0.0]), ["a", "a"], torch.tensor([True, True]))
    close(out1, [1.0, -1.0])
    # call 2: batch mean 3, var 9 -> running mean 0.5*1 + 0.5*3 = 2, var 0.5*1 + 0.5*9 = 5
    out2, stats = ts.normalize(torch.tensor([6.0, 0.0, 0.0]), ["a", "a", "a"], torch.tensor([True, True, False]))
    close(out2, [1.7888544, -0.8944272, 0.0])  # (6 - 2) / sqrt(5), (0 - 2) / sqrt(5)
    assert ts.tasks["a"] == {"mean": 2.0, "var": 5.0, "count": 4, "steps": 2}
    assert stats["adv/a/mean"] == 2.0
    assert stats["adv/a/std"] == pytest.approx(2.2360680)
    assert stats["adv/a/n"] == 2.0


def test_state_dict_round_trip():
    ts = TaskAdvantageStats(momentum=0.5)
    ts.normalize(torch.tensor([2.0, 0.0, 3.0, -1.0]), ["a", "a", "b", "b"], torch.ones(4, dtype=torch.bool))
    restored = TaskAdvantageStats(momentum=0.5)
    restored.load_state_dict(json.loads(json.dumps(ts.state_dict())))
    batch = (torch.tensor([6.0, 0.0, 1.0, 0.5]), ["a", "a", "b", "b"], torch.tensor([True, True, True, False]))
    out_a, stats_a = ts.normalize(*batch)
    out_b, stats_b = restored.normalize(*batch)
    assert torch.equal(out_a, out_b)
    assert stats_a == stats_b
    assert ts.state_dict() == restored.state_dict()


def test_single_sample_guard_only_centres():
    ts = TaskAdvantageStats(momentum=0.5)
    # first batch of task a has one informative sample: var 0 -> centred to 0, no blow-up
    out1, stats = ts.normalize(torch.tensor([0.5, 0.3]), ["a", "b"], torch.tensor([True, False]))
    assert out1.tolist() == [0.0, 0.0]
    assert stats["adv/a/std"] == 0.0 and "adv/b/n" not in stats
    # running mean 0.5*0.5 + 0.5*1.5 = 1.0, var still 0 (< eps^2) -> only centred: 1.5 - 1.0
    out2, _ = ts.normalize(torch.tensor([1.5]), ["a"], torch.tensor([True]))
    close(out2, [0.5])
    assert torch.isfinite(out2).all()


def test_non_informative_stay_exactly_zero_and_no_task_stats_passthrough():
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0])
    groups = torch.tensor([0, 0, 1, 1])
    adv, informative, stats = compute_advantages(rewards, groups, torch.ones(4, dtype=torch.bool), ["a"] * 4, None)
    close(adv, [0.5, -0.5, 0.0, 0.0])
    assert adv[2].item() == 0.0 and adv[3].item() == 0.0
    assert not any(k.startswith("adv/a/") for k in stats)


def test_bad_momentum_rejected():
    with pytest.raises(ValueError):
        TaskAdvantageStats(momentum=0.0)
    with pytest.raises(ValueError):
        TaskAdvantageStats(momentum=1.5)


def test_empty_batch():
    empty = torch.zeros(0)
    adv, informative, stats = group_advantages(empty, empty.long(), empty.bool())
    assert adv.numel() == 0 and informative.numel() == 0
    assert not math.isnan(stats["adv/informative_frac"])
