"""ASGI pieces shared by the env server and the controller: JSON replies any input can be echoed into, the
error body and handlers, the request-body limit, and the fast path for well-formed step requests."""

from __future__ import annotations

import json
import logging
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from agentrl.envs.service_errors import ServiceError
from agentrl.envs.sessions import EnvService
from agentrl.envs.wire import API_VERSION

log = logging.getLogger(__name__)
MAX_CALLS_PER_STEP = 64


# --- replies ---------------------------------------------------------------------------------------
class SafeJSONResponse(JSONResponse):
    """JSON that any input can be echoed into: ASCII-escaped (a lone surrogate from a request cannot break
    UTF-8 encoding) and strict (NaN is refused when the body is built, not sent as invalid JSON)."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def json_reply(body: dict[str, Any], status: int = 200, headers: dict[str, str] | None = None) -> SafeJSONResponse:
    """``body`` with the API version, as a JSON reply."""
    return SafeJSONResponse({"api_version": API_VERSION, **body}, status_code=status, headers=headers)


def error_reply(status: int, kind: str, message: str, details: Any = None,
                headers: dict[str, str] | None = None) -> SafeJSONResponse:
    """The service's error body ``{"api_version", "error": {"type", "message", "details"?}}``."""
    error = {"type": kind, "message": message}
    if details is not None:
        error["details"] = details
    return json_reply({"error": error}, status, headers)


def service_error_reply(exc: ServiceError) -> SafeJSONResponse:
    return error_reply(exc.status, exc.kind, exc.message, exc.details)


_HTTP_KINDS = {400: "bad_request", 404: "not_found", 405: "method_not_allowed"}


class BodyLimit:
    """ASGI middleware: refuse request bodies over ``max_bytes`` with 413 before the app parses them."""

    def __init__(self, app: Callable, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope["headers"]).get(b"content-length", b"0")
        if not declared.isdigit() or int(declared) > self.max_bytes:
            await self._too_large(scope, receive, send)
            return
        chunks, size, more = [], 0, True
        while more:  # read the whole body here (chunked bodies have no declared length)
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        whole = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
        await self.app(scope, replaying(whole, receive), send)

    async def _too_large(self, scope: dict, receive: Callable, send: Callable) -> None:
        reply = error_reply(413, "request_too_large", f"request bodies are limited to {self.max_bytes} bytes")
        await reply(scope, receive, send)


def replaying(message: dict, receive: Callable) -> Callable:
    """An ASGI ``receive`` that gives ``message`` (a body already read) first, then defers to ``receive``."""
    replayed = False

    async def replay() -> dict:
        nonlocal replayed
        if replayed:
            return await receive()
        replayed = True
        return message

    return replay


class StepFastPath:
    """ASGI middleware: serve a well-formed ``POST /sessions/{id}/step`` without FastAPI's routing and body
    validation, which take longer than the step itself when the tool is trivial.

    Well-formed means ``Content-Type: application/json`` and a body that is a JSON object whose only key is
    ``tool_calls``, a list of 1 to MAX_CALLS_PER_STEP items: what StepRequest accepts, unchanged. Any other
    request goes on to the app, which validates it and writes its error reply, so every reply is the same
    with or without this middleware. It runs inside BodyLimit, which hands it the whole body at once.
    """

    def __init__(self, app: Callable, service: EnvService) -> None:
        self.app, self.service = app, service

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        parts = scope["path"].split("/") if scope["type"] == "http" and scope["method"] == "POST" else []
        if len(parts) != 4 or parts[:2] != ["", "sessions"] or not parts[2] or parts[3] != "step" \
                or scope.get("root_path"):
            await self.app(scope, receive, send)
            return
        message = await receive()
        tool_calls = _well_formed_calls(scope, message)
        if tool_calls is None:
            await self.app(scope, replaying(message, receive), send)
            return
        try:
            reply = json_reply(await self.service.step(parts[2], tool_calls))
        except ServiceError as exc:
            reply = service_error_reply(exc)
        await reply(scope, receive, send)


def _well_formed_calls(scope: dict, message: dict) -> list[Any] | None:
    """The ``tool_calls`` of a step request's body if StepRequest would take it as it is, else None."""
    if message["type"] != "http.request" or message.get("more_body", False):
        return None
    content_type = next((value for name, value in scope["headers"] if name == b"content-type"), b"")
    if content_type.split(b";")[0].strip().lower() != b"application/json":
        return None
    try:
        body = json.loads(message.get("body", b""))
    except (ValueError, RecursionError):  # the app parses it again and writes the error reply
        return None
    if not isinstance(body, dict) or list(body) != ["tool_calls"]:
        return None
    calls = body["tool_calls"]
    return calls if isinstance(calls, list) and 1 <= len(calls) <= MAX_CALLS_PER_STEP else None


def install_error_handlers(app: FastAPI) -> None:
    """Make every error a JSON error reply: ServiceError, invalid requests, HTTP errors, and the unexpected."""
    @app.exception_handler(ServiceError)
    async def service_error(request: Request, exc: ServiceError) -> SafeJSONResponse:
        return service_error_reply(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> SafeJSONResponse:
        # loc/msg/type only: "input" and "ctx" echo the (possibly huge, possibly unencodable) input
        problems = [{"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]}
                    for e in exc.errors()[:20]]
        first = problems[0] if problems else {"loc": [], "msg": "invalid request"}
        return error_reply(422, "invalid_request", f"{'.'.join(first['loc'])}: {first['msg']}", problems)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> SafeJSONResponse:
        return error_reply(exc.status_code, _HTTP_KINDS.get(exc.status_code, "http_error"), str(exc.detail),
                           headers=exc.headers)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> SafeJSONResponse:
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return error_reply(500, "internal_error", f"{type(exc).__name__}: {str(exc)[:500]}")
