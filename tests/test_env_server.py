"""The env service over real HTTP on loopback: every route, remote == in-process, bad input, failures, fuzz."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import quote

import httpx
import pytest

from agentrl.envs import ToolEnvironment, env_factory, make_env, tool
from agentrl.envs.base import TRUNCATION_MARKER
from agentrl.envs.client import EnvServiceError, RemoteEnvironment
from agentrl.cli import main as cli_main
from agentrl.envs.asgi import _well_formed_calls
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import INLINE_STRIKES, EnvService
from agentrl.envs.wire import API_VERSION, task_to_json
from agentrl.policy.base import SamplingParams
from agentrl.policy.scripted import ScriptedPolicy, tool_call_text
from agentrl.rollout.chat import ChatFormat
from agentrl.rollout.episode import EpisodeLimits, run_episode
from agentrl.rollout.toolcalls import parse_call
from agentrl.rollout.traces import oracle_conversation
from agentrl.types import Task, ToolCall

CALL_TIMEOUT = 0.5
MAX_OUTPUT = 5000  # above calculator/lookup's own 2000-character cut, so their results match in-process


class ProbeEnv(ToolEnvironment):
    """Tools that misbehave on purpose: slow, raising, flooding."""

    name, version, system_prompt = "probe", "probe-v1", "Probe the server."
    max_observation_chars = 10**7  # no cut of its own: the server's cut is what is tested

    @tool
    def nap(self, seconds: float) -> str:
        """Sleep.

        Args:
            seconds: how long.
        """
        time.sleep(seconds)
        return "rested"

    @tool
    def explode(self) -> str:
        """Raise."""
        raise RuntimeError("kaboom")

    @tool
    def flood(self, n: int) -> str:
        """Return n characters.

        Args:
            n: how many.
        """
        return "x" * n

    @tool
    def done(self) -> str:
        """End the episode."""
        self.finish(reward=1.0, success=True)
        return "bye"

    def make_task(self, rng, split, index):
        return Task(self.name, split, index, f"Probe {index}.", {"n": index}, self.version)

    def oracle(self, task):
        return [ToolCall("done", {})]


@pytest.fixture(scope="module")
def url():
    factories = {**env_factories([("calculator", {}), ("lookup", {})]), "probe": ProbeEnv}
    service = EnvService(factories, threads=8, call_timeout=CALL_TIMEOUT, max_output_chars=MAX_OUTPUT)
    with serve_in_thread(service) as address:
        yield address


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=10, trust_env=False) as client:
        yield client


def call(name: str, arguments, call_id: str = "call_0") -> dict:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def ok(response: httpx.Response) -> dict:
    body = response.json()
    assert response.status_code == 200, body
    assert body["api_version"] == API_VERSION
    return body


def error(response: httpx.Response, status: int, kind: str) -> dict:
    body = response.json()
    assert response.status_code == status, body
    assert body["api_version"] == API_VERSION and body["error"]["type"] == kind, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    return body["error"]


def open_session(http, env="probe", split="test", index=0) -> str:
    return ok(http.post("/sessions", json={"env": env, "split": split, "index": index}))["session_id"]


# --- routes ---------------------------------------------------------------------------------------
def test_health_envs_and_openapi(http):
    assert ok(http.get("/health")) == {"api_version": API_VERSION, "status": "ok",
                                       "envs": ["calculator", "lookup", "probe"], "sessions": 0}
    described = {d["name"]: d for d in ok(http.get("/envs"))["envs"]}
    for name in ("calculator", "lookup"):
        env = make_env(name)
        assert described[name] == {"name": name, "version": env.version, "task_version": env.task_version,
                                   "splits": env.split_sizes, "tools": env.tools()}
    paths = http.get("/openapi.json").json()["paths"]
    assert set(paths) == {"/health", "/envs", "/envs/{env}/tasks", "/envs/{env}/oracle", "/sessions",
                          "/sessions/{session_id}/step", "/sessions/{session_id}"}


def test_tasks_and_oracle_routes_match_in_process(http):
    env = make_env("lookup")
    tasks = ok(http.get("/envs/lookup/tasks", params={"split": "test", "start": 5, "n": 3}))["tasks"]
    assert tasks == [json.loads(json.dumps(task_to_json(t))) for t in env.tasks("test", 3, start=5)]
    oracle = ok(http.get("/envs/lookup/oracle", params={"split": "test", "index": 5}))
    assert [c["function"] for c in oracle["tool_calls"]] == \
        [{"name": c.name, "arguments": c.arguments} for c in env.oracle(env.task_at("test", 5))]
    end = ok(http.get("/envs/probe/tasks", params={"split": "test", "start": 198, "n": 10}))["tasks"]
    assert [t["index"] for t in end] == [198, 199]  # cut at the end of the split


def test_session_lifecycle(http):
    created = ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": 4}))
    env = make_env("calculator")
    task = env.task_at("test", 4)
    assert created["task"] == task_to_json(task) and created["tools"] == env.tools()
    assert created["messages"] == env.reset(task)
    sid = created["session_id"]
    assert ok(http.get("/health"))["sessions"] == 1
    step = ok(http.post(f"/sessions/{sid}/step", json={"tool_calls": [
        call("calculate", json.dumps({"expression": task.data["expression"]}), "a"),  # OpenAI: a JSON string
        call("answer", {"value": task.data["answer"]}, "b"),
        call("calculate", {"expression": "1"}, "c")]}))  # after the episode ended: not run
    assert step["messages"] == [
        {"role": "tool", "content": str(task.data["answer"]), "name": "calculate", "tool_call_id": "a"},
        {"role": "tool", "content": "Answer recorded.", "name": "answer", "tool_call_id": "b"}]
    assert step["done"] and step["reward"] == 1.0 and step["info"]["success"] is True
    assert [r["done"] for r in step["results"]] == [False, True]
    assert ok(http.delete(f"/sessions/{sid}")) == {"api_version": API_VERSION, "session_id": sid, "closed": True}
    error(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("answer", {"value": 1})]}), 404,
          "unknown_session")
    error(http.delete(f"/sessions/{sid}"), 404, "unknown_session")
    # a seed names a task reproducibly
    first, again = (ok(http.post("/sessions", json={"env": "lookup", "split": "test", "seed": 7})) for _ in range(2))
    assert first["task"] == again["task"] and first["session_id"] != again["session_id"]
    for body in (first, again):
        ok(http.delete(f"/sessions/{body['session_id']}"))


# --- remote == in-process ---------------------------------------------------------------------------
@pytest.mark.parametrize("env_name", ["calculator", "lookup"])
def test_oracle_episodes_through_remote_env_match_in_process(url, env_name):
    remote, local = RemoteEnvironment(url, env_name), make_env(env_name)
    assert remote.tasks("test", 5) == local.tasks("test", 5)
    for task in local.tasks("test", 5):
        assert remote.oracle(task) == local.oracle(task)
        assert oracle_conversation(remote.clone(), task) == oracle_conversation(make_env(env_name), task)
        # step by step, including bad calls and calls after the end
        remote_env, local_env = remote.clone(), make_env(env_name)
        assert remote_env.reset(task) == local_env.reset(task)
        calls = [ToolCall("nosuch", {}), ToolCall(local.oracle(task)[0].name, {"bogus": [1, {"a": None}]}),
                 *local.oracle(task), ToolCall("answer", {"value": 1.5, "key": "x"})]
        for c in calls:
            assert remote_env.step(c) == local_env.step(c), c
        remote_env.close()
        assert remote_env.session_id is None


@pytest.mark.parametrize("env_name", ["calculator", "lookup"])
def test_run_episode_through_remote_env_is_token_identical(url, tokenizer, env_name):
    local = make_env(env_name)
    task = local.task_at("test", 3)
    replies = ['<tool_call>{"name": "calculate", "arguments": {"expression": </tool_call>',
               '<tool_call>\n{"name": "sqrt", "arguments": {"x": 4}}\n</tool_call>',
               '<tool_call>\n{"name": "answer", "arguments": {"value": "many"}}\n</tool_call>',
               *[tool_call_text(c) for c in local.oracle(task)]]

    def play(env):
        return asyncio.run(run_episode(ScriptedPolicy(tokenizer, replies), env, task, ChatFormat(tokenizer),
                                       SamplingParams(max_new_tokens=64), EpisodeLimits(max_turns=8)))

    here, there = play(make_env(env_name)), play(RemoteEnvironment(url, env_name))
    assert there.status == "ok" and there.success and there.reward == here.reward > 0, there.error
    assert there.info["tool_errors"] == 3
    assert there == here  # turns (prompt, completion and observation ids, logprobs), messages, tools, info


def test_recipe_url_builds_remote_environments(url, tmp_path):
    from agentrl.config import load_recipe
    from agentrl.train.setup import build_envs

    recipe_path = tmp_path / "recipe.yaml"
    recipe_path.write_text(f"envs:\n  - {{name: lookup, url: '{url}'}}\n  - {{name: calculator}}\n")
    suite = build_envs(load_recipe(recipe_path))
    assert isinstance(suite.prototypes["lookup"], RemoteEnvironment)
    assert isinstance(suite.make("lookup"), RemoteEnvironment) and not isinstance(suite.make("calculator"),
                                                                                   RemoteEnvironment)
    assert suite.prototypes["lookup"].task_at("train", 123) == make_env("lookup").task_at("train", 123)
    assert suite.prototypes["lookup"].task_version == make_env("lookup").task_version
    with pytest.raises(ValueError, match="kwargs"):
        env_factory("lookup", {"max_hops": 2}, url)
    with pytest.raises(EnvServiceError, match="serves") as unknown:
        RemoteEnvironment(url, "nosuch")
    assert unknown.value.kind == "unknown_env"


def test_task_from_other_settings_is_refused(url):
    env = RemoteEnvironment(url, "calculator")
    other = make_env("calculator", max_operand=20).task_at("test", 0)
    with pytest.raises(EnvServiceError, match="different calculator/test/0") as mismatch:
        env.reset(other)
    assert mismatch.value.kind == "task_mismatch"
    env.close()


# --- bad input ---------------------------------------------------------------------------------------
BAD_CALLS = [
    call("calculate", '{"expression": '),  # arguments: a string that is not JSON
    call("calculate", "[1, 2]"),  # JSON, but not an object
    call("calculate", 7),
    call("sqrt", {"x": 4}),  # unknown tool
    call("answer", {"value": "many"}),  # wrong type
    call("answer", {}),  # missing argument
    call("answer", {"value": True}),  # a bool is not a number
    call("calculate", {"expression": "1", "extra": 1}),
    call("", {}),
    {"type": "function", "function": {"arguments": {}}},  # no name
    {"type": "code", "function": {"name": "answer", "arguments": {}}},
    {"type": "function"},
    "calculate(1)",
    [1, 2],
    None,
]


def test_bad_tool_calls_become_error_results_identical_to_in_process(http):
    sid = open_session(http, "calculator")
    body = ok(http.post(f"/sessions/{sid}/step", json={"tool_calls": BAD_CALLS}))
    assert len(body["results"]) == len(body["messages"]) == len(BAD_CALLS) and not body["done"]
    local = make_env("calculator")
    local.reset(local.task_at("test", 0))
    for raw, result, message in zip(BAD_CALLS, body["results"], body["messages"]):
        assert result["observation"].startswith("Error: ") and "tool_error" in result["info"], (raw, result)
        assert message["content"] == result["observation"]
        parsed = parse_call(raw["function"]) if isinstance(raw, dict) and isinstance(raw.get("function"), dict) \
            and raw.get("type") == "function" else None
        if isinstance(parsed, ToolCall):  # a well-formed call the env refuses: the env's own error text
            expected = local.step(parsed).observation
        elif isinstance(parsed, str):  # what run_episode shows for a call it cannot parse
            expected = f"Error: {parsed}"
        else:
            expected = result["observation"]
            assert "tool call must be a JSON object like" in expected
        assert result["observation"] == expected, raw
    ok(http.delete(f"/sessions/{sid}"))


def test_oversized_output_is_truncated_with_the_marker(http, url):
    sid = open_session(http)
    result = ok(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("flood", {"n": 10**6})]}))["results"][0]
    assert result["observation"] == "x" * MAX_OUTPUT + TRUNCATION_MARKER  # the server's cut
    ok(http.delete(f"/sessions/{sid}"))
    # an error that quotes a huge argument is cut by the environment, identically in-process and remote
    local, remote = make_env("calculator"), RemoteEnvironment(url, "calculator")
    task = local.task_at("test", 0)
    local.reset(task), remote.reset(task)
    huge = ToolCall("answer", {"value": "9" * 10**5})
    observation = local.step(huge).observation
    assert observation.endswith(TRUNCATION_MARKER) and len(observation) < local.max_observation_chars + 100
    assert remote.step(huge).observation == observation
    remote.close()


def test_protocol_misuse_gets_json_errors(http):
    sid = open_session(http)
    step = f"/sessions/{sid}/step"
    json_headers = {"content-type": "application/json"}
    error(http.post("/sessions/nosuch/step", json={"tool_calls": [call("done", {})]}), 404, "unknown_session")
    error(http.post(step, content=b'{"tool_calls": [', headers=json_headers), 422, "invalid_request")
    error(http.post(step, content=b"[" * 100_000, headers=json_headers), 400, "bad_request")
    error(http.post(step, json={"tool_calls": []}), 422, "invalid_request")
    error(http.post(step, json={"tool_calls": {"name": "done"}}), 422, "invalid_request")
    error(http.post(step, json={"tool_calls": [call("done", {})] * 65}), 422, "invalid_request")
    error(http.post(step, json=["tool_calls"]), 422, "invalid_request")
    error(http.post(step, content=b"x" * (5 * 2**20)), 413, "request_too_large")
    error(http.post("/sessions", json={"env": "probe", "index": "3"}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "probe", "index": 3, "sede": 1}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "probe", "index": 3, "seed": 1}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "probe"}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "probe", "split": "dev", "index": 0}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "probe", "split": "test", "index": 200}), 422, "invalid_request")
    error(http.post("/sessions", json={"env": "nosuch", "index": 0}), 404, "unknown_env")
    error(http.get("/envs/probe/tasks", params={"split": "test", "n": 1001}), 422, "invalid_request")
    error(http.get("/envs/probe/oracle", params={"split": "test", "index": -1}), 422, "invalid_request")
    error(http.get("/no/such/route"), 404, "not_found")
    error(http.put("/health"), 405, "method_not_allowed")
    # a lone surrogate (valid JSON escape, not encodable as UTF-8) does not break the reply
    escaped = json.dumps({"env": "\ud800", "index": 0}).encode()
    assert "'\\ud800'" in error(http.post("/sessions", content=escaped, headers=json_headers), 404,
                                 "unknown_env")["message"]
    ok(http.post(step, json={"tool_calls": [call("done", {})]}))  # the session is unharmed
    ok(http.delete(f"/sessions/{sid}"))


def test_env_exception_is_structured_and_marks_the_episode_env_error(url, http, tokenizer):
    sid = open_session(http)
    failure = error(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("explode", {})]}), 500,
                    "env_exception")
    assert "RuntimeError: kaboom" in failure["message"] and "kaboom" in failure["details"]["traceback"]
    error(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("done", {})]}), 409, "session_failed")
    ok(http.delete(f"/sessions/{sid}"))
    task = ProbeEnv().task_at("test", 0)
    policy = ScriptedPolicy(tokenizer, [tool_call_text(ToolCall("explode", {}))])
    traj = asyncio.run(run_episode(policy, RemoteEnvironment(url, "probe"), task, ChatFormat(tokenizer),
                                   SamplingParams(max_new_tokens=64)))
    assert traj.status == "env_error" and not traj.scored and "kaboom" in traj.error
    assert ok(http.get("/health"))["sessions"] == 0  # run_episode closed it


def test_timeouts_and_concurrent_steps(http):
    sid = open_session(http)
    step = f"/sessions/{sid}/step"
    started = time.monotonic()
    result = ok(http.post(step, json={"tool_calls": [call("nap", {"seconds": 2.5}), call("done", {})]}))
    assert time.monotonic() - started < 1.5
    assert result["results"] == [{"observation": f"Error: tool 'nap' did not finish within {CALL_TIMEOUT:g} s",
                                  "reward": None, "done": False,
                                  "info": {"tool_error": f"tool 'nap' did not finish within {CALL_TIMEOUT:g} s",
                                           "timeout": True}}]  # the call after it did not run
    error(http.post(step, json={"tool_calls": [call("done", {})]}), 409, "session_busy")  # still napping
    ok(http.delete(f"/sessions/{sid}"))

    sid = open_session(http)
    replies: list[httpx.Response] = []

    def nap():
        replies.append(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("nap", {"seconds": 0.3})]}))

    threads = [threading.Thread(target=nap) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(r.status_code for r in replies) == [200, 409]
    error(next(r for r in replies if r.status_code == 409), 409, "session_busy")
    ok(http.delete(f"/sessions/{sid}"))


def test_step_fast_path_replies_as_the_validated_route(http):
    """Well-formed steps skip FastAPI's validation (StepFastPath); the same body under another JSON content
    type takes the validated route. Replies, errors included, are the same either way."""
    fast, routed = {"content-type": "application/json"}, {"content-type": "application/merge-patch+json"}
    task = make_env("calculator").task_at("test", 2)
    steps = [[call("calculate", {"expression": task.data["expression"]})], BAD_CALLS,
             [call("answer", {"value": task.data["answer"]})], [call("answer", {"value": 1})]]
    sids = {"calculator": [open_session(http, "calculator", index=2) for _ in range(2)],
            "probe": [open_session(http) for _ in range(2)]}

    def both(env: str, calls: list) -> dict:
        body = json.dumps({"tool_calls": calls})
        replies = [http.post(f"/sessions/{sid}/step", content=body, headers=headers)
                   for sid, headers in zip(sids[env], (fast, routed))]
        assert replies[0].status_code == replies[1].status_code, [r.text for r in replies]
        first, second = ({**r.json(), "session_id": ""} for r in replies)
        assert first == second
        return first

    for calls in steps:
        assert "results" in both("calculator", calls)
    assert both("probe", [call("explode", {})])["error"]["type"] == "env_exception"
    assert both("probe", [call("done", {})])["error"]["type"] == "session_failed"
    sids["probe"] = ["nosuch", "nosuch"]
    assert both("probe", [call("done", {})])["error"]["type"] == "unknown_session"
    for sid in sids["calculator"]:
        ok(http.delete(f"/sessions/{sid}"))


def test_fast_path_takes_only_what_the_validated_route_would_take_unchanged():
    scope = {"headers": [(b"content-type", b"application/json; charset=utf-8")]}

    def calls(body: bytes, **message) -> list | None:
        return _well_formed_calls(scope, {"type": "http.request", "body": body, **message})

    assert calls(b'{"tool_calls": [1, {"a": null}]}') == [1, {"a": None}]
    assert calls(json.dumps({"tool_calls": [0] * 64}).encode()) == [0] * 64
    for refused in (b'{"tool_calls": []}', json.dumps({"tool_calls": [0] * 65}).encode(), b'{"tool_calls": {}}',
                    b'{"tool_calls": [1], "x": 1}', b"[1]", b"{", b"[" * 100_000, b"\xff"):
        assert calls(refused) is None, refused
    assert calls(b'{"tool_calls": [1]}', more_body=True) is None
    scope = {"headers": [(b"content-type", b"text/plain")]}
    assert calls(b'{"tool_calls": [1]}') is None


def test_inline_env_steps_in_the_event_loop_until_a_call_is_slow(caplog):
    with pytest.raises(ValueError, match="not served here"):
        EnvService({"probe": ProbeEnv}, inline=["calculator"])
    with pytest.raises(SystemExit):
        cli_main(["serve-env", "--env", "calculator", "--inline", "probe", "--port", "0"])
    service = EnvService({"probe": ProbeEnv}, call_timeout=0.05, inline=["probe"])
    with serve_in_thread(service) as address, httpx.Client(base_url=address, trust_env=False) as http:
        sid = open_session(http)
        failure = error(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("explode", {})]}), 500,
                        "env_exception")  # as from a worker thread
        assert "RuntimeError: kaboom" in failure["message"] and "kaboom" in failure["details"]["traceback"]
        nap = {"tool_calls": [call("nap", {"seconds": 0.1})]}
        step = f"/sessions/{open_session(http)}/step"
        with caplog.at_level(logging.WARNING, logger="agentrl.envs.sessions"):
            # in the event loop, call_timeout cannot stop it; over the budget 3 times in a row, probe goes
            # back to the threads (once or twice can be a preempted event loop on a busy machine)
            for _ in range(INLINE_STRIKES - 1):
                assert ok(http.post(step, json=nap))["results"][0]["observation"] == "rested"
                assert service.inline == {"probe"}
            assert ok(http.post(step, json=nap))["results"][0]["observation"] == "rested"
        assert service.inline == set() and "run in worker threads from now on" in caplog.text
        # in a thread again, call_timeout stops it (a long nap: on a loaded machine a 0.1 s one could finish
        # before the event loop, itself preempted, even starts waiting)
        long_nap = {"tool_calls": [call("nap", {"seconds": 2.0})]}
        assert ok(http.post(step, json=long_nap))["results"][0]["info"]["timeout"] is True


@pytest.mark.slow
def test_idle_connection_outlives_the_clients_keepalive(url):
    """The server keeps an idle connection open longer than httpx does (5 s), so a client never sends a
    request on a connection the server is closing (uvicorn's default, 5 s too, made that race)."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(6)
        sock.sendall(request)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200")  # b"" if the server had closed it


def test_idle_sessions_expire_and_capacity_is_bounded():
    with serve_in_thread(EnvService({"probe": ProbeEnv}, session_ttl=0.3, max_sessions=1)) as address:
        with httpx.Client(base_url=address, trust_env=False) as http:
            sid = open_session(http)
            error(http.post("/sessions", json={"env": "probe", "index": 1}), 503, "capacity")
            time.sleep(0.7)
            assert ok(http.get("/health"))["sessions"] == 0
            error(http.post(f"/sessions/{sid}/step", json={"tool_calls": [call("done", {})]}), 404,
                  "unknown_session")
            open_session(http)  # room again


# --- the server dies ---------------------------------------------------------------------------------
def start_cli_server(*args: str) -> tuple[subprocess.Popen, str]:
    """``agentrl serve-env`` in a subprocess on a free port; returns it and its URL."""
    proc = subprocess.Popen([sys.executable, "-c", "from agentrl.cli import main; main()", "serve-env",
                             "--port", "0", *args], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()  # printed once it listens
    assert " at http://" in line, line
    return proc, line.split(" at ")[1].split()[0]


class KillingPolicy(ScriptedPolicy):
    """Kills the server just before its second turn."""

    def __init__(self, tokenizer, replies, proc):
        super().__init__(tokenizer, replies)
        self.proc = proc

    async def generate(self, prompt_ids, sampling):
        if self.requests:
            self.proc.kill()
            self.proc.wait()
        return await super().generate(prompt_ids, sampling)


def test_server_killed_mid_episode_is_a_fast_env_error(tokenizer):
    proc, address = start_cli_server("--env", "calculator", "--env_kwargs", 'calculator={"max_operand": 20}')
    try:
        env, local = RemoteEnvironment(address, "calculator", timeout=30), make_env("calculator", max_operand=20)
        assert env.task_version == local.task_version != make_env("calculator").task_version
        task = local.task_at("test", 1)
        replies = [tool_call_text(c) for c in local.oracle(task)]
        policy = KillingPolicy(tokenizer, replies, proc)
        started = time.monotonic()
        traj = asyncio.run(run_episode(policy, env, task, ChatFormat(tokenizer), SamplingParams(max_new_tokens=64)))
        assert time.monotonic() - started < 5
        assert len(traj.turns) == 2 and traj.status == "env_error" and not traj.scored
        assert "EnvServiceError" in traj.error and address in traj.error
        with pytest.raises(EnvServiceError) as gone:
            RemoteEnvironment(address, "calculator")
        assert gone.value.kind == "unreachable"
    finally:
        proc.kill()
        proc.wait()


# --- fuzz ----------------------------------------------------------------------------------------------
def random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.random() < 0.5
    if kind == 2:
        return rng.choice([0, -1, 7, 2**70, -(10**30), rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1e308, 1e-320, float("nan"), float("inf"), rng.uniform(-1e6, 1e6)])
    if kind in (4, 5):
        return random_text(rng)
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_text(rng, 12): random_json(rng, depth + 1) for _ in range(rng.randrange(4))}


def random_text(rng: random.Random, longest: int = 60) -> str:
    roll = rng.random()
    if roll < 0.02:
        return rng.choice("x7{[") * rng.randrange(10**4, 3 * 10**5)  # huge
    if roll < 0.1:
        return "".join(chr(rng.randrange(0xD800, 0xE000)) for _ in range(rng.randrange(1, 4)))  # lone surrogates
    if roll < 0.3:
        return rng.choice(['{"expression": "2*(3+4)"}', '{"key": ', "1 +", "12 * (3 + 4)", "", "\x00\n\t", "é✓𝔘",
                           '{"value": 3}', "answer", "calculate", "get", "../../etc/passwd", "null"])
    alphabet = "abc019 +-*/()[]{}\":,\\'\x00é"
    return "".join(rng.choice(alphabet) for _ in range(rng.randrange(longest)))


def random_call(rng: random.Random, tools: list[str]):
    roll = rng.random()
    if roll < 0.05:
        return random_json(rng)
    name = rng.choice(tools) if rng.random() < 0.7 else random_json(rng)
    if roll < 0.45:
        arguments = random_json(rng)
    elif roll < 0.75:
        arguments = {rng.choice(["expression", "value", "key", "x"]): random_json(rng)
                     for _ in range(rng.randrange(3))}
    else:
        arguments = rng.choice([json.dumps(random_json(rng)), random_text(rng)])
    item = {"type": "function" if rng.random() < 0.9 else random_json(rng), "function": {"name": name,
                                                                                           "arguments": arguments}}
    if rng.random() < 0.3:
        item["id"] = random_json(rng)
    if rng.random() < 0.05:
        item["function"] = random_json(rng)
    return item


def check_reply(response: httpx.Response, route: str) -> None:
    """Every reply: JSON with the API version; an error body, or the route's result shape."""
    assert response.status_code < 500, (route, response.status_code, response.text[:500])
    body = response.json()
    assert body["api_version"] == API_VERSION, body
    if response.status_code != 200:
        assert isinstance(body["error"]["type"], str) and isinstance(body["error"]["message"], str), body
    elif route == "step":
        assert len(body["results"]) == len(body["messages"]) >= 1
        for result, message in zip(body["results"], body["messages"]):
            assert isinstance(result["observation"], str) and result["observation"] == message["content"]
            assert isinstance(result["done"], bool) and isinstance(result["info"], dict)
    elif route == "create":
        assert isinstance(body["session_id"], str) and body["messages"] and body["tools"]


@pytest.mark.parametrize("n_calls", [1_000, pytest.param(10_000, marks=pytest.mark.slow)])
def test_fuzz_random_and_malformed_requests(url, n_calls):
    """Random or malformed tool calls plus protocol garbage: never a 5xx, every reply well-formed.

    The fast suite sends 1,000 tool calls (~1 s); the slow suite 10,000 (~10 s on 2 busy cores).
    """
    tool_calls, requests = fuzz(url, n_calls)
    assert tool_calls >= n_calls and requests >= n_calls // 5


def fuzz(url: str, n_calls: int) -> tuple[int, int]:
    """Send at least ``n_calls`` random tool calls among random requests to an env-service URL, checking every
    reply (check_reply) and that the service is healthy after; returns (tool calls, requests) sent."""
    rng = random.Random(0)
    envs = {"calculator": ["calculate", "answer"], "lookup": ["get", "answer"]}
    sessions: list[tuple[str, str]] = []
    tool_calls = requests = 0
    started = time.monotonic()
    with httpx.Client(base_url=url, timeout=30, trust_env=False) as http:

        def send(method: str, path: str, body=None, raw: bytes | None = None):
            nonlocal requests
            requests += 1
            content = raw if raw is not None else (None if body is None else json.dumps(body).encode())
            return http.request(method, path, content=content, headers={"content-type": "application/json"})

        while tool_calls < n_calls:
            roll = rng.random()
            if roll < 0.5 and sessions:
                sid, env = rng.choice(sessions)
                calls = [random_call(rng, envs[env]) for _ in range(rng.randrange(1, 12))]
                tool_calls += len(calls)
                check_reply(send("POST", f"/sessions/{sid}/step", {"tool_calls": calls}), "step")
            elif roll < 0.62 or not sessions:
                body = {"env": rng.choice(list(envs)), "split": rng.choice(["test", "train"]),
                        "index": rng.randrange(200)}
                if rng.random() < 0.3:  # damage it
                    body[rng.choice(["env", "split", "index", "seed", "extra"])] = random_json(rng)
                reply = send("POST", "/sessions", body)
                check_reply(reply, "create")
                if reply.status_code == 200:
                    sessions.append((reply.json()["session_id"], reply.json()["env"]))
            elif roll < 0.7:
                # a live id, or any text percent-encoded (lone surrogates make invalid UTF-8 there)
                sid = rng.choice(sessions)[0] if rng.random() < 0.5 else \
                    quote(random_text(rng, 40)[:500].encode("utf-8", "surrogatepass"), safe="") or "x"
                raw = rng.choice([b"{", b"", b"null", b"[]", b'{"tool_calls": null}', b"\xff\xfe",
                                  json.dumps(random_json(rng)).encode(), b'{"tool_calls": [' * 50])
                check_reply(send("POST", f"/sessions/{sid}/step", raw=raw), "step")
            elif roll < 0.76:
                check_reply(send("POST", f"/sessions/{rng.getrandbits(64):x}/step",
                                 {"tool_calls": [random_call(rng, ["answer"])]}), "step")
            elif roll < 0.8 and sessions:
                sid, _ = sessions.pop(rng.randrange(len(sessions)))
                check_reply(send("DELETE", f"/sessions/{sid}"), "delete")
            elif roll < 0.9:
                method = rng.choice(["GET", "POST", "PUT", "PATCH", "DELETE"])
                path = rng.choice(["/", "/health", "/envs", "/sessions", "/envs/calculator/tasks", "/docs/x",
                                   "/sessions/x/step/y", "/envs/lookup/oracle?split=test&index=x"])
                body = random_json(rng) if rng.random() < 0.5 else None
                check_reply(send(method, path, body), "other")
            else:
                params = {"split": rng.choice(["test", "train", random_text(rng, 8)]),
                          "start": rng.choice([0, 5, -1, 10**6, "a"]), "n": rng.choice([1, 3, 0, 5000]),
                          "index": rng.choice([0, 199, 200, -3, "z"])}
                query = "&".join(f"{k}={quote(str(v)[:500].encode('utf-8', 'surrogatepass'))}"
                                 for k, v in params.items())
                route = rng.choice(["tasks", "oracle"])
                check_reply(send("GET", f"/envs/{rng.choice(list(envs) + ['nosuch'])}/{route}?{query}"), route)
        assert ok(http.get("/health"))["status"] == "ok"
        for sid, _ in sessions:
            ok(http.delete(f"/sessions/{sid}"))
    elapsed = time.monotonic() - started
    print(f"fuzz: {tool_calls} tool calls in {requests} requests, {elapsed:.1f} s")
    return tool_calls, requests
