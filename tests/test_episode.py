"""The multi-turn loop: token-faithfulness, loss masks, malformed calls, limits and failures."""

from __future__ import annotations

import asyncio

import pytest
import torch
from transformers import AutoModelForCausalLM

from agentrl.envs import ToolEnvironment, make_env, tool
from agentrl.policy.base import SamplingParams
from agentrl.policy.hf import HFPolicy
from agentrl.policy.scripted import ScriptedPolicy, tool_call_text
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episode, run_episodes
from agentrl.types import Task, ToolCall


def play(policy, env, task, tokenizer, **limits):
    return asyncio.run(run_episode(policy, env, task, ChatFormat(tokenizer), SamplingParams(max_new_tokens=64),
                                   EpisodeLimits(**limits)))


def oracle_replies(env_name: str, index: int = 0):
    env = make_env(env_name)
    task = env.task_at("test", index)
    return task, [tool_call_text(call) for call in env.oracle(task)]


@pytest.mark.parametrize("env_name", ["calculator", "lookup"])
def test_oracle_replay_is_token_faithful(tokenizer, env_name):
    task, replies = oracle_replies(env_name)
    policy = ScriptedPolicy(tokenizer, replies)
    traj = play(policy, make_env(env_name), task, tokenizer)
    assert traj.status == "ok" and traj.success, traj.error
    assert len(traj.turns) == len(policy.requests) == len(replies)
    for turn, (prompt, reply) in zip(traj.turns, policy.requests):
        assert turn.prompt_ids == prompt and turn.completion_ids == reply
    ids, mask, _ = traj.token_view()
    # trained positions are exactly the sampled ids, in order; everything else is prompt or env output
    assert [i for i, m in zip(ids, mask) if m] == [t for turn in traj.turns for t in turn.completion_ids]
    # the recorded tokens spell the same conversation the chat template renders (no drift)
    chat = ChatFormat(tokenizer)
    rendered = chat.render(traj.messages[:-1], traj.tools, generation_prompt=False)
    decoded = tokenizer.decode(ids, skip_special_tokens=False)
    assert rendered.startswith(decoded) and rendered[len(decoded):] == "\n"


def test_env_tokens_are_masked(tokenizer):
    task, replies = oracle_replies("lookup")
    traj = play(ScriptedPolicy(tokenizer, replies), make_env("lookup"), task, tokenizer)
    ids, mask, _ = traj.token_view()
    first = traj.turns[0]
    start = len(first.prompt_ids) + len(first.completion_ids)
    observation = ids[start:start + len(first.observation_ids)]
    assert observation == first.observation_ids and first.observation_ids
    assert all(m == 0 for m in mask[start:start + len(first.observation_ids)])
    assert "<tool_response>" in tokenizer.decode(observation)


def test_malformed_call_becomes_error_observation_and_episode_goes_on(tokenizer):
    task, replies = oracle_replies("calculator")
    bad = ['<tool_call>{"name": "calculate", "arguments": {"expression": </tool_call>',
           '<tool_call>\n{"name": "sqrt", "arguments": {"x": 4}}\n</tool_call>',
           '<tool_call>\n{"name": "answer", "arguments": {"value": "many"}}\n</tool_call>']
    policy = ScriptedPolicy(tokenizer, bad + replies)
    traj = play(policy, make_env("calculator"), task, tokenizer, max_turns=8)
    assert traj.status == "ok" and traj.success
    errors = [m["content"] for m in traj.messages if m["role"] == "tool" and m["content"].startswith("Error")]
    assert len(errors) == 3 and traj.info["tool_errors"] == 3
    assert "not valid JSON" in errors[0] and "unknown tool 'sqrt'" in errors[1] and "'value'" in errors[2]
    assert "Error: tool call is not valid JSON" in tokenizer.decode(policy.requests[1][0])


def test_limits_end_episodes_as_truncated(tokenizer):
    task, replies = oracle_replies("lookup")
    loop = [tool_call_text(ToolCall("get", {"key": task.data["start"] if "start" in task.data else "x"}))] * 3
    assert play(ScriptedPolicy(tokenizer, loop), make_env("lookup"), task, tokenizer, max_turns=3).status \
        == "truncated"
    cut = play(ScriptedPolicy(tokenizer, replies, finish=False), make_env("lookup"), task, tokenizer)
    assert cut.status == "truncated" and "eos" in cut.error
    short = play(ScriptedPolicy(tokenizer, replies), make_env("lookup"), task, tokenizer, max_total_tokens=10)
    assert short.status == "truncated" and short.turns == []


def test_plain_text_reply_ends_with_zero_reward(tokenizer):
    task, _ = oracle_replies("calculator")
    traj = play(ScriptedPolicy(tokenizer, ["I do not know."]), make_env("calculator"), task, tokenizer)
    assert traj.status == "ok" and traj.reward == 0.0 and not traj.success and len(traj.turns) == 1


class Exploding(ToolEnvironment):
    name, version, system_prompt = "exploding", "exploding-v1", "Call boom."

    @tool
    def boom(self) -> str:
        """Fail like a crashed backend."""
        raise ConnectionError("sandbox died")


def test_env_exception_is_env_error_not_crash(tokenizer):
    task = Task("exploding", "test", 0, "go", {}, "exploding-v1")
    traj = play(ScriptedPolicy(tokenizer, ['<tool_call>{"name": "boom", "arguments": {}}</tool_call>']),
                Exploding(), task, tokenizer)
    assert traj.status == "env_error" and "ConnectionError: sandbox died" in traj.error
    assert not traj.scored and traj.reward == 0.0


def test_policy_exception_is_policy_error(tokenizer):
    task, _ = oracle_replies("calculator")
    traj = play(ScriptedPolicy(tokenizer, []), make_env("calculator"), task, tokenizer)
    assert traj.status == "policy_error" and "ran out of replies" in traj.error


class Recording:
    """Wrap a policy and keep every generation it returns."""

    def __init__(self, inner):
        self.inner, self.version, self.generations = inner, inner.version, []

    async def generate(self, prompt_ids, sampling):
        gen = await self.inner.generate(prompt_ids, sampling)
        self.generations.append((list(prompt_ids), gen))
        return gen


def test_hf_policy_trajectories_match_sampled_ids_and_logprobs(micro_model_dir, tokenizer):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(micro_model_dir)
    hf = HFPolicy(model, tokenizer.eos_token_id, tokenizer.pad_token_id)
    policy = Recording(hf)
    env = make_env("calculator")
    tasks = env.tasks("test", 3) * 2
    trajs = asyncio.run(run_episodes(policy, lambda name: make_env(name), tasks, list(range(6)),
                                     ChatFormat(tokenizer), SamplingParams(max_new_tokens=12, temperature=1.0),
                                     EpisodeLimits(max_turns=2)))
    sampled = {(tuple(p), tuple(g.ids)) for p, g in policy.generations}
    turns = [turn for traj in trajs for turn in traj.turns]
    assert len(turns) == len(policy.generations) >= 6
    assert all((tuple(t.prompt_ids), tuple(t.completion_ids)) in sampled for t in turns)
    assert hf.generate_calls < len(turns)  # concurrent episodes shared batched generate calls
    # behaviour logprobs line up with a teacher-forced forward pass over the recorded tokens
    for traj in trajs:
        ids, mask, behaviour = traj.token_view()
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
        recomputed = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
        trained = torch.tensor(mask[1:], dtype=torch.bool)
        assert torch.allclose(recomputed[trained], torch.tensor(behaviour[1:])[trained], atol=1e-3)


def test_blocking_environments_step_in_threads_so_episodes_overlap(tokenizer):
    """Two episodes whose one tool call takes 0.4 s: with ``blocking = True`` they wait side by side."""
    import threading
    import time

    class Slow(ToolEnvironment):
        name, version, system_prompt = "slow", "slow-v1", "Wait."
        blocking = True
        threads: set = set()

        @tool
        def wait(self) -> str:
            """Wait a while; ends the episode."""
            Slow.threads.add(threading.current_thread().name)
            time.sleep(0.4)
            self.finish(reward=1.0, success=True)
            return "done"

    task = Task("slow", "test", 0, "Wait.", {}, "slow-v1")
    policy = ScriptedPolicy(tokenizer, [tool_call_text(ToolCall("wait", {}))] * 2)
    start = time.perf_counter()
    trajs = asyncio.run(run_episodes(policy, lambda name: Slow(), [task, task], [0, 1], ChatFormat(tokenizer),
                                     SamplingParams(max_new_tokens=64), EpisodeLimits(max_turns=2)))
    elapsed = time.perf_counter() - start
    assert [t.success for t in trajs] == [True, True]
    assert elapsed < 0.75, elapsed  # inline, the two calls would take 0.8 s one after the other
    assert all(name.startswith("agentrl-env") for name in Slow.threads)
