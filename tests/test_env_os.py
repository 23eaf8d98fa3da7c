"""The os environment with a real sandbox: oracle, rewards from the real workspace, escapes, cleanup, service."""

from __future__ import annotations

import json
import re
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from agentrl.envs.base import TRUNCATION_MARKER
from agentrl.envs.server import env_factories, serve_in_thread
from agentrl.envs.sessions import EnvService
from agentrl.sandbox import Sandbox, SandboxUnavailable
from agentrl.types import ToolCall
from environments.lookup import KEY_WORDS
from environments.os_shell import (CHANGE_KINDS, DIRS, EASY, KINDS, QUESTION_KINDS, STEMS, WORDS, OSEnv, initial_state,
                                   normalize, read_state)
from tests.env_checks import assert_served_like_in_process, assert_tasks_identical_across_processes, play

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    try:
        Sandbox().close()
    except SandboxUnavailable as e:
        pytest.skip(f"this machine cannot provide the sandbox: {e}")


def task_of(env, kind, split="train"):
    return next(t for t in env.tasks(split, len(env.kinds)) if t.data["kind"] == kind)


def processes_of(uid: int) -> list[int]:
    """Host pids whose real uid is ``uid``."""
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            lines = (entry / "status").read_text().splitlines() if entry.name.isdigit() else []
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited while we looked
        if any(line.split()[:2] == ["Uid:", str(uid)] for line in lines):
            pids.append(int(entry.name))
    return pids


def bash(command):
    return ToolCall("bash", {"command": command})


def answer(value):
    return ToolCall("answer", {"value": value})


# --- the oracle ------------------------------------------------------------------------------------------
def check_oracle_episode(kwargs, task):
    env = OSEnv(**kwargs)
    results = play(env, task, env.oracle(task))
    assert [r.done for r in results] == [False, True], task.id
    assert results[-1].reward == 1.0 and env.info["success"], task.id
    assert env.info["tool_errors"] == 0 and not any(r.observation.startswith("Error") for r in results)
    shown = results[0].observation
    if task.data["kind"] in QUESTION_KINDS:  # the real shell agrees with the truth computed in Python
        assert str(task.data["answer"]) in {normalize(token) for token in shown.split()}, (task.id, shown)
    else:
        assert shown == "(no output)", (task.id, shown)
    assert env.sandbox is None  # answer closed it


def check_oracle(kwargs, tasks):
    # Two episodes at a time, as the env service runs them (each in its own sandbox).
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda task: check_oracle_episode(kwargs, task), tasks))


@pytest.mark.slow  # 100 sandboxes per preset: 8-39 s each on 2 shared cores, by load
@pytest.mark.parametrize("kwargs", [{}, EASY], ids=["default", "easy"])
def test_oracle_solves_the_whole_test_split(kwargs):
    tasks = OSEnv(**kwargs).tasks("test")
    assert len(tasks) == 100
    check_oracle(kwargs, tasks)


@pytest.mark.parametrize("kwargs", [{}, EASY], ids=["default", "easy"])
def test_oracle_solves_every_kind(kwargs):
    check_oracle(kwargs, OSEnv(**kwargs).tasks("test", 12))  # kinds take turns: 1 (default) or 2 (easy) of each


def test_easy_preset_is_small_and_single_token():
    env = OSEnv(**EASY)
    repertoire = {"ls", "wc", "sed", "chmod", "echo", "rm"}
    for task in env.tasks("train", 300):
        calls = env.oracle(task)
        assert 1 <= len(calls) <= 4
        command, value = calls[0].arguments["command"], calls[-1].arguments["value"]
        assert command.split()[0] in repertoire and len(command) <= 30 and "/" not in command, command
        assert value in WORDS or value == "done" or 0 <= int(value) <= 999, value
        assert len(task.prompt) <= 70, task.prompt
        # what the command names (a file, an extension, a line number, a word) is in the prompt after a space
        # or a dot, as it is in the command, so the model copies the same token
        named = re.findall(r"(?<= )[a-z]+\.[a-z]+|(?<=\*)\.[a-z]+|(?<= )\d+(?=p )|(?<=echo )[a-z]+", command)
        assert named and all(f" {n}" in task.prompt or n.startswith(".") and n in task.prompt for n in named), command


# --- rewards --------------------------------------------------------------------------------------------
def test_question_rewards():
    env = OSEnv()
    for kind in QUESTION_KINDS:
        task = task_of(env, kind)
        truth = str(task.data["answer"])
        other = str(int(truth) + 1) if truth.isdigit() else "done" if kind == "find_word" else \
            next(w for w in WORDS if w != truth)
        cases = [(truth, 1.0), (f" '{truth.upper()}'. ", 1.0), (other, 0.0), ("done", 0.0), ("", 0.0),
                 ("²", 0.0), ("9" * 5000, 0.0), ("x" * 100_000, 0.0)]
        if truth.isdigit():
            cases += [(f"+0{truth}", 1.0), (f"{truth}.5", 0.0), (f"-{truth}", 0.0)]
        if kind == "find_word":
            path = next(p for p in task.data["tree"]["files"] if p.endswith(truth))
            cases.append((f"./{path}", 1.0))
        for value, reward in cases:
            result = play(env, task, [answer(value)])[-1]
            assert (result.done, result.reward, env.info["success"]) == (True, reward, reward == 1.0), (kind, value)


def change_cases(task):
    """(commands, reward) for a change task: other ways to do it, wrong ways, and partial (collateral) ones."""
    data, files = task.data, task.data["tree"]["files"]
    kind, path, new, word = data["kind"], data["path"], data.get("new"), data.get("word")
    other = next(p for p in sorted(files) if p != path)
    if kind == "chmod":
        return [([f"chmod 755 {path}"], 1.0), ([f"find . -name {path.rsplit('/')[-1]} -exec chmod u+x {{}} +"], 1.0),
                ([f"echo chmod +x {path}"], 0.0), ([f"chmod +x {path} && echo extra >> {path}"], 0.0),
                ([f"chmod +x {path}", f"rm {other}"], 0.5), ([f"chmod +x {path}", "touch scratch"], 0.5),
                ([f"chmod go+w {other}", f"chmod +x {path}"], 0.5), ([f"rm {path} && ln -s /etc/shadow {path}"], 0.0),
                ([f"(sleep 10; chmod +x {path}) &"], 0.0),  # not done when the episode ends: it never will be
                ([], 0.0)]
    if kind == "create":
        return [([f"printf {word} > {path}"], 1.0), ([f"echo {word} {word} > {path}"], 0.0),
                ([f"echo {word} > {path}", f"rm {other}"], 0.5), ([f"ln -s /etc/passwd {path}"], 0.0), ([], 0.0),
                ([f"printf '%s%70000s' {word} '' > {path}"], 0.0)]  # too long to be read: not the word
    if kind == "delete":
        return [([f"rm -f {path}"], 1.0), ([], 0.0), ([f"mv {path} {path}.bak"], 0.5), (["rm -rf ./*"], 0.5),
                ([f"(sleep 10; rm {path}) &", f"rm {other}"], 0.0)]
    if kind == "rename":
        return [([f"cp {path} {new} && rm {path}"], 1.0), ([f"cp {path} {new}"], 0.0),
                ([f"mv {path} {new} && echo x >> {new}"], 0.0), ([f"mv {path} {new}", f"cp {new} {path}.old"], 0.5)]
    return [([f"cat {path} > {new}"], 1.0), ([f"mv {path} {new}"], 0.5), ([f"touch {new}"], 0.0),
            ([f"ln -s {path.rsplit('/')[-1]} {new}"], 0.0)]


@pytest.mark.parametrize("kind", CHANGE_KINDS)
def test_change_rewards_read_the_real_workspace(kind):
    env = OSEnv()
    task = task_of(env, kind)
    for commands, reward in change_cases(task):
        results = play(env, task, [*map(bash, commands), answer("done")])
        assert not any(r.observation.startswith("Error") for r in results), results
        assert (results[-1].done, results[-1].reward, env.info["success"]) == (True, reward, reward == 1.0), commands
    # the answer's text plays no part in a change task
    assert play(env, task, [*env.oracle(task)[:-1], answer("whatever")])[-1].reward == 1.0


def test_read_state_reports_links_without_following_them(outside_dir):
    secret = outside_dir / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    (outside_dir / "inner").mkdir()
    (outside_dir / "inner" / "also.txt").write_text("s3cret")
    env = OSEnv()
    for task in env.tasks("test", 5):  # the workspace as populated reads back as the task's initial state
        env.reset(task)
        env.step(bash("true"))
        assert read_state(env.sandbox.workspace) == initial_state(task.data["tree"])
    env.step(bash(f"ln -s {secret} one && ln -s {outside_dir} two && mkdir -p d && ln -s ../.. d/up && mkfifo pipe"))
    state = read_state(env.sandbox.workspace)
    assert state["one"] == ["link", str(secret)] and state["two"] == ["link", str(outside_dir)]
    assert state["d/up"] == ["link", "../.."] and state["pipe"][0] == "other"
    assert "s3cret" not in json.dumps(state) and not any(p.startswith("two/") for p in state)
    env.step(bash("mkdir -p many && cd many && seq 1200 | xargs touch"))
    assert read_state(env.sandbox.workspace) is None  # too many entries: unread, and a change task scores 0
    env.close()


# --- malformed and hostile input ------------------------------------------------------------------------
def test_bad_calls_are_error_observations():
    env = OSEnv()
    task = env.task_at("test", 7)
    calls = [ToolCall("nope", {}), ToolCall("bash", {}), ToolCall("bash", {"command": 5}),
             ToolCall("bash", {"command": ["ls"]}), ToolCall("bash", {"command": "ls", "extra": 1}),
             ToolCall("answer", {}), ToolCall("answer", {"value": 3}), ToolCall("answer", {"value": None}),
             bash(""), bash("   "), bash("echo " + "x" * 300_000)]
    results = play(env, task, calls)
    for call, result in zip(calls, results):
        assert result.observation.startswith("Error: ") and not result.done and result.reward is None, call
        assert len(result.observation) < 2100
    assert not env.done and env.info["tool_errors"] == len(calls)
    final = [env.step(call) for call in env.oracle(task)][-1]  # the episode is still playable
    assert final.done and env.info["success"]
    after = env.step(bash("ls"))
    assert after.observation.startswith("Error: ") and "finished" in after.observation


def test_escape_attempts_become_bounded_observations(outside_dir):
    secret = outside_dir / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    env = OSEnv(max_output_chars=300, timeout=1.0)
    task = env.task_at("test", 0)
    env.reset(task)
    env.step(bash("true"))
    uid, workspace = env.sandbox.uid, env.sandbox.workspace
    cases = [  # (command, what the observation shows)
        ("cat /etc/shadow", "Permission denied"),
        (f"cat {secret}", "Permission denied"),
        ("ls /root", "Permission denied"),
        (f"echo pwned > {outside_dir}/dropped", "Read-only file system"),
        ("echo pwned > /etc/os-env-pwned", "Read-only file system"),
        (f"rm -rf {outside_dir} 2>&1 | tail -n 1", "Read-only file system"),
        ("kill -9 1", "[exit code"),
        ("python3 -c \"import socket; socket.create_connection(('192.0.2.1', 80), timeout=2)\" 2>&1 | tail -n 1",
         "unreachable"),
        ("sleep 1000", "[timed out after 1 s]"),
        ("bomb() { bomb | bomb & }; bomb; sleep 30", "[timed out after 1 s]"),
        ("yes", "[killed: output_limit]"),
        ("seq 1 100000", TRUNCATION_MARKER),
        ("head -c 100000 /dev/urandom", TRUNCATION_MARKER),
        ("python3 -c 'x = bytearray(1 << 30)'", "MemoryError"),
        ("head -c 5000000 /dev/zero > big", "[killed: file_size]"),
        ("echo a\0b", "embedded null byte"),
        ("echo \ud800", "surrogates not allowed"),
    ]
    start = time.monotonic()
    for command, shown in cases:
        result = env.step(bash(command))
        assert shown in result.observation and not result.done and result.reward is None, (command, result)
        assert len(result.observation) <= 300 + len(TRUNCATION_MARKER) + 40, command
        assert "s3cret" not in result.observation
    assert time.monotonic() - start < 20
    assert subprocess.run(["sh", "-c", "echo alive"], capture_output=True, text=True).stdout == "alive\n"
    assert not (outside_dir / "dropped").exists() and not Path("/etc/os-env-pwned").exists()
    assert secret.read_text() == "s3cret"
    results = [env.step(call) for call in env.oracle(task)]  # the session survived all of it
    assert results[-1].done and env.info["success"]
    assert processes_of(uid) == [] and not workspace.exists()


# --- cleanup --------------------------------------------------------------------------------------------
def test_close_leaves_no_processes_or_directories():
    env = OSEnv()
    env.reset(env.task_at("test", 1))
    assert env.sandbox is None  # started by the first command
    env.step(bash("true"))
    first = env.sandbox
    for command in ("sleep 1000 &", "setsid sleep 1000 &", "(sh -c 'sleep 1000 &' &)",
                    "nohup sleep 1000 >/dev/null 2>&1 &"):
        env.step(bash(command))
    assert len(processes_of(first.uid)) >= 4
    env.reset(env.task_at("test", 2))  # a new episode: the old sandbox goes
    assert processes_of(first.uid) == [] and not first.workspace.exists()
    env.step(bash("sleep 1000 &"))
    second = env.sandbox
    assert len(processes_of(second.uid)) == 1
    env.close()
    env.close()  # idempotent
    assert processes_of(second.uid) == [] and not second.workspace.exists() and env.sandbox is None
    # ending the episode frees everything at once, before close()
    task = task_of(env, "delete")
    env.reset(task)
    env.step(bash("(sleep 1000 &) ; sleep 1000 &"))
    third = env.sandbox
    env.step(env.oracle(task)[-1])
    assert env.sandbox is None and processes_of(third.uid) == [] and not third.workspace.exists()


# --- tasks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs", [{}, EASY, {"depth": 1}], ids=["default", "easy", "depth1"])
def test_tasks_are_deterministic_balanced_and_split(kwargs):
    env = OSEnv(**kwargs)
    test = env.tasks("test")
    assert test == OSEnv(**kwargs).tasks("test")
    assert env.tasks("train", 20, start=5000) == OSEnv(**kwargs).tasks("train", 20, start=5000)
    kinds = [t.data["kind"] for t in test]
    assert all(abs(kinds.count(k) - len(kinds) / len(env.kinds)) <= 1 for k in env.kinds)
    train = env.tasks("train", 500)
    assert len({t.prompt for t in train[:100]}) > 60
    problem = lambda t: t.prompt + json.dumps(t.data["tree"], sort_keys=True)  # noqa: E731
    assert not {problem(t) for t in train} & {problem(t) for t in test}


def test_tasks_identical_across_processes():
    assert_tasks_identical_across_processes("environments.os_shell:OSEnv", [{}, EASY], 30)


def test_constructor_kwargs_shape_the_distribution():
    assert OSEnv().task_version == "os-v1"
    flat = OSEnv(depth=0, files=[5, 5], lines=[2, 2], kinds=["line"])
    assert flat.task_version == "os-v1(depth=0,files=(5, 5),lines=(2, 2),kinds=line)"
    for task in flat.tasks("train", 20):
        tree = task.data["tree"]
        assert tree["dirs"] == [] and len(tree["files"]) == 5 and task.data["kind"] == "line"
        assert all(len(text.split()) == 2 for text in tree["files"].values())  # scripts too: "echo word"
    assert {len(t.data["tree"]["dirs"]) for t in OSEnv(depth=2).tasks("train", 50)} == {4, 6}
    assert OSEnv(**EASY).tasks("test", 5) == OSEnv(**{k: list(v) if k != "depth" else v
                                                      for k, v in EASY.items()}).tasks("test", 5)
    for bad in ({"depth": 3}, {"files": (0, 2)}, {"files": (3, 2)}, {"depth": 2, "files": (1, 5)},
                {"kinds": ("line", "dance")}, {"kinds": ()}, {"timeout": 0}, {"timeout": 60},
                {"max_output_chars": 0}):
        with pytest.raises(ValueError):
            OSEnv(**bad)


def test_vocabularies_are_disjoint_and_words_substring_free():
    assert not (set(WORDS) & set(STEMS) or set(WORDS) & set(DIRS) or set(STEMS) & set(DIRS))
    assert not any(a in b for a in WORDS for b in WORDS + ("echo",) if a != b)  # grep counts as the generator does
    assert set(WORDS) | set(STEMS) <= set(KEY_WORDS)  # in the tiny tokenizer's corpus: one token each
    assert set(KINDS) == set(QUESTION_KINDS) | set(CHANGE_KINDS)


# --- through the env service -------------------------------------------------------------------------------
def test_oracle_episodes_through_remote_env_match_in_process():
    service = EnvService(env_factories([("environments.os_shell:OSEnv", {})]), threads=4)
    with serve_in_thread(service) as url:
        local = OSEnv()
        assert_served_like_in_process(url, "os", OSEnv, (local.task_at("test", 0), local.task_at("test", 7)),
                                      [ToolCall("nosuch", {}), ToolCall("bash", {"bogus": [1]}),
                                       bash("ls -R | wc -l; cat nope")], [answer("again")], n_listed=12)
        assert service.sessions == {}  # a question and a change, each closed