"""Recipes: every file in recipes/ loads, overrides apply, bad keys and types fail with the key named."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agentrl.config import ConfigError, load_recipe
from agentrl.envs import make_env
from agentrl.resolve import resolve
from rewards import REWARDS

RECIPES = sorted(Path(__file__).parents[1].joinpath("recipes").glob("*.yaml"))
ACCELERATE = sorted(Path(__file__).parents[1].joinpath("recipes", "accelerate").glob("*.yaml"))


def test_there_are_recipes():
    assert RECIPES and ACCELERATE


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_names_real_things(path):
    recipe = load_recipe(path)
    for env in recipe.envs:
        assert make_env(env.name, **env.kwargs).tools()
        assert callable(resolve(env.reward, REWARDS, "reward"))
    assert recipe.rollout.tasks_per_step > 0 and recipe.rollout.group_size > 1


@pytest.mark.parametrize("path", ACCELERATE, ids=lambda p: p.name)
def test_accelerate_configs_parse(path):
    config = yaml.safe_load(path.read_text())
    assert config["use_cpu"] is True and config["num_processes"] >= 1


def test_overrides_apply_with_yaml_values():
    recipe = load_recipe(RECIPES[0], ["--rollout.group_size=4", "--algo.lr=5e-3", "--train.resume=auto",
                                      "envs.1.weight=3"])
    assert recipe.rollout.group_size == 4 and recipe.algo.lr == 0.005 and recipe.train.resume == "auto"
    assert recipe.envs[1].weight == 3.0


@pytest.mark.parametrize("override, fragment", [
    ("--rollout.gruop_size=4", "'rollout.gruop_size' (did you mean 'group_size'?)"),
    ("--trian.steps=4", "'trian'"),
    ("--train.steps=many", "train.steps: expected int"),
    ("--algo.task_norm=3", "algo.task_norm: expected bool"),
    ("--envs=[{name: calculator, wieght: 2}]", "'envs[0].wieght'"),
    ("steps", "--section.key=value"),
])
def test_bad_keys_and_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as info:
        load_recipe(None, [override])
    assert fragment in str(info.value)


def test_unknown_names_fail_clearly():
    with pytest.raises(KeyError, match="known names"):
        make_env("nosuchenv")
    with pytest.raises(KeyError, match="known names"):
        resolve("nosuchreward", REWARDS, "reward")


def test_bad_sft_scheduler_names_the_key(tmp_path):
    from agentrl.train.sft import run_sft

    recipe = load_recipe(None, ["--sft.lr_scheduler=cosin"])
    with pytest.raises(ConfigError, match="sft.lr_scheduler.*'cosin'"):  # before the model is even looked for
        run_sft(tmp_path / "no-model", tmp_path / "sft", None, recipe.sft, 0)
    assert load_recipe(None, ["--sft.lr_scheduler=constant"]).sft.lr_scheduler == "constant"


@pytest.mark.parametrize("overrides, fragment", [
    (["--policy.backend=vlm"], "policy.backend must be one of"),
    (["--policy.backend=vllm"], "exactly one of policy.url"),
    (["--policy.backend=vllm", "--policy.url=http://x", "--policy.launch=true"], "exactly one of policy.url"),
    (["--policy.max_loras=0"], "policy.max_loras"),
])
def test_policy_section_is_checked(overrides, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_recipe(None, overrides)


def test_vllm_server_command_has_the_flags_the_backend_relies_on(tmp_path):
    from agentrl.policy.vllm import server_command

    command = server_command(tmp_path / "model", "/nonexistent/python", "127.0.0.1", 8000, 16, 2)
    joined = " ".join(command)
    for flag in ("--enable-lora", "--max-lora-rank 16", "--logprobs-mode processed_logprobs",
                 "--model-impl transformers", "--served-model-name base", "--dtype float32"):
        assert flag in joined


@pytest.mark.parametrize("overrides, fragment", [
    (["--lora.r=12"], "lora.r=12"),
    (["--policy.python=/nonexistent/python"], "policy.python"),
])
def test_a_vllm_setup_that_cannot_work_fails_before_sft(overrides, fragment):
    from agentrl.train.loop import check_policy_setup

    recipe = load_recipe(None, ["--policy.backend=vllm", "--policy.launch=true"] + overrides)
    with pytest.raises(ConfigError, match=fragment):
        check_policy_setup(recipe)


def test_truncation_penalty_lowers_only_truncated_training_rewards():
    import random

    from agentrl.train.loop import score
    from agentrl.train.setup import build_envs
    from agentrl.types import Trajectory

    recipe = load_recipe(None, ["--envs=[{name: calculator, truncation_penalty: 0.5}, {name: lookup}]"])
    suite = build_envs(recipe)
    calc = suite.prototypes["calculator"].make_task(random.Random(0), "train", 0)
    look = suite.prototypes["lookup"].make_task(random.Random(0), "train", 0)
    trajs = [Trajectory(calc, 0, reward=1.0, status="ok"), Trajectory(calc, 0, reward=0.0, status="truncated"),
             Trajectory(look, 1, reward=0.0, status="truncated"), Trajectory(calc, 0, status="env_error")]
    score(trajs, suite)
    assert [t.reward for t in trajs] == [1.0, -0.5, 0.0, 0.0]  # lookup has no penalty; env errors are unscored
    assert trajs[3].status == "env_error"
    with pytest.raises(ConfigError, match=r"envs\[calculator\].truncation_penalty must be >= 0"):
        load_recipe(None, ["--envs=[{name: calculator, truncation_penalty: -1}]"])
