"""Sandbox: run model-written commands in a per-session workspace, without network, under resource limits.

One :class:`Sandbox` per environment session. Commands run as a uid of their own (one per live sandbox) in
new mount, PID, IPC and network namespaces held by a small supervisor process (``supervisor.py``, PID 1 of the
session), with rlimits on CPU time, address space, processes and file size, and a byte cap on output.
``close()`` kills every process the session started and deletes the workspace. See docs/sandbox.md for what
is and is not guaranteed.
"""

from __future__ import annotations

import json
import os
import random
import selectors
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from agentrl.envs.base import TRUNCATION_MARKER

SUPERVISOR = Path(__file__).with_name("supervisor.py")
# Session uids are drawn from a range no distribution or container runtime hands out (systemd-nspawn stops
# at 0x6FFFFFFF); a live sandbox claims its uid so that two sandboxes on a host never share one.
UID_BASE, UID_COUNT = 0x7E000000, 1 << 24
SETUP_TIMEOUT = 30.0  # seconds for the supervisor to come up (a loaded machine: it is a Python start)
CLOSE_TIMEOUT = 10.0
FLOOD_FACTOR = 16  # a stream that writes this many times max_output_bytes gets the run killed
COMMAND_PATH = "/usr/local/bin:/usr/bin:/bin"
# Exit codes that mean a limit's signal: the process's own, or a shell's 128 + signal for its child.
_SIGNAL_REASONS = {code: reason for signum, reason in ((signal.SIGXCPU, "cpu_time"), (signal.SIGXFSZ, "file_size"))
                   for code in (-signum, 128 + signum)}


class SandboxUnavailable(RuntimeError):
    """This machine cannot provide the sandbox's guarantees (not root, no namespaces, old kernel)."""


@dataclass(frozen=True)
class SandboxLimits:
    """Per-run limits (``network`` and ``tmp_bytes`` are per session).

    Args:
        cpu_seconds: CPU time of each process (RLIMIT_CPU); past it the process gets SIGXCPU.
        wall_seconds: default wall-clock limit of a run; past it every process of the session is killed.
        memory_bytes: address space of each process (RLIMIT_AS); allocations past it fail.
        max_processes: processes and threads the session may have at once (RLIMIT_NPROC of its uid).
        max_output_bytes: bytes kept of each of stdout and stderr; a run that writes ``FLOOD_FACTOR`` times
            more to one of them is killed.
        max_file_bytes: largest file a process may write (RLIMIT_FSIZE); past it the process gets SIGXFSZ.
        tmp_bytes: size of the session's private ``/tmp`` (a tmpfs, so it is memory).
        network: share the host's network instead of a namespace with loopback only.
    """

    cpu_seconds: int = 10
    wall_seconds: float = 20.0
    memory_bytes: int = 1 << 30
    max_processes: int = 64
    max_output_bytes: int = 64 << 10
    max_file_bytes: int = 64 << 20
    tmp_bytes: int = 64 << 20
    network: bool = False

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if name != "network" and not value > 0:
                raise ValueError(f"SandboxLimits.{name} must be positive, not {value!r}")


@dataclass(frozen=True)
class RunResult:
    """What a command did.

    Args:
        stdout, stderr: the output, decoded as UTF-8 (bad bytes replaced), each cut to ``max_output_bytes``
            with :data:`~agentrl.envs.base.TRUNCATION_MARKER` appended when longer.
        exit_code: the exit status; negative when killed by a signal (``-signal.SIGXCPU``: out of CPU time;
            a shell command reports its child's death as ``128 + signal`` instead).
        timed_out: the wall-clock limit was reached.
        killed_reason: why the process ended abnormally, if the sandbox knows: ``"timeout"``,
            ``"output_limit"``, ``"cpu_time"`` (SIGXCPU) or ``"file_size"`` (SIGXFSZ), the last two read from
            the exit code (so a program that exits 152 or 153 of its own accord is misread); else None.
        truncated: stdout or stderr was cut.
    """

    stdout: str
    stderr: str
    exit_code: int
    timed_out: bool = False
    killed_reason: str | None = None
    truncated: bool = False


class Sandbox:
    """A per-session workspace where commands run without network, under limits, as an unprivileged uid.

    Needs root (to create the namespaces and switch to the session uid) and Linux >= 5.12; raises
    :class:`SandboxUnavailable` otherwise. Thread-safe: runs of one sandbox are serialized, different
    sandboxes run concurrently.

    Args:
        limits: the limits; defaults to ``SandboxLimits()``.
        root: directory in which the workspace directory is created (default: the system temp dir); it and its
            parents must be searchable by other users.

    Example:
        >>> with Sandbox(SandboxLimits(wall_seconds=5)) as box:  # doctest: +SKIP
        ...     box.run("echo hi > note.txt && cat note.txt").stdout
        'hi\\n'
    """

    def __init__(self, limits: SandboxLimits | None = None, root: str | os.PathLike | None = None) -> None:
        self.limits = limits or SandboxLimits()
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._supervisor: subprocess.Popen | None = None
        self._pid1: int | None = None
        self.workspace: Path | None = None
        if os.geteuid() != 0:
            raise SandboxUnavailable(f"the sandbox needs root to create namespaces and switch uid; euid {os.geteuid()}")
        root = Path(root or tempfile.gettempdir()).resolve()
        for directory in (root, *root.parents):
            if not directory.stat().st_mode & stat.S_IXOTH:
                raise SandboxUnavailable(f"{directory} is not searchable by other users, so the sandbox uid "
                                         f"could not reach a workspace under {root}")
        self.uid, self._uid_claim = _claim_uid()
        try:
            self.workspace = Path(tempfile.mkdtemp(prefix="agentrl-sandbox-", dir=root))
            os.chown(self.workspace, self.uid, self.uid)
            self._start_supervisor()
        except BaseException:
            self.close()
            raise

    def _start_supervisor(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        config = {"fd": theirs.fileno(), "workspace": str(self.workspace), "uid": self.uid,
                  "network": self.limits.network, "tmp_bytes": self.limits.tmp_bytes}
        self._sock = ours
        with theirs:
            # No preexec_fn (unsafe with threads): all privileged setup happens in the supervisor script.
            self._supervisor = subprocess.Popen(
                [sys.executable, "-I", "-S", str(SUPERVISOR), json.dumps(config)],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, pass_fds=[theirs.fileno()],
                start_new_session=True)
        ours.settimeout(SETUP_TIMEOUT)
        reply = self._receive()
        ours.settimeout(None)
        if "error" in reply:
            raise SandboxUnavailable(f"cannot set up the sandbox: {reply['error']}")
        self._pid1 = reply["ready"]

    def run(self, command: str | list[str], *, timeout: float | None = None, stdin: str | None = None) -> RunResult:
        """Run a command in the workspace and wait for it (not for what it left in the background).

        Args:
            command: a shell command line (run by ``/bin/sh -c``) or an argv list (looked up on ``PATH``).
            timeout: wall-clock seconds; defaults to ``limits.wall_seconds``. Reaching it kills every
                process of the session, including ones earlier runs left in the background.
            stdin: text fed to the command's standard input (default: empty).

        Returns:
            A :class:`RunResult`. Background processes keep running until the session is closed or a run
            times out; their later output is dropped.
        """
        argv = ["/bin/sh", "-c", command] if isinstance(command, str) else list(command)
        request = {"op": "run", "argv": argv, "env": self._command_env(), "rlimits": self._rlimits()}
        with self._lock:
            deadline = time.monotonic() + (self.limits.wall_seconds if timeout is None else timeout)
            if self._sock is None:
                raise RuntimeError("run() on a closed Sandbox")
            stdin_fd = _stdin_fd(stdin)
            out_r, out_w = os.pipe()
            err_r, err_w = os.pipe()
            try:
                socket.send_fds(self._sock, [json.dumps(request).encode()], [stdin_fd, out_w, err_w])
            finally:
                for fd in (stdin_fd, out_w, err_w):
                    os.close(fd)
            try:
                return self._collect(out_r, err_r, deadline)
            finally:
                os.close(out_r)
                os.close(err_r)

    def _collect(self, out_r: int, err_r: int, deadline: float) -> RunResult:
        """Read both pipes until the run's process exits, the deadline passes or the output floods."""
        limit = self.limits.max_output_bytes
        captures = {out_r: _Capture(limit), err_r: _Capture(limit)}
        exit_code, killed_reason = None, None
        with selectors.DefaultSelector() as selector:
            for fd in captures:
                os.set_blocking(fd, False)
                selector.register(fd, selectors.EVENT_READ)
            selector.register(self._sock, selectors.EVENT_READ)
            while exit_code is None and killed_reason is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    killed_reason = "timeout"
                    break
                for key, _ in selector.select(remaining):
                    if key.fileobj is self._sock:
                        exit_code = self._receive()["exit"]
                    elif not captures[key.fd].read(key.fd):
                        selector.unregister(key.fd)
                if exit_code is None and any(c.seen > FLOOD_FACTOR * limit for c in captures.values()):
                    killed_reason = "output_limit"
        if killed_reason is not None:
            exit_code = self._kill_all(exit_code)
        for fd, capture in captures.items():
            capture.drain(fd)  # what the process wrote before it exited; later writers get EPIPE
        if killed_reason is None:
            killed_reason = _SIGNAL_REASONS.get(exit_code)
        out, err = captures[out_r], captures[err_r]
        return RunResult(stdout=out.text(), stderr=err.text(), exit_code=exit_code,
                         timed_out=killed_reason == "timeout", killed_reason=killed_reason,
                         truncated=out.truncated or err.truncated)

    def _kill_all(self, exit_code: int | None) -> int:
        """Have the supervisor kill every process of the session; the run's exit code (it died first)."""
        self._sock.send(json.dumps({"op": "kill"}).encode())
        while "killed" not in (reply := self._receive()):
            exit_code = reply["exit"]
        return exit_code

    def _receive(self) -> dict:
        message = self._sock.recv(1 << 16)
        if not message:
            raise RuntimeError(f"the sandbox supervisor (pid {self._supervisor.pid}) exited unexpectedly")
        return json.loads(message)

    def _command_env(self) -> dict[str, str]:
        return {"PATH": COMMAND_PATH, "HOME": str(self.workspace), "TMPDIR": "/tmp", "LANG": "C.UTF-8"}

    def _rlimits(self) -> dict[str, tuple[int, int]]:
        limits = self.limits
        return {"RLIMIT_CPU": (limits.cpu_seconds, limits.cpu_seconds + 1),  # SIGXCPU first, SIGKILL 1 s later
                "RLIMIT_AS": (limits.memory_bytes, limits.memory_bytes),
                "RLIMIT_NPROC": (limits.max_processes, limits.max_processes),
                "RLIMIT_FSIZE": (limits.max_file_bytes, limits.max_file_bytes),
                "RLIMIT_CORE": (0, 0)}

    def close(self) -> None:
        """Kill every process the session started, delete the workspace and free the uid. Idempotent."""
        with self._lock:
            if self._sock is not None:
                # The supervisor reads end of file: it kills everything and exits. shutdown() rather than only
                # close(), so that a copy of the socket in a process forked from ours cannot keep it open.
                self._sock.shutdown(socket.SHUT_RDWR)
                self._sock.close()
                self._sock = None
            if self._supervisor is not None:
                try:
                    self._supervisor.wait(CLOSE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    # Safe by pid: PID 1 is the waiting supervisor's child, so its pid is not reused yet.
                    if self._pid1 is not None:
                        os.kill(self._pid1, signal.SIGKILL)
                    self._supervisor.kill()
                    self._supervisor.wait()
                self._supervisor = None
            if self.workspace is not None and self.workspace.exists():
                shutil.rmtree(self.workspace)
            self._uid_claim.close()

    def __enter__(self) -> Sandbox:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Sandbox(uid={self.uid}, workspace={str(self.workspace)!r}, limits={asdict(self.limits)})"


class _Capture:
    """One output stream: the first ``limit`` bytes, and how many were written in all."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data, self.seen = limit, bytearray(), 0

    def read(self, fd: int) -> bool:
        """Take what the pipe holds now; False at end of file."""
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return True
        self._keep(chunk)
        return bool(chunk)

    def drain(self, fd: int) -> None:
        """Take what is left in the pipe without waiting, up to the flood threshold."""
        start = self.seen
        while self.seen - start <= FLOOD_FACTOR * self.limit:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            self._keep(chunk)

    def _keep(self, chunk: bytes) -> None:
        self.seen += len(chunk)
        self.data += chunk[: max(0, self.limit - len(self.data))]

    @property
    def truncated(self) -> bool:
        return self.seen > self.limit

    def text(self) -> str:
        text = self.data.decode(errors="replace")
        return text + TRUNCATION_MARKER if self.truncated else text


def _stdin_fd(text: str | None) -> int:
    """A readable descriptor holding ``text``: a memfd, so a large input never blocks the caller."""
    if text is None:
        return os.open(os.devnull, os.O_RDONLY)
    fd = os.memfd_create("agentrl-sandbox-stdin")
    os.write(fd, text.encode())
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _claim_uid() -> tuple[int, socket.socket]:
    """A uid no other live sandbox on this host holds, and the socket that holds it.

    The claim is an abstract unix socket named after the uid: binding one is exclusive, and the kernel drops it
    when the socket is closed or its process dies, so a crashed server leaves no stale claim behind.
    """
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    for _ in range(100):
        uid = UID_BASE + random.randrange(UID_COUNT)
        try:
            claim.bind(f"\0agentrl-sandbox-uid-{uid}")
            return uid, claim
        except OSError:
            continue
    claim.close()
    raise SandboxUnavailable("found no free sandbox uid in 100 draws")
