"""Checks every environment's tests make: tasks independent of the process, and served == in-process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Callable, Iterable

from agentrl.envs import make_env
from agentrl.envs.client import RemoteEnvironment
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import Task, ToolCall

ROOT = Path(__file__).resolve().parents[1]

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
