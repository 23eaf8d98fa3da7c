"""How the env service says no: :class:`ServiceError` and the checks that turn what an environment did wrong
into one (an exception it raised, a step result or info the wire cannot carry)."""

from __future__ import annotations

import json
import math
import traceback
from typing import Any

from agentrl.envs.base import truncate
from agentrl.types import StepResult

MAX_ERROR_CHARS = 4000


class ServiceError(Exception):
    """A request the service refuses or could not serve.

    Args:
        status: the HTTP status of the reply (4xx: the caller's mistake; 5xx: the environment or service).
        kind: a stable, machine-readable error type (``unknown_session``, ``env_exception``, ...).
        message: what happened, for people.
        details: optional JSON-able extra data (a traceback, validation errors).
    """

    def __init__(self, status: int, kind: str, message: str, details: Any = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.message, self.details = status, kind, message, details


def exception_text(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {frames[-1].filename}:{frames[-1].lineno}" if frames else ""
    return truncate(f"{type(exc).__name__}: {exc}", MAX_ERROR_CHARS) + where


def env_exception(exc: BaseException) -> ServiceError:
    """The ServiceError (500 ``env_exception``, with the traceback) for an exception an environment raised."""
    return ServiceError(500, "env_exception", exception_text(exc),
                        {"exception": type(exc).__name__,
                         "traceback": truncate("".join(traceback.format_exception(exc)), MAX_ERROR_CHARS)})


def check_step_result(result: Any, env_name: str) -> None:
    """Refuse, as an ``env_exception``, a step result the client could not rebuild exactly."""
    problem = ""
    if not isinstance(result, StepResult):
        problem = f"step returned {type(result).__name__}, not StepResult"
    elif not isinstance(result.observation, str):
        problem = f"step's observation is {type(result.observation).__name__}, not str"
    elif result.reward is not None and not (isinstance(result.reward, (int, float)) and math.isfinite(result.reward)):
        problem = f"step's reward {result.reward!r} is not a finite number"
    elif not isinstance(result.info, dict):
        problem = f"step's info is {type(result.info).__name__}, not a dict"
    if problem:
        raise ServiceError(500, "env_exception", f"{env_name}: {problem}")
    json_safe(result.info, "step info")


def json_safe(value: Any, what: str) -> Any:
    """``value`` if it encodes as strict JSON, else an ``env_exception``: the environment returned something
    the wire cannot carry (a set, an object, NaN)."""
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ServiceError(500, "env_exception", f"the environment's {what} is not JSON: {exc}") from None
    return value
