"""RemoteEnvironment: an environment served by ``agentrl serve-env``, used through the Environment protocol.

The rollout engine cannot tell it from an in-process environment: ``reset`` opens a session for the task's
split and index (the server generates the same task and the client checks that it did), ``step`` sends one
OpenAI-format call and rebuilds the StepResult, ``close`` ends the session. Tasks come from the server too
(``task_at``, ``tasks``), so a recipe's task sampler and evaluation work unchanged.

Every failure to use the service — connection refused, server gone mid-episode, a timeout, an error reply,
an exception inside the environment on the server — raises :class:`EnvServiceError`, which ``run_episode``
records as an ``env_error`` episode (infrastructure, excluded from training), never a hang.
"""

from __future__ import annotations

import json
import logging
from typing import Any
from urllib.parse import quote

import httpx

from agentrl.envs.wire import (API_VERSION, call_to_openai, step_result_from_json, task_from_json,
                               task_to_json)
from agentrl.types import Message, StepResult, Task, ToolCall, ToolSpec

log = logging.getLogger(__name__)
TASKS_PER_REQUEST = 1000  # the server's limit per GET /envs/{env}/tasks


class EnvServiceError(RuntimeError):
    """The env service could not do what was asked; always an infrastructure failure, never the model's.

    Args:
        message: what failed, with the URL.
        kind: the server's error type (``unknown_session``, ``env_exception``, ``session_busy``, ...) or,
            when no usable reply came, ``unreachable``, ``timeout``, ``connection_lost``, ``bad_reply``,
            ``api_version``, ``task_mismatch``.
        status: the HTTP status of the reply, None when there was none.
        details: the error's ``details`` (e.g. the environment's traceback for ``env_exception``).
    """

    def __init__(self, message: str, kind: str, status: int | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.kind, self.status, self.details = kind, status, details


def error_from_reply(where: str, status: int, body: Any) -> EnvServiceError:
    """The EnvServiceError for an error reply of the env service (``{"error": {"type", "message", "details"}}``)."""
    error = body.get("error") if isinstance(body, dict) and isinstance(body.get("error"), dict) else {}
    kind = str(error.get("type", "http_error"))
    return EnvServiceError(f"{where}: HTTP {status} {kind}: {error.get('message', '')}", kind, status,
                           error.get("details"))


class RemoteEnvironment:
    """An environment that runs in an ``agentrl serve-env`` process, one session per episode.

    Args:
        url: the server, e.g. ``"http://127.0.0.1:8123"``.
        env_name: the environment's name on that server (as ``GET /envs`` lists it).
        timeout: seconds to wait for any reply; keep it above the server's ``--call_timeout``.
        connect_timeout: seconds to wait for a connection (and for a session to close).
        http: an ``httpx.Client`` to share (its timeouts then apply); :meth:`clone` passes its own.
        description: this environment's entry of ``GET /envs``, to skip fetching it (:meth:`clone` passes it).

    Raises:
        EnvServiceError: when the server cannot be reached, speaks another API version, or lacks the env.

    Example:
        >>> env = RemoteEnvironment("http://127.0.0.1:8123", "calculator")  # doctest: +SKIP
        >>> messages = env.reset(env.task_at("test", 0))  # doctest: +SKIP
        >>> env.step(ToolCall("calculate", {"expression": "2 + 2"})).observation  # doctest: +SKIP
        '4'
    """

    def __init__(self, url: str, env_name: str, timeout: float = 60.0, connect_timeout: float = 5.0,
                 http: httpx.Client | None = None, description: dict[str, Any] | None = None) -> None:
        self.url, self.name = url.rstrip("/"), env_name
        # trust_env=False: an HTTP(S)_PROXY meant for the internet must not capture calls to env workers.
        self._http = http or httpx.Client(base_url=self.url, trust_env=False,
                                          timeout=httpx.Timeout(timeout, connect=connect_timeout))
        self._close_timeout = connect_timeout
        self._path = f"/envs/{quote(env_name, safe='')}"
        self.description = description or self._describe()
        self.version: str = self.description["version"]
        self.task_version: str = self.description["task_version"]
        self.split_sizes: dict[str, int] = dict(self.description["splits"])
        self.session_id: str | None = None
        self._calls = 0

    def clone(self) -> RemoteEnvironment:
        """Another environment of the same server and name, for a concurrent episode; it shares this one's
        connection pool and description, so making it sends no request."""
        return RemoteEnvironment(self.url, self.name, connect_timeout=self._close_timeout, http=self._http,
                                 description=self.description)

    # --- the Environment protocol ---------------------------------------------------------------
    def tools(self) -> list[ToolSpec]:
        return list(self.description["tools"])

    def reset(self, task: Task) -> list[Message]:
        """Open a session on the server for ``task`` (by split and index) and return its opening messages.

        Raises:
            EnvServiceError: ``task_mismatch`` when the server generates a different task for that split
                and index (other environment code, version or settings than the task's source).
        """
        if task.env != self.name:
            raise ValueError(f"{self.name} cannot run task {task.id}")
        self.close()
        body = self._request("POST", "/sessions", json={"env": self.name, "split": task.split, "index": task.index})
        self.session_id, self._calls = body["session_id"], 0
        self._check_same_task(task, body["task"])
        return body["messages"]

    def step(self, call: ToolCall) -> StepResult:
        """Run one tool call in this episode's session."""
        if self.session_id is None:
            raise RuntimeError(f"{self.name}: step() before reset()")
        self._calls += 1
        body = self._request("POST", f"/sessions/{self.session_id}/step",
                             json={"tool_calls": [call_to_openai(call, f"call_{self._calls}")]})
        return step_result_from_json(body["results"][0])

    def close(self) -> None:
        """End the session, if one is open.

        A server that cannot be reached is logged, not raised: the session ended with it, and the episode
        already recorded the failure that brought it down (raising here would turn it into a crashed run).
        """
        if self.session_id is None:
            return
        session, self.session_id = self.session_id, None
        try:
            self._request("DELETE", f"/sessions/{session}", timeout=self._close_timeout)
        except EnvServiceError as exc:
            log.warning("could not close session %s of %s at %s: %s", session, self.name, self.url, exc)

    # --- tasks and the oracle, generated on the server ------------------------------------------
    def task_at(self, split: str, index: int) -> Task:
        """Task ``index`` of ``split``, as the server's environment generates it (ground truth included)."""
        return self.tasks(split, 1, index)[0]

    def tasks(self, split: str, n: int | None = None, start: int = 0) -> list[Task]:
        """Tasks ``start .. start+n`` of a split (to its end when ``n`` is None)."""
        if split not in self.split_sizes:
            raise ValueError(f"{self.name} has splits {sorted(self.split_sizes)}, not {split!r}")
        stop = self.split_sizes[split] if n is None else min(self.split_sizes[split], start + n)
        out: list[Task] = []
        while start + len(out) < stop:
            count = min(TASKS_PER_REQUEST, stop - start - len(out))
            body = self._request("GET", f"{self._path}/tasks",
                                 params={"split": split, "start": start + len(out), "n": count})
            out += [task_from_json(item) for item in body["tasks"]]
        return out

    def oracle(self, task: Task) -> list[ToolCall]:
        """The server-side environment's scripted expert calls for ``task``."""
        body = self._request("GET", f"{self._path}/oracle", params={"split": task.split, "index": task.index})
        self._check_same_task(task, body["task"])
        return [ToolCall(c["function"]["name"], c["function"]["arguments"]) for c in body["tool_calls"]]

    # --- HTTP -------------------------------------------------------------------------------------
    def _describe(self) -> dict[str, Any]:
        envs = self._request("GET", "/envs")["envs"]
        for description in envs:
            if description["name"] == self.name:
                return description
        raise EnvServiceError(f"{self.url} serves {sorted(d['name'] for d in envs)}, not {self.name!r}",
                              "unknown_env")

    def _check_same_task(self, task: Task, served: dict[str, Any]) -> None:
        # Compare as JSON: tuples in the caller's task data arrive as lists.
        mine = json.loads(json.dumps(task_to_json(task)))
        if mine != served:
            differ = sorted(key for key in mine if mine[key] != served.get(key))
            raise EnvServiceError(
                f"{self.url} generated a different {task.id} (fields {differ} differ; version "
                f"{served.get('version')!r} there, {task.version!r} here): the server runs other environment "
                "code, version or settings than the one this task came from", "task_mismatch")

    def _request(self, method: str, path: str, **kwargs: Any) -> dict[str, Any]:
        where = f"{method} {self.url}{path}"
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError as exc:
            raise EnvServiceError(f"{where}: cannot connect to the env service ({exc})", "unreachable") from exc
        except httpx.TimeoutException as exc:
            raise EnvServiceError(f"{where}: no reply in time ({type(exc).__name__})", "timeout") from exc
        except httpx.TransportError as exc:
            raise EnvServiceError(f"{where}: connection lost ({type(exc).__name__}: {exc})",
                                  "connection_lost") from exc
        try:
            body = response.json()
        except ValueError:
            raise EnvServiceError(f"{where}: HTTP {response.status_code} reply is not JSON: {response.text[:200]!r}",
                                  "bad_reply", response.status_code) from None
        if not isinstance(body, dict) or body.get("api_version") != API_VERSION:
            found = body.get("api_version") if isinstance(body, dict) else None
            raise EnvServiceError(f"{where}: the server speaks env-service API {found!r}, this client {API_VERSION!r}",
                                  "api_version", response.status_code)
        if response.is_error:
            raise error_from_reply(where, response.status_code, body)
        return body
