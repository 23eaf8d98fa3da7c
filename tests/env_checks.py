"""Checks every environment's tests make: the oracle solves its tasks, tasks are independent of the process,
served == in-process, and what a tiny model must copy is a single token it was shown."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

from agentrl.envs import make_env
from agentrl.envs.client import RemoteEnvironment
from agentrl.policy.scripted import tool_call_text
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import StepResult, Task, ToolCall

ROOT = Path(__file__).resolve().parents[1]

def play(env, task: Task, calls: Iterable[ToolCall]) -> list[StepResult]:
    """Reset ``env`` to ``task`` and make ``calls`` in order."""
    env.reset(task)
    return [env.step(call) for call in calls]


def assert_oracle_solves(env, tasks: Iterable[Task], full: float = 1.0) -> list[list[StepResult]]:
    """Each task's oracle episode ends on its last call with reward ``full`` and success, and no call errs.
    Returns every episode's step results."""
    episodes = []
    for task in tasks:
        results = play(env, task, env.oracle(task))
        assert [r.done for r in results] == [False] * (len(results) - 1) + [True], task.id
        assert results[-1].reward == full and env.info["success"], task.id
        assert env.info["tool_errors"] == 0 and not any(r.observation.startswith("Error") for r in results), task.id
        episodes.append(results)
    return episodes


def assert_copied_words_are_shown_tokens(tokenizer, env, tasks: Iterable[Task], vocabulary: set[str],
                                         every_word: bool = False) -> list[int]:
    """What a from-scratch model can copy (docs/learning.md): every vocabulary word in an oracle call's
    arguments is one token whose id already appeared before that call. With ``every_word``, each word of
    the arguments must be a vocabulary word. Returns the prompt length of each oracle conversation."""
    chat = ChatFormat(tokenizer)
    lengths = []
    for task in tasks:
        conversation = oracle_conversation(env, task)
        lengths.append(len(chat.prompt_ids(conversation.messages, conversation.tools)))
        for i, message in enumerate(conversation.messages):
            if message["role"] != "assistant":
                continue
            shown = chat.prompt_ids(conversation.messages[:i], conversation.tools)
            call = message["tool_calls"][0]["function"]
            ids = chat.encode(tool_call_text(ToolCall(call["name"], call["arguments"])))
            for word in re.findall(r"\w+", " ".join(map(str, call["arguments"].values()))):
                if every_word:
                    assert word in vocabulary, (task.prompt, word)
                elif word not in vocabulary:
                    continue
                token = [t for t in ids if tokenizer.decode([t]).strip() == word]
                assert token and token[0] in shown, (task.prompt, word)
    return lengths


_TASKS_SCRIPT = """
import json, sys, warnings
from dataclasses import asdict
from agentrl.envs import make_env
warnings.simplefilter("ignore")
path, settings, n = json.loads(sys.argv[1])
print(json.dumps([asdict(t) for kwargs in settings for t in make_env(path, **kwargs).tasks("test", n)]))
"""


def assert_tasks_identical_across_processes(path: str, settings: list[dict[str, Any]], n: int) -> None:
    """The first ``n`` test tasks of ``path`` under each kwargs setting equal those a subprocess builds with
    another ``PYTHONHASHSEED``: this catches any dependence on salted ``hash()`` or set order. Kwargs go
    through JSON on both sides, as a recipe's YAML gives them."""
    settings = json.loads(json.dumps(settings))
    out = subprocess.run([sys.executable, "-c", _TASKS_SCRIPT, json.dumps([path, settings, n])], cwd=ROOT,
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "12345"}).stdout
    here = [asdict(t) for kwargs in settings for t in make_env(path, **kwargs).tasks("test", n)]
    assert json.loads(out) == json.loads(json.dumps(here))


def assert_served_like_in_process(url: str, name: str, make_local: Callable[[], Any], tasks: Iterable[Task],
                                  bad_calls: list[ToolCall], after_calls: list[ToolCall] = (),
                                  conversations: bool = True, n_listed: int = 5,
                                  check: Callable[[Any], None] | None = None) -> None:
    """The environment served as ``name`` at ``url`` behaves exactly like ``make_local()``: same version, tools,
    tasks and oracle; for each task the same oracle conversation (when ``conversations``) and the same result
    for every call of ``bad_calls``, the oracle's calls, then ``after_calls``. ``check`` sees the local
    environment after the calls, before it is closed."""
    remote, local = RemoteEnvironment(url, name), make_local()
    assert remote.task_version == local.task_version and remote.tools() == local.tools()
    assert remote.tasks("test", n_listed) == local.tasks("test", n_listed)
    for task in tasks:
        assert remote.oracle(task) == local.oracle(task)
        if conversations:
            assert oracle_conversation(remote.clone(), task) == oracle_conversation(make_local(), task)
        remote_env, local_env = remote.clone(), make_local()
        try:
            assert remote_env.reset(task) == local_env.reset(task)
            for call in [*bad_calls, *local.oracle(task), *after_calls]:
                assert remote_env.step(call) == local_env.step(call), call
            if check is not None:
                check(local_env)
        finally:
            remote_env.close()
            local_env.close()
        assert remote_env.session_id is None
