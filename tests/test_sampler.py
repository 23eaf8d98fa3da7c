"""The task sampler: fixed shares by weight, or shares that follow where GRPO still has a learning signal."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from agentrl.config import ConfigError, load_recipe
from agentrl.rollout.sampler import TaskSampler
from agentrl.train.loop import informative_groups


def sampler(**kwargs):
    names = ("solved", "learning", "unseen")
    return TaskSampler({n: (lambda i, n=n: (n, i)) for n in names}, dict.fromkeys(names, 50),
                       {"solved": 1.0, "learning": 1.0, "unseen": 2.0}, seed=0, **kwargs)


def test_fixed_weights_ignore_observations():
    fixed, observed = sampler(), sampler()
    observed.observe({"solved": (0, 5), "learning": (5, 5)})
    assert observed.current_weights() == {"solved": 1.0, "learning": 1.0, "unseen": 2.0}
    assert fixed.sample(40) == observed.sample(40)


def test_adaptive_weights_follow_informative_groups_down_to_the_floor():
    s = sampler(informative_floor=0.2, informative_momentum=0.5)
    s.observe({"solved": (0, 4), "learning": (3, 4)})
    assert s.current_weights() == pytest.approx({"solved": 0.5, "learning": 0.875, "unseen": 2.0})
    for _ in range(20):  # solved: every group all-equal; unseen: never drawn, so never observed
        s.observe({"solved": (0, 4), "learning": (2, 4)})
    assert s.current_weights() == pytest.approx({"solved": 0.2, "learning": 0.5, "unseen": 2.0})
    drawn = Counter(name for name, _ in s.sample(2700))
    assert drawn["solved"] > 0  # the floor keeps a solved environment in the mix
    assert drawn["solved"] / 2700 == pytest.approx(0.2 / 2.7, abs=0.02)
    assert drawn["learning"] / 2700 == pytest.approx(0.5 / 2.7, abs=0.03)
    s.observe({"learning": (0, 0)})  # no groups this step: the estimate stays
    assert s.current_weights()["learning"] == pytest.approx(0.5)


def test_adaptive_state_resumes_exactly_and_old_checkpoints_load():
    s = sampler(informative_floor=0.1)
    s.observe({"solved": (0, 4)})
    s.sample(7)
    state = json.loads(json.dumps(s.state_dict()))  # as a checkpoint keeps it
    again = sampler(informative_floor=0.1)
    again.load_state_dict(state)
    assert again.current_weights() == s.current_weights() and again.sample(30) == s.sample(30)
    old = {k: v for k, v in state.items() if k != "informative"}
    before = sampler(informative_floor=0.1)
    before.load_state_dict(old)
    assert before.informative == {"solved": 1.0, "learning": 1.0, "unseen": 1.0}


def test_informative_groups_counts_groups_not_episodes_and_skips_unscored_ones():
    records = [{"task": "kg", "group": 1, "scored": True}] * 3 + [{"task": "kg", "group": 2, "scored": True}] * 2 \
        + [{"task": "web", "group": 3, "scored": False}] * 2 + [{"task": "os", "group": 4, "scored": True}]
    informative = torch.tensor([True, True, False, False, False, False, False, False])
    assert informative_groups(records, informative) == {"kg": (1, 2), "os": (0, 1)}


@pytest.mark.parametrize("override, key", [("--rollout.informative_floor=1.5", "rollout.informative_floor"),
                                           ("--rollout.informative_momentum=0", "rollout.informative_momentum")])
def test_bad_adaptive_settings_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_recipe(None, [override])


def test_a_run_moves_weight_away_from_an_environment_with_no_learning_signal(micro_model_dir, tmp_path):
    from agentrl.train.loop import train

    overrides = [f"--model.path={micro_model_dir}", "--model.build=null", "--sft.enabled=false",
                 f"--train.output_dir={tmp_path}", "--train.steps=3", "--train.save_every=0", "--eval.at_end=false",
                 "--envs=[{name: calculator, reward: 'tests.train_helpers:constant_reward'}, "
                 "{name: lookup, reward: 'tests.train_helpers:token_sum_reward'}]",
                 "--rollout.tasks_per_step=4", "--rollout.group_size=4", "--rollout.max_new_tokens=8",
                 "--rollout.max_turns=2", "--rollout.informative_floor=0.25", "--rollout.informative_momentum=0.5"]
    train(load_recipe(None, overrides))
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    weights = [(m["sampler/calculator/weight"], m["sampler/lookup/weight"]) for m in logged]
    assert len(weights) == 3
    calculator, lookup = zip(*weights)
    assert calculator[-1] < 1.0 and list(calculator) == sorted(calculator, reverse=True)
    assert min(calculator) >= 0.25
    assert lookup[-1] > calculator[-1]
