"""Revoking a command in the store, as the Producer (CLI, API) and Celery's remote control do."""

from __future__ import annotations

import redis

from producer.audit.events import Outcome, Phase
from producer.audit.trail import Attempt, Trail, subject_of
from producer.errors import StaleVersion
from producer.record import CommandRecord
from producer.redisconn import database_of, redis_client
from producer.settings import Settings
from producer.states import State
from producer.store.clock import utcnow
from producer.store.repository import Store


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


def cancel_channel(settings: Settings, tenant: str, broker_url: str) -> str:
    """The pub/sub channel that tells `tenant`'s workers to check a command's cancel flag.

    It names the Redis database: channels are server-wide in Redis, so deployments on two
    databases of one server would otherwise hear each other (kombu adds `/<db>.` to its own
    channels for the same reason).
    """
    return settings.key("cancel", str(database_of(broker_url)), tenant)


def revoke_remote(
    store: Store,
    trail: Trail,
    rec: CommandRecord,
    *,
    settings: Settings,
    broker_url: str,
    actor: str,
    operator: str,
    reason: str,
    terminate: bool,
) -> str | None:
    """A revoke that arrived through Celery (Flower, `celery control`), applied to the store.

    Pending: revoked, never runs. Running with terminate: the cancel flag, announced, so
    its worker kills the whole tree. Returns what was done, or None (already done, or
    nothing to do); whoever wins the conditional update writes the audit events, once.
    """
    attempt = revoke_event(rec, actor=actor, operator=operator, reason=reason, terminate=terminate)
    if rec.state is State.PENDING:
        if not revoke_pending(store, rec, attempt, actor=operator, reason=reason):
            return None
        trail.copy(attempt.events)
        return "revoked"
    if rec.state is State.RUNNING and terminate and store.flag_cancel(rec.id):
        store.append_events(attempt.events)
        trail.copy(attempt.events)
        client = redis_client(broker_url, socket_connect_timeout=2, socket_timeout=2)
        try:
            client.publish(cancel_channel(settings, rec.tenant, broker_url), rec.id)
        except redis.RedisError:
            pass  # the worker re-reads the flag on its next lease renewal
        finally:
            client.close()
        return "terminating"
    return None
