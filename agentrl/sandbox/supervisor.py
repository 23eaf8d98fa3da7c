"""PID 1 of one sandbox session: sets up its namespaces, then forks and kills its processes on request.

Run as a script by :class:`agentrl.sandbox.Sandbox` (``python -I -S supervisor.py CONFIG_JSON``, as root, stdlib
only) with one end of a ``SOCK_SEQPACKET`` socket pair. It

1. unshares the mount, PID, IPC and (unless the network is allowed) network namespaces and forks; the parent
   stays outside and only waits, so the session's PID 1 is reaped by us and not by the host's init;
2. as PID 1 remounts every filesystem read-only and nosuid, mounts a private size-limited tmpfs on ``/tmp``
   (bound on ``/var/tmp`` and ``/dev/shm`` too), binds the workspace back read-write, mounts a ``/proc`` that
   shows only the session's processes and brings up loopback;
3. serves requests, one JSON datagram each: ``run`` forks a child that takes the three file descriptors sent
   with the request as stdin/stdout/stderr, drops to the session uid under rlimits and execs the command;
   ``kill`` SIGKILLs every process in the namespace and reaps them all. End of file (the Sandbox closed, or its
   process died) does the same and exits, which takes the namespaces down with it.

Replies: ``{"ready": host_pid}`` or ``{"error": text}`` after setup, ``{"exit": code}`` when a run's process
ends (negative: killed by that signal), ``{"killed": true}`` after a kill.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import json
import os
import resource
import select
import signal
import socket
import struct
import sys

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x08000000, 0x20000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT, MS_BIND, MS_PRIVATE = 0x2, 0x4, 0x8, 0x20, 0x1000, 0x40000
AT_FDCWD, AT_RECURSIVE = -100, 0x8000
MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 0x1, 0x2
SYS_MOUNT_SETATTR = 442  # the same on every architecture: syscall numbers from 424 on are shared
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
SIOCSIFFLAGS, IFF_UP, IFF_LOOPBACK, IFF_RUNNING = 0x8914, 0x1, 0x8, 0x40
MAX_REQUEST_BYTES = 1 << 20

libc = ctypes.CDLL(None, use_errno=True)


class MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64),
                ("propagation", ctypes.c_uint64), ("userns_fd", ctypes.c_uint64)]


def check(result: int, what: str) -> None:
    if result == -1:
        errno = ctypes.get_errno()
        raise OSError(errno, f"{what}: {os.strerror(errno)}")


def mount(source: str | None, target: str, fstype: str | None, flags: int, data: str | None = None) -> None:
    encode = lambda s: None if s is None else s.encode()  # noqa: E731
    check(libc.mount(encode(source), encode(target), encode(fstype), ctypes.c_ulong(flags), encode(data)),
          f"mount {target}")


def isolate_filesystem(workspace: str, tmp_bytes: int) -> None:
    """Everything read-only except the workspace and a private /tmp; a /proc of this PID namespace only."""
    workspace_fd = os.open(workspace, os.O_PATH | os.O_DIRECTORY)  # reachable after /tmp is covered
    # Private first, so nothing mounted here shows up on the host; then read-only and nosuid, recursively.
    attr = MountAttr(attr_set=MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID, propagation=MS_PRIVATE)
    check(libc.syscall(ctypes.c_long(SYS_MOUNT_SETATTR), ctypes.c_long(AT_FDCWD), b"/", ctypes.c_long(AT_RECURSIVE),
                       ctypes.byref(attr), ctypes.c_long(ctypes.sizeof(attr))), "mount_setattr / read-only")
    mount("tmpfs", "/tmp", "tmpfs", MS_NOSUID | MS_NODEV, f"size={tmp_bytes},mode=1777")
    for shared_tmp in ("/var/tmp", "/dev/shm"):
        if os.path.isdir(shared_tmp) and not os.path.islink(shared_tmp):
            mount("/tmp", shared_tmp, None, MS_BIND)
    os.makedirs(workspace, exist_ok=True)  # a mount point in the new /tmp when the workspace lives under /tmp
    mount(f"/proc/self/fd/{workspace_fd}", workspace, None, MS_BIND)
    mount(None, workspace, None, MS_REMOUNT | MS_BIND | MS_NOSUID | MS_NODEV)  # the bind inherited read-only
    os.close(workspace_fd)
    mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s, SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", IFF_UP | IFF_LOOPBACK | IFF_RUNNING))


def send(sock: socket.socket, **message) -> None:
    sock.send(json.dumps(message).encode())


def exec_command(request: dict, fds: list[int], config: dict) -> None:
    """In the forked child: take the request's descriptors, drop to the session uid under rlimits, exec."""
    signal.set_wakeup_fd(-1)
    for signum in (signal.SIGCHLD, signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores the last two; exec keeps that
        signal.signal(signum, signal.SIG_DFL)
    os.setsid()
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(config["workspace"])
    for name, (soft, hard) in request["rlimits"].items():
        resource.setrlimit(getattr(resource, name), (soft, hard))
    uid = config["uid"]
    os.setgroups([])
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    check(libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0), "prctl(PR_SET_NO_NEW_PRIVS)")
    argv = request["argv"]
    os.execve(find_executable(argv[0], request["env"]["PATH"]), argv, request["env"])


def find_executable(name: str, path: str) -> str:
    """``name`` looked up on ``path`` as the session uid sees it.

    Not ``os.execvpe``: it imports a module, and the session uid may not be able to read this Python's stdlib.
    """
    if "/" in name:
        return name
    for directory in path.split(":"):
        candidate = os.path.join(directory, name)
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    raise FileNotFoundError(errno.ENOENT, "not found on PATH", name)


def spawn(request: dict, fds: list[int], config: dict) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            exec_command(request, fds, config)
        except BaseException as e:  # noqa: BLE001 -- the child must never return into the serve loop
            os.write(2, f"sandbox: cannot run {request['argv'][0]!r}: {e}\n".encode(errors="replace"))
        finally:
            os._exit(127)
    for fd in fds:
        os.close(fd)
    return pid


def reap(sock: socket.socket | None, run_pid: int | None, block: bool) -> int | None:
    """Reap finished children (all of them when ``block``); report the run's exit. Returns the live run pid."""
    while True:
        try:
            pid, status = os.waitpid(-1, 0 if block else os.WNOHANG)
        except ChildProcessError:
            return run_pid
        if pid == 0:
            return run_pid
        if pid == run_pid:
            run_pid = None
            if sock is not None:
                send(sock, exit=os.waitstatus_to_exitcode(status))


def kill_all(sock: socket.socket | None, run_pid: int | None) -> None:
    """SIGKILL every other process in this PID namespace and reap them all.

    ``kill(-1)`` holds the kernel's task-list lock while it signals, so no process can fork its way out of it;
    every process in the namespace descends from PID 1, so once ``waitpid`` finds no children none are left.
    """
    try:
        os.kill(-1, signal.SIGKILL)
    except ProcessLookupError:
        pass  # nothing was running
    reap(sock, run_pid, block=True)


def serve(sock: socket.socket, config: dict) -> None:
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)  # a Python handler, so SIGCHLD reaches the wakeup pipe
    run_pid = None
    while True:
        readable, _, _ = select.select([sock, wake_r], [], [])
        if wake_r in readable:
            os.read(wake_r, 4096)
            run_pid = reap(sock, run_pid, block=False)
        if sock not in readable:
            continue
        message, fds, _, _ = socket.recv_fds(sock, MAX_REQUEST_BYTES, 3)
        if not message:
            kill_all(None, run_pid)
            return
        request = json.loads(message)
        if request["op"] == "run":
            run_pid = spawn(request, fds, config)
        elif request["op"] == "kill":
            kill_all(sock, run_pid)
            run_pid = None
            send(sock, killed=True)
        else:
            raise ValueError(f"unknown request {request['op']!r}")


def main(config: dict) -> None:
    sock = socket.socket(fileno=config["fd"])
    flags = CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | (0 if config["network"] else CLONE_NEWNET)
    try:
        check(libc.unshare(flags), "unshare")
    except OSError as e:
        send(sock, error=str(e))
        return
    pid1 = os.fork()
    if pid1:  # outside the namespace: only wait, so that PID 1 is reaped here
        sock.close()
        os.waitpid(pid1, 0)
        os._exit(0)  # nothing to flush: skip the interpreter's teardown, which close() would wait for
    check(libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0), "prctl(PR_SET_PDEATHSIG)")
    try:
        host_pid = int(os.readlink("/proc/self"))  # the host's /proc, before ours covers it
        isolate_filesystem(config["workspace"], config["tmp_bytes"])
        if not config["network"]:
            loopback_up()
    except OSError as e:
        send(sock, error=str(e))
        return
    send(sock, ready=host_pid)
    serve(sock, config)
    os._exit(0)


if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
