"""run_episode: the multi-turn loop between a policy and an environment, recorded token-faithfully."""

from __future__ import annotations

import asyncio
import functools
import traceback
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any, Callable

from agentrl.envs.base import Environment
from agentrl.policy.base import Policy, SamplingParams
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.toolcalls import parse_completion
from agentrl.types import Message, Task, Trajectory, Turn


@dataclass(frozen=True)
class EpisodeLimits:
    """Limits that end an episode as ``truncated``."""

    max_turns: int = 6
    max_total_tokens: int = 1024


ENV_THREADS = 64  # threads for the calls of blocking environments (browsers, sandboxes, remote services)


@functools.lru_cache(maxsize=1)
def _env_executor() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=ENV_THREADS, thread_name_prefix="agentrl-env")


async def env_call(env: Environment, method: Callable[..., Any], *args: Any) -> Any:
    """Call an environment method. An environment whose class sets ``blocking = True`` (its calls wait on a
    browser, a subprocess or the network) is called in a worker thread, so the other episodes and the policy's
    batching go on meanwhile; others are called inline, which keeps a run's batches, and so its samples,
    reproducible."""
    if getattr(env, "blocking", False):
        return await asyncio.get_running_loop().run_in_executor(_env_executor(), functools.partial(method, *args))
    return method(*args)


class _PolicyFailure(Exception):
    """The policy backend failed; the episode is recorded as ``policy_error``."""


def _error_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return f"{type(exc).__name__}: {exc}{where}"


async def run_episode(policy: Policy, env: Environment, task: Task, chat: ChatFormat,
                      sampling: SamplingParams, limits: EpisodeLimits = EpisodeLimits(),
                      group_id: int = 0) -> Trajectory:
    """Play one episode and return its trajectory; never raises for env or policy failures.

    Each turn the policy gets the exact ids of everything so far; its sampled ids are kept as they are and
    the environment's reply is tokenised and appended (loss-masked). The episode ends when the env says
    done, the model answers without a tool call, or a limit is hit (``truncated``). An exception from the
    env ends it as ``env_error``; one from the policy as ``policy_error`` (both excluded from training).

    Example:
        >>> traj = asyncio.run(run_episode(policy, env, task, ChatFormat(tok), SamplingParams()))  # doctest: +SKIP
    """
    traj = Trajectory(task=task, group_id=group_id)
    try:
        await _play(policy, env, task, chat, sampling, limits, traj)
    except _PolicyFailure as exc:
        traj.status, traj.error = "policy_error", _error_text(exc.__cause__ or exc)
    except Exception as exc:  # the episode boundary: an env failure is data, not a crash
        traj.status, traj.error = "env_error", _error_text(exc)
    finally:
        await env_call(env, env.close)
    if not traj.scored:
        traj.reward, traj.success = 0.0, False
    return traj


async def _play(policy: Policy, env: Environment, task: Task, chat: ChatFormat, sampling: SamplingParams,
                limits: EpisodeLimits, traj: Trajectory) -> None:
    traj.messages = list(await env_call(env, env.reset, task))
    traj.tools = await env_call(env, env.tools)
    prompt_ids = chat.prompt_ids(traj.messages, traj.tools)
    for _ in range(limits.max_turns):
        budget = min(sampling.max_new_tokens, limits.max_total_tokens - len(prompt_ids))
        if budget <= 0:
            traj.status, traj.error = "truncated", "token limit reached"
            return
        try:
            gen = await policy.generate(prompt_ids, replace(sampling, max_new_tokens=budget))
        except Exception as exc:
            raise _PolicyFailure() from exc
        turn = Turn(prompt_ids=prompt_ids, completion_ids=gen.ids, logprobs=gen.logprobs, version=gen.version)
        traj.turns.append(turn)
        parsed = parse_completion(chat.decode(gen.ids))
        traj.messages.append(_assistant_message(parsed.content, parsed.calls))
        if not gen.finished:
            traj.status, traj.error = "truncated", "turn ended without eos (token limit)"
            return
        if not parsed.items:
            return  # a plain-text answer ends the episode; the env gave no reward
        tool_messages, done = await _run_tools(env, parsed.items, traj)
        traj.messages += tool_messages
        if done:
            return
        turn.observation_ids = chat.observation_ids(tool_messages)
        prompt_ids = prompt_ids + gen.ids + turn.observation_ids
    traj.status, traj.error = "truncated", f"no result after {limits.max_turns} turns"


def _assistant_message(content: str, calls: list) -> Message:
    message: Message = {"role": "assistant", "content": content}
    if calls:
        message["tool_calls"] = [call.to_message_entry() for call in calls]
    return message


async def _run_tools(env: Environment, items: list, traj: Trajectory) -> tuple[list[Message], bool]:
    """Execute the parsed calls in order; parse errors become error observations."""
    messages: list[Message] = []
    for item in items:
        if isinstance(item, str):
            traj.info["tool_errors"] = traj.info.get("tool_errors", 0) + 1
            messages.append({"role": "tool", "content": f"Error: {item}"})
            continue
        result = await env_call(env, env.step, item)
        if "tool_error" in result.info:
            traj.info["tool_errors"] = traj.info.get("tool_errors", 0) + 1
        messages.append({"role": "tool", "name": item.name, "content": result.observation})
        if result.done:
            traj.reward = float(result.reward if result.reward is not None else 0.0)
            traj.success = bool(result.info.get("success", False))
            return messages, True
    return messages, False


async def run_episodes(policy: Policy, make_env: Callable[[str], Environment], tasks: list[Task],
                       group_ids: list[int], chat: ChatFormat, sampling: SamplingParams,
                       limits: EpisodeLimits = EpisodeLimits()) -> list[Trajectory]:
    """Run many episodes concurrently (one fresh env each); the policy batches their turns."""
    coros = [run_episode(policy, make_env(task.env), task, chat, sampling, limits, group)
             for task, group in zip(tasks, group_ids)]
    return list(await asyncio.gather(*coros))
