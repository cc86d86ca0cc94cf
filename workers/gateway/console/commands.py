"""The console's commands: sign-in, the filtered list, one command, its output and actions."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from starlette.responses import Response

from producer.errors import IllegalTransition, InvalidOperation, NotFound, StaleVersion
from producer.record import CommandRecord
from producer.states import OVERRIDE_TO, RETRYABLE, ROLLBACKABLE, State
from producer.tokens import well_formed
from workers.gateway.console.web import (
    HEADERS,
    SIGN_IN_SCOPES,
    Console,
    ConsoleError,
    Viewer,
    Who,
    form_of,
    see_other,
)

PAGE = 100
# The list's "created since" choices: label and how far back.
SINCE = {
    "15m": timedelta(minutes=15),
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "24h": timedelta(hours=24),
    "7d": timedelta(days=7),
}


@dataclass(frozen=True)
class Filters:
    """The list's filters as the query string gives them (empty: no filter)."""

    state: str = ""
    action: str = ""
    since: str = ""
    q: str = ""

    def query(self) -> str:
        pairs = {k: v for k, v in vars(self).items() if v}
        return urllib.parse.urlencode(pairs)


def filters(
    state: Annotated[str, Query(max_length=20)] = "",
    action: Annotated[str, Query(max_length=64)] = "",
    since: Annotated[str, Query(max_length=5)] = "",
    q: Annotated[str, Query(max_length=200)] = "",
) -> Filters:
    return Filters(state, action, since, q.strip())


def _is_safe_next(target: str) -> bool:
    # Only a path of this console: never another site (`//host`, `https://…`).
    return target.startswith("/ui/") and not target.startswith("//") and "\\" not in target


def routes(console: Console) -> APIRouter:
    """Sign-in and the commands' pages, list and actions."""
    router = APIRouter(include_in_schema=False)
    producer = console.producer

    @router.get("/login")
    def login_page(request: Request, next: str = "/ui/") -> Response:
        session = console.sessions.read(request) or console.sessions.anonymous()
        answer = console.render(request, "login.html", None, csrf=session.csrf, next=next)
        console.sessions.store(request, answer, session)
        return answer

    @router.post("/login")
    async def login(request: Request) -> Response:
        session = console.sessions.read(request)
        if session is None:
            raise ConsoleError(403, "the sign-in form expired: reload the page")
        fields = await form_of(request, session)
        raw = fields.get("token", "").strip()
        target = fields.get("next", "/ui/")
        info = (
            await anyio.to_thread.run_sync(console.tokens.verify, raw) if well_formed(raw) else None
        )
        problem = None
        if info is None:
            problem = "That token is not valid: it is mistyped, expired or revoked."
        elif not info.scopes & SIGN_IN_SCOPES:
            problem = "That token has neither the read nor the operate scope."
        elif producer.tenants.get(info.tenant) is None:
            problem = f"The token's tenant {info.tenant!r} is not configured here."
        if problem is not None or info is None:
            return console.render(
                request, "login.html", None, 401, csrf=session.csrf, next=target, error=problem
            )
        expires = None if info.expires_at is None else info.expires_at.timestamp()
        answer = see_other(target if _is_safe_next(target) else "/ui/")
        console.sessions.store(request, answer, console.sessions.signed_in(info.id, expires))
        return answer

    @router.post("/logout")
    async def logout(request: Request, who: Who) -> Response:
        await form_of(request, who)
        answer = see_other("/ui/login")
        console.sessions.clear(request, answer)
        return answer

    def listed(who: Viewer, f: Filters, before: str) -> list[CommandRecord]:
        try:
            state = State(f.state) if f.state else None
        except ValueError:
            raise ConsoleError(400, f"no state {f.state!r}") from None
        since = datetime.now(UTC) - SINCE[f.since] if f.since in SINCE else None
        after = _cursor(before) if before else None
        return producer.store.list(
            tenant=who.tenant.name,
            state=state,
            since=since,
            action=f.action or None,
            text=f.q or None,
            limit=PAGE,
            after=after,
        )

    @router.get("/commands")
    def commands_page(
        request: Request, who: Who, f: Annotated[Filters, Depends(filters)], before: str = ""
    ) -> Response:
        records = listed(who, f, before)
        return console.render(
            request,
            "commands.html",
            who,
            records=records,
            f=f,
            since_choices=list(SINCE),
            actions=sorted(who.tenant.actions),
            older=_cursor_of(records[-1]) if len(records) == PAGE else None,
            live=not before,
        )

    @router.get("/commands/rows")
    def command_rows(
        request: Request, who: Who, f: Annotated[Filters, Depends(filters)]
    ) -> Response:
        """The list's rows alone: what the page polls to stay current."""
        return console.render(request, "command_rows.html", who, records=listed(who, f, ""))

    @router.get("/commands/{command_id}")
    def command_page(request: Request, who: Who, command_id: str, done: str = "") -> Response:
        return _command(console, request, who, command_id, notice=done)

    @router.get("/commands/{command_id}/events")
    async def command_events(request: Request, who: Who, command_id: str) -> Response:
        """The command's state changes and output (server-sent events), as the API's stream."""
        from workers.gateway.events import event_stream  # noqa: PLC0415

        rec = await anyio.to_thread.run_sync(lambda: console.owned(who, command_id))
        return StreamingResponse(
            event_stream(producer, rec.id, after=request.headers.get("last-event-id")),
            media_type="text/event-stream",
            headers={**HEADERS, "X-Accel-Buffering": "no"},
        )

    @router.post("/commands/{command_id}/{what}")
    async def operate(request: Request, who: Who, command_id: str, what: str) -> Response:
        fields = await form_of(request, who)
        who.need("operate")
        if what not in ("revoke", "retry", "rollback", "override"):
            raise ConsoleError(404, f"no action {what!r} on a command")
        rec = await anyio.to_thread.run_sync(lambda: console.owned(who, command_id))
        reason = fields.get("reason", "").strip() or None
        ticket = fields.get("ticket", "").strip() or None
        kwargs: dict[str, Any] = {"operator": who.name, "reason": reason, "ticket": ticket}
        if what == "revoke":
            kwargs["terminate"] = fields.get("terminate") == "on"
        elif what == "override":
            kwargs["identity"] = who.name
            kwargs["resolution"] = fields.get("resolution", State.REVERTED.value)
        action = getattr(producer, what)
        try:
            await anyio.to_thread.run_sync(lambda: action(rec.id, **kwargs))
        except (InvalidOperation, IllegalTransition, StaleVersion, NotFound, ValueError) as exc:
            refused = str(exc)
            return await anyio.to_thread.run_sync(
                lambda: _command(console, request, who, rec.id, error=refused, status=409)
            )
        return see_other(f"/ui/commands/{rec.id}?done={what}")

    return router


def _command(
    console: Console,
    request: Request,
    who: Viewer,
    command_id: str,
    *,
    notice: str = "",
    error: str | None = None,
    status: int = 200,
) -> Response:
    rec = console.owned(who, command_id, history=True)
    events = console.producer.audit_events(command_id=rec.id)
    timeline: list[dict[str, Any]] = [
        {
            "at": t.at,
            "kind": "state",
            "what": f"{t.from_state or '—'} → {t.to_state}",
            "who": t.actor,
            "detail": t.reason or "",
        }
        for t in rec.transitions
    ]
    for e in events:
        at = datetime.fromisoformat(e.ts)
        timeline.append(
            {
                "at": at if at.tzinfo else at.replace(tzinfo=UTC),
                "kind": "audit",
                "what": f"{e.phase} ({e.outcome})",
                "who": e.operator or e.actor,
                "detail": "; ".join(x for x in (e.ticket, e.reason) if x),
            }
        )
    timeline.sort(key=lambda item: item["at"])
    batch = console.producer.get_batch(rec.batch_id) if rec.batch_id else None
    return console.render(
        request,
        "command.html",
        who,
        status,
        rec=rec,
        timeline=timeline,
        batch=batch,
        duration=_duration(rec),
        notice=notice,
        error=error,
        can_retry=rec.state in RETRYABLE,
        can_rollback=rec.state in ROLLBACKABLE,
        can_revoke=rec.state in (State.PENDING, State.RUNNING),
        override_to=sorted(OVERRIDE_TO),
    )


def _duration(rec: CommandRecord) -> float | None:
    if rec.started_at is None or rec.finished_at is None:
        return None
    return (rec.finished_at - rec.started_at).total_seconds()


def _cursor_of(rec: CommandRecord) -> str:
    return f"{rec.created_at.isoformat()}|{rec.id}"


def _cursor(text: str) -> tuple[datetime, str]:
    at, _, last = text.partition("|")
    try:
        return datetime.fromisoformat(at), last
    except ValueError:
        raise ConsoleError(400, "that page link is not one this console gave") from None
