"""The gateway's routes: submit, read, follow and operate on commands over HTTP.

Handlers that touch the store are plain functions: FastAPI runs them in its thread pool, and
the store (SQLAlchemy, synchronous) needs no second code path. Only authentication, rate
limits and the event streams are async.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import datetime
from typing import Annotated, Any

import anyio
import redis.asyncio as aioredis
from fastapi import Body, Depends, FastAPI, Header, Path, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from opentelemetry import context as otel_context
from opentelemetry import propagate
from opentelemetry import trace as otel_trace

from producer import telemetry
from producer.client import Producer
from producer.errors import (
    AmbiguousId,
    IdempotencyConflict,
    IllegalTransition,
    InvalidEventId,
    InvalidOperation,
    NotFound,
    PolicyDenied,
    SpecError,
    StaleVersion,
)
from producer.live import Cursor
from producer.record import CommandRecord
from producer.spec import KEY_PATTERN, MAX_KEY_LENGTH, CommandSpec
from producer.states import State
from producer.tokens import Tokens
from workers.cli_actions import action_json
from workers.gateway import errors
from workers.gateway.auth import Authenticate, Caller, Gateway, caller
from workers.gateway.errors import ErrorBody, GatewayError
from workers.gateway.limits import DEFAULT_MAX_BODY, BodyLimit, TenantRates, too_many
from workers.gateway.models import (
    ActionList,
    CommandPage,
    CommandRequest,
    Health,
    RevokeRequest,
    Submitted,
)

# RFC 8941 sf-string: printable ASCII, with `"` and `\` escaped by a backslash.
_SF_STRING = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"')
COMMAND_ID = r"^[0-9a-f][0-9a-f-]{7,35}$"
MAX_PAGE = 200


# One server-sent event, as a client's parser sees it; `data` is JSON text: {state, version},
# {text} for stdout and stderr, the final record for end.
SSE_EVENT = {
    "type": "object",
    "properties": {
        "id": {"type": "string"},
        "event": {"type": "string", "enum": ["state", "stdout", "stderr", "end"]},
        "data": {"type": "string", "contentMediaType": "application/json"},
        "retry": {"type": "integer"},
    },
}


def _doc(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": ErrorBody} for status in statuses}


# Every route may answer these; each route adds its own.
COMMON = _doc(400, 401, 403, 413, 415, 422, 429, 500)


Who = Annotated[Caller, Depends(caller)]
CommandId = Annotated[str, Path(pattern=COMMAND_ID, description="A command id.")]


def create_app(
    producer: Producer,
    *,
    tokens: Tokens | None = None,
    redis_client: aioredis.Redis | None = None,
    max_body: int = DEFAULT_MAX_BODY,
    token_cache_s: float = 0.0,
    close_producer: bool = False,
    session_key: bytes | None = None,
    session_ttl_s: float = 8 * 3600,
) -> FastAPI:
    """The gateway over `producer`; `tokens` default to the producer's store.

    `token_cache_s`: how long a verified token is trusted without asking the store again
    (what a revoke may take to reach this gateway); 0 asks on every request.
    `close_producer`: the app owns `producer` and closes it (and flushes traces) at shutdown.
    `session_key`, `session_ttl_s`: the console's (/ui/) cookie signing key (None: random
    per process) and how long a sign-in lasts.
    """
    tokens = tokens if tokens is not None else Tokens(producer.store, trail=producer.trail)
    client = redis_client if redis_client is not None else _async_redis(producer)
    rates = TenantRates(client, producer.settings.key("http"))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await client.aclose()
            if close_producer:
                producer.close()
                telemetry.shutdown()

    app = FastAPI(
        lifespan=lifespan,
        title="execq gateway",
        version=_version(),
        description=(
            "Run OS commands for many tenants, auditable, traceable and reversible. "
            "Authenticate with `Authorization: Bearer exq_…`; errors are JSON with `error`."
        ),
        responses=COMMON,
    )
    # Not FastAPI's own max_body_size: its 413 is plain text, sent outside the app's
    # exception handlers, and every error here is JSON.
    app.add_middleware(BodyLimit, limit=max_body)
    # Outermost but for the body limit: a caller without a valid token gets 401 before its
    # body is even read (a malformed body must not tell it more than that).
    gateway = Gateway(producer, tokens, rates, token_cache_s=token_cache_s)
    app.add_middleware(Authenticate, gateway=gateway)
    errors.install(app)

    def owned(who: Caller, command_id: str, *, history: bool = False) -> CommandRecord:
        """The command if it is the caller's tenant's; another tenant's is not found.

        `command_id` may be a unique prefix (8 characters or more) among the tenant's own
        commands: another tenant's ids neither match nor make a prefix ambiguous.
        """
        try:
            full = producer.resolve_id(command_id, tenant=who.tenant.name)
            rec = producer.get(full, with_transitions=history)
        except AmbiguousId as exc:
            raise GatewayError(404, str(exc), candidates=exc.candidates) from None
        except NotFound:
            rec = None
        if rec is None or rec.tenant != who.tenant.name:
            raise GatewayError(404, f"no command {command_id}")
        return rec

    @app.get("/healthz", response_model=Health, tags=["health"])
    def healthz() -> Health:
        """Liveness and readiness: answers once the store is reachable (no token)."""
        try:
            producer.store.count()
        except Exception:
            raise GatewayError(503, "the results store is unreachable") from None
        return Health(status="ok")

    @app.get("/v1/actions", response_model=ActionList, tags=["actions"], responses=_doc(404, 503))
    def list_actions(who: Who) -> ActionList:
        """The tenant's actions with their parameters (JSON Schema)."""
        who.need("submit", "read")
        items = [action_json(name, a) for name, a in sorted(who.tenant.actions.items())]
        return ActionList(tenant=who.tenant.name, actions=items)

    @app.post(
        "/v1/commands",
        status_code=201,
        response_model=Submitted,
        tags=["commands"],
        responses={
            200: {"model": Submitted, "description": "A repeat of an idempotency key."},
            **_doc(409),
        },
    )
    def submit(
        who: Who,
        request: Request,
        response: Response,
        body: Annotated[CommandRequest, Body()],
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                description="A key the caller chooses: a repeat replays the first answer "
                "(IETF Idempotency-Key header draft; quoted or bare).",
            ),
        ] = None,
    ) -> Submitted:
        """Submit a command: 201 for a new one, 200 for a repeat of the same key and body."""
        who.need("submit")
        key = _idempotency_key(idempotency_key)
        try:
            spec = CommandSpec(
                tenant=who.tenant.name,
                principal=who.name,
                idempotency_key=key,
                **body.spec_fields(),
            )
        except SpecError as exc:
            raise GatewayError(422, f"invalid command: {exc}") from None
        try:
            with _trace_of(request):
                result = producer.submit(spec)
        except PolicyDenied as exc:
            raise _refusal(exc) from None
        except IdempotencyConflict as exc:
            raise GatewayError(
                422,
                f"Idempotency-Key {key!r} was used with another body: {exc}",
                command_id=exc.command_id,
            ) from None
        except SpecError as exc:
            raise GatewayError(422, f"invalid command: {exc}") from None
        if result.duplicate:
            response.status_code = 200
        else:
            response.headers["Location"] = f"/v1/commands/{result.id}"
        return Submitted(id=result.id, state=result.state, duplicate=result.duplicate)

    @app.get("/v1/commands", response_model=CommandPage, tags=["commands"])
    def list_commands(
        who: Who,
        state: Annotated[State | None, Query(description="Only commands in this state.")] = None,
        limit: Annotated[int, Query(ge=1, le=MAX_PAGE)] = 50,
        cursor: Annotated[
            str | None, Query(max_length=200, description="`next_cursor` of the previous page.")
        ] = None,
    ) -> JSONResponse:
        """The tenant's commands, newest first."""
        who.need("read")
        after = _decode_cursor(cursor) if cursor else None
        records = producer.list(tenant=who.tenant.name, state=state, limit=limit, after=after)
        more = len(records) == limit
        next_cursor = _encode_cursor(records[-1]) if more and records else None
        items = [rec.to_json() for rec in records]
        return JSONResponse({"items": items, "next_cursor": next_cursor})

    @app.get(
        "/v1/commands/{command_id}",
        response_model=CommandRecord,
        tags=["commands"],
        responses=_doc(404),
    )
    def get_command(who: Who, command_id: CommandId) -> JSONResponse:
        """One command, as `execq status --json` prints it."""
        who.need("read")
        return JSONResponse(owned(who, command_id, history=True).to_json())

    @app.get(
        "/v1/commands/{command_id}/events",
        tags=["commands"],
        responses={
            200: {
                "content": {"text/event-stream": {"schema": SSE_EVENT}},
                "description": "Server-sent events: state, stdout, stderr, then end.",
            },
            **_doc(404),
        },
        response_class=StreamingResponse,
    )
    async def events(
        who: Who,
        command_id: CommandId,
        last_event_id: Annotated[
            str | None,
            Header(alias="Last-Event-ID", max_length=100, description="Resume after it."),
        ] = None,
    ) -> StreamingResponse:
        """Follow a command: its state changes and output as they happen, then its record."""
        from workers.gateway.events import event_stream  # noqa: PLC0415

        who.need("read")
        if last_event_id is not None:
            try:
                Cursor.parse(last_event_id)
            except InvalidEventId as exc:
                raise GatewayError(400, f"Last-Event-ID: {exc}") from None
        rec = await anyio.to_thread.run_sync(lambda: owned(who, command_id))
        return StreamingResponse(
            event_stream(producer, rec.id, after=last_event_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    def operate(who: Caller, command_id: str, what: str, **kwargs: Any) -> CommandRecord:
        who.need("operate")
        full = owned(who, command_id).id
        action = getattr(producer, what)
        try:
            rec: CommandRecord = action(
                full, operator=who.name, reason="via the HTTP gateway", **kwargs
            )
        except (InvalidOperation, IllegalTransition, StaleVersion) as exc:
            raise GatewayError(409, str(exc)) from None
        return rec

    @app.post(
        "/v1/commands/{command_id}/revoke",
        response_model=CommandRecord,
        tags=["operate"],
        responses=_doc(404, 409),
    )
    def revoke(
        who: Who,
        command_id: CommandId,
        body: Annotated[RevokeRequest | None, Body()] = None,
    ) -> JSONResponse:
        """Pending: it never runs. Running, with `terminate`: its process tree is killed."""
        terminate = body.terminate if body is not None else False
        return JSONResponse(operate(who, command_id, "revoke", terminate=terminate).to_json())

    @app.post(
        "/v1/commands/{command_id}/retry",
        response_model=CommandRecord,
        tags=["operate"],
        responses=_doc(404, 409),
    )
    def retry(who: Who, command_id: CommandId) -> JSONResponse:
        """A failed or revoked command runs again (attempts + 1)."""
        return JSONResponse(operate(who, command_id, "retry").to_json())

    @app.post(
        "/v1/commands/{command_id}/rollback",
        response_model=CommandRecord,
        tags=["operate"],
        responses=_doc(404, 409),
    )
    def rollback(who: Who, command_id: CommandId) -> JSONResponse:
        """Run the command's compensation (succeeded or failed -> reverting -> reverted)."""
        return JSONResponse(operate(who, command_id, "rollback").to_json())

    from workers.gateway import console  # noqa: PLC0415

    console.mount(app, producer, tokens, session_key=session_key, session_ttl_s=session_ttl_s)
    _instrument(app)
    return app


def _refusal(exc: PolicyDenied) -> GatewayError:
    extra: dict[str, Any] = {"command_id": exc.command_id, "rule": exc.rule}
    if exc.rule == "submit_rate":
        limited = too_many(str(exc), exc.retry_after_s or 1.0)
        limited.extra = extra
        return limited
    if exc.rule == "idempotency_key":
        return GatewayError(400, f"{exc}: send an Idempotency-Key header", **extra)
    return GatewayError(403, f"refused by policy: {exc}", **extra)


def _idempotency_key(raw: str | None) -> str | None:
    """The header's value: an RFC 8941 string ("…") as the draft says, or a bare token."""
    if raw is None:
        return None
    value = raw.strip()
    if value.startswith('"'):
        match = _SF_STRING.fullmatch(value)
        value = re.sub(r"\\(.)", r"\1", match.group(1)) if match else ""
    if not KEY_PATTERN.fullmatch(value):
        raise GatewayError(
            400,
            f"Idempotency-Key must be 1-{MAX_KEY_LENGTH} printable ASCII characters "
            'without spaces, bare or as a quoted string ("…")',
        )
    return value


def _encode_cursor(rec: CommandRecord) -> str:
    raw = json.dumps([rec.created_at.isoformat(), rec.id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        at, last_id = json.loads(raw)
        return datetime.fromisoformat(at), str(last_id)
    except (binascii.Error, ValueError, TypeError, UnicodeDecodeError):
        raise GatewayError(400, "cursor is not one this gateway gave") from None


@contextmanager
def _trace_of(request: Request) -> Iterator[None]:
    """The caller's `traceparent` as the current context, when no server span holds it.

    With tracing exported, the FastAPI instrumentation's server span already continues the
    caller's trace; without, nothing would, and the command would start a trace of its own.
    """
    if otel_trace.get_current_span().get_span_context().is_valid:
        yield
        return
    token = otel_context.attach(propagate.extract(dict(request.headers)))
    try:
        yield
    finally:
        otel_context.detach(token)


def _instrument(app: FastAPI) -> None:
    if telemetry.exporter_name() == "none":
        return
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415

    FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz")


def _async_redis(producer: Producer) -> aioredis.Redis:
    from producer.redisconn import async_redis_client  # noqa: PLC0415

    return async_redis_client(producer.broker_url)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version  # noqa: PLC0415

    try:
        return version("execq")
    except PackageNotFoundError:
        return "0"
