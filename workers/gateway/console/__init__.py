"""The operators' console: server-rendered pages under /ui/ of the gateway.

Signed in with a tenant's token (read or operate scope), a person sees that tenant's
commands, their output, history and audit trail, and operates on them through the same
Producer methods (and so the same audit events) as the command line and the API.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.staticfiles import StaticFiles
from starlette.responses import Response

from producer.client import Producer
from producer.tokens import Tokens
from workers.gateway.console import commands, overview
from workers.gateway.console.session import Sessions
from workers.gateway.console.web import (
    HERE,
    Console,
    ConsoleError,
    SignInNeeded,
    see_other,
    sign_in_redirect,
)

PREFIX = "/ui"


def mount(
    app: FastAPI,
    producer: Producer,
    tokens: Tokens,
    *,
    session_key: bytes | None = None,
    session_ttl_s: float = 8 * 3600,
) -> Console:
    """Serve the console under /ui/ of `app` (left out of the OpenAPI document)."""
    console = Console(
        producer,
        tokens,
        Sessions(session_key, session_ttl_s),
        trace_url=producer.settings.trace_url,
    )
    app.state.console = console
    app.include_router(commands.routes(console), prefix=PREFIX)
    app.include_router(overview.routes(console), prefix=PREFIX)
    app.mount(f"{PREFIX}/static", StaticFiles(directory=HERE / "static"), name="console-static")

    @app.get(PREFIX, include_in_schema=False)
    def bare() -> Response:
        return see_other(f"{PREFIX}/")

    @app.exception_handler(ConsoleError)
    async def _refused(request: Request, exc: ConsoleError) -> Response:
        try:
            viewer = await console.viewer(request)
        except SignInNeeded:
            viewer = None
        return console.render(request, "error.html", viewer, exc.status, message=exc.message)

    @app.exception_handler(SignInNeeded)
    async def _sign_in(request: Request, _: SignInNeeded) -> Response:
        return sign_in_redirect(request)

    return console
