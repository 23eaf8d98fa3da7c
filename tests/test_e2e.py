"""End to end on the micro model: SFT warm start (trl) → GRPO → `agentrl eval` writing results.json."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agentrl.eval.cli import main as eval_main
from agentrl.eval.cli import parse_model_args

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_sft_then_grpo_then_eval(micro_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "agentrl.train", "--config", str(ROOT / "recipes/quickstart.yaml"),
           f"--model.path={micro_model_dir}", "--model.build=null", f"--train.output_dir={out}",
           "--sft.examples_per_env=16", "--sft.batch_size=8", "--train.steps=2", "--rollout.tasks_per_step=2",
           "--rollout.group_size=2", "--rollout.max_new_tokens=16", "--rollout.max_turns=2", "--eval.limit=2"]
    proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    # 16 oracle traces from each of the recipe's 2 environments and its 5 SFT-only ones
    assert json.loads((out / "sft" / "sft_done.json").read_text())["examples"] == 16 * 7
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert "held-out success after RL" in proc.stdout
    results = eval_main(["--model", "hf", "--model_args", f"pretrained={out / 'sft'},adapter={out / 'adapter'}",
                         "--tasks", "calculator,lookup", "--limit", "3", "--output_path", str(tmp_path / "eval"),
                         "--max_new_tokens", "16", "--max_turns", "2"])
    saved = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert saved["tasks"].keys() == {"calculator", "lookup"} == results["tasks"].keys()
    assert all(t["n"] + t["infra_errors"] == 3 and 0.0 <= t["success"] <= 1.0 for t in saved["tasks"].values())
    assert len((tmp_path / "eval" / "samples.jsonl").read_text().splitlines()) == 6


def test_model_args_parse_like_lm_eval():
    assert parse_model_args("pretrained=a/b,adapter=c") == {"pretrained": "a/b", "adapter": "c"}
    with pytest.raises(ValueError, match="key=value"):
        parse_model_args("pretrained")


def test_eval_cli_rejects_unknown_model_args():
    with pytest.raises(SystemExit, match="pretrained=DIR"):
        eval_main(["--model_args", "pretrained=x,lora=y", "--tasks", "calculator"])


def test_eval_takes_environments_with_kwargs_from_a_recipe():
    from agentrl.config import load_recipe
    from agentrl.eval.cli import task_specs

    recipe = load_recipe(ROOT / "recipes/quickstart.yaml")
    specs = dict(task_specs(None, recipe))
    assert specs["calculator"]["max_operand"] == 99 and specs["lookup"]["alphabet"] == "words"
    assert [name for name, _ in task_specs("lookup", recipe)] == ["lookup"]
    with pytest.raises(SystemExit, match="not among"):
        task_specs("nosuch", recipe)
    with pytest.raises(SystemExit, match="--tasks"):
        task_specs(None, None)


def test_eval_limit_and_temperature_default_to_the_recipe(micro_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("envs: [{name: lookup}]\nrollout: {max_new_tokens: 4, max_turns: 1}\n"
                      "eval: {limit: 2, temperature: 0.5}\n")
    results = eval_main(["--model_args", f"pretrained={micro_model_dir}", "--config", str(recipe)])
    assert results["config"]["limit"] == 2 and results["config"]["temperature"] == 0.5
    assert results["tasks"]["lookup"]["n"] + results["tasks"]["lookup"]["infra_errors"] == 2
    results = eval_main(["--model_args", f"pretrained={micro_model_dir}", "--config", str(recipe), "--limit", "1",
                         "--temperature", "0"])
    assert results["config"]["limit"] == 1 and results["config"]["temperature"] == 0.0


def test_eval_split_train_plays_the_tasks_sft_starts_with(micro_model_dir, tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("envs: [{name: lookup}]\nrollout: {max_new_tokens: 4, max_turns: 1}\neval: {limit: 2}\n")
    for split in ("train", "test"):
        out = tmp_path / split
        results = eval_main(["--model_args", f"pretrained={micro_model_dir}", "--config", str(recipe),
                             "--split", split, "--output_path", str(out)])
        assert results["config"]["split"] == split
        samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
        assert sorted(s["task"] for s in samples) == [f"lookup/{split}/0", f"lookup/{split}/1"]
    with pytest.raises(SystemExit):  # argparse: not one of the choices
        eval_main(["--model_args", f"pretrained={micro_model_dir}", "--config", str(recipe), "--split", "dev"])


def test_eval_tasks_rejects_an_unknown_split():
    from agentrl.envs import env_factory
    from agentrl.eval.runner import eval_tasks

    env, _ = env_factory("lookup", {}, "")
    assert [t.split for t in eval_tasks({"lookup": env}, 2, "train")] == ["train", "train"]
    with pytest.raises(ValueError, match=r"lookup has splits \['test', 'train'\], not 'validation'"):
        eval_tasks({"lookup": env}, 1, "validation")


def test_compare_titles_say_which_split_and_decoding(tmp_path):
    from agentrl.eval.compare import compare

    def write(name, config):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"tasks": {"lookup": {"success": 0.5, "n": 2}}, "mean_success": 0.5,
                                    "config": config}))
        return str(path)

    old = write("old", {"temperature": 0.0})  # written before `split` existed: a test-split eval
    test = write("test", {"split": "test", "temperature": 0.0})
    train = write("train", {"split": "train", "temperature": 0.0})
    hot = write("hot", {"split": "train", "temperature": 0.7})
    assert compare([old, test], ["A", "B"]).splitlines()[0] == "held-out success (test split, greedy)"
    assert compare([train, train], ["A", "B"]).splitlines()[0] == "success (train split, greedy)"
    assert compare([test, hot], ["A", "B"]).splitlines()[0] == \
        "success (A: test split, greedy; B: train split, temperature 0.7)"
