"""The environment examples in the README and docs/environments.md run as written and their oracles solve their
tasks."""

from __future__ import annotations

import re
from pathlib import Path

from agentrl.rollout.traces import oracle_conversation

ROOT = Path(__file__).parents[1]


def test_readme_environment_example_works():
    readme = (ROOT / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", readme, re.DOTALL) if "ToolEnvironment" in block)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    env = namespace["EchoEnv"]()
    assert [t["function"]["name"] for t in env.tools()] == ["say"]
    tasks = env.tasks("test", 5)
    assert all(oracle_conversation(namespace["EchoEnv"](), task).success for task in tasks)


def test_environments_doc_examples_work(monkeypatch):
    monkeypatch.chdir(ROOT)  # the MCP example starts the repository's test server by a relative path
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "environments.md").read_text(), re.DOTALL)
    examples = {}
    for block in blocks:
        if "ToolEnvironment" in block or "MCPEnvironment" in block:
            namespace: dict = {}
            exec(compile(block, "docs/environments.md", "exec"), namespace)
            examples.update({name: namespace[name] for name in ("SumEnv", "ShopEnv", "KVEnv") if name in namespace})
    assert sorted(examples) == ["KVEnv", "ShopEnv", "SumEnv"]
    for name, n in [("SumEnv", 3), ("ShopEnv", 3), ("KVEnv", 1)]:  # each KVEnv episode starts a server
        env = examples[name]()
        for task in env.tasks("test", n):
            conversation = oracle_conversation(examples[name](), task)
            assert conversation.success and conversation.reward == 1.0, (name, task.id)
    # The server excerpt is the real server, abridged.
    excerpt = next(block for block in blocks if block.startswith("server = MCPServer("))
    server_lines = (ROOT / "tests" / "mcp_servers" / "kv_server.py").read_text().splitlines()
    assert [line for line in excerpt.splitlines() if line.strip() and line not in server_lines] == []


def test_the_add_an_environment_guide_runs_as_written():
    """The guide's environment and its tests, executed in order; its oracle solves the whole test split."""
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "docs" / "adding-an-environment.md").read_text(), re.DOTALL)
    assert len(blocks) == 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/adding-an-environment.md", "exec"), namespace)
    env_class = namespace["PantryEnv"]
    assert [t["function"]["name"] for t in env_class().tools()] == ["answer", "look", "shelves"]
    namespace["test_the_oracle_solves_the_test_split"]()
    namespace["test_a_wrong_answer_and_a_bad_call"]()
    code_lines = len([line for line in blocks[0].splitlines() if line.strip()])
    assert code_lines <= 100  # the guide promises the smallest complete example
