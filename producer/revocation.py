"""Revoking a command in the store, as the Producer (CLI, API) and Celery's remote control do."""

from __future__ import annotations

from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, subject_of
from producer.errors import StaleVersion
from producer.record import CommandRecord
from producer.states import State
from producer.store.repository import Store, utcnow


def revoke_event(
    rec: CommandRecord,
    *,
    actor: str,
    operator: str,
    reason: str | None,
    ticket: str | None = None,
    terminate: bool = False,
) -> Attempt:
    """The audited request to revoke `rec` (who asked, why, with which ticket)."""
    attempt = Attempt(subject_of(rec), actor=actor)
    attempt.add(
        Phase.REVOKE,
        Outcome.OK,
        operator=operator,
        ticket=ticket,
        reason=reason,
        state=rec.state.value,
        terminate=terminate,
    )
    return attempt


def revoke_pending(
    store: Store, rec: CommandRecord, attempt: Attempt, *, actor: str, reason: str | None
) -> bool:
    """pending -> revoked with the attempt's events; False when it changed meanwhile."""
    attempt.add(Phase.ABORT, Outcome.REFUSED, reason="revoked")
    try:
        store.transition(
            rec.id,
            expect_state=State.PENDING,
            expect_version=rec.version,
            to=State.REVOKED,
            actor=actor,
            reason=reason or "revoked",
            events=attempt.events,
            failure_reason="revoked",
            finished_at=utcnow(),
        )
    except StaleVersion:
        return False
    return True
