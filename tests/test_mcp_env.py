"""An MCP server's tools as an environment, against a real server process (tests/mcp_servers/kv_server.py).

Each environment instance starts its own server (about 1 s here), so the tests share instances where they can.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mcp.types import CallToolResult, EmbeddedResource, ImageContent, TextContent, TextResourceContents
from mcp.types import Tool as MCPTool

from agentrl.envs import ToolError, tool
from agentrl.envs.client import RemoteEnvironment
from agentrl.envs.mcp_env import MCPEnvironment, StdioServerParameters, openai_spec, result_text
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.policy.base import SamplingParams
from agentrl.policy.scripted import ScriptedPolicy, tool_call_text
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episode
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import Task, ToolCall

KV_SERVER = Path(__file__).parent / "mcp_servers" / "kv_server.py"


class KVEnv(MCPEnvironment):
    """Store the task's value under its key with the server's put, then call done."""

    name, version = "mcp-kv", "mcp-kv-v1"
    system_prompt = "Store the value under the key with put, then call done."
    server = StdioServerParameters(command=sys.executable, args=[str(KV_SERVER)])
    call_timeout = 10.0

    @tool
    def done(self) -> str:
        """Finish; the store is checked against the task."""
        try:
            stored = self.call_server("get", {"key": self.task.data["key"]})
        except ToolError:
            stored = None
        correct = stored == self.task.data["value"]
        self.finish(reward=float(correct), success=correct)
        return "Checked."

    def make_task(self, rng, split, index):
        key, value = f"{split}-{index}", str(rng.randrange(10**6))
        return Task(self.name, split, index, f"Store {value} under the key {key!r}.", {"key": key, "value": value},
                    self.version)

    def oracle(self, task):
        return [ToolCall("put", {"key": task.data["key"], "value": task.data["value"]}), ToolCall("done", {})]


def gone(pid: int) -> bool:
    """True once the process has exited and been reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_tools_calls_and_bad_calls_against_a_real_server():
    env = KVEnv()
    tools = {t["function"]["name"]: t["function"] for t in env.tools()}
    assert list(tools) == ["done", "put", "get", "crash", "nap", "pid"]  # local tools first, then the server's
    assert tools["put"]["description"] == "Store a value under a key."
    assert tools["put"]["parameters"]["required"] == ["key", "value"]
    assert {name: p["type"] for name, p in tools["put"]["parameters"]["properties"].items()} == \
        {"key": "string", "value": "string"}
    assert tools["nap"]["parameters"]["properties"]["seconds"]["type"] == "number"

    task = env.task_at("test", 0)
    env.reset(task)
    assert env.step(ToolCall("put", {"key": "a", "value": "1"})).observation == "stored"
    assert env.step(ToolCall("get", {"key": "a"})).observation == "1"
    errors = {  # call -> observation; none ends the episode or raises
        ("get", (("key", "zz"),)): "Error: Error executing tool get: no key 'zz'",  # ToolError in the server
        ("crash", ()): "Error: Error executing tool crash",  # an unexpected exception in the server
        ("get", (("key", 3),)): "Error: get: argument 'key' must be string, got 3",  # checked here
        ("put", (("key", "a"),)): "Error: put is missing required argument(s) ['value']",
        ("get", (("key", "a"), ("default", "x"))): "Error: get got unknown argument(s) ['default']; it takes ['key']",
        ("nope", ()): "Error: unknown tool 'nope'; available tools: ['crash', 'done', 'get', 'nap', 'pid', 'put']",
    }
    for (name, arguments), observation in errors.items():
        result = env.step(ToolCall(name, dict(arguments)))
        assert (result.observation, result.done, result.info) == \
            (observation, False, {"tool_error": observation.removeprefix("Error: ")})
    env.call_timeout = 0.4
    started = time.monotonic()
    assert env.step(ToolCall("nap", {"seconds": 1.2})).observation == "Error: tool 'nap' did not finish within 0.4 s"
    assert time.monotonic() - started < 1.1
    env.call_timeout = KVEnv.call_timeout
    assert env.step(ToolCall("get", {"key": "a"})).observation == "1"  # the connection is still good
    final = [env.step(call) for call in env.oracle(task)][-1]
    assert final.done and final.reward == 1.0 and final.info == {"tool_errors": 7, "tool_calls": 12, "success": True}
    # Another episode on the same instance keeps the server and its store (the rollout engine uses a fresh one).
    env.reset(task)
    wrong = [env.step(ToolCall("put", {"key": task.data["key"], "value": "nope"})), env.step(ToolCall("done", {}))]
    assert wrong[-1].done and wrong[-1].reward == 0.0 and not wrong[-1].info["success"]

    pid = int(env.call_server("pid", {}))
    started = time.monotonic()
    env.close()
    assert gone(pid) and time.monotonic() - started < 5.0  # the server was still napping: up to 2 s to exit
    env.close()  # twice is fine


def test_oracle_episode_through_run_episode(tokenizer):
    env = KVEnv()
    task = env.task_at("test", 1)
    policy = ScriptedPolicy(tokenizer, [tool_call_text(call) for call in env.oracle(task)])
    traj = asyncio.run(run_episode(policy, env, task, ChatFormat(tokenizer), SamplingParams(max_new_tokens=64),
                                   EpisodeLimits(max_turns=4)))
    assert traj.status == "ok" and traj.reward == 1.0 and traj.success, traj.error
    assert [m["content"] for m in traj.messages if m["role"] == "tool"] == ["stored", "Checked."]
    assert [t["function"]["name"] for t in traj.tools] == ["done", "put", "get", "crash", "nap", "pid"]


def test_a_dead_server_is_an_env_error_and_close_returns(tokenizer):
    env = KVEnv()
    task = env.task_at("test", 2)
    env.tools()  # connects; run_episode's reset() keeps this connection
    pid = int(env.call_server("pid", {}))

    class KillingPolicy(ScriptedPolicy):
        """Kills the server just before its second turn."""

        async def generate(self, prompt_ids, sampling):
            if self.requests:
                os.kill(pid, signal.SIGKILL)
                for _ in range(500):  # until the client's event loop has reaped it
                    if gone(pid):
                        break
                    await asyncio.sleep(0.01)
            return await super().generate(prompt_ids, sampling)

    policy = KillingPolicy(tokenizer, [tool_call_text(call) for call in env.oracle(task)])
    started = time.monotonic()
    traj = asyncio.run(run_episode(policy, env, task, ChatFormat(tokenizer), SamplingParams(max_new_tokens=64)))
    assert traj.status == "env_error" and not traj.scored
    assert "ConnectionError" in traj.error and "is gone" in traj.error, traj.error
    assert time.monotonic() - started < 5.0  # including run_episode's close()
    with pytest.raises(RuntimeError, match="no MCP connection"):
        env.step(ToolCall("put", {"key": "a", "value": "b"}))


def test_a_server_that_does_not_start_or_answer_raises():
    class Silent(KVEnv):  # reads its stdin and never answers
        server = StdioServerParameters(command=sys.executable, args=["-c", "import sys; sys.stdin.read()"])
        connect_timeout = 0.5

    class Missing(KVEnv):
        server = StdioServerParameters(command="/no/such/mcp-server")

    started = time.monotonic()
    with pytest.raises(TimeoutError, match="did not connect within 0.5 s"):
        Silent().tools()
    assert time.monotonic() - started < 3.0  # and it was stopped: its stdin closed, it exited
    with pytest.raises(FileNotFoundError):
        Missing().reset(Missing().task_at("test", 0))


def test_served_through_the_env_server_by_import_path():
    factories = env_factories([("tests.test_mcp_env:KVEnv", {})])
    service = EnvService(factories, threads=2)  # its prototype lists the tools: one server for the service
    try:
        with serve_in_thread(service) as url:
            remote = RemoteEnvironment(url, "mcp-kv")
            assert [t["function"]["name"] for t in remote.tools()] == ["done", "put", "get", "crash", "nap", "pid"]
            task = remote.task_at("test", 3)
            assert task == KVEnv().task_at("test", 3)
            session = remote.clone()
            session.reset(task)  # a session: its own server
            assert session.step(ToolCall("get", {"key": 3})).observation == \
                "Error: get: argument 'key' must be string, got 3"
            assert session.step(ToolCall("get", {"key": "x"})).observation == \
                "Error: Error executing tool get: no key 'x'"
            final = [session.step(call) for call in remote.oracle(task)][-1]
            assert final.done and final.reward == 1.0 and final.info["success"]
            session.close()
    finally:
        service.prototypes["mcp-kv"].close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow  # about 2-3 s: one more server start, polled until it listens
def test_streamable_http_server():
    """The same environment over a streamable-HTTP server that runs on its own; its death is a ConnectionError."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(KV_SERVER), "--http", str(port)], stderr=subprocess.DEVNULL)
    try:
        class HTTPKVEnv(KVEnv):
            server = f"http://127.0.0.1:{port}/mcp"

        deadline = time.monotonic() + 30
        while True:  # until the server listens
            env = HTTPKVEnv()
            try:
                env.tools()
                break
            except Exception:  # not listening yet: connection refused (inside an ExceptionGroup)
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        task = env.task_at("test", 4)
        assert oracle_conversation(env, task).success
        env.reset(task)
        proc.kill()
        proc.wait()
        with pytest.raises(ConnectionError, match="is gone"):
            env.step(ToolCall("get", {"key": "a"}))
        env.close()
    finally:
        proc.kill()
        proc.wait()


# --- converting MCP listings and results (no server) ---------------------------------------------------
def test_listing_and_result_conversion():
    listed = MCPTool(name="f", input_schema={"type": "object", "properties": {"x": {"type": "string"}}})
    assert openai_spec(listed) == {"type": "function", "function": {
        "name": "f", "description": "", "parameters": {"type": "object", "properties": {"x": {"type": "string"}}}}}
    with pytest.raises(ValueError, match="'f': its input schema must have \"type\": \"object\""):
        openai_spec(MCPTool(name="f", input_schema={"type": "string"}))
    result = CallToolResult(content=[
        TextContent(text="first"), ImageContent(data="AAAA", mime_type="image/png"),
        EmbeddedResource(resource=TextResourceContents(uri="file:///a.txt", text="inside")), TextContent(text="last")])
    assert result_text(result) == "first\n[image (image/png) not shown]\ninside\nlast"
    assert result_text(CallToolResult(content=[], structured_content={"n": 1})) == '{"n": 1}'
    assert result_text(CallToolResult(content=[])) == ""
