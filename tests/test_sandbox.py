"""The sandbox with real processes: normal commands work, escapes and limits are stopped, the host stays intact."""

from __future__ import annotations

import re
import subprocess
import threading
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agentrl.envs.base import TRUNCATION_MARKER
from agentrl.rollout.traces import oracle_conversation
from agentrl.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from agentrl.types import ToolCall

DOC = Path(__file__).parents[1] / "docs" / "sandbox.md"


def make_sandbox(**limits) -> Sandbox:
    try:
        return Sandbox(SandboxLimits(**limits))
    except SandboxUnavailable as e:
        pytest.skip(f"this machine cannot provide the sandbox: {e}")


@pytest.fixture(scope="module", autouse=True)
def sandbox_available():
    make_sandbox().close()


def processes_of(uid: int) -> list[int]:
    """Host pids whose real uid is ``uid`` (a sandbox's processes, wherever they hid)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                status = (entry / "status").read_text()
            except (FileNotFoundError, ProcessLookupError):
                continue  # exited while we looked
            uid_line = next(line for line in status.splitlines() if line.startswith("Uid:"))
            if int(uid_line.split()[1]) == uid:
                pids.append(int(entry.name))
    return pids


def assert_host_intact() -> None:
    assert subprocess.run(["sh", "-c", "echo alive"], capture_output=True, text=True, check=True).stdout == "alive\n"


@pytest.fixture
def http_server():
    class Hello(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"hello")

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


SERVE_AND_FETCH = """
import http.server, threading, urllib.request
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
threading.Thread(target=server.serve_forever, daemon=True).start()
print(urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/", timeout=3).status)
"""


def fetch_command(url: str) -> list[str]:
    return ["python3", "-c", f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=3).read())"]


# --- what should work ---------------------------------------------------------------------------------


def test_normal_commands_run_in_the_workspace():
    with make_sandbox() as box:
        result = box.run("echo hello && pwd && echo oops >&2")
        assert (result.stdout, result.stderr, result.exit_code) == (f"hello\n{box.workspace}\n", "oops\n", 0)
        assert box.run(["python3", "-c", "print(6 * 7)"]).stdout == "42\n"
        assert box.run("cat", stdin="from stdin").stdout == "from stdin"
        assert box.run("exit 3").exit_code == 3

        assert box.run("echo written inside > note.txt && mkdir sub && ls").stdout == "note.txt\nsub\n"
        assert (box.workspace / "note.txt").read_text() == "written inside\n"
        (box.workspace / "given.txt").write_text("from the host")
        assert box.run("cat given.txt").stdout == "from the host"

        assert box.run("echo scratch > /tmp/scratch && cat /tmp/scratch").stdout == "scratch\n"


def test_close_deletes_the_workspace_and_refuses_runs():
    box = make_sandbox()
    box.run("echo data > file")
    workspace = box.workspace
    box.close()
    assert not workspace.exists()
    box.close()  # idempotent
    with pytest.raises(RuntimeError, match="closed"):
        box.run("true")


def test_sandboxes_run_concurrently_without_seeing_each_other():
    def session(token: str) -> tuple[int, str, bool]:
        with make_sandbox() as box:
            box.run(f"echo {token} > mine && echo {token} > /tmp/mine")
            own_tmp = box.run("ls /tmp").stdout.split() == sorted(["mine", box.workspace.name])
            return box.uid, box.run("cat mine /tmp/mine").stdout, own_tmp

    tokens = [uuid.uuid4().hex for _ in range(4)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(session, tokens))
    assert len({uid for uid, _, _ in results}) == 4
    assert [out for _, out, _ in results] == [f"{token}\n{token}\n" for token in tokens]
    assert all(own_tmp for _, _, own_tmp in results)  # no other session's workspace or files in its /tmp


def test_docs_environment_example_works():
    block = next(b for b in re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL) if "ToolEnvironment" in b)
    namespace: dict = {}
    exec(compile(block, str(DOC), "exec"), namespace)
    env_class = namespace["ShellEnv"]
    tasks = env_class().tasks("test", 2)
    assert all(oracle_conversation(env_class(), task).success for task in tasks)
    env = env_class()
    env.reset(tasks[0])
    workspace = env.sandbox.workspace
    env.step(ToolCall("shell", {"command": "ln -s /etc/shadow answer.txt"}))
    assert env.step(ToolCall("done", {})).reward == 0.0  # read as the sandbox uid: no secret reaches the reward
    env.close()
    assert not workspace.exists()


# --- escapes ------------------------------------------------------------------------------------------


def test_cannot_read_files_that_are_not_world_readable(outside_dir):
    secret = outside_dir / "secret.txt"
    secret.write_text("s3cret")
    secret.chmod(0o600)
    with make_sandbox() as box:
        assert box.run(f"ls {outside_dir}").stdout == "secret.txt\n"  # visible, so permissions stop the read
        result = box.run(f"cat {secret}")
        assert result.exit_code != 0 and "Permission denied" in result.stderr
        assert "s3cret" not in result.stdout
        assert box.run("cat /etc/shadow").exit_code != 0
    assert secret.read_text() == "s3cret"


def test_cannot_write_outside_the_workspace(outside_dir):
    with make_sandbox() as box:
        result = box.run(f"echo pwned > {outside_dir}/dropped; rm -f {outside_dir}/*; touch /etc/pwned")
        assert result.stderr.count("Read-only file system") == 2
        marker = f"/tmp/agentrl-sandbox-probe-{uuid.uuid4().hex}"
        assert box.run(f"echo private > {marker}").exit_code == 0  # its own /tmp, not the host's
    assert not (outside_dir / "dropped").exists()
    assert not Path("/etc/pwned").exists() and not Path(marker).exists()


def test_no_network(http_server):
    assert urllib.request.urlopen(http_server, timeout=5).read() == b"hello"  # the host reaches it
    with make_sandbox() as box:
        result = box.run(fetch_command(http_server))
        assert result.exit_code == 1 and "Connection refused" in result.stderr
        outside = box.run(["python3", "-c", "import socket; socket.create_connection(('192.0.2.1', 80), timeout=3)"])
        assert outside.exit_code == 1 and "Network is unreachable" in outside.stderr
        assert box.run(["python3", "-c", SERVE_AND_FETCH]).stdout == "200\n"  # its own loopback works


def test_network_flag_shares_the_host_network(http_server):
    with make_sandbox(network=True) as box:
        assert box.run(fetch_command(http_server)).stdout == "b'hello'\n"


def test_cannot_see_or_signal_host_processes():
    with make_sandbox() as box:
        pids = box.run("ls /proc | grep '^[0-9]'").stdout.split()
        assert len(pids) <= 4  # PID 1, sh, ls, grep
        assert box.run("kill -9 1").exit_code != 0  # the supervisor is root's


def test_fork_bomb_is_bounded_and_cleaned_up():
    with make_sandbox(max_processes=32) as box:
        counts = []

        def sample():
            for _ in range(20):
                counts.append(len(processes_of(box.uid)))
                time.sleep(0.1)

        sampler = threading.Thread(target=sample)
        sampler.start()
        result = box.run("bomb() { bomb | bomb & }; bomb; sleep 30", timeout=2.5)
        sampler.join()
        assert result.timed_out and result.killed_reason == "timeout"
        assert 1 < max(counts) <= 32
        assert processes_of(box.uid) == []  # a timeout kills every process of the session
        assert box.run("echo still usable").stdout == "still usable\n"
    assert processes_of(box.uid) == []
    assert_host_intact()


# --- limits -------------------------------------------------------------------------------------------


def test_memory_limit():
    with make_sandbox(memory_bytes=256 << 20) as box:
        result = box.run(["python3", "-c", "x = bytearray(1 << 30)"])
        assert result.exit_code == 1 and "MemoryError" in result.stderr
        assert box.run(["python3", "-c", "x = bytearray(64 << 20)"]).exit_code == 0


def test_cpu_time_limit():
    with make_sandbox(cpu_seconds=1, wall_seconds=10) as box:
        start = time.monotonic()
        result = box.run("python3 -c 'while True: pass'")
        assert result.killed_reason == "cpu_time" and not result.timed_out
        assert time.monotonic() - start < 8


def test_wall_clock_limit_kills_the_run():
    with make_sandbox() as box:
        start = time.monotonic()
        result = box.run("sleep 30", timeout=0.5)
        assert result.timed_out and result.killed_reason == "timeout" and result.exit_code < 0
        assert time.monotonic() - start < 3
        assert processes_of(box.uid) == []


def test_file_size_limit():
    with make_sandbox(max_file_bytes=1 << 20) as box:
        result = box.run("head -c 2000000 /dev/zero > big")
        assert result.killed_reason == "file_size"
        assert (box.workspace / "big").stat().st_size == 1 << 20


def test_output_is_capped_and_a_flood_is_killed():
    with make_sandbox(max_output_bytes=1000) as box:
        short = box.run("seq 1 2000")  # 8893 bytes: cut, not killed
        assert short.truncated and short.exit_code == 0 and short.killed_reason is None
        assert short.stdout == "\n".join(map(str, range(1, 2001)))[:1000] + TRUNCATION_MARKER

        start = time.monotonic()
        flood = box.run("yes", timeout=20)
        assert flood.killed_reason == "output_limit" and flood.truncated and not flood.timed_out
        assert flood.stdout == "y\n" * 500 + TRUNCATION_MARKER
        assert time.monotonic() - start < 5


def test_background_processes_do_not_block_runs_and_die_on_close():
    with make_sandbox() as box:
        start = time.monotonic()
        box.run("sleep 1000 &")
        box.run("setsid sleep 1000 &")
        box.run("(sh -c 'sleep 1000 &' &)")  # double fork: reparented, not a child of anything we ran
        box.run("nohup sleep 1000 >/dev/null 2>&1 &")
        assert box.run("(sleep 0.3; echo late) & echo now").stdout == "now\n"
        assert time.monotonic() - start < 3
        time.sleep(0.5)
        assert box.run("echo next").stdout == "next\n"  # the late echo went nowhere
        assert len(processes_of(box.uid)) == 4
    assert processes_of(box.uid) == []
    assert_host_intact()

