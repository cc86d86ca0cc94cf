"""What every console page shares: the signed-in viewer, templates, errors and CSRF checks."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import anyio
from fastapi import Depends, Request
from jinja2 import Environment, FileSystemLoader, select_autoescape
from starlette.responses import HTMLResponse, RedirectResponse, Response

from producer.client import Producer
from producer.errors import AmbiguousId, NotFound
from producer.record import CommandRecord
from producer.states import TERMINAL, State
from producer.tenants import Tenant
from producer.tokens import TokenInfo, Tokens
from workers.gateway.console.session import Session, Sessions

HERE = Path(__file__).resolve().parent
# Scopes that may sign in: a console is for watching and operating, not for submitting only.
SIGN_IN_SCOPES = frozenset({"read", "operate"})
# Sent with every console page: no inline script or style, no framing, nothing cached.
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
    ),
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class ConsoleError(Exception):
    """Raised when a console request is refused: shown as an HTML page with `status`."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class SignInNeeded(Exception):
    """Raised when a console request has no valid session: it is sent to the sign-in page."""


@dataclass(frozen=True)
class Viewer:
    """Who looks: the signed-in token, its tenant and its session (for the CSRF value)."""

    token: TokenInfo
    tenant: Tenant
    session: Session

    @property
    def name(self) -> str:
        return self.token.name

    def can(self, scope: str) -> bool:
        return scope in self.token.scopes

    def need(self, scope: str) -> None:
        if not self.can(scope):
            raise ConsoleError(403, f"this token lacks the {scope} scope")


class Console:
    """The console's collaborators: the producer, the tokens, sessions and templates."""

    def __init__(
        self, producer: Producer, tokens: Tokens, sessions: Sessions, *, trace_url: str | None
    ) -> None:
        self.producer = producer
        self.tokens = tokens
        self.sessions = sessions
        self.trace_url = trace_url
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )
        self.templates.filters["when"] = when
        self.templates.filters["seconds"] = seconds
        self.templates.globals["TERMINAL"] = TERMINAL
        self.templates.globals["STATES"] = list(State)

    def render(
        self,
        request: Request,
        template: str,
        viewer: Viewer | None,
        status: int = 200,
        **context: Any,
    ) -> HTMLResponse:
        html = self.templates.get_template(template).render(
            request=request, viewer=viewer, trace_link=self.trace_link, **context
        )
        return HTMLResponse(html, status_code=status, headers=HEADERS)

    def trace_link(self, trace_id: str | None) -> str | None:
        if not trace_id or not self.trace_url:
            return None
        return self.trace_url.replace("{trace_id}", urllib.parse.quote(trace_id, safe=""))

    async def viewer(self, request: Request) -> Viewer:
        """The signed-in viewer; SignInNeeded when the session or its token is not valid."""
        session = self.sessions.read(request)
        if session is None or session.token_id is None:
            raise SignInNeeded
        token_id = session.token_id
        try:
            token = await anyio.to_thread.run_sync(self.tokens.get, token_id)
        except NotFound:
            raise SignInNeeded from None
        tenant = self.producer.tenants.get(token.tenant)
        if token.status() != "active" or tenant is None:
            raise SignInNeeded
        return Viewer(token, tenant, session)

    def owned(self, viewer: Viewer, command_id: str, *, history: bool = False) -> CommandRecord:
        """The viewer's tenant's command (by id or unique prefix); another tenant's is 404."""
        try:
            full = self.producer.resolve_id(command_id, tenant=viewer.tenant.name)
            rec = self.producer.get(full, with_transitions=history)
        except (AmbiguousId, NotFound):
            rec = None
        if rec is None or rec.tenant != viewer.tenant.name:
            raise ConsoleError(404, f"no command {command_id}")
        return rec


async def current_viewer(request: Request) -> Viewer:
    """The signed-in viewer of the app's console (a dependency of every console page)."""
    console: Console = request.app.state.console
    return await console.viewer(request)


# Module level: FastAPI resolves a handler's annotations in its module's namespace.
Who = Annotated[Viewer, Depends(current_viewer)]


async def form_of(request: Request, viewer: Viewer | Session) -> dict[str, str]:
    """A POSTed urlencoded form, once its CSRF value matches the session's; 403 otherwise."""
    body = (await request.body()).decode("utf-8", errors="replace")
    fields = dict(urllib.parse.parse_qsl(body, keep_blank_values=True))
    session = viewer.session if isinstance(viewer, Viewer) else viewer
    if not session.csrf_ok(fields.pop("csrf", None)):
        raise ConsoleError(403, "the form's CSRF token is missing or wrong: reload the page")
    return fields


def see_other(url: str) -> RedirectResponse:
    return RedirectResponse(url, status_code=303, headers=HEADERS)


def sign_in_redirect(request: Request) -> Response:
    """A page goes to the sign-in page (and back after); a fragment poll gets 401."""
    if request.headers.get("x-console-fragment"):
        return Response(status_code=401, headers=HEADERS)
    back = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    return see_other("/ui/login?" + urllib.parse.urlencode({"next": back}))


def when(value: datetime | str | None) -> str:
    """A time as UTC, to the second: `2026-11-02 14:03:07`."""
    if value is None:
        return ""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def seconds(value: float | None) -> str:
    if value is None:
        return ""
    if value < 10:
        return f"{value:.2f} s"
    if value < 600:
        return f"{value:.1f} s"
    return f"{value / 60:.1f} min"
