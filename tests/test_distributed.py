"""Two gloo ranks on CPU through `accelerate launch`: the run completes and the adapters stay in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


@pytest.mark.slow
def test_two_process_run_keeps_parameters_in_sync(micro_model_dir, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/cpu_2proc.yaml"), "-m", "agentrl.train",
           "--config", str(ROOT / "recipes/quickstart.yaml"),
           f"--model.path={micro_model_dir}", "--model.build=null", "--sft.enabled=false",
           f"--train.output_dir={out}", "--train.steps=3", "--train.save_every=1",
           "--envs=[{name: calculator, reward: 'tests.train_helpers:token_sum_reward'}, "
           "{name: lookup, reward: 'tests.train_helpers:token_sum_reward'}]",
           "--rollout.tasks_per_step=4", "--rollout.group_size=4", "--rollout.max_new_tokens=8",
           "--rollout.max_turns=2", "--eval.limit=4", "--algo.lr=0.05"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in logged if "rollout/episodes" in m]
    assert [m["step"] for m in steps] == [1, 2, 3]
    assert all(m["rollout/episodes"] == 16 for m in steps)  # both ranks' episodes were gathered
    assert all(m["sync/param_gap"] == 0.0 for m in steps)
    assert any(m.get("train/n_tokens", 0) > 0 for m in steps)  # there were real updates to keep in sync
    last = out / "checkpoints" / "step_3"
    assert (last / "rng_0.pt").exists() and (last / "rng_1.pt").exists()  # two ranks really ran
    assert "held-out success after RL" in proc.stdout
