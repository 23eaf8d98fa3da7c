"""Load benchmark of ``agentrl serve-env``: many concurrent sessions of a scripted policy on loopback.

It starts a real ``agentrl serve-env`` process on a free loopback port, then measures tool-call round trips:

1. **sequential** — one session, calls back to back, one at a time: the per-call cost with no queueing. Twice:
   with a minimal keep-alive HTTP client (what the server and the loopback cost) and with ``RemoteEnvironment``
   (what the trainer's client adds: httpx, JSON, StepResult).
2. **load** — ``--sessions`` sessions opened at once and kept open (the server's ``/health`` must count them
   all), stepped concurrently ``--steps-per-session`` times each by ``--client-procs`` client processes, then
   closed. With ``--think-ms 0`` every session sends its next call as soon as the last one returns (a closed
   loop at full speed: the round trip is mostly waiting in the server's queue behind the other sessions'
   calls). With ``--think-ms T`` a session waits a random 0..2T ms before each call, as an agent waits for its
   model, so calls arrive spread out and the round trip is what one call costs while the others stay open.

A round trip is timed in the client process, from writing the request to having read the whole reply, on a
connection kept alive (one per session). An error is any failed request, non-2xx reply, or reply without the
step's fields. The trivial tool is ``bench.echo_env:EchoEnv.echo`` (returns its argument); ``--env calculator``
uses the calculator's ``calculate`` instead.

The figures, their conditions and what dominates them: docs/env-service.md, "Load benchmark".

Usage:
    .venv/bin/python bench/env_load.py                      # 1000 sessions x 5 calls, think 0 and 2000 ms
    .venv/bin/python bench/env_load.py --inline             # serve-env --inline echo: calls in the event loop
    .venv/bin/python bench/env_load.py --sessions 2000 --steps-per-session 10 --think-ms 0 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import random
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[1]
ENVS = {"echo": "bench.echo_env:EchoEnv", "calculator": "calculator"}  # served name -> --env value
CALLS = {"echo": ("echo", {"text": "hello"}), "calculator": ("calculate", {"expression": "2 + 2"})}


# --- a minimal HTTP/1.1 keep-alive client (cheap, so the server gets the CPU) -----------------------
class Connection:
    """One kept-alive HTTP/1.1 connection; ``request`` returns ``(status, body bytes)``.

    Like any keep-alive client it connects again when the server has closed the idle connection (uvicorn does
    after 5 s); ``reconnects`` counts that.
    """

    def __init__(self, url: str) -> None:
        self.host, port = url.removeprefix("http://").rsplit(":", 1)
        self.port, self.reconnects = int(port), -1

    async def connect(self) -> Connection:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)  # asyncio sets TCP_NODELAY
        self.reconnects += 1
        return self

    @classmethod
    async def open(cls, url: str) -> Connection:
        return await cls(url).connect()

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, bytes]:
        if self.reader.at_eof():
            self.writer.close()
            await self.connect()
        data = b"" if body is None else json.dumps(body).encode()
        head = (f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Length: {len(data)}\r\n"
                + ("Content-Type: application/json\r\n" if body is not None else "") + "\r\n")
        self.writer.write(head.encode() + data)
        lines = (await self.reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(":", 1) for line in lines[1:] if line)
        length = {k.lower(): v for k, v in headers.items()}.get("content-length")
        if length is None:
            raise RuntimeError(f"reply without Content-Length: {lines[0]}")
        return int(lines[0].split()[1]), await self.reader.readexactly(int(length))

    def close(self) -> None:
        self.writer.close()


def step_body(env: str, n: int) -> dict[str, Any]:
    name, arguments = CALLS[env]
    return {"tool_calls": [{"id": f"call_{n}", "type": "function", "function": {"name": name, "arguments": arguments}}]}


def check_reply(status: int, raw: bytes, fields: tuple[str, ...]) -> dict[str, Any]:
    body = json.loads(raw)
    if not 200 <= status < 300 or "error" in body or any(field not in body for field in fields):
        raise RuntimeError(f"HTTP {status}: {raw[:300]!r}")
    return body


# --- the server ------------------------------------------------------------------------------------
@contextmanager
def serve_env(env: str, workers: int, max_sessions: int, inline: bool) -> Iterator[tuple[str, int]]:
    """``agentrl serve-env`` in a subprocess on a free loopback port; yields its URL and pid once it listens."""
    command = [sys.executable, "-m", "agentrl.cli", "serve-env", "--env", ENVS[env], "--host", "127.0.0.1",
               "--port", "0", "--workers", str(workers), "--max_sessions", str(max_sessions),
               *(["--inline", env] if inline else [])]
    proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stdout.readline()  # printed once it listens
        if " at http://" not in line:
            raise RuntimeError(f"serve-env did not start: {line!r}")
        yield line.split(" at ")[1].split()[0], proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def server_sessions(url: str) -> int:
    """The open sessions the server's ``GET /health`` counts."""
    async def get() -> int:
        conn = await Connection.open(url)
        try:
            return check_reply(*await conn.request("GET", "/health"), ("sessions",))["sessions"]
        finally:
            conn.close()

    return asyncio.run(get())


# --- CPU accounting (Linux /proc), to say what else ran ----------------------------------------------
def machine_busy_s() -> float:
    """CPU seconds all cores spent busy since boot (user+nice+system+irq+softirq+steal)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- 1. sequential ---------------------------------------------------------------------------------
def sequential_raw(url: str, env: str, calls: int) -> list[float]:
    """Round trips of ``calls`` back-to-back steps of one session, with the minimal client."""
    async def run() -> list[float]:
        conn = await Connection.open(url)
        created = check_reply(*await conn.request("POST", "/sessions", {"env": env, "split": "train", "index": 0}),
                              ("session_id",))
        path, times = f"/sessions/{created['session_id']}/step", []
        for n in range(calls):
            body = step_body(env, n)
            start = time.perf_counter()
            status, raw = await conn.request("POST", path, body)
            times.append(time.perf_counter() - start)
            check_reply(status, raw, ("results",))
        check_reply(*await conn.request("DELETE", f"/sessions/{created['session_id']}"), ("closed",))
        conn.close()
        return times

    return asyncio.run(run())


def sequential_remote_env(url: str, env: str, calls: int) -> list[float]:
    """Round trips of ``calls`` back-to-back ``RemoteEnvironment.step`` calls (the trainer's client)."""
    from agentrl.envs.client import RemoteEnvironment
    from agentrl.types import ToolCall

    remote = RemoteEnvironment(url, env)
    remote.reset(remote.task_at("train", 0))
    call, times = ToolCall(*CALLS[env]), []
    for _ in range(calls):
        start = time.perf_counter()
        remote.step(call)
        times.append(time.perf_counter() - start)
    remote.close()
    return times


# --- 2. load: client processes ----------------------------------------------------------------------
class Tally:
    """Round trips and errors of one kind of request in one client process."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self.errors: list[str] = []

    async def measure(self, conn: Connection, method: str, path: str, body: Any, fields: tuple[str, ...]) -> Any:
        start = time.perf_counter()
        try:
            status, raw = await conn.request(method, path, body)
            self.times.append(time.perf_counter() - start)
            return check_reply(status, raw, fields)
        except Exception as exc:  # the benchmark counts failures; it must not stop at the first
            self.errors.append(f"{method} {path}: {type(exc).__name__}: {exc}"[:300])
            return None


async def client_load(url: str, env: str, sessions: int, steps: int, think_s: float, seed: int,
                      barrier: Any) -> dict[str, Any]:
    """One client process: open ``sessions`` sessions, step them concurrently, close them; the shared
    ``barrier`` holds every process between phases, so all sessions are open while any steps."""
    rng = random.Random(seed)
    creates, step_tally, closes = Tally(), Tally(), Tally()
    conns = await asyncio.gather(*(Connection.open(url) for _ in range(sessions)))
    opened = await asyncio.gather(*(creates.measure(conn, "POST", "/sessions",
                                                 {"env": env, "split": "train", "index": i}, ("session_id",))
                                    for i, conn in enumerate(conns)))
    ids = [body["session_id"] if body else None for body in opened]
    barrier.wait()  # every process has opened its sessions (the parent checks /health)
    barrier.wait()  # go

    async def episode(conn: Connection, session_id: str | None) -> None:
        for n in range(steps if session_id else 0):
            if think_s:
                await asyncio.sleep(rng.uniform(0, 2 * think_s))
            await step_tally.measure(conn, "POST", f"/sessions/{session_id}/step", step_body(env, n),
                                     ("results",))

    started = time.monotonic()
    await asyncio.gather(*(episode(conn, sid) for conn, sid in zip(conns, ids)))
    stepped = time.monotonic()
    barrier.wait()  # every process has stepped (the parent checks /health again)
    barrier.wait()
    await asyncio.gather(*(closes.measure(conn, "DELETE", f"/sessions/{sid}", None, ("closed",))
                           for conn, sid in zip(conns, ids) if sid))
    for conn in conns:
        conn.close()
    return {"create": creates.times, "step": step_tally.times, "close": closes.times,
            "errors": creates.errors + step_tally.errors + closes.errors, "started": started, "stepped": stepped,
            "reconnects": sum(conn.reconnects for conn in conns)}


def client_main(url: str, env: str, sessions: int, steps: int, think_s: float, seed: int, barrier: Any,
                results: Any) -> None:
    results.put(asyncio.run(client_load(url, env, sessions, steps, think_s, seed, barrier)))


def run_load(url: str, server_pid: int, env: str, sessions: int, steps: int, think_s: float,
             procs: int) -> dict[str, Any]:
    """Open ``sessions`` sessions over ``procs`` client processes, step them all concurrently, close them."""
    context = mp.get_context("spawn")  # clients import nothing of the server
    barrier, results = context.Barrier(procs + 1, timeout=600), context.Queue()
    shares = [sessions // procs + (i < sessions % procs) for i in range(procs)]
    clients = [context.Process(target=client_main, args=(url, env, share, steps, think_s, i, barrier, results))
               for i, share in enumerate(shares)]
    for client in clients:
        client.start()
    barrier.wait()
    open_after_create = server_sessions(url)
    busy, server_cpu = machine_busy_s(), process_cpu_s(server_pid)
    barrier.wait()
    barrier.wait()
    busy, server_cpu = machine_busy_s() - busy, process_cpu_s(server_pid) - server_cpu
    open_after_steps = server_sessions(url)
    barrier.wait()
    parts = [results.get() for _ in clients]
    for client in clients:
        client.join()
    wall = max(p["stepped"] for p in parts) - min(p["started"] for p in parts)
    step_times = [t for p in parts for t in p["step"]]
    errors = [e for p in parts for e in p["errors"]]
    return {"sessions": sessions, "steps_per_session": steps, "think_ms": think_s * 1000, "client_procs": procs,
            "step": summary(step_times), "create": summary([t for p in parts for t in p["create"]]),
            "close": summary([t for p in parts for t in p["close"]]), "errors": len(errors),
            "first_errors": errors[:5], "reconnects": sum(p["reconnects"] for p in parts),
            "open_sessions_seen_by_server": [open_after_create, open_after_steps],
            "open_after_close": server_sessions(url), "step_phase_s": wall, "calls_per_s": len(step_times) / wall,
            # CPU seconds during the step phase: the machine's total (all processes), and the server's
            "cpu_s": {"machine": busy, "server": server_cpu},
            "server_cpu_us_per_call": server_cpu / len(step_times) * 1e6}


# --- reporting -------------------------------------------------------------------------------------
def summary(times: list[float]) -> dict[str, float]:
    if not times:
        return {"n": 0}
    ms = sorted(t * 1000 for t in times)

    def pct(q: float) -> float:
        return ms[min(len(ms) - 1, int(q * len(ms)))]

    return {"n": len(ms), "p50": statistics.median(ms), "p90": pct(0.90), "p99": pct(0.99), "max": ms[-1],
            "mean": statistics.fmean(ms)}


def conditions() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "loadavg": [round(x, 2) for x in os.getloadavg()], "python": sys.version.split()[0]}


def print_table(report: dict[str, Any]) -> None:
    rows = [("sequential, minimal client", report["sequential_raw"], None),
            ("sequential, RemoteEnvironment", report["sequential_remote_env"], None)]
    rows += [(f"{r['sessions']} sessions, think {r['think_ms']:g} ms", r["step"], r) for r in report["load"]]
    flags = f"--workers {report['server_workers']}" + (f" --inline {report['env']}" if report["inline"] else "")
    print(f"\nserve-env {report['env']} ({flags}), {report['conditions']['cpus']} CPUs, "
          f"load average {report['conditions']['loadavg']} before, {report['conditions_after']['loadavg']} after")
    print(f"{'step round trip (ms)':32} {'calls':>6} {'p50':>7} {'p90':>7} {'p99':>7} {'max':>7} "
          f"{'calls/s':>8} {'errors':>6} {'open (server)':>13} {'server CPU/call':>15} {'busy cores':>10}")
    for label, s, load in rows:
        extra = (f"{load['calls_per_s']:8.0f} {load['errors']:6d} "
                 f"{'/'.join(map(str, load['open_sessions_seen_by_server'])):>13} "
                 f"{load['server_cpu_us_per_call']:12.0f} us {load['cpu_s']['machine'] / load['step_phase_s']:10.2f}"
                 if load else f"{1000 / s['mean']:8.0f} {0:6d} {1:>13} {s['server_cpu_us_per_call']:12.0f} us")
        print(f"{label:32} {s['n']:6d} {s['p50']:7.3f} {s['p90']:7.3f} {s['p99']:7.3f} {s['max']:7.2f} {extra}")
    for r in report["load"]:
        for error in r["first_errors"]:
            print("  error:", error)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=1000, help="sessions open at once in the load rows")
    parser.add_argument("--steps-per-session", type=int, default=5, help="tool calls each session makes")
    parser.add_argument("--think-ms", default="0,2000",
                        help="comma-separated mean waits before each call; one load row per value")
    parser.add_argument("--sequential-calls", type=int, default=2000, help="calls of each sequential row")
    parser.add_argument("--env", default="echo", choices=sorted(ENVS), help="echo (trivial tool) or calculator")
    parser.add_argument("--server-workers", type=int, default=16, help="serve-env --workers (tool threads)")
    parser.add_argument("--inline", action="store_true", help="serve-env --inline ENV: tool calls in the event loop")
    parser.add_argument("--client-procs", type=int, default=2, help="load-generator processes")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the report as JSON")
    args = parser.parse_args(argv)
    report: dict[str, Any] = {"env": args.env, "server_workers": args.server_workers, "inline": args.inline,
                              "conditions": conditions()}
    with serve_env(args.env, args.server_workers, args.sessions + 10, args.inline) as (url, pid):
        sequential_raw(url, args.env, 200)  # warm-up
        for key, measure in (("sequential_raw", sequential_raw), ("sequential_remote_env", sequential_remote_env)):
            server_cpu = process_cpu_s(pid)
            report[key] = summary(measure(url, args.env, args.sequential_calls))
            report[key]["server_cpu_us_per_call"] = (process_cpu_s(pid) - server_cpu) / args.sequential_calls * 1e6
        report["load"] = [run_load(url, pid, args.env, args.sessions, args.steps_per_session, float(t) / 1000,
                                   args.client_procs) for t in args.think_ms.split(",")]
    report["conditions_after"] = conditions()
    print_table(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
