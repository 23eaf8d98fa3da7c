"""EnvService: the env server's sessions, without HTTP — environments run in worker threads with timeouts.

Environment methods are synchronous and may be slow, so every call (building the env, ``reset``, ``step``,
``close``, task generation) runs in a thread pool and the event loop only waits for it, up to
``call_timeout`` — except the tool calls of environments served ``inline``, which run in the event loop
itself (see :class:`EnvService`). A session is one episode on one fresh environment instance. Refusals and
failures are :class:`ServiceError` (an HTTP status, a machine-readable ``kind`` and a message);
``agentrl.envs.server`` turns them into JSON error replies.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from agentrl.envs.base import truncate
from agentrl.envs.service_errors import ServiceError, check_step_result, env_exception, json_safe
from agentrl.envs.wire import call_from_openai, call_to_openai, step_result_to_json, task_to_json
from agentrl.types import Message, StepResult, Task, ToolCall

log = logging.getLogger(__name__)
MAX_TASKS_PER_REQUEST = 1000
# An inline tool call that takes longer stalled every session that long: its environment goes back to the
# worker threads. Well above a trivial tool (microseconds) and a garbage-collector pause, well below a
# timeout anyone would set.
INLINE_BUDGET_S = 0.02
# Over-budget inline calls in a row that send an environment back: one can be the machine's doing (the event
# loop's thread preempted on a busy machine, measured: a 76 ms echo at load 3), three in a row are the tool's.
INLINE_STRIKES = 3


class _CallTimeout(Exception):
    """An environment call outlived ``call_timeout``; it goes on running in its worker thread."""

    def __init__(self, future: asyncio.Future) -> None:
        super().__init__()
        self.future = future


@dataclass(eq=False)
class Session:
    """One episode: a fresh environment instance and its state on the server."""

    id: str
    env_name: str
    env: Any
    last_used: float
    busy: bool = False  # a step is running
    failed: str = ""  # the environment exception that ended the episode
    stuck: asyncio.Future | None = None  # a call that timed out and still runs in a worker thread
    deleted: bool = False  # DELETE came while a step was running; that step closes the env when it ends


def _close_quietly(env: Any) -> None:
    """Close an environment nobody waits for (expired, deleted mid-step); a failure can only be logged."""
    try:
        env.close()
    except Exception:  # no caller to hand it to: the session is already gone
        log.exception("closing an environment of an expired or deleted session failed")


class EnvService:
    """Sessions of one or more environments, for many concurrent episodes in one process.

    Args:
        factories: ``{served name: callable() -> environment}``; each call must build a fresh instance whose
            ``name`` is the served name. Environments need ``tools/reset/step/close`` (the Environment
            protocol), ``version``, ``split_sizes`` and ``task_at(split, index)``; ``oracle`` is optional.
        threads: worker threads that run environment methods.
        call_timeout: seconds one environment call may take before the caller gets a timeout.
        session_ttl: seconds a session may stay idle before it is closed and forgotten.
        max_sessions: open sessions at most; more are refused with ``capacity`` (503).
        max_output_chars: longest tool observation sent back; longer ones are cut with TRUNCATION_MARKER.
        inline: served names whose tool calls (``step``) run in the event loop instead of a worker thread.
            For trivial tools: it saves two thread switches a call (about a third of the server's time for a
            trivial call). Such a call cannot be stopped by ``call_timeout`` and stalls every session while it
            runs, so INLINE_STRIKES (3) calls in a row over INLINE_BUDGET_S (20 ms) send its environment back to
            the worker threads for good (and logs a warning).

    Example:
        >>> from agentrl.envs import make_env
        >>> service = EnvService({"calculator": lambda: make_env("calculator")})
        >>> service.describe()[0]["tools"][0]["function"]["name"]
        'answer'
        >>> service.shutdown()
    """

    def __init__(self, factories: dict[str, Callable[[], Any]], threads: int = 16, call_timeout: float = 30.0,
                 session_ttl: float = 600.0, max_sessions: int = 10_000, max_output_chars: int = 100_000,
                 inline: Iterable[str] = ()) -> None:
        if not factories:
            raise ValueError("EnvService needs at least one environment")
        self.factories = dict(factories)
        self.inline = set(inline)
        self._inline_strikes: dict[str, int] = {}
        if not self.inline <= set(self.factories):
            raise ValueError(f"inline names {sorted(self.inline - set(self.factories))} are not served here; "
                             f"this service has {sorted(self.factories)}")
        self.prototypes = {name: factory() for name, factory in self.factories.items()}
        for name, env in self.prototypes.items():
            if env.name != name:
                raise ValueError(f"environment served as {name!r} calls itself {env.name!r}: serve it under its name")
        # Task generation and the oracle run on these shared instances, one thread at a time each.
        self._locks = {name: threading.Lock() for name in self.prototypes}
        self.descriptions = [{"name": name, "version": env.version, "task_version": env.task_version,
                              "splits": dict(env.split_sizes), "tools": env.tools()}
                             for name, env in self.prototypes.items()]
        self.call_timeout, self.session_ttl = call_timeout, session_ttl
        self.max_sessions, self.max_output_chars = max_sessions, max_output_chars
        self.executor = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="agentrl-env")
        self.sessions: dict[str, Session] = {}
        self._starting = 0  # sessions being created (counted against max_sessions too)

    # --- environments and tasks ---------------------------------------------------------------
    def describe(self) -> list[dict[str, Any]]:
        """Each environment's name, version, task version, split sizes and OpenAI tool schemas."""
        return self.descriptions

    def _prototype(self, env_name: str) -> Any:
        if env_name not in self.prototypes:
            raise ServiceError(404, "unknown_env", f"no environment {env_name!r} here; "
                                                   f"this server has {sorted(self.prototypes)}")
        return self.prototypes[env_name]

    def _check_range(self, env_name: str, split: str, index: int) -> None:
        sizes = self._prototype(env_name).split_sizes
        if split not in sizes:
            raise ServiceError(422, "invalid_request", f"{env_name} has splits {sorted(sizes)}, not {split!r}")
        if not 0 <= index < sizes[split]:
            raise ServiceError(422, "invalid_request",
                               f"index {index} is outside {env_name}'s {split!r} split (0..{sizes[split] - 1})")

    def _index(self, env_name: str, split: str, index: int | None, seed: int | None) -> int:
        if (index is None) == (seed is None):
            raise ServiceError(422, "invalid_request", "give exactly one of 'index' and 'seed'")
        if index is None:
            sizes = self._prototype(env_name).split_sizes
            if split not in sizes:
                raise ServiceError(422, "invalid_request", f"{env_name} has splits {sorted(sizes)}, not {split!r}")
            index = random.Random(seed).randrange(sizes[split])
        self._check_range(env_name, split, index)
        return index

    async def tasks(self, env_name: str, split: str, start: int, n: int) -> list[dict[str, Any]]:
        """Tasks ``start .. start+n`` of a split (fewer at its end), ground truth included."""
        self._check_range(env_name, split, start)
        if not 1 <= n <= MAX_TASKS_PER_REQUEST:
            raise ServiceError(422, "invalid_request", f"n must be in 1..{MAX_TASKS_PER_REQUEST}, got {n}")
        env, lock = self._prototype(env_name), self._locks[env_name]
        stop = min(start + n, env.split_sizes[split])

        def generate() -> list[Task]:
            with lock:
                return [env.task_at(split, i) for i in range(start, stop)]

        tasks = await self._run_or_timeout(generate, f"generating {env_name} tasks")
        return [json_safe(task_to_json(task), "task") for task in tasks]

    async def oracle(self, env_name: str, split: str, index: int) -> dict[str, Any]:
        """The task at ``split/index`` and the environment's scripted expert calls for it (OpenAI format)."""
        self._check_range(env_name, split, index)
        env, lock = self._prototype(env_name), self._locks[env_name]

        def solve() -> tuple[Task, list]:
            with lock:
                task = env.task_at(split, index)
                return task, env.oracle(task)

        task, calls = await self._run_or_timeout(solve, f"the {env_name} oracle")
        body = {"task": task_to_json(task), "tool_calls": [call_to_openai(c, f"call_{i}") for i, c in enumerate(calls)]}
        return json_safe(body, "oracle reply")

    # --- sessions -----------------------------------------------------------------------------
    async def create(self, env_name: str, split: str, index: int | None = None,
                     seed: int | None = None) -> dict[str, Any]:
        """Open a session on a fresh environment reset to task ``split/index`` (or a task drawn with ``seed``)."""
        self._prototype(env_name)
        factory, index = self.factories[env_name], self._index(env_name, split, index, seed)
        self.expire()
        if len(self.sessions) + self._starting >= self.max_sessions:
            raise ServiceError(503, "capacity", f"{len(self.sessions)} sessions are open, the most this server "
                                                "holds (--max_sessions); close finished ones")

        def start() -> tuple[Any, Task, list[Message], list]:
            env = factory()
            task = env.task_at(split, index)
            return env, task, env.reset(task), env.tools()

        self._starting += 1
        try:
            env, task, messages, tools = await self._run_or_timeout(start, f"starting {env_name}")
        finally:
            self._starting -= 1
        body = json_safe({"task": task_to_json(task), "messages": messages, "tools": tools}, "reset reply")
        session = Session(uuid.uuid4().hex, env_name, env, time.monotonic())
        self.sessions[session.id] = session
        return {"session_id": session.id, "env": env_name, **body}

    def _session(self, session_id: str) -> Session:
        session = self.sessions.get(session_id)
        if session is None:
            raise ServiceError(404, "unknown_session", f"no session {session_id[:100]!r}: it never existed, "
                                                       f"was closed, or expired after {self.session_ttl:g} s idle")
        return session

    async def step(self, session_id: str, tool_calls: list[Any]) -> dict[str, Any]:
        """Run the calls in order until one ends the episode; bad calls become error observations.

        Calls after the one that ends the episode (or after one that timed out) are not run.
        """
        session = self._session(session_id)
        if not tool_calls:
            raise ServiceError(422, "invalid_request", "tool_calls is empty: a step takes at least one call")
        if session.failed:
            raise ServiceError(409, "session_failed", f"the episode already ended with an environment error: "
                                                      f"{session.failed}")
        if session.busy:
            raise ServiceError(409, "session_busy", "another step on this session is still running; a session "
                                                    "runs one step at a time")
        if session.stuck is not None and not session.stuck.done():
            raise ServiceError(409, "session_busy", "a tool call that timed out is still running in this "
                                                    "session; it cannot take another call until that one returns")
        session.busy, session.stuck = True, None
        results: list[StepResult] = []
        messages: list[Message] = []
        try:
            for raw in tool_calls:
                result, name = await self._step_one(session, raw)
                results.append(result)
                message: Message = {"role": "tool", "content": result.observation}
                if name is not None:
                    message["name"] = name
                if isinstance(raw, dict) and isinstance(raw.get("id"), str):
                    message["tool_call_id"] = raw["id"]
                messages.append(message)
                if result.done or session.stuck is not None:
                    break
        except ServiceError as exc:
            if exc.kind == "env_exception":
                session.failed = exc.message
            raise
        finally:
            session.busy, session.last_used = False, time.monotonic()
            if session.deleted:
                self._close_later(session)
        last = results[-1]
        return {"session_id": session.id, "results": [step_result_to_json(r) for r in results],
                "messages": messages, "done": last.done, "reward": last.reward, "info": last.info}

    async def _step_one(self, session: Session, raw: Any) -> tuple[StepResult, str | None]:
        call = call_from_openai(raw)
        if isinstance(call, str):  # the same text run_episode shows for a call it could not parse
            message = truncate(call, self.max_output_chars)
            return StepResult(observation=f"Error: {message}", info={"tool_error": message}), None
        try:
            if session.env_name in self.inline:
                result = self._step_inline(session, call)
            else:
                result = await self._run(session.env.step, call)
        except _CallTimeout as timeout:
            session.stuck = timeout.future
            message = f"tool {call.name!r} did not finish within {self.call_timeout:g} s"
            return StepResult(observation=f"Error: {message}", info={"tool_error": message, "timeout": True}), call.name
        check_step_result(result, session.env_name)
        observation = truncate(result.observation, self.max_output_chars)
        return StepResult(observation, result.reward, result.done, result.info), call.name

    async def close(self, session_id: str) -> dict[str, Any]:
        """Forget a session and close its environment (after a step still running on it, if any)."""
        session = self.sessions.pop(self._session(session_id).id)
        if session.busy or (session.stuck is not None and not session.stuck.done()):
            session.deleted = True
            if not session.busy:
                self._close_later(session)
        else:
            await self._run_or_timeout(session.env.close, f"closing {session.env_name}")
        return {"session_id": session.id, "closed": True}

    def _close_later(self, session: Session) -> None:
        if session.stuck is not None and not session.stuck.done():
            session.stuck.add_done_callback(lambda _: self.executor.submit(_close_quietly, session.env))
        else:
            self.executor.submit(_close_quietly, session.env)

    def expire(self, now: float | None = None) -> list[str]:
        """Close and forget sessions idle for longer than ``session_ttl``; return their ids."""
        now = time.monotonic() if now is None else now
        idle = [s for s in self.sessions.values() if not s.busy and now - s.last_used > self.session_ttl]
        for session in idle:
            del self.sessions[session.id]
            self._close_later(session)
        return [s.id for s in idle]

    async def expire_forever(self) -> None:
        """Run :meth:`expire` every quarter TTL (at most every 30 s); cancel the task to stop it."""
        while True:
            await asyncio.sleep(min(max(self.session_ttl / 4, 0.05), 30.0))
            expired = self.expire()
            if expired:
                log.info("expired %d idle sessions", len(expired))

    def shutdown(self) -> None:
        """Close every session's environment and stop taking work; a call stuck in a thread still runs on."""
        for session in list(self.sessions.values()):
            self.executor.submit(_close_quietly, session.env)
        self.sessions.clear()
        self.executor.shutdown(wait=False)

    # --- running environment code -------------------------------------------------------------
    async def _run(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` in a worker thread. Raises _CallTimeout after ``call_timeout`` (the thread runs on),
        and ServiceError(500, "env_exception") with the traceback when it raises."""
        future = asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)
        done, _ = await asyncio.wait({future}, timeout=self.call_timeout)
        if not done:
            # Nobody awaits it any more: fetch its outcome when it comes, so asyncio does not warn about it.
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
            raise _CallTimeout(future)
        exc = future.exception()
        if exc is not None:
            raise env_exception(exc)
        return future.result()

    def _step_inline(self, session: Session, call: ToolCall) -> Any:
        """``session.env.step(call)`` in the event loop; a call over INLINE_BUDGET_S ends inline for its env."""
        started = time.perf_counter()
        try:
            return session.env.step(call)
        except BaseException as exc:  # as in a worker thread, where concurrent.futures catches BaseException
            raise env_exception(exc) from None
        finally:
            took, name = time.perf_counter() - started, session.env_name
            self._inline_strikes[name] = self._inline_strikes.get(name, 0) + 1 if took > INLINE_BUDGET_S else 0
            if self._inline_strikes[name] >= INLINE_STRIKES and name in self.inline:
                self.inline.discard(name)
                log.warning("an inline %s call to %r took %.3f s, stalling every session: %s's tool calls run in "
                            "worker threads from now on", session.env_name, call.name, took, session.env_name)

    async def _run_or_timeout(self, fn: Callable[..., Any], what: str) -> Any:
        try:
            return await self._run(fn)
        except _CallTimeout:
            raise ServiceError(504, "env_timeout", f"{what} did not finish within {self.call_timeout:g} s") from None
