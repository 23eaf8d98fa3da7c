"""EnvController: one env-service API in front of many ``agentrl serve-env`` workers (``agentrl serve-controller``).

The controller speaks the workers' own API (docs/env-service.md), so ``RemoteEnvironment`` and a recipe's
``url:`` work against it unchanged. It forwards each request to a worker and passes the worker's reply back
as it is:

- a new session goes to the least-loaded live worker that serves its environment (open sessions plus
  sessions being opened; ties go to the worker that joined first), and a worker that is full (503) or
  cannot be reached is skipped for the next one;
- every later request of a session goes to the worker that holds it (affinity);
- a session whose worker died (``agentrl.envs.workers``: heartbeats, probes) gets 502 ``worker_lost``, also
  while its request is in flight; the client raises it as ``EnvServiceError``, an ``env_error`` episode.

Workers join and leave through :class:`~agentrl.envs.workers.WorkerPool` (``controller.pool``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Iterable
from urllib.parse import quote

import httpx

from agentrl.envs.service_errors import ServiceError
from agentrl.envs.workers import Worker, WorkerPool, normalize_url

log = logging.getLogger(__name__)
_JSON = {"content-type": "application/json"}


@dataclass(frozen=True)
class Forwarded:
    """A worker's reply, passed back to the caller as it is (it already carries ``api_version``)."""

    status: int
    content: bytes


def _error_type(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["type"])
    except (ValueError, KeyError, TypeError):
        return ""


class EnvController:
    """Route env-service requests over the workers of a :class:`WorkerPool`; see the module docstring.

    Args:
        workers: worker URLs to join at :meth:`start`. One that cannot be reached yet is kept as dead and
            joins when it answers; one that disagrees with the others raises ``worker_mismatch``.
        **pool_options: :class:`WorkerPool`'s arguments (heartbeats, timeouts, session TTL).

    Example:
        >>> controller = EnvController(["http://127.0.0.1:8123"], heartbeat_interval=1.0)
        >>> controller.health()["status"]  # nothing joined before start()
        'no_workers'
    """

    def __init__(self, workers: Iterable[str] = (), **pool_options: Any) -> None:
        self.initial = [normalize_url(url) for url in workers]
        self.pool = WorkerPool(**pool_options)
        self._heartbeat: asyncio.Task | None = None

    async def start(self) -> None:
        """Open connections, join the ``workers`` given at construction, start heartbeats (idempotent)."""
        if self._heartbeat is not None:
            return
        await self.pool.open()
        try:
            for url in self.initial:
                await self.pool.add_worker(url, must_answer=False)
        except BaseException:
            await self.pool.close()
            raise
        self._heartbeat = asyncio.create_task(self.pool.heartbeat_forever())

    async def stop(self) -> None:
        """Stop heartbeats and close connections (the workers and their sessions are left as they are)."""
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        await self.pool.close()

    # --- the env-service API -------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """A worker's /health reply, for the whole pool, plus worker counts by state."""
        states = [worker.state for worker in self.pool.workers.values()]
        live = any(state != "dead" for state in states)
        return {"status": "ok" if live else "no_workers", "envs": sorted(self.pool.served()),
                "sessions": len(self.pool.routes),
                "workers": {state: states.count(state) for state in ("live", "draining", "dead")}}

    def describe(self) -> list[dict[str, Any]]:
        """``GET /envs``: each environment that a live worker serves (live workers agree on them)."""
        return list(self.pool.served().values())

    def _candidates(self, env: str, exclude: set[str], sessions: bool) -> list[Worker]:
        """Workers that may take ``env``'s requests, least loaded first (joining order breaks ties)."""
        allowed = ("live",) if sessions else ("live", "draining")
        fit = [w for w in self.pool.workers.values() if w.state in allowed and env in w.envs and w.id not in exclude]
        if not fit and not exclude:
            if any(env in w.envs for w in self.pool.workers.values()):
                states = ", ".join(f"{w.id} {w.state}" for w in self.pool.workers.values() if env in w.envs)
                raise ServiceError(503, "no_worker", f"no live worker serves {env!r} now ({states})")
            raise ServiceError(404, "unknown_env", f"no worker serves an environment {env[:100]!r}; "
                                                   f"served: {sorted(self.pool.served())}")
        order = {worker_id: i for i, worker_id in enumerate(self.pool.workers)}
        return sorted(fit, key=lambda w: (w.load, order[w.id]))

    async def create(self, env: str, body: bytes) -> Forwarded:
        """``POST /sessions`` (``body`` as received) on the least-loaded live worker serving ``env``; a
        worker that is full or cannot be reached is skipped for the next one."""
        tried: set[str] = set()
        last: Forwarded | ServiceError | None = None
        while True:
            candidates = self._candidates(env, tried, sessions=True)
            if not candidates:
                if isinstance(last, ServiceError):
                    raise ServiceError(503, "no_worker", f"no worker could open a {env!r} session; "
                                                         f"last: {last.message}")
                assert last is not None
                return last
            worker = candidates[0]
            tried.add(worker.id)
            worker.starting += 1
            failure: ServiceError | None = None
            try:
                response = await self._send(worker, "POST", "/sessions", content=body, headers=_JSON)
            except ServiceError as exc:
                failure = exc
            finally:
                worker.starting -= 1
            if failure is None and response.status_code == 200:
                self.pool.opened(worker, response.json()["session_id"])
            self.pool.drop_if_drained(worker)  # it may have begun draining while this session was being opened
            if failure is not None:
                if failure.kind not in ("worker_lost", "worker_connection_lost"):
                    raise failure
                last = failure  # nothing was opened there, or what was is lost with it: try the next worker
                continue
            last = Forwarded(response.status_code, response.content)
            if response.status_code != 503:  # 503: that worker is full (--max_sessions): try the next one
                return last

    async def step(self, session_id: str, body: bytes) -> Forwarded:
        """``POST /sessions/{id}/step`` (``body`` as received) on the worker that holds the session."""
        route = self.pool.route(session_id)
        response = await self._send(route.worker, "POST", f"/sessions/{quote(session_id, safe='')}/step",
                                    content=body, headers=_JSON)
        route.last_used = time.monotonic()
        if response.status_code == 404 and _error_type(response) == "unknown_session":
            self.pool.forget(session_id)  # it expired on the worker
        return Forwarded(response.status_code, response.content)

    async def close(self, session_id: str) -> Forwarded:
        """``DELETE /sessions/{id}`` on the worker that holds the session; a lost session is forgotten
        and answered with ``worker_lost``."""
        if session_id in self.pool.lost and session_id not in self.pool.routes:
            raise ServiceError(502, "worker_lost", self.pool.lost.pop(session_id))
        route = self.pool.route(session_id)
        response = await self._send(route.worker, "DELETE", f"/sessions/{quote(session_id, safe='')}")
        if response.status_code in (200, 404):
            self.pool.forget(session_id)
        return Forwarded(response.status_code, response.content)

    async def env_request(self, env: str, path: str, query: str) -> Forwarded:
        """``GET /envs/{env}/tasks`` or ``/oracle`` on the least-loaded worker serving ``env`` (draining
        ones too); a worker that cannot be reached is skipped for the next one."""
        tried: set[str] = set()
        while True:
            candidates = self._candidates(env, tried, sessions=False)
            if not candidates:
                raise ServiceError(503, "no_worker", f"no worker serving {env!r} could be reached")
            tried.add(candidates[0].id)
            try:
                response = await self._send(candidates[0], "GET", f"/envs/{quote(env, safe='')}/{path}?{query}")
            except ServiceError as exc:
                if exc.kind in ("worker_lost", "worker_connection_lost"):
                    continue
                raise
            return Forwarded(response.status_code, response.content)

    # --- forwarding ------------------------------------------------------------------------------------
    async def _send(self, worker: Worker, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """One request to ``worker``; a failure is a ServiceError: 502 ``worker_lost`` (it is dead, or died
        while the request was in flight), 502 ``worker_connection_lost`` (the request failed but the worker
        answers /health), 504 ``worker_timeout``, 503 ``controller_busy`` (no free connection)."""
        if worker.lost is None:
            worker.lost = asyncio.get_running_loop().create_future()
        lost = worker.lost
        where = f"{method} {worker.url}{path.split('?')[0]}"
        request = asyncio.ensure_future(self.pool.http.request(method, worker.url + path, **kwargs))
        try:
            await asyncio.wait({request, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not request.done():
                request.cancel()
        if not request.done() or request.cancelled():
            raise ServiceError(502, "worker_lost", f"{where}: worker {worker.id} was lost while the request was "
                                                   f"in flight: {lost.result()}")
        try:
            return request.result()
        except httpx.PoolTimeout:
            raise ServiceError(503, "controller_busy", f"{where}: no free connection to the worker in time") from None
        except (httpx.ReadTimeout, httpx.WriteTimeout):
            raise ServiceError(504, "worker_timeout",
                               f"{where}: no reply within {self.pool.request_timeout:g} s") from None
        except httpx.TransportError as exc:
            cause = f"{type(exc).__name__}: {exc}"
            await self.pool.probe(worker, cause)
            if worker.state == "dead":
                raise ServiceError(502, "worker_lost", f"{where}: worker {worker.id} is dead: {worker.error}") from None
            raise ServiceError(502, "worker_connection_lost", f"{where}: {cause} (the worker still answers /health; "
                                                              "the request's outcome is unknown)") from None


# --- workers joining a controller (agentrl serve-env --controller) ---------------------------------
async def join_controller(controller_url: str, worker_url: str, timeout: float = 30.0) -> str:
    """Ask the controller at ``controller_url`` to take the worker at ``worker_url``; return its worker id.

    Raises:
        EnvServiceError: the controller cannot be reached, or refused the worker (kind ``worker_mismatch``
            when the worker's environments differ from the same environments on its other workers).

    Example:
        >>> worker_id = asyncio.run(join_controller("http://127.0.0.1:8200", "http://127.0.0.1:8123"))  # doctest: +SKIP
    """
    body = await _controller_request(controller_url, "POST", "/workers", timeout, json={"url": worker_url})
    return body["worker"]["id"]


async def leave_controller(controller_url: str, worker_id: str, timeout: float = 5.0) -> None:
    """Leave the controller at once (its sessions here are lost); a failure is only logged, as the
    controller's heartbeats will notice the worker is gone anyway."""
    from agentrl.envs.client import EnvServiceError

    try:
        await _controller_request(controller_url, "DELETE", f"/workers/{quote(worker_id, safe='')}", timeout,
                                  params={"force": "true"})
    except EnvServiceError as exc:
        log.warning("could not leave the controller %s: %s", controller_url, exc)


async def _controller_request(controller_url: str, method: str, path: str, timeout: float,
                              **kwargs: Any) -> dict[str, Any]:
    from agentrl.envs.client import EnvServiceError, error_from_reply

    where = f"{method} {controller_url.rstrip('/')}{path}"
    async with httpx.AsyncClient(trust_env=False, timeout=timeout) as http:
        try:
            response = await http.request(method, controller_url.rstrip("/") + path, **kwargs)
            body = response.json()
        except httpx.HTTPError as exc:
            raise EnvServiceError(f"{where}: cannot reach the controller ({type(exc).__name__}: {exc})",
                                  "unreachable") from None
        except ValueError:
            raise EnvServiceError(f"{where}: HTTP {response.status_code} reply is not JSON", "bad_reply",
                                  response.status_code) from None
    if response.is_error:
        raise error_from_reply(where, response.status_code, body)
    return body
