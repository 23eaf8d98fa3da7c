"""The env server: environments' sessions over HTTP (FastAPI on uvicorn), for ``agentrl serve-env``.

Routes (every JSON reply carries ``api_version``; docs/env-service.md has examples, ``/openapi.json`` the schema):

- ``GET /health`` — liveness, served environments, open sessions.
- ``GET /envs`` — each environment's name, version, task version, split sizes and OpenAI tool schemas.
- ``GET /envs/{env}/tasks?split=&start=&n=`` — generated tasks, ground truth included (for the trainer).
- ``GET /envs/{env}/oracle?split=&index=`` — the scripted expert's calls for one task.
- ``POST /sessions`` ``{"env", "split", "index" | "seed"}`` — open an episode: opening messages, tools.
- ``POST /sessions/{id}/step`` ``{"tool_calls": [OpenAI-format calls]}`` — tool results, reward, done, info.
- ``DELETE /sessions/{id}`` — close the episode.

Errors are ``{"api_version", "error": {"type", "message", "details"?}}`` with a 4xx status for misuse
(unknown session 404, busy session 409, invalid body 422, body too large 413) and 5xx when the environment
raised (500 ``env_exception``) or timed out outside a tool call (504). A bad tool call is not an HTTP
error: the model gets an ``Error: ...`` tool result, exactly as in-process.

With ``--controller URL`` the server joins an ``agentrl serve-controller`` once it listens and leaves it when it
shuts down (``agentrl.envs.controller``).
"""

from __future__ import annotations

import asyncio
import functools
import logging
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Callable, Iterator

from fastapi import FastAPI, Query
from pydantic import BaseModel, ConfigDict, Field

from agentrl.envs import make_env
from agentrl.envs.asgi import (MAX_CALLS_PER_STEP, BodyLimit, SafeJSONResponse, StepFastPath, install_error_handlers,
                               json_reply)
from agentrl.envs.controller import join_controller, leave_controller
from agentrl.envs.serving import run_app, serve_app_in_thread
from agentrl.envs.sessions import MAX_TASKS_PER_REQUEST, EnvService
from agentrl.envs.wire import API_VERSION

log = logging.getLogger(__name__)
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20


# --- request and reply bodies (they also make the OpenAPI description) ---------------------------
class _Request(BaseModel):
    # Strict and closed, like recipes: "3" is not an index, and a misspelt key is an error, not a default.
    model_config = ConfigDict(strict=True, extra="forbid")


class CreateSession(_Request):
    env: str = Field(description="environment name, as GET /envs lists it")
    split: str = Field("train", description='task split, e.g. "train" or "test"')
    index: int | None = Field(None, description="task index in the split (give index or seed)")
    seed: int | None = Field(None, description="draw the task index from this seed (give index or seed)")


class StepRequest(_Request):
    tool_calls: list[Any] = Field(min_length=1, max_length=MAX_CALLS_PER_STEP, description=(
        'OpenAI-format calls: {"id": "call_0", "type": "function", "function": {"name": "calculate", '
        '"arguments": "{\\"expression\\": \\"2+2\\"}"}}; arguments may be a JSON string or an object'))


class ErrorInfo(BaseModel):
    type: str
    message: str
    details: Any = None


class ErrorReply(BaseModel):
    api_version: str
    error: ErrorInfo


class TaskBody(BaseModel):
    env: str
    split: str
    index: int
    prompt: str
    data: dict[str, Any]
    version: str


class EnvBody(BaseModel):
    name: str
    version: str
    task_version: str
    splits: dict[str, int]
    tools: list[dict[str, Any]]


class HealthReply(BaseModel):
    api_version: str
    status: str
    envs: list[str]
    sessions: int


class EnvsReply(BaseModel):
    api_version: str
    envs: list[EnvBody]


class TasksReply(BaseModel):
    api_version: str
    tasks: list[TaskBody]


class OracleReply(BaseModel):
    api_version: str
    task: TaskBody
    tool_calls: list[dict[str, Any]]


class SessionReply(BaseModel):
    api_version: str
    session_id: str
    env: str
    task: TaskBody
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]]


class StepResultBody(BaseModel):
    observation: str
    reward: float | None
    done: bool
    info: dict[str, Any]


class StepReply(BaseModel):
    api_version: str
    session_id: str
    results: list[StepResultBody] = Field(description="one per call that ran, in order")
    messages: list[dict[str, Any]] = Field(description="the same results as OpenAI tool messages")
    done: bool
    reward: float | None
    info: dict[str, Any]


class CloseReply(BaseModel):
    api_version: str
    session_id: str
    closed: bool


ERROR_REPLIES: dict[int | str, dict[str, Any]] = {status: {"model": ErrorReply}
                                                  for status in (404, 409, 413, 422, 500, 503, 504)}


def create_app(service: EnvService, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The HTTP app over ``service``; it expires idle sessions while it runs and shuts the service down after.

    Example:
        >>> from agentrl.envs import make_env
from agentrl.envs.asgi import (MAX_CALLS_PER_STEP, BodyLimit, SafeJSONResponse, StepFastPath, install_error_handlers,
                               json_reply)
        >>> app = create_app(EnvService({"calculator": lambda: make_env("calculator")}))
        >>> sorted(app.openapi()["paths"])[:2]
        ['/envs', '/envs/{env}/oracle']
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        sweeper = asyncio.create_task(service.expire_forever())
        yield
        sweeper.cancel()
        service.shutdown()

    app = FastAPI(title="agentrl env service", version=API_VERSION, lifespan=lifespan,
                  default_response_class=SafeJSONResponse,
                  description="Environments' sessions over HTTP: the function-call API of agentrl. "
                              "See docs/env-service.md.")
    install_error_handlers(app)
    app.add_middleware(StepFastPath, service=service)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)  # added last: it runs first

    @app.get("/health", response_model=HealthReply)
    async def health() -> SafeJSONResponse:
        return json_reply({"status": "ok", "envs": sorted(service.prototypes), "sessions": len(service.sessions)})

    @app.get("/envs", response_model=EnvsReply)
    async def envs() -> SafeJSONResponse:
        return json_reply({"envs": service.describe()})

    @app.get("/envs/{env}/tasks", response_model=TasksReply, responses=ERROR_REPLIES)
    async def tasks(env: str, split: str = Query(...), start: int = Query(0, ge=0),
                    n: int = Query(1, ge=1, le=MAX_TASKS_PER_REQUEST)) -> SafeJSONResponse:
        return json_reply({"tasks": await service.tasks(env, split, start, n)})

    @app.get("/envs/{env}/oracle", response_model=OracleReply, responses=ERROR_REPLIES)
    async def oracle(env: str, split: str = Query(...), index: int = Query(..., ge=0)) -> SafeJSONResponse:
        return json_reply(await service.oracle(env, split, index))

    @app.post("/sessions", response_model=SessionReply, responses=ERROR_REPLIES)
    async def create_session(body: CreateSession) -> SafeJSONResponse:
        return json_reply(await service.create(body.env, body.split, body.index, body.seed))

    @app.post("/sessions/{session_id}/step", response_model=StepReply, responses=ERROR_REPLIES)
    async def step(session_id: str, body: StepRequest) -> SafeJSONResponse:
        return json_reply(await service.step(session_id, body.tool_calls))

    @app.delete("/sessions/{session_id}", response_model=CloseReply, responses=ERROR_REPLIES)
    async def close(session_id: str) -> SafeJSONResponse:
        return json_reply(await service.close(session_id))

    return app


def env_factories(specs: list[tuple[str, dict[str, Any]]]) -> dict[str, Callable[[], Any]]:
    """``[(name or module:Class, kwargs)]`` → ``{served name: factory}``, names resolved as recipes resolve them.

    Example:
        >>> list(env_factories([("calculator", {"max_operand": 20})]))
        ['calculator']
    """
    factories: dict[str, Callable[[], Any]] = {}
    for name, kwargs in specs:
        served = make_env(name, **kwargs).name
        if served in factories:
            raise ValueError(f"two --env entries serve an environment named {served!r}")
        factories[served] = functools.partial(make_env, name, **kwargs)
    return factories


@contextmanager
def serve_in_thread(service: EnvService, host: str = "127.0.0.1", port: int = 0,
                    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> Iterator[str]:
    """Serve ``service`` from a background thread of this process while the ``with`` block runs; yields the URL.

    For tests, notebooks and benchmarks; ``agentrl serve-env`` is the way to run a server on its own.

    Example:
        >>> from agentrl.envs import make_env
from agentrl.envs.asgi import (MAX_CALLS_PER_STEP, BodyLimit, SafeJSONResponse, StepFastPath, install_error_handlers,
                               json_reply)
        >>> with serve_in_thread(EnvService({"calculator": lambda: make_env("calculator")})) as url:
        ...     url.startswith("http://127.0.0.1:")
        True
    """
    with serve_app_in_thread(create_app(service, max_request_bytes), host, port) as url:
        yield url


def serve(service: EnvService, host: str, port: int, announce: Callable[[str], None] = print,
          max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES, log_level: str = "warning", controller: str = "",
          advertise_url: str = "") -> None:
    """Serve ``service`` with uvicorn until interrupted; ``announce`` gets the URL once it listens (port 0
    picks a free port, and the URL says which).

    With ``controller`` (an ``agentrl serve-controller`` URL) the server joins it once it listens, as
    ``advertise_url`` (default: the URL it listens on), and leaves it when it stops. A refusal (e.g. the
    controller's workers serve another version of an environment) stops the server and raises EnvServiceError.
    """
    joined: list[str] = []

    async def join(url: str) -> None:
        worker_id = await join_controller(controller, advertise_url or url)
        joined.append(worker_id)
        print(f"agentrl serve-env: joined the controller {controller} as worker {worker_id}", flush=True)

    async def leave() -> None:
        if joined:
            await leave_controller(controller, joined[0])

    run_app(create_app(service, max_request_bytes), host, port, announce, log_level,
            started=join if controller else None, stopping=leave if controller else None)
