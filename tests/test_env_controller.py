"""The env controller over real HTTP on loopback: dispatch, affinity, joining/leaving, dead workers, training.

Workers are real ``agentrl serve-env`` servers: threads of this process where nothing kills them,
subprocesses (``python -m agentrl.cli serve-env``) where a test kills or stops one.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest
import torch
from safetensors.torch import load_file

from agentrl.algo.advantages import TaskAdvantageStats
from agentrl.config import load_recipe
from agentrl.envs import make_env
from agentrl.envs.client import EnvServiceError, RemoteEnvironment
from agentrl.envs.controller import EnvController
from agentrl.envs.controller_server import create_controller_app
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.serving import serve_app_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.envs.wire import API_VERSION
from agentrl.policy.base import Generation, SamplingParams
from agentrl.policy.scripted import tool_call_text
from agentrl.rollout.traces import oracle_conversation
from agentrl.train import loop
from agentrl.types import ToolCall
from tests import test_env_server as single_server

ROOT = Path(__file__).parents[1]
# Fast enough for a test, slow enough that a busy CPU does not make a live worker miss two heartbeats in a row.
FAST_HEARTBEATS = {"heartbeat_interval": 0.2, "heartbeat_timeout": 0.5, "max_missed": 2}


# --- helpers -----------------------------------------------------------------------------------------
@contextmanager
def worker(*specs: tuple[str, dict]) -> Iterator[str]:
    """An env server in a thread of this process, serving ``(env name, kwargs)`` specs; yields its URL."""
    with serve_in_thread(EnvService(env_factories(list(specs)), threads=4)) as url:
        yield url


@contextmanager
def controller(*workers: str, **options) -> Iterator[str]:
    """A controller in a thread of this process over ``workers``; yields its URL."""
    with serve_app_in_thread(create_controller_app(EnvController(workers, **options))) as url:
        yield url


def spawn(*args: str) -> subprocess.Popen:
    """``python -m agentrl.cli ARGS`` in a subprocess (it prints its URL once it listens: see :func:`printed`)."""
    return subprocess.Popen([sys.executable, "-m", "agentrl.cli", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})


def printed(proc: subprocess.Popen, lines: int = 1) -> list[str]:
    """The next ``lines`` lines a spawned server prints: its URL, then (with --controller) the join."""
    out = [proc.stdout.readline() for _ in range(lines)]
    assert all(" at http://" in line or "joined" in line for line in out), out
    return out


def url_in(line: str) -> str:
    return line.split(" at ")[1].split()[0]


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
    proc.wait()
    proc.stdout.close()


def ok(response: httpx.Response) -> dict:
    body = response.json()
    assert response.status_code == 200, body
    assert body["api_version"] == API_VERSION
    return body


def error(response: httpx.Response, status: int, kind: str) -> str:
    body = response.json()
    assert response.status_code == status and body["error"]["type"] == kind, body
    assert body["api_version"] == API_VERSION
    return body["error"]["message"]


def workers_by_url(http: httpx.Client) -> dict[str, dict]:
    return {w["url"]: w for w in ok(http.get("/workers"))["workers"]}


def holds(http: httpx.Client, session_id: str) -> bool:
    """Whether the worker behind ``http`` holds the session: a call that is not a call object comes back as
    an error observation without reaching the environment, or 404 from a worker without the session."""
    response = http.post(f"/sessions/{session_id}/step", json={"tool_calls": [None]})
    assert response.status_code in (200, 404), response.text
    return response.status_code == 200


def answer(value) -> dict:
    call = {"id": "c", "type": "function", "function": {"name": "answer", "arguments": {"value": value}}}
    return {"tool_calls": [call]}


# --- dispatch and affinity -----------------------------------------------------------------------------
def test_sessions_spread_least_loaded_and_stay_on_their_worker():
    with ExitStack() as stack:
        both = stack.enter_context(worker(("calculator", {}), ("lookup", {})))
        calc = stack.enter_context(worker(("calculator", {})))
        address = stack.enter_context(controller(both, calc))
        http = stack.enter_context(httpx.Client(base_url=address, timeout=10, trust_env=False))
        direct = {url: stack.enter_context(httpx.Client(base_url=url, timeout=10, trust_env=False))
                  for url in (both, calc)}

        health = ok(http.get("/health"))
        assert health["status"] == "ok" and health["envs"] == ["calculator", "lookup"]
        assert health["workers"] == {"live": 2, "draining": 0, "dead": 0}
        assert ok(http.get("/envs"))["envs"] == ok(direct[both].get("/envs"))["envs"]  # same entries, same order
        paths = set(http.get("/openapi.json").json()["paths"])
        assert paths == set(direct[both].get("/openapi.json").json()["paths"]) | {"/workers", "/workers/{worker_id}"}

        # 10 sessions: 5 each; each worker really holds its 5
        local = make_env("calculator")
        tasks = local.tasks("test", 10)
        remote = RemoteEnvironment(address, "calculator")
        envs = [remote.clone() for _ in tasks]
        for env, task in zip(envs, tasks):
            assert env.reset(task) == local.reset(task)
        listed = workers_by_url(http)
        assert [listed[both]["sessions"], listed[calc]["sessions"]] == [5, 5]
        assert [ok(direct[url].get("/health"))["sessions"] for url in (both, calc)] == [5, 5]
        # affinity: every step reaches the worker holding the session (another worker would answer 404)
        for env, task in zip(envs, tasks):
            result = env.step(ToolCall("answer", {"value": task.data["answer"]}))
            assert result.done and result.reward == 1.0
        # least loaded: close 4 of the first worker's sessions; the next 3 sessions all go there
        on_first = [env for env in envs if holds(direct[both], env.session_id)]
        assert on_first == envs[0::2] and not any(holds(direct[calc], env.session_id) for env in on_first)
        for env in on_first[:4]:
            env.close()
        more = [remote.clone() for _ in range(3)]
        for env, task in zip(more, tasks):
            env.reset(task)
        listed = workers_by_url(http)
        assert [listed[both]["sessions"], listed[calc]["sessions"]] == [4, 5]
        assert [listed[both]["created"], listed[calc]["created"]] == [8, 5]
        # lookup sessions only go to the worker that serves lookup
        lookup = RemoteEnvironment(address, "lookup")
        lookup.reset(make_env("lookup").task_at("test", 1))
        assert workers_by_url(http)[both]["sessions"] == 5
        for env in [*envs, *more, lookup]:
            env.close()
        assert ok(http.get("/health"))["sessions"] == 0
        assert [ok(direct[url].get("/health"))["sessions"] for url in (both, calc)] == [0, 0]
        # tasks, the oracle and whole episodes through the controller are those of an in-process env
        for name in ("calculator", "lookup"):
            here, there = make_env(name), RemoteEnvironment(address, name)
            assert there.tasks("test", 3, start=7) == here.tasks("test", 3, start=7)
            for task in here.tasks("test", 2):
                assert there.oracle(task) == here.oracle(task)
                assert oracle_conversation(there.clone(), task) == oracle_conversation(make_env(name), task)
        # the worker API's errors come back as they are; the controller adds unknown_session for ids it never routed
        sid = ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": 0}))["session_id"]
        error(http.post("/sessions", json={"env": "calculator", "index": "0"}), 422, "invalid_request")
        error(http.post(f"/sessions/{sid}/step", json={"tool_calls": []}), 422, "invalid_request")
        error(http.get("/envs/calculator/tasks", params={"split": "test", "n": 0}), 422, "invalid_request")
        error(http.post("/sessions", json={"env": "calculator", "split": "dev", "index": 0}), 422, "invalid_request")
        error(http.post("/sessions/nosuch/step", json=answer(1)), 404, "unknown_session")
        error(http.post("/sessions", json={"env": "nosuch", "index": 0}), 404, "unknown_env")
        error(http.get("/envs/nosuch/tasks", params={"split": "test"}), 404, "unknown_env")
        assert ok(http.post(f"/sessions/{sid}/step", json=answer(-1)))["reward"] == 0.0
        ok(http.delete(f"/sessions/{sid}"))
        error(http.delete(f"/sessions/{sid}"), 404, "unknown_session")


def test_full_or_vanished_workers_are_skipped_when_opening_sessions():
    with worker(("calculator", {})) as big, controller(heartbeat_interval=60) as address, \
            httpx.Client(base_url=address, timeout=10, trust_env=False) as http:

        def open_session() -> str:
            return ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": 0}))["session_id"]

        with serve_in_thread(EnvService(env_factories([("calculator", {})]), max_sessions=2)) as small:
            joined = [ok(http.post("/workers", json={"url": url}))["worker"]["id"] for url in (small, big)]
            assert joined == ["w1", "w2"]
            sessions = [open_session() for _ in range(5)]
            # least loaded takes small, big, small, big; the fifth goes to small, which is full (503): then big
            assert {url: w["sessions"] for url, w in workers_by_url(http).items()} == {small: 2, big: 3}
        # small is gone, and no heartbeat has noticed: the next session tries it, finds it dead, opens on big
        assert workers_by_url(http)[small]["state"] == "live"
        open_session()
        listed = workers_by_url(http)
        assert listed[small]["state"] == "dead" and "ConnectError" in listed[small]["error"]
        assert listed[big]["sessions"] == 4
        replies = [http.post(f"/sessions/{sid}/step", json=answer(1)) for sid in sessions]
        assert [r.status_code for r in replies] == [502, 200, 502, 200, 200]  # small held the 1st and 3rd
        assert all(r.json()["error"]["type"] == "worker_lost" for r in replies if r.status_code == 502)


@pytest.mark.parametrize("n_calls", [100, pytest.param(3_000, marks=pytest.mark.slow)])
def test_fuzz_through_the_controller_never_gets_a_5xx(n_calls):
    """The env server's fuzz, through the controller: random tool calls and protocol garbage are answered as
    a worker answers them, never with a 5xx."""
    with worker(("calculator", {}), ("lookup", {})) as one, worker(("calculator", {}), ("lookup", {})) as two, \
            controller(one, two) as address:
        tool_calls, requests = single_server.fuzz(address, n_calls)
    assert tool_calls >= n_calls and requests >= n_calls // 5


# --- workers joining and leaving ---------------------------------------------------------------------------
def test_workers_join_only_if_they_agree_and_leave_by_draining():
    with ExitStack() as stack:
        first = stack.enter_context(worker(("calculator", {}), ("lookup", {})))
        second = stack.enter_context(worker(("calculator", {})))
        other = stack.enter_context(worker(("calculator", {"max_operand": 20})))
        address = stack.enter_context(controller(first))
        http = stack.enter_context(httpx.Client(base_url=address, timeout=10, trust_env=False))

        joined = ok(http.post("/workers", json={"url": second + "/"}))["worker"]
        assert joined["id"] == "w2" and joined["url"] == second and joined["state"] == "live"
        assert ok(http.post("/workers", json={"url": second}))["worker"]["id"] == "w2"  # joining twice: one entry
        message = error(http.post("/workers", json={"url": other}), 409, "worker_mismatch")
        assert "'calculator'" in message and "task_version" in message and "max_operand=20" in message
        assert "w1" in message  # names the worker it disagrees with
        error(http.post("/workers", json={"url": "ftp://x"}), 422, "invalid_request")
        error(http.post("/workers", json={"url": "http://127.0.0.1:9"}), 502, "worker_unreachable")
        error(http.post("/workers", json={"address": second}), 422, "invalid_request")
        assert list(workers_by_url(http)) == [first, second]

        # draining: no new sessions, open ones keep working, gone once the last one closes
        sid = ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": 0}))["session_id"]
        left = ok(http.delete("/workers/w1"))
        assert left["worker"]["state"] == "draining" and not left["removed"]
        assert ok(http.get("/envs"))["envs"][0]["name"] == "calculator"  # w1 still serves what it holds
        later = [ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": i}))["session_id"]
                 for i in range(3)]
        assert workers_by_url(http)[second]["sessions"] == 3 and workers_by_url(http)[first]["sessions"] == 1
        message = error(http.post("/sessions", json={"env": "lookup", "split": "test", "index": 0}), 503, "no_worker")
        assert "w1 draining" in message
        assert ok(http.post(f"/sessions/{sid}/step", json=answer(-1)))["done"]
        ok(http.delete(f"/sessions/{sid}"))
        assert list(workers_by_url(http)) == [second]
        # /envs only offers what the live workers serve
        assert [d["name"] for d in ok(http.get("/envs"))["envs"]] == ["calculator"]
        assert ok(http.get("/health"))["envs"] == ["calculator"]
        error(http.post("/sessions", json={"env": "lookup", "split": "test", "index": 0}), 404, "unknown_env")
        with pytest.raises(EnvServiceError) as missing:
            RemoteEnvironment(address, "lookup")
        assert missing.value.kind == "unknown_env"
        # a worker with other settings may join once nobody serves the environment differently
        ok(http.delete("/workers/w2", params={"force": "true"}))
        for session_id in later:
            assert "it left" in error(http.post(f"/sessions/{session_id}/step", json=answer(1)), 502, "worker_lost")
        assert ok(http.post("/workers", json={"url": other}))["worker"]["id"] == "w3"
        error(http.delete("/workers/w1"), 404, "unknown_worker")

        # serve-controller refuses to start over workers that disagree
        proc = subprocess.run([sys.executable, "-m", "agentrl.cli", "serve-controller", "--port", "0", "--worker",
                               first, "--worker", other], cwd=ROOT, capture_output=True, text=True, timeout=60,
                              env={**os.environ, "PYTHONPATH": str(ROOT)})
        assert proc.returncode == 1 and "worker_mismatch" in proc.stderr and other in proc.stderr, proc.stderr


# --- a training step through the controller ----------------------------------------------------------------
def training_recipe(model_dir, output, url: str = "", steps: int = 1, **extra):
    """A short GRPO run on both environments, in-process or (with ``url``) served behind the controller."""
    served = f", url: '{url}'" if url else ""
    envs = ", ".join(f"{{name: {name}, reward: 'tests.train_helpers:token_sum_reward'{served}}}"
                     for name in ("calculator", "lookup"))
    overrides = [f"--model.path={model_dir}", "--model.build=null", "--sft.enabled=false",
                 f"--train.output_dir={output}", f"--train.steps={steps}", "--train.save_every=0",
                 f"--envs=[{envs}]", "--rollout.tasks_per_step=2", "--rollout.group_size=3",
                 "--rollout.max_new_tokens=12", "--rollout.max_turns=2", "--eval.at_end=false", "--algo.lr=0.05"]
    return load_recipe(None, overrides + [f"--{k}={v}" for k, v in extra.items()])


def record_rollouts(monkeypatch) -> list[list]:
    """Keep each step's trajectories (after scoring: score() fills rewards in place) as train() makes them."""
    steps: list[list] = []
    real = loop.RolloutEngine.take

    def recording(self, *args, **kwargs):
        batch = real(self, *args, **kwargs)
        steps.append(batch.trajectories)
        return batch

    monkeypatch.setattr(loop.RolloutEngine, "take", recording)
    return steps


def record_advantages(monkeypatch) -> list[dict]:
    """Keep compute_advantages' inputs and outputs for every step."""
    calls: list[dict] = []
    real = loop.compute_advantages

    def recording(rewards, group_ids, valid, tasks, task_stats, scale_by_std=False):
        adv, informative, stats = real(rewards, group_ids, valid, tasks, task_stats, scale_by_std=scale_by_std)
        calls.append({"rewards": rewards, "groups": group_ids, "valid": valid, "tasks": tasks, "adv": adv,
                      "informative": informative})
        return adv, informative, stats

    monkeypatch.setattr(loop, "compute_advantages", recording)
    return calls


def logged(output: Path) -> list[dict]:
    lines = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in m.items() if not k.startswith("time")} for m in lines]  # wall-clock times differ


def test_training_step_through_the_controller_matches_in_process(micro_model_dir, tmp_path, monkeypatch):
    rollouts = record_rollouts(monkeypatch)
    loop.train(training_recipe(micro_model_dir, tmp_path / "local"))
    with worker(("calculator", {}), ("lookup", {})) as one, worker(("calculator", {}), ("lookup", {})) as two, \
            controller(one, two) as address:
        loop.train(training_recipe(micro_model_dir, tmp_path / "remote", address))
        spread = [w["created"] for w in httpx.get(address + "/workers", trust_env=False).json()["workers"]]
    local, remote = rollouts  # one step each
    assert spread == [3, 3]  # six episodes, over both workers
    assert all(isinstance(t, loop.Trajectory) and t.status in ("ok", "truncated") and t.turns for t in remote)
    assert len({tuple(t.turns[0].completion_ids) for t in remote}) > 1  # sampled with temperature, not all alike
    # same tasks, messages, tools, prompt/sampled/observation ids, logprobs, rewards: the RNG drew the same tokens
    assert remote == local
    assert logged(tmp_path / "remote") == logged(tmp_path / "local")
    assert "train/loss" in logged(tmp_path / "local")[0]
    a = load_file(str(tmp_path / "local" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "remote" / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(a[k].abs().sum() > 0 for k in a if "lora_B" in k)  # the step changed the adapter


# --- a worker dies --------------------------------------------------------------------------------------------
class ToolCallingPolicy:
    """A scripted policy for train(): every turn is a tool call from a fixed cycle (the micro model's own
    samples never are), so episodes step their environments; runs ``on_request(n)`` before the n-th request.

    It yields to the event loop before answering, so all of a step's episodes open their sessions and ask
    for their first turn before any of them steps.
    """

    CALLS = [ToolCall("calculate", {"expression": "2 + 3"}), ToolCall("get", {"key": "a"}),
             ToolCall("answer", {"value": 5})]

    def __init__(self, tokenizer, on_request=None) -> None:
        self.tokenizer, self.on_request = tokenizer, on_request
        self.version, self.requests = 0, 0

    async def generate(self, prompt_ids: list[int], sampling: SamplingParams) -> Generation:
        self.requests += 1
        if self.on_request is not None:
            self.on_request(self.requests)
        await asyncio.sleep(0)
        text = tool_call_text(self.CALLS[self.requests % len(self.CALLS)])
        ids = self.tokenizer(text, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
        assert len(ids) <= sampling.max_new_tokens
        return Generation(ids=ids, logprobs=[-1.0] * len(ids), version=self.version, finished=True)

    async def load_adapter(self, path, version: int) -> None:
        self.version = version


def test_killed_worker_fails_its_episodes_as_env_errors_and_training_goes_on(micro_model_dir, tokenizer, tmp_path,
                                                                           monkeypatch):
    rollouts, advantages = record_rollouts(monkeypatch), record_advantages(monkeypatch)
    ctl = spawn("serve-controller", "--port", "0")  # default heartbeats: a killed worker is found by its requests
    victim = spawn("serve-env", "--env", "calculator", "--env", "lookup", "--port", "0")
    try:
        address, victim_url = url_in(printed(ctl)[0]), url_in(printed(victim)[0])

        def kill_victim(request: int) -> None:
            if request == 6:  # the step's 6 episodes all have an open session and wait for their first turn
                victim.kill()
                victim.wait()

        monkeypatch.setattr(loop, "HFPolicy", lambda *args, **kwargs: ToolCallingPolicy(tokenizer, kill_victim))
        with worker(("calculator", {}), ("lookup", {})) as survivor, \
                httpx.Client(base_url=address, timeout=10, trust_env=False) as http:
            assert ok(http.post("/workers", json={"url": victim_url}))["worker"]["id"] == "w1"
            assert ok(http.post("/workers", json={"url": survivor}))["worker"]["id"] == "w2"
            loop.train(training_recipe(micro_model_dir, tmp_path, address, steps=2, **{
                # 0.5, the default: losing one worker of two (3 of 6 episodes) must not stop a run
                "rollout.max_new_tokens": 64, "rollout.max_turns": 3, "rollout.max_error_rate": 0.5}))

            # step 1: the victim's 3 episodes are env errors, the survivor's 3 ran to their end
            first, second = rollouts
            lost = [t for t in first if t.status == "env_error"]
            assert len(lost) == 3 and all("worker_lost" in t.error and "w1" in t.error for t in lost)
            assert all(len(t.turns) == 1 and not t.scored and t.reward == 0.0 for t in lost)
            alive = [t for t in first if t.scored]
            assert len(alive) == 3 and all(t.messages[-1]["role"] == "tool" for t in alive)
            assert max(len(t.turns) for t in alive) >= 2  # sessions on the survivor kept stepping after the kill
            print("turns of the survivor's episodes:", [len(t.turns) for t in alive],
                  [t.messages[-1]["content"][:40] for t in alive])
            assert all(t.status != "env_error" for t in second) and len(second) == 6  # step 2: all on w2
            listed = {w["id"]: w for w in ok(http.get("/workers"))["workers"]}
            assert listed["w1"]["state"] == "dead" and listed["w1"]["created"] == 3
            assert listed["w2"]["state"] == "live" and listed["w2"]["created"] == 9

            # the errors took no part in the advantages: same result as the valid episodes alone
            step1 = advantages[0]
            valid = step1["valid"]
            assert valid.tolist() == [t.scored for t in first]
            assert not step1["informative"][~valid].any() and (step1["adv"][~valid] == 0).all()
            alone, informative, _ = loop.compute_advantages(
                step1["rewards"][valid], step1["groups"][valid], torch.ones(int(valid.sum()), dtype=torch.bool),
                [task for task, v in zip(step1["tasks"], valid.tolist()) if v], TaskAdvantageStats(0.1))
            assert torch.equal(step1["adv"][valid], alone) and torch.equal(step1["informative"][valid], informative)
            # counted and logged; the run went on
            metrics = logged(tmp_path)
            assert [m["rollout/infra_errors"] for m in metrics] == [3.0, 0.0]
            assert [m["rollout/episodes"] for m in metrics] == [6.0, 6.0]
            assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()

            # new sessions go only to the live worker
            remote = RemoteEnvironment(address, "lookup")
            envs = [remote.clone() for _ in range(4)]
            for env in envs:
                env.reset(remote.task_at("test", 0))
            assert {w["id"]: w["sessions"] for w in ok(http.get("/workers"))["workers"]} == {"w1": 0, "w2": 4}
            for env in envs:
                env.close()
            assert ok(http.get("/health"))["workers"] == {"live": 1, "draining": 0, "dead": 1}
    finally:
        stop(victim)
        stop(ctl)


def test_hung_and_killed_workers_are_found_and_a_returning_worker_rejoins():
    with worker(("calculator", {})) as steady, controller(steady, **FAST_HEARTBEATS) as address, \
            httpx.Client(base_url=address, timeout=10, trust_env=False) as http, \
            httpx.Client(base_url=steady, timeout=10, trust_env=False) as direct:
        proc = spawn("serve-env", "--env", "calculator", "--port", "0", "--controller", address)
        try:
            line, joined = printed(proc, 2)
            flaky = url_in(line)
            assert "as worker w2" in joined and workers_by_url(http)[flaky]["state"] == "live"

            def open_session() -> str:
                return ok(http.post("/sessions", json={"env": "calculator", "split": "test", "index": 0}))["session_id"]

            on_steady, on_flaky = open_session(), open_session()
            assert holds(direct, on_steady) and not holds(direct, on_flaky)
            # hung (SIGSTOP): a step in flight to it fails once heartbeats give up on the worker
            proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            message = error(http.post(f"/sessions/{on_flaky}/step", json=answer(1)), 502, "worker_lost")
            hung = time.monotonic() - started
            assert "in flight" in message and "heartbeats missed" in message and hung < 3.0
            assert workers_by_url(http)[flaky]["state"] == "dead"
            ok(http.post(f"/sessions/{on_steady}/step", json=answer(1)))  # the other worker's sessions go on
            assert all(holds(direct, open_session()) for _ in range(2))  # new sessions: only the live worker
            # it answers again: it rejoins without its old sessions
            proc.send_signal(signal.SIGCONT)
            deadline = time.monotonic() + 5
            while workers_by_url(http)[flaky]["state"] != "live":
                assert time.monotonic() < deadline, workers_by_url(http)[flaky]
                time.sleep(0.05)
            error(http.post(f"/sessions/{on_flaky}/step", json=answer(1)), 502, "worker_lost")
            assert "lost with worker w2" in error(http.delete(f"/sessions/{on_flaky}"), 502, "worker_lost")
            error(http.delete(f"/sessions/{on_flaky}"), 404, "unknown_session")  # forgotten once reported
            # killed (SIGKILL): its sessions fail at their next request, without waiting for heartbeats
            doomed = open_session()  # the least-loaded worker is the one that came back
            assert workers_by_url(http)[flaky]["sessions"] == 1
            proc.kill()
            proc.wait()
            started = time.monotonic()
            error(http.post(f"/sessions/{doomed}/step", json=answer(1)), 502, "worker_lost")
            killed = time.monotonic() - started
            assert killed < 1.0
            print(f"a step on a hung worker failed after {hung:.2f} s (heartbeats every "
                  f"{FAST_HEARTBEATS['heartbeat_interval']} s, {FAST_HEARTBEATS['max_missed']} missed); "
                  f"on a killed worker after {killed * 1000:.0f} ms")
            assert ok(http.get("/health"))["workers"] == {"live": 1, "draining": 0, "dead": 1}
        finally:
            stop(proc)
