"""The README's environment example runs as written and its oracle solves its tasks."""

from __future__ import annotations

import re
from pathlib import Path

from agentrl.rollout.traces import oracle_conversation


def test_readme_environment_example_works():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "ToolEnvironment" in block)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    env = namespace["EchoEnv"]()
    assert [t["function"]["name"] for t in env.tools()] == ["say"]
    tasks = env.tasks("test", 5)
    assert all(oracle_conversation(namespace["EchoEnv"](), task).success for task in tasks)
