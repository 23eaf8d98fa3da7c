"""WorkerPool: the env workers behind a controller, and which of them holds which session.

It decides who is in the pool and whether they are alive; ``agentrl.envs.controller`` decides where each
request goes. A worker joins only if every environment it serves agrees with the same environment on the live
workers (version, task version, splits, tools). It leaves by draining (no new sessions, removed once its last
session closes) or at once. Every ``heartbeat_interval`` seconds each worker gets ``GET /health``. A worker is
marked dead when it refuses the connection, misses ``max_missed`` heartbeats in a row, or fails a probe after
a forwarded request could not reach it. Its sessions are then lost (remembered, so that their requests can be
answered ``worker_lost``) and requests in flight to it are woken. Dead workers are still probed, and one that
answers again, and still agrees, rejoins without its old sessions.

All state lives in one asyncio event loop, so nothing here needs a lock.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httpx

from agentrl.envs.service_errors import ServiceError
from agentrl.envs.wire import API_VERSION

log = logging.getLogger(__name__)
MAX_LOST_SESSIONS = 100_000  # lost session ids remembered, to answer worker_lost rather than unknown_session
AGREEING_FIELDS = ("version", "task_version", "splits", "tools")


@dataclass(eq=False)
class Worker:
    """One ``agentrl serve-env`` process as the controller sees it."""

    id: str
    url: str
    envs: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> its GET /envs entry
    state: str = "live"  # live | draining (no new sessions) | dead
    sessions: set[str] = field(default_factory=set)  # open sessions the controller routed here
    starting: int = 0  # session creations in flight
    created: int = 0  # sessions opened here since it joined
    reported_sessions: int | None = None  # open sessions by its last /health (all clients, not only ours)
    last_seen: float | None = None  # monotonic time of its last good reply
    missed: int = 0  # heartbeats missed in a row
    error: str = ""  # why it is dead, or why it was refused when it came back
    died_at: float | None = None
    lost: asyncio.Future | None = None  # resolved when it is marked dead: wakes requests in flight to it
    probe: asyncio.Task | None = None  # a health probe after a failed request, shared by concurrent failures

    @property
    def load(self) -> int:
        return len(self.sessions) + self.starting


@dataclass(eq=False)
class SessionRoute:
    """Where a session lives, and when it was last used (idle ones are forgotten after ``session_ttl``)."""

    worker: Worker
    last_used: float


def normalize_url(url: str) -> str:
    """``url`` without a trailing slash, if it is a plain ``http(s)://host:port``; else 422 ``invalid_request``."""
    url = url.strip().rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path or parts.query:
        raise ServiceError(422, "invalid_request", f"a worker URL looks like http://HOST:PORT, not {url[:200]!r}")
    return url


class WorkerPool:
    """The workers behind a controller: joining, agreement, heartbeats, death, and session bookkeeping.

    Args:
        heartbeat_interval: seconds between heartbeats.
        heartbeat_timeout: seconds a heartbeat or probe waits for ``/health``.
        max_missed: heartbeats missed in a row (timeouts, errors) before a worker is marked dead; a refused
            connection marks it dead at once.
        request_timeout: seconds a request to a worker may take; keep it above the workers' ``--call_timeout``.
        connect_timeout: seconds to connect to a worker.
        session_ttl: seconds an idle session is remembered; keep it at least the workers' ``--session_ttl``.
        forget_dead_after: seconds after which a dead worker is dropped from the list.

    Example:
        >>> pool = WorkerPool(heartbeat_interval=1.0)
        >>> pool.list_workers()  # nothing joined yet: see EnvController.start and add_worker
        []
    """

    def __init__(self, heartbeat_interval: float = 2.0, heartbeat_timeout: float = 2.0, max_missed: int = 3,
                 request_timeout: float = 120.0, connect_timeout: float = 5.0, session_ttl: float = 600.0,
                 forget_dead_after: float = 600.0) -> None:
        if heartbeat_interval <= 0 or heartbeat_timeout <= 0 or max_missed < 1:
            raise ValueError("heartbeat_interval and heartbeat_timeout must be > 0 and max_missed >= 1")
        self.heartbeat_interval, self.heartbeat_timeout = heartbeat_interval, heartbeat_timeout
        self.max_missed = max_missed
        self.request_timeout, self.connect_timeout = request_timeout, connect_timeout
        self.session_ttl, self.forget_dead_after = session_ttl, forget_dead_after
        self.workers: dict[str, Worker] = {}  # id -> worker, in joining order (the dispatch tie-break)
        self.routes: dict[str, SessionRoute] = {}  # session id -> the worker that holds it
        self.lost: OrderedDict[str, str] = OrderedDict()  # session id -> why it was lost
        self._next_id = 1
        self._http: httpx.AsyncClient | None = None

    async def open(self) -> None:
        """Open the HTTP client to the workers (idempotent); it belongs to the running event loop."""
        if self._http is None:
            # keepalive_expiry below uvicorn's 5 s keep-alive: never reuse a connection the worker may be closing.
            self._http = httpx.AsyncClient(
                trust_env=False, timeout=httpx.Timeout(self.request_timeout, connect=self.connect_timeout),
                limits=httpx.Limits(max_connections=1024, max_keepalive_connections=256, keepalive_expiry=2.0))

    async def close(self) -> None:
        """Close the connections (the workers and their sessions are left as they are)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            raise RuntimeError("the worker pool is not open (EnvController.start() has not run)")
        return self._http

    # --- workers joining and leaving --------------------------------------------------------------
    async def add_worker(self, url: str, must_answer: bool = True) -> dict[str, Any]:
        """Join the worker at ``url`` (or re-check one that is already known) and return its entry.

        Raises:
            ServiceError: 502 ``worker_unreachable`` / ``worker_bad_reply`` (only with ``must_answer``),
                409 ``api_version``, or 409 ``worker_mismatch`` when one of its environments differs from the
                same environment on a live worker.
        """
        url = normalize_url(url)
        try:
            envs, sessions = await self._identify(url)
        except ServiceError as exc:
            if must_answer or exc.kind != "worker_unreachable":
                raise
            worker = self._by_url(url) or self._new_worker(url)
            self.mark_dead(worker, exc.message)
            return self.entry(worker)
        worker = self._by_url(url)
        self._check_agreement(url, envs, ignore=worker)
        if worker is None:
            worker = self._new_worker(url)
            log.info("worker %s joined: %s serving %s", worker.id, url, sorted(envs))
        elif worker.state == "dead":
            log.warning("worker %s (%s) is back", worker.id, url)
        worker.envs, worker.reported_sessions = envs, sessions
        worker.missed, worker.error, worker.died_at, worker.last_seen = 0, "", None, time.monotonic()
        if worker.state == "dead":
            worker.state, worker.lost = "live", None
        return self.entry(worker)

    def remove_worker(self, worker_id: str, force: bool = False) -> dict[str, Any]:
        """Let a worker leave: drain it (no new sessions; removed when its last session closes), or with
        ``force`` remove it now, losing its open sessions. Returns its entry and whether it is gone."""
        worker = self.workers.get(worker_id)
        if worker is None:
            raise ServiceError(404, "unknown_worker", f"no worker {worker_id[:100]!r}; workers: {sorted(self.workers)}")
        if force or worker.state == "dead":
            log.info("worker %s (%s) left: %d open sessions lost", worker.id, worker.url, len(worker.sessions))
            self.mark_dead(worker, "it left the controller (DELETE /workers)", quiet=True)
            self.workers.pop(worker.id, None)
        elif worker.state == "live":
            worker.state = "draining"
            log.info("worker %s (%s) is draining: %d open sessions", worker.id, worker.url, len(worker.sessions))
            self.drop_if_drained(worker)
        return {"worker": self.entry(worker), "removed": worker.id not in self.workers}

    def list_workers(self) -> list[dict[str, Any]]:
        """Every known worker's entry, in joining order."""
        return [self.entry(worker) for worker in self.workers.values()]

    def entry(self, worker: Worker) -> dict[str, Any]:
        """A worker as ``GET /workers`` shows it."""
        now = time.monotonic()
        return {"id": worker.id, "url": worker.url, "state": worker.state, "envs": sorted(worker.envs),
                "sessions": len(worker.sessions), "starting": worker.starting, "created": worker.created,
                "worker_sessions": worker.reported_sessions, "missed_heartbeats": worker.missed,
                "last_seen_s": None if worker.last_seen is None else round(now - worker.last_seen, 3),
                "error": worker.error}

    def _new_worker(self, url: str) -> Worker:
        worker = Worker(f"w{self._next_id}", url)
        self._next_id += 1
        self.workers[worker.id] = worker
        return worker

    def _by_url(self, url: str) -> Worker | None:
        return next((w for w in self.workers.values() if w.url == url), None)

    async def _identify(self, url: str) -> tuple[dict[str, dict[str, Any]], int | None]:
        """A worker's environments (by name) and open sessions, from its /envs and /health."""
        health = await self._get_json(url, "/health")
        described = (await self._get_json(url, "/envs")).get("envs")
        if not isinstance(described, list) or not all(
                isinstance(d, dict) and isinstance(d.get("name"), str) and all(k in d for k in AGREEING_FIELDS)
                for d in described):
            raise ServiceError(502, "worker_bad_reply", f"GET {url}/envs: not a list of environments")
        sessions = health.get("sessions")
        return {d["name"]: d for d in described}, sessions if isinstance(sessions, int) else None

    async def _get_json(self, url: str, path: str) -> dict[str, Any]:
        try:
            response = await self.http.get(url + path, timeout=max(self.heartbeat_timeout, self.connect_timeout))
            body = response.json()
        except httpx.HTTPError as exc:
            raise ServiceError(502, "worker_unreachable", f"GET {url}{path}: {type(exc).__name__}: {exc}") from None
        except ValueError:
            raise ServiceError(502, "worker_bad_reply", f"GET {url}{path}: the reply is not JSON") from None
        if not isinstance(body, dict) or body.get("api_version") != API_VERSION:
            found = body.get("api_version") if isinstance(body, dict) else None
            raise ServiceError(409, "api_version", f"{url} speaks env-service API {found!r}, this controller "
                                                   f"{API_VERSION!r}")
        if response.status_code != 200:
            raise ServiceError(502, "worker_bad_reply", f"GET {url}{path}: HTTP {response.status_code}")
        return body

    def _check_agreement(self, url: str, envs: dict[str, dict[str, Any]], ignore: Worker | None) -> None:
        """Refuse a worker whose environment differs from the same environment on a live worker: the
        trainer would mix two task distributions (or two tool sets) under one name."""
        for name, mine in envs.items():
            for other in self.workers.values():
                theirs = other.envs.get(name)
                if other is ignore or other.state == "dead" or theirs is None:
                    continue
                differ = [key for key in AGREEING_FIELDS if mine.get(key) != theirs.get(key)]
                if differ:
                    shown = ", ".join(f"{key} {mine.get(key)!r} (on {other.id}: {theirs.get(key)!r})"
                                      if key in ("version", "task_version") else f"{key} differ" for key in differ)
                    raise ServiceError(409, "worker_mismatch", (
                        f"worker {url} serves {name!r} unlike worker {other.id} ({other.url}): {shown}. Workers "
                        "serving one environment must run the same code and settings (--env_kwargs)"),
                        {"env": name, "fields": differ, "worker": other.id})

    # --- health ----------------------------------------------------------------------------------
    async def heartbeat_forever(self) -> None:
        """Run :meth:`heartbeat` every ``heartbeat_interval`` seconds; cancel the task to stop it."""
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            await self.heartbeat()

    async def heartbeat(self) -> None:
        """Ask every worker ``/health`` once; mark dead, or bring back, as the answers say; expire idle
        session routes and forget long-dead workers."""
        beats = await asyncio.gather(*(self._beat(w) for w in list(self.workers.values())), return_exceptions=True)
        for outcome in beats:
            if isinstance(outcome, Exception):
                log.error("a heartbeat failed: %r", outcome)
        now = time.monotonic()
        for session_id, route in list(self.routes.items()):
            if now - route.last_used > self.session_ttl:
                self.forget(session_id)
        for worker in list(self.workers.values()):
            if worker.state == "dead" and worker.died_at is not None and now - worker.died_at > self.forget_dead_after:
                log.info("forgetting worker %s (%s), dead for %.0f s", worker.id, worker.url, now - worker.died_at)
                del self.workers[worker.id]

    async def _beat(self, worker: Worker) -> None:
        failure, refused = await self._health_failure(worker)
        if self.workers.get(worker.id) is not worker:
            return  # removed meanwhile
        if worker.state == "dead":
            if not failure:
                try:
                    await self.add_worker(worker.url)
                except ServiceError as exc:  # back, but now it disagrees with the live workers
                    worker.error = f"answers again but was refused: {exc.message}"
            return
        if not failure:
            worker.missed = 0
            return
        worker.missed += 1
        if refused or worker.missed >= self.max_missed:
            self.mark_dead(worker, failure if refused else f"{worker.missed} heartbeats missed; last: {failure}")

    async def _health_failure(self, worker: Worker) -> tuple[str, bool]:
        """GET /health: ``("", False)`` when the worker answered well, else what went wrong and whether the
        connection was refused (nothing listens there: it is gone, no need to wait for more misses)."""
        try:
            response = await self.http.get(worker.url + "/health", timeout=self.heartbeat_timeout)
            body = response.json()
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}", isinstance(exc, httpx.ConnectError)
        except ValueError:
            return "/health answered something that is not JSON", False
        if response.status_code != 200 or not isinstance(body, dict) or body.get("api_version") != API_VERSION:
            return f"/health answered HTTP {response.status_code}", False
        worker.last_seen = time.monotonic()
        if isinstance(body.get("sessions"), int):
            worker.reported_sessions = body["sessions"]
        return "", False

    async def probe(self, worker: Worker, cause: str) -> None:
        """After a request could not reach ``worker``: ask /health once (shared by concurrent failures) and
        mark it dead if that fails too."""
        if worker.probe is None or worker.probe.done():
            async def probe() -> None:
                failure, _ = await self._health_failure(worker)
                if failure and self.workers.get(worker.id) is worker:
                    self.mark_dead(worker, f"a request failed ({cause}), and so did /health ({failure})")

            worker.probe = asyncio.create_task(probe())
        await asyncio.shield(worker.probe)

    def mark_dead(self, worker: Worker, reason: str, quiet: bool = False) -> None:
        """Lose the worker's sessions, wake requests in flight to it, and mark it dead (a draining worker
        is removed instead). ``quiet``: it left on purpose, which is no cause for a warning."""
        if worker.state == "dead":
            worker.error = reason
            return
        if not quiet:
            log.warning("worker %s (%s) is dead (%d sessions lost): %s", worker.id, worker.url,
                        len(worker.sessions), reason)
        for session_id in list(worker.sessions):
            self.routes.pop(session_id, None)
            self._lose(session_id, f"session {session_id} was lost with worker {worker.id} ({worker.url}): {reason}")
        worker.sessions.clear()
        if worker.lost is not None and not worker.lost.done():
            worker.lost.set_result(reason)
        if worker.state == "draining":
            self.workers.pop(worker.id, None)
        worker.state, worker.error, worker.died_at, worker.missed = "dead", reason, time.monotonic(), 0

    def _lose(self, session_id: str, message: str) -> None:
        self.lost[session_id] = message
        while len(self.lost) > MAX_LOST_SESSIONS:
            self.lost.popitem(last=False)

    # --- sessions -----------------------------------------------------------------------------------
    def served(self) -> dict[str, dict[str, Any]]:
        """``{name: GET /envs entry}`` of every environment a live (or draining) worker serves."""
        served: dict[str, dict[str, Any]] = {}
        for worker in self.workers.values():
            if worker.state != "dead":
                for name, description in worker.envs.items():
                    served.setdefault(name, description)
        return served

    def opened(self, worker: Worker, session_id: str) -> None:
        """Route ``session_id`` to ``worker`` from now on; if the worker died or left while the session was
        being opened, the session is lost at once."""
        worker.created += 1
        if self.workers.get(worker.id) is not worker or worker.state == "dead":
            self._lose(session_id, f"session {session_id} was lost with worker {worker.id} ({worker.url}): "
                                   f"{worker.error or 'it left'}")
            return
        self.routes[session_id] = SessionRoute(worker, time.monotonic())
        worker.sessions.add(session_id)

    def route(self, session_id: str) -> SessionRoute:
        """The route of an open session (its use is noted). Raises ServiceError: 502 ``worker_lost`` for a
        session lost with its worker, 404 ``unknown_session`` for one never opened, closed or expired."""
        route = self.routes.get(session_id)
        if route is not None:
            route.last_used = time.monotonic()
            return route
        if session_id in self.lost:
            raise ServiceError(502, "worker_lost", self.lost[session_id])
        raise ServiceError(404, "unknown_session", f"no session {session_id[:100]!r}: it never existed, was "
                                                   f"closed, or expired after {self.session_ttl:g} s idle")

    def forget(self, session_id: str) -> None:
        """Stop routing a closed or expired session (a draining worker leaves with its last session)."""
        route = self.routes.pop(session_id, None)
        if route is not None:
            route.worker.sessions.discard(session_id)
            self.drop_if_drained(route.worker)

    def drop_if_drained(self, worker: Worker) -> None:
        """Remove a draining worker once no session is open or being opened there."""
        if worker.state == "draining" and not worker.sessions and not worker.starting:
            log.info("worker %s (%s) drained and left", worker.id, worker.url)
            self.workers.pop(worker.id, None)

