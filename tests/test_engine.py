"""The asynchronous rollout engine: admission by staleness, drops, attestation, concurrency limits, failures."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from agentrl.envs import make_env
from agentrl.policy.base import Generation, SamplingParams
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.engine import RolloutEngine, VersionMismatch, check_versions
from agentrl.rollout.episode import EpisodeLimits
from agentrl.types import Task, Trajectory, Turn


class RecordingPolicy:
    """Answers every turn with a plain-text reply (one-turn episodes) after ``delay`` seconds (``slow_delay``
    for the first ``slow_calls`` calls); records each call's time and version and how many ran together.
    A sample attests the version live when its request started, or ``attest(version)`` when given."""

    def __init__(self, eos_id: int, delay: float = 0.01, slow_calls: int = 0, slow_delay: float = 0.0,
                 attest=None) -> None:
        self.eos_id, self.delay, self.slow_calls, self.slow_delay, self.attest = eos_id, delay, slow_calls, \
            slow_delay, attest
        self.version = 0
        self.calls: list[tuple[float, int]] = []  # (monotonic time, version)
        self.running = self.most_running = 0

    async def generate(self, prompt_ids, sampling):
        version = self.version
        self.running += 1
        self.most_running = max(self.most_running, self.running)
        try:
            self.calls.append((time.monotonic(), version))
            await asyncio.sleep(self.slow_delay if len(self.calls) <= self.slow_calls else self.delay)
        finally:
            self.running -= 1
        attested = version if self.attest is None else self.attest(version)
        return Generation(ids=[5, self.eos_id], logprobs=[-1.0, -0.5], version=attested, finished=True)

    async def load_adapter(self, path, version):
        self.version = version


def make_engine(tokenizer, policy, max_staleness=0, max_inflight=64, group_size=2, per_step=2, plan=None):
    env_proto = make_env("calculator")

    def planner(step):
        return [(step * per_step + j, env_proto.task_at("train", step * per_step + j)) for j in range(per_step)]

    def finish(trajs):
        for t in trajs:
            t.reward = float(t.group_id % 2)

    return RolloutEngine(policy, make_env, plan or planner, finish, ChatFormat(tokenizer),
                         SamplingParams(max_new_tokens=8), EpisodeLimits(2, 512), group_size, max_staleness,
                         max_inflight).start()


def train_steps(engine, policy, steps, per_step=2, update_seconds=0.3, publish_early=False):
    """Play the trainer: take a step's groups, 'update' for a while, publish the next version."""
    batches, updates = [], []
    engine.publish(0)
    for step in range(steps):
        batches.append(engine.take(per_step, version=step))
        begin = time.monotonic()
        time.sleep(update_seconds)
        updates.append((begin, time.monotonic()))
        engine.run(policy.load_adapter(None, step + 1))
        engine.publish(step + 1)
    return batches, updates


def test_zero_staleness_is_synchronous(tokenizer):
    """k = 0: nothing is sampled while the trainer updates, and every sample is from the current version."""
    policy = RecordingPolicy(tokenizer.eos_token_id)
    engine = make_engine(tokenizer, policy, max_staleness=0)
    try:
        batches, updates = train_steps(engine, policy, steps=3)
    finally:
        engine.close()
    for step, batch in enumerate(batches):
        assert len(batch.groups) == 2 and batch.dropped == 0 and batch.staleness == [0, 0]
        assert {turn.version for t in batch.trajectories for turn in t.turns} == {step}
        assert [g.step for g in batch.groups] == [step, step]
        assert all(t.reward == t.group_id % 2 for t in batch.trajectories)  # finish() ran on each group
    for begin, end in updates:
        assert not [t for t, _ in policy.calls if begin <= t <= end]


def test_staleness_one_samples_the_next_step_during_the_update(tokenizer):
    """k = 1: the next step's groups are generated while the trainer updates; none is more than 1 behind."""
    policy = RecordingPolicy(tokenizer.eos_token_id)
    engine = make_engine(tokenizer, policy, max_staleness=1)
    try:
        batches, updates = train_steps(engine, policy, steps=4)
    finally:
        engine.close()
    overlapped = [t for t, _ in policy.calls for begin, end in updates if begin <= t <= end]
    assert overlapped, "no sampling happened during an update"
    staleness = [s for b in batches for s in b.staleness]
    assert max(staleness) == 1 and min(staleness) == 0
    assert sum(b.dropped for b in batches) == 0


def test_a_group_that_falls_too_far_behind_is_dropped_and_counted(tokenizer):
    """Group 0's episodes take 1 s while steps take 0.5 s: it finishes two versions late and k = 1 drops it."""
    policy = RecordingPolicy(tokenizer.eos_token_id, slow_calls=2, slow_delay=1.0)  # group 0 starts first
    engine = make_engine(tokenizer, policy, max_staleness=1)
    try:
        batches, _ = train_steps(engine, policy, steps=5, update_seconds=0.5)
    finally:
        engine.close()
    assert sum(b.dropped for b in batches) == 1 and engine.dropped_total == 1
    assert 0 not in [g.group_id for b in batches for g in b.groups]
    assert all(s <= 1 for b in batches for s in b.staleness)


def test_a_sample_from_an_unpublished_version_is_an_error(tokenizer):
    """The server keeps serving version 0 after version 1 was published: the trainer refuses the samples."""
    policy = RecordingPolicy(tokenizer.eos_token_id, attest=lambda v: 0)
    engine = make_engine(tokenizer, policy, max_staleness=0)
    try:
        with pytest.raises(VersionMismatch, match=r"adapter version\(s\) \[0\], expected 1"):
            train_steps(engine, policy, steps=2)
    finally:
        engine.close()


def test_a_version_newer_than_the_trainer_is_an_error():
    traj = Trajectory(Task("lookup", "train", 0, "p", {}, "v"), 0, turns=[Turn([1], [2], [0.0], version=5)])
    check_versions([traj], expected=5, oldest=3)
    with pytest.raises(VersionMismatch, match=r"expected 3..4"):
        check_versions([traj], expected=4, oldest=3)


def test_inflight_episodes_stay_within_the_limit(tokenizer):
    policy = RecordingPolicy(tokenizer.eos_token_id)
    engine = make_engine(tokenizer, policy, max_staleness=2, max_inflight=4, group_size=2, per_step=4)
    try:
        train_steps(engine, policy, steps=3, per_step=4, update_seconds=0.05)
    finally:
        engine.close()
    assert policy.most_running == 4  # the limit was reached and never passed


def test_an_engine_failure_reaches_the_trainer(tokenizer):
    def broken_plan(step):
        raise ValueError("no tasks left")

    engine = make_engine(tokenizer, RecordingPolicy(tokenizer.eos_token_id), plan=broken_plan)
    try:
        engine.publish(0)
        with pytest.raises(RuntimeError, match="no tasks left"):
            engine.take(1, version=0, poll=0.05)
    finally:
        engine.close()


def test_resume_step_points_at_the_oldest_group_not_taken(tokenizer):
    """A checkpoint re-draws the groups in flight: resume_step is the oldest step with groups not taken."""
    policy = RecordingPolicy(tokenizer.eos_token_id)
    engine = make_engine(tokenizer, policy, max_staleness=1)
    try:
        engine.publish(0)
        engine.take(2, version=0)
        deadline = time.monotonic() + 5
        while engine.next_step < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert engine.next_step == 2  # steps 0 and 1 admitted (k = 1), step 0 taken
        assert engine.resume_step() == 1
        engine.take(2, version=1)
        assert engine.resume_step() == 2
    finally:
        engine.close()


def test_close_cancels_groups_in_flight_without_hanging(tokenizer):
    policy = RecordingPolicy(tokenizer.eos_token_id, delay=30.0)
    engine = make_engine(tokenizer, policy, max_staleness=1)
    engine.publish(0)
    while not policy.calls:
        time.sleep(0.01)
    start = time.monotonic()
    engine.close()
    assert time.monotonic() - start < 5
    assert not any(t.name == "rollout-engine" for t in threading.enumerate())


def test_bad_settings_are_refused(tokenizer):
    policy = RecordingPolicy(tokenizer.eos_token_id)
    with pytest.raises(ValueError, match="max_inflight=2 is below group_size=4"):
        RolloutEngine(policy, make_env, lambda s: [], lambda t: None, ChatFormat(tokenizer), SamplingParams(),
                      EpisodeLimits(), group_size=4, max_inflight=2)
    with pytest.raises(ValueError, match="max_staleness"):
        RolloutEngine(policy, make_env, lambda s: [], lambda t: None, ChatFormat(tokenizer), SamplingParams(),
                      EpisodeLimits(), group_size=4, max_staleness=-1)


def test_an_async_hf_policy_serves_a_copy_that_each_sync_refreshes(micro_model_dir, tokenizer, tmp_path):
    import torch
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from agentrl.config import LoRAConfig, load_recipe
    from agentrl.train.loop import make_policy, sync_policy
    from agentrl.train.setup import add_lora

    trained = add_lora(AutoModelForCausalLM.from_pretrained(micro_model_dir), LoRAConfig(r=4, alpha=8))
    accelerator = Accelerator(cpu=True)
    policy, server = make_policy(load_recipe(None, ["--rollout.max_staleness=1"]), trained, tokenizer,
                                 micro_model_dir, accelerator)
    assert server is None and policy.model is not trained
    assert not any(p.requires_grad for p in policy.model.parameters())
    with torch.no_grad():
        for name, p in trained.named_parameters():
            if "lora_B" in name:
                p.add_(0.5)

    def lora_b(model):
        return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_B" in n}

    assert all(not torch.equal(a, b) for a, b in zip(lora_b(trained).values(), lora_b(policy.model).values()))
    sync_policy(policy, trained, accelerator, tmp_path, 1)
    assert policy.version == 1
    served = lora_b(policy.model)
    assert all(torch.equal(served[n], p) for n, p in lora_b(trained).items())


def test_asynchronous_training_runs_with_bounded_staleness(micro_model_dir, tmp_path):
    """max_staleness=1 with the embedded backend: the run completes, the next step's groups were sampled by
    the previous version (staleness 1 logged), nothing older is trained on, importance weights are logged."""
    import json

    from agentrl.config import load_recipe
    from agentrl.train.loop import train

    out = tmp_path / "run"
    recipe = load_recipe(None, [f"--model.path={micro_model_dir}", "--model.build=null", "--sft.enabled=false",
                                f"--train.output_dir={out}", "--train.steps=4", "--train.save_every=2",
                                "--envs=[{name: lookup, reward: 'tests.train_helpers:token_sum_reward'}]",
                                "--rollout.tasks_per_step=2", "--rollout.group_size=4",
                                "--rollout.max_new_tokens=8", "--rollout.max_turns=2", "--rollout.max_staleness=1",
                                "--eval.limit=2"])
    results = train(recipe)
    assert results["tasks"]["lookup"]["n"] + results["tasks"]["lookup"]["infra_errors"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "rollout/staleness_max" in r]
    assert len(steps) == 4
    assert all(r["rollout/staleness_max"] <= 1 for r in steps)
    assert any(r["rollout/staleness_mean"] > 0 for r in steps)  # samples from the previous version were used
    trained = [r for r in steps if "train/is_weight_mean" in r]
    assert trained and all(0 < r["train/is_weight_mean"] <= 2.0 for r in trained)
    assert (out / "checkpoints" / "step_4" / "trainer_state.pt").exists()


def test_generation_threads_apply_to_the_generating_thread_only(micro_model_dir, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM

    from agentrl.policy.hf import HFPolicy

    policy = HFPolicy(AutoModelForCausalLM.from_pretrained(micro_model_dir), tokenizer.eos_token_id,
                      tokenizer.pad_token_id, num_threads=1)
    seen = []
    real = policy._generate_locked

    def spying(prompts, sampling):
        seen.append(torch.get_num_threads())
        return real(prompts, sampling)

    policy._generate_locked = spying
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        asyncio.run(policy.generate([1, 2, 3], SamplingParams(max_new_tokens=2)))
        assert seen == [1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
