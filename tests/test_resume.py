"""Checkpoint/resume: a run resumed from step k continues exactly like the uninterrupted run."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from agentrl.config import load_recipe
from agentrl.train.loop import train


def recipe(model_dir, output, **extra):
    overrides = [f"--model.path={model_dir}", "--model.build=null", "--sft.enabled=false",
                 f"--train.output_dir={output}", "--train.steps=3", "--train.save_every=1",
                 "--envs=[{name: calculator, reward: 'tests.train_helpers:token_sum_reward'}, "
                 "{name: lookup, reward: 'tests.train_helpers:token_sum_reward', weight: 2}]",
                 "--rollout.tasks_per_step=2", "--rollout.group_size=4", "--rollout.max_new_tokens=8",
                 "--rollout.max_turns=2", "--eval.limit=2", "--algo.lr=0.05"]
    return load_recipe(None, overrides + [f"--{k}={v}" for k, v in extra.items()])


def metrics(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def full_run(micro_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(recipe(micro_model_dir, out))
    return out


def test_resume_continues_same_step_sampler_and_statistics(micro_model_dir, full_run, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(full_run / "checkpoints" / "step_2", resumed / "checkpoints" / "step_2")
    train(recipe(micro_model_dir, resumed, **{"train.resume": "auto"}))
    a = torch.load(full_run / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=False)
    b = torch.load(resumed / "checkpoints" / "step_3" / "trainer_state.pt", weights_only=False)
    assert a["step"] == b["step"] == 3
    assert a["sampler"] == b["sampler"]
    assert a["task_stats"] == b["task_stats"] and a["task_stats"]["tasks"]  # statistics exist and match
    wa = load_file(str(full_run / "checkpoints" / "step_3" / "adapter" / "adapter_model.safetensors"))
    wb = load_file(str(resumed / "checkpoints" / "step_3" / "adapter" / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)
    last_a = [m for m in metrics(full_run) if m["step"] == 3 and "rollout/episodes" in m][0]
    (last_b,) = [m for m in metrics(resumed) if "rollout/episodes" in m]
    assert last_b["step"] == 3
    for key in ("rollout/lookup/reward", "rollout/calculator/reward", "train/loss"):
        assert last_a.get(key) == pytest.approx(last_b.get(key), abs=1e-6), key


def test_training_moved_the_adapter(full_run):
    weights = load_file(str(full_run / "adapter" / "adapter_model.safetensors"))
    assert any("lora_B" in k and weights[k].abs().sum() > 0 for k in weights)  # B starts at exactly zero
    logged = metrics(full_run)
    assert any("train/loss" in m for m in logged)
    assert any("adv/lookup/std" in m for m in logged)


def test_samples_from_another_adapter_version_are_refused():
    from agentrl.rollout.engine import check_versions
    from agentrl.types import Task, Trajectory, Turn

    traj = Trajectory(Task("lookup", "train", 0, "p", {}, "v"), 0, turns=[Turn([1], [2], [0.0], version=3)])
    check_versions([traj], expected=3)
    with pytest.raises(RuntimeError, match="version"):
        check_versions([traj], expected=4)
