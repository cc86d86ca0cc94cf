"""Every error the gateway answers is JSON with an `error` field, and never a stack trace."""

from __future__ import annotations

import logging
import traceback
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("execq.gateway")


class ErrorBody(BaseModel):
    """What every 4xx and 5xx answer holds: `error` says what is wrong and what to do."""

    model_config = ConfigDict(extra="allow")

    error: str


class GatewayError(Exception):
    """An answer other than success: status, message, headers and extra JSON fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        **extra: Any,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.extra = extra


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status, headers=headers)


def _where(loc: tuple[int | str, ...]) -> str:
    # ("body", "argv", 0) -> "argv[0]"; the leading "body"/"query"/"header" says little.
    parts = [str(p) for p in loc[1:]] if len(loc) > 1 else [str(p) for p in loc]
    out = ""
    for part in parts:
        out += f"[{part}]" if part.isdigit() else (f".{part}" if out else part)
    return out or "body"


def describe_validation(exc: RequestValidationError) -> tuple[int, str, list[dict[str, str]]]:
    """400 for a body that is not JSON at all, 422 naming each field otherwise.

    The offending values are left out on purpose: a body may hold secret values.
    """
    problems = []
    malformed = False
    for err in exc.errors():
        if err.get("type") in ("json_invalid", "json_type") or (
            err.get("type") == "missing" and tuple(err.get("loc", ())) == ("body",)
        ):
            malformed = True
        problems.append({"field": _where(tuple(err.get("loc", ()))), "problem": err["msg"]})
    if malformed:
        return 400, "the body must be a JSON object (Content-Type: application/json)", problems
    text = "; ".join(f"{p['field']}: {p['problem']}" for p in problems[:5])
    return 422, f"invalid request: {text}", problems


def install(app: FastAPI) -> None:
    """Map every failure to the JSON error shape, including FastAPI's and Starlette's own."""

    @app.exception_handler(GatewayError)
    async def _gateway(_: Request, exc: GatewayError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.headers, **exc.extra)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if (
            request.method == "POST"
            and kind
            and not (kind == "application/json" or kind.endswith("+json"))
        ):
            return error_response(
                415,
                f"the body must be JSON with Content-Type: application/json, not {kind} "
                "(curl: --json '{...}')",
            )
        status, message, problems = describe_validation(exc)
        return error_response(status, message, problems=problems)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else "request refused"
        extra = getattr(exc, "extra", None) or {}
        return error_response(exc.status_code, detail, dict(exc.headers or {}), **extra)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # The frames, not the message: the message of an unexpected error may quote input
        # (secret values included), the frames only say where it happened.
        log.error(
            "gateway: unexpected %s on %s %s\n%s",
            type(exc).__name__,
            request.method,
            request.url.path,
            "".join(traceback.format_tb(exc.__traceback__)),
        )
        return error_response(500, "internal error; the gateway's log says more")
