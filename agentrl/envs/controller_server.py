"""The controller's HTTP app: the env-service routes over many workers, plus ``/workers`` (serve-controller).

The env-service routes (``/health``, ``/envs``, ``/envs/{env}/tasks``, ``/envs/{env}/oracle``, ``/sessions``,
``/sessions/{id}/step``, ``DELETE /sessions/{id}``) take the same requests as a worker's and give the
worker's replies, so a client cannot tell the controller from one big worker. Requests are validated here
with the worker's own models before they are forwarded, except a step's body, which only the worker reads.

Added routes: ``GET /workers`` (each worker's state, load and health), ``POST /workers`` ``{"url"}`` (join),
``DELETE /workers/{id}[?force=true]`` (drain, or remove at once).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import FastAPI, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from agentrl.envs.controller import EnvController, Forwarded
from agentrl.envs.asgi import BodyLimit, SafeJSONResponse, install_error_handlers, json_reply
from agentrl.envs.server import (DEFAULT_MAX_REQUEST_BYTES, ERROR_REPLIES, CloseReply, CreateSession, EnvsReply,
                                 OracleReply, SessionReply, StepReply, StepRequest, TasksReply)
from agentrl.envs.serving import run_app
from agentrl.envs.sessions import MAX_TASKS_PER_REQUEST
from agentrl.envs.wire import API_VERSION

_WORKER_ERRORS = {**ERROR_REPLIES, 502: ERROR_REPLIES[500]}


class JoinRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    url: str = Field(description="the worker's base URL as the controller can reach it, e.g. http://10.0.0.5:8123")


class WorkerBody(BaseModel):
    id: str
    url: str
    state: str = Field(description="live | draining (takes no new sessions) | dead")
    envs: list[str]
    sessions: int = Field(description="open sessions the controller routed to it")
    starting: int = Field(description="sessions being opened there")
    created: int = Field(description="sessions opened there since it joined")
    worker_sessions: int | None = Field(description="open sessions by its last /health (all its clients)")
    missed_heartbeats: int
    last_seen_s: float | None = Field(description="seconds since it last answered")
    error: str = Field(description="why it is dead, or why it was refused when it came back")


class ControllerHealthReply(BaseModel):
    api_version: str
    status: str = Field(description='"ok" while a worker is live, else "no_workers"')
    envs: list[str]
    sessions: int
    workers: dict[str, int] = Field(description="workers by state: live, draining, dead")


class WorkersReply(BaseModel):
    api_version: str
    workers: list[WorkerBody]


class WorkerReply(BaseModel):
    api_version: str
    worker: WorkerBody


class LeaveReply(BaseModel):
    api_version: str
    worker: WorkerBody
    removed: bool = Field(description="gone now (false: draining until its last session closes)")


def _passed_on(reply: Forwarded) -> Response:
    return Response(content=reply.content, status_code=reply.status, media_type="application/json")


def create_controller_app(controller: EnvController, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The controller's HTTP app; it starts the controller (joins its workers, heartbeats) and stops it after.

    Example:
        >>> app = create_controller_app(EnvController())
        >>> sorted(app.openapi()["paths"])[-2:]
        ['/workers', '/workers/{worker_id}']
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await controller.start()
        yield
        await controller.stop()

    app = FastAPI(title="agentrl env controller", version=API_VERSION, lifespan=lifespan,
                  default_response_class=SafeJSONResponse,
                  description="The env-service API (docs/env-service.md) in front of many agentrl serve-env "
                              "workers, plus /workers.")
    install_error_handlers(app)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)

    @app.get("/health", response_model=ControllerHealthReply)
    async def health() -> SafeJSONResponse:
        return json_reply(controller.health())

    @app.get("/envs", response_model=EnvsReply)
    async def envs() -> SafeJSONResponse:
        return json_reply({"envs": controller.describe()})

    @app.get("/envs/{env}/tasks", response_model=TasksReply, responses=_WORKER_ERRORS)
    async def tasks(request: Request, env: str, split: str = Query(...), start: int = Query(0, ge=0),
                    n: int = Query(1, ge=1, le=MAX_TASKS_PER_REQUEST)) -> Response:
        return _passed_on(await controller.env_request(env, "tasks", request.url.query))

    @app.get("/envs/{env}/oracle", response_model=OracleReply, responses=_WORKER_ERRORS)
    async def oracle(request: Request, env: str, split: str = Query(...), index: int = Query(..., ge=0)) -> Response:
        return _passed_on(await controller.env_request(env, "oracle", request.url.query))

    @app.post("/sessions", response_model=SessionReply, responses=_WORKER_ERRORS)
    async def create_session(request: Request, body: CreateSession) -> Response:
        return _passed_on(await controller.create(body.env, await request.body()))

    # The hot route: the body goes to the worker unparsed, and the worker's own validation answers a bad one
    # (the same 422 as here, about 1 ms per call saved on a 2-core machine). Its schema is still documented.
    @app.post("/sessions/{session_id}/step", response_model=StepReply, responses=_WORKER_ERRORS,
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/json": {"schema": StepRequest.model_json_schema()}}}})
    async def step(request: Request, session_id: str) -> Response:
        return _passed_on(await controller.step(session_id, await request.body()))

    @app.delete("/sessions/{session_id}", response_model=CloseReply, responses=_WORKER_ERRORS)
    async def close(session_id: str) -> Response:
        return _passed_on(await controller.close(session_id))

    @app.get("/workers", response_model=WorkersReply)
    async def workers() -> SafeJSONResponse:
        return json_reply({"workers": controller.pool.list_workers()})

    @app.post("/workers", response_model=WorkerReply, responses=_WORKER_ERRORS)
    async def join(body: JoinRequest) -> SafeJSONResponse:
        return json_reply({"worker": await controller.pool.add_worker(body.url)})

    @app.delete("/workers/{worker_id}", response_model=LeaveReply, responses=ERROR_REPLIES)
    async def leave(worker_id: str, force: bool = Query(False, description="remove now; its sessions are lost")
                    ) -> SafeJSONResponse:
        return json_reply(controller.pool.remove_worker(worker_id, force))

    return app


def serve_controller(controller: EnvController, host: str, port: int, announce: Callable[[str], None] = print,
                     max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, log_level: str = "warning") -> None:
    """Serve ``controller`` with uvicorn until interrupted. Its initial workers join before it listens, so
    one that disagrees with the others stops the start (ServiceError ``worker_mismatch``)."""
    run_app(create_controller_app(controller, max_request_bytes), host, port, announce, log_level,
            prepare=controller.start)


def describe_workers(workers: list[dict[str, Any]]) -> str:
    """One line per worker, for people: ``w1 live http://... sessions=3 envs=calculator,lookup``."""
    return "\n".join(f"{w['id']} {w['state']} {w['url']} sessions={w['sessions']} envs={','.join(w['envs'])}"
                     + (f" ({w['error']})" if w["error"] else "") for w in workers)
