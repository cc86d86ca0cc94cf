"""Starting a compensation: the one way a command enters `reverting`, whoever asks.

An operator (`execq rollback`), a worker (`rollback_on_failure`), the reaper (a lost worker,
or a crash between a failure and its rollback) and a batch undoing its steps all come here.
The transition is guarded by the version the caller read, so of several callers at once
exactly one starts the compensation; the others get StaleVersion. The compensation itself
runs on the tenant's pool (workers/compensation.py), claimed through its lease: a repeated
message never runs it twice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Literal

from producer.audit.events import AuditEvent, Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.broker import Publisher
from producer.errors import BrokerUnavailable, InvalidOperation, StaleVersion
from producer.record import CommandRecord
from producer.states import ROLLBACKABLE, State
from producer.store.repository import Store
from producer.store.sweeps import ran_and_failed
from producer.tracing import TraceContext, new_span_id, sampled_by_default

log = logging.getLogger("execq.rollback")

Trigger = Literal["operator", "failure", "batch", "worker_lost"]


def refusal(rec: CommandRecord, *, expect_version: int | None = None) -> str | None:
    """Why `rec` cannot be rolled back now, in words an operator can act on; None if it can."""
    if not rec.compensate and not rec.snapshot_paths:
        return (
            f"command {rec.id} has no compensation: it was submitted without `compensate` "
            "or `snapshot_paths`"
        )
    if rec.state is State.REVERTING:
        return f"command {rec.id} is already being rolled back (asked by {_last_actor(rec)})"
    if rec.state is State.REVERTED:
        return f"command {rec.id} is already rolled back"
    if rec.state not in ROLLBACKABLE:
        allowed = ", ".join(sorted(s.value for s in ROLLBACKABLE))
        return f"command {rec.id} is {rec.state}; only {allowed} commands can be rolled back"
    if expect_version is not None and rec.version != expect_version:
        return (
            f"command {rec.id} is at version {rec.version}, not {expect_version} as expected: "
            "it changed since you looked (see `execq status`)"
        )
    return None


def _last_actor(rec: CommandRecord) -> str:
    for t in reversed(rec.transitions):
        if t.to_state is State.REVERTING:
            return t.actor
    return "another caller"


def begin(
    store: Store,
    rec: CommandRecord,
    *,
    actor: str,
    trigger: Trigger,
    reason: str | None = None,
    operator: str | None = None,
    ticket: str | None = None,
) -> list[AuditEvent]:
    """Move `rec` (as read) to `reverting` with its `rollback` event; StaleVersion if it moved.

    Raises InvalidOperation when the record cannot be rolled back at all.
    """
    problem = refusal(rec)
    if problem is not None:
        raise InvalidOperation(problem)
    attempt = Attempt(subject_of(rec), actor=actor)
    attempt.add(
        Phase.ROLLBACK,
        Outcome.OK,
        reason=reason,
        operator=operator,
        ticket=ticket,
        trigger=trigger,
        from_state=rec.state.value,
        snapshot=bool(rec.snapshot_paths),
        compensate=bool(rec.compensate),
    )
    store.transition(
        rec.id,
        expect_state=rec.state,
        expect_version=rec.version,
        to=State.REVERTING,
        actor=actor,
        reason=reason or f"rollback ({trigger})",
        events=attempt.events,
        # Unpublished and unleased: the outbox re-sends it until a worker claims it.
        published_at=None,
        lease_owner=None,
        lease_pid=None,
        lease_expires_at=None,
        cancel_requested=False,
    )
    return attempt.events


def headers_for(rec_trace_id: str | None) -> dict[str, str]:
    """Trace headers that continue the command's own trace (a new span id under it)."""
    if rec_trace_id is None:
        return {}
    context = TraceContext(rec_trace_id, new_span_id(), sampled_by_default(rec_trace_id))
    return {"traceparent": context.traceparent}


def send(
    store: Store,
    publisher: Publisher,
    command_id: str,
    tenant: str,
    *,
    headers: Mapping[str, str] | None = None,
    countdown: float | None = None,
    secrets: Mapping[str, str] | None = None,
) -> bool:
    """Publish a command's message from a worker or reaper; False leaves it to the outbox."""
    try:
        publisher.publish(command_id, tenant, secrets=secrets, headers=headers, countdown=countdown)
    except BrokerUnavailable as exc:
        log.warning("command %s not published now (the outbox will): %s", command_id, exc)
        return False
    store.mark_published([command_id])
    return True


def start(
    store: Store,
    publisher: Publisher,
    rec: CommandRecord,
    *,
    actor: str,
    trigger: Trigger,
    reason: str | None,
    trail: Trail,
) -> bool:
    """begin() and publish, for callers inside workers; False when another caller won."""
    try:
        events = begin(store, rec, actor=actor, trigger=trigger, reason=reason)
    except (StaleVersion, InvalidOperation) as exc:
        log.info("rollback of %s not started: %s", rec.id, exc)
        return False
    trail.copy(events)
    send(store, publisher, rec.id, rec.tenant, headers=headers_for(rec.trace_id))
    log.info("rollback of command %s queued (%s)", rec.id, trigger)
    return True


def after_failure(
    store: Store,
    publisher: Publisher,
    command_id: str,
    *,
    actor: str,
    trail: Trail,
    trigger: Trigger = "failure",
) -> bool:
    """Start the rollback a failed `rollback_on_failure` command asks for (worker, reaper)."""
    rec = store.get(command_id)
    if not ran_and_failed(rec.failure_reason):
        log.debug("no rollback of %s: it never ran (%s)", command_id, rec.failure_reason)
        return False
    reason = f"rollback_on_failure: {rec.failure_reason}"
    return start(store, publisher, rec, actor=actor, trigger=trigger, reason=reason, trail=trail)
