"""The console's overview (activity charts, what runs, what needs a person), the tenant's
audit chain, and running one of the tenant's actions from a form."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from starlette.responses import Response

from producer.errors import IdempotencyConflict, PolicyDenied, SpecError
from producer.keys import load_audit_keys
from producer.spec import CommandSpec
from producer.states import State
from workers.gateway.console import charts
from workers.gateway.console.web import Console, ConsoleError, Viewer, Who, form_of, see_other

WINDOWS_H = (1, 6, 24)
SLICES = 60
LISTED = 50
AUDIT_PAGE = 50


def routes(console: Console) -> APIRouter:
    router = APIRouter(include_in_schema=False)
    producer = console.producer

    @router.get("/")
    def overview(
        request: Request, who: Who, hours: Annotated[int, Query(ge=1, le=24)] = 6
    ) -> Response:
        tenant = who.tenant.name
        until = datetime.now(UTC)
        since = until - timedelta(hours=hours)
        rows = producer.store.activity(tenant, since)
        buckets = charts.bucketed(rows, since, until, SLICES)
        step = (until - since) / SLICES
        running = producer.store.list(tenant=tenant, state=State.RUNNING, limit=LISTED)
        failed_reverts = producer.store.list(tenant=tenant, state=State.REVERT_FAILED, limit=LISTED)
        attention = producer.store.list(tenant=tenant, needs_attention=True, limit=LISTED)
        totals = {s: sum(b.counts.get(s, 0) for b in buckets) for s in charts.FINAL}
        durations = sorted(d for b in buckets for d in b.durations)
        whole = charts.Bucket(since, durations=durations)
        return console.render(
            request,
            "overview.html",
            who,
            hours=hours,
            windows=WINDOWS_H,
            rate=charts.rate_chart(buckets, step, f"Commands per minute, last {hours} h"),
            duration=charts.duration_chart(buckets, step, f"Run time p50 and p95, last {hours} h"),
            totals=totals,
            p50=whole.percentile(50),
            p95=whole.percentile(95),
            running=running,
            failed_reverts=failed_reverts,
            attention=attention,
        )

    @router.get("/audit")
    def audit(
        request: Request, who: Who, before: Annotated[int | None, Query(ge=1)] = None
    ) -> Response:
        chain = who.tenant.name
        started = time.perf_counter()
        latest = producer.store.audit.witnessed(load_audit_keys().audit_witness)
        problem: str | None
        if latest.problem is not None:
            report = None
            problem = str(latest.problem)
        else:
            report = producer.store.audit.verify(tenant=chain, checkpoints=latest.checkpoints)
            problem = None if report.problem is None else str(report.problem)
        elapsed = time.perf_counter() - started
        events = producer.store.audit.page(chain, before_seq=before, limit=AUDIT_PAGE)
        older = events[-1].seq if len(events) == AUDIT_PAGE else None
        return console.render(
            request,
            "audit.html",
            who,
            report=report,
            summary=None if report is None else report.chains.get(chain),
            problem=problem,
            checkpoint=latest.checkpoints.get(chain),
            elapsed=elapsed,
            events=events,
            older=older,
        )

    @router.get("/actions")
    def actions(request: Request, who: Who) -> Response:
        return console.render(request, "actions.html", who, actions=sorted(who.tenant.actions))

    @router.get("/actions/{name}")
    def action_form(request: Request, who: Who, name: str) -> Response:
        return _form(console, request, who, name)

    @router.post("/actions/{name}")
    async def run_action(request: Request, who: Who, name: str) -> Response:
        fields = await form_of(request, who)
        who.need("submit")
        action = who.tenant.actions.get(name)
        if action is None:
            raise ConsoleError(404, f"no action {name!r}")
        schema = action.params_schema()
        try:
            params = _params(schema, fields)
            spec = CommandSpec(
                tenant=who.tenant.name,
                principal=who.name,
                action=name,
                params=params,
                idempotency_key=fields.get("idempotency_key", "").strip() or None,
            )
            result = await anyio.to_thread.run_sync(producer.submit, spec)
        except (SpecError, ValueError) as exc:
            return _form(console, request, who, name, error=str(exc), values=fields)
        except (PolicyDenied, IdempotencyConflict) as exc:
            error = f"refused: {exc}"
            return _form(
                console, request, who, name, error=error, values=fields, command=exc.command_id
            )
        return see_other(f"/ui/commands/{result.id}?done=submit")

    return router


def _params(schema: dict[str, Any], fields: dict[str, str]) -> dict[str, str | int | bool]:
    """The form's values typed as the action's schema says (blank: left to the default)."""
    out: dict[str, str | int | bool] = {}
    for name, prop in schema["properties"].items():
        kind = prop.get("type")
        raw = fields.get(f"p.{name}")
        if kind == "boolean":
            out[name] = raw == "on"
            continue
        if raw is None or raw == "":
            continue
        if kind == "integer":
            try:
                out[name] = int(raw)
            except ValueError:
                raise ValueError(f"{name}: {raw!r} is not a whole number") from None
        else:
            out[name] = raw
    return out


def _form(
    console: Console,
    request: Request,
    who: Viewer,
    name: str,
    *,
    error: str | None = None,
    values: dict[str, str] | None = None,
    command: str | None = None,
) -> Response:
    who.need("submit")
    action = who.tenant.actions.get(name)
    if action is None:
        raise ConsoleError(404, f"no action {name!r}")
    schema = action.params_schema()
    return console.render(
        request,
        "action.html",
        who,
        422 if error else 200,
        name=name,
        action=action,
        schema=schema,
        required=set(schema.get("required", [])),
        error=error,
        values=values or {},
        command=command,
    )
