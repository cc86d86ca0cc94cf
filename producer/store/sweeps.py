"""What the reaper and the outbox ask the store: expired leases, unpublished commands, and
failures whose rollback a crash left unqueued (Store mixes these in)."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import timedelta
from typing import cast

from sqlalchemy import ColumnElement, Connection, Table, and_, literal_column, or_, select, update

from producer.states import State
from producer.store.clock import lease_now, utcnow
from producer.store.models import Command, Transition

commands = cast(Table, Command.__table__)
transitions = cast(Table, Transition.__table__)

# Failure reasons of a command that ran (and so may have changed something): the ones a
# rollback_on_failure undoes. Limit kills are `<kind>_limit`.
RAN_AND_FAILED = ("exit_code", "signal", "timeout", "worker_lost")


def ran_and_failed(reason: str | None) -> bool:
    """Whether a failure means the command ran (so `rollback_on_failure` undoes it): a non-zero
    exit, a signal, a limit or the timeout, or its worker lost while it ran. A refusal before
    it started (policy, secrets, snapshot, sandbox) changed nothing: there is nothing to undo."""
    return reason is not None and (reason in RAN_AND_FAILED or reason.endswith("_limit"))


@dataclass(frozen=True)
class Expired:
    """A running command whose worker stopped renewing its lease."""

    id: str
    tenant: str
    version: int
    retry_safe: bool
    attempts: int
    argv: list[str]
    principal: str | None
    trace_id: str | None
    lease_owner: str | None
    state: State = State.RUNNING
    rollback_on_failure: bool = False
    batch_id: str | None = None


def _state_in(*states: State) -> ColumnElement[bool]:
    """`state` compared with literal states, not bound parameters: the partial indexes
    (migration 0004) serve a query only when the planner sees the states, and the generic plan
    of a prepared statement (psycopg prepares after 5 runs) sees no parameter values."""
    values: list[ColumnElement[str]] = [literal_column(f"'{s.value}'") for s in states]
    return commands.c.state == values[0] if len(values) == 1 else commands.c.state.in_(values)


class Sweeps:
    """Periodic scans; `_one` is the Store's connection for one statement."""

    def _one(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def mark_published(self, command_ids: Sequence[str]) -> None:
        """Record that the broker accepted these commands' messages."""
        if not command_ids:
            return
        now = utcnow()
        with self._one() as conn:
            conn.execute(
                update(commands)
                .where(commands.c.id.in_(list(command_ids)))
                .values(published_at=now, publish_count=commands.c.publish_count + 1)
            )

    def unpublished(
        self,
        *,
        tenant: str | None,
        older_than_s: float,
        republish_after_s: float,
        secret_grace_s: float,
        limit: int,
    ) -> list[tuple[str, str]]:
        """(id, tenant) of pending commands never published, or published long ago and unclaimed.

        The second kind is how a message Redis lost (restart without persistence) is recovered.
        """
        now = utcnow()
        # Only the producer holds secret values: give it longer to publish such a command.
        never_published = and_(
            commands.c.published_at.is_(None),
            commands.c.updated_at < now - timedelta(seconds=older_than_s),
            or_(
                commands.c.has_secrets.is_(False),
                commands.c.updated_at < now - timedelta(seconds=secret_grace_s),
            ),
        )
        cond = and_(
            or_(
                and_(_state_in(State.PENDING), commands.c.held.is_(False)),
                # A compensation nobody has started yet travels the same way.
                and_(_state_in(State.REVERTING), commands.c.lease_owner.is_(None)),
            ),
            or_(
                never_published,
                commands.c.published_at < now - timedelta(seconds=republish_after_s),
            ),
        )
        if tenant is not None:
            cond = and_(cond, commands.c.tenant == tenant)
        with self._one() as conn:
            rows = conn.execute(
                select(commands.c.id, commands.c.tenant)
                .where(cond)
                .order_by(commands.c.created_at)
                .limit(limit)
            ).all()
        return [(r.id, r.tenant) for r in rows]

    def expired_leases(self, *, tenant: str | None, limit: int) -> list[Expired]:
        """Running commands whose lease ran out: what the reaper needs to decide and audit."""
        with self._one() as conn:
            cond = and_(
                _state_in(State.RUNNING, State.REVERTING),
                # the database's clock on PostgreSQL: see producer/store/clock.py
                commands.c.lease_expires_at < lease_now(conn),
            )
            if tenant is not None:
                cond = and_(cond, commands.c.tenant == tenant)
            rows = conn.execute(
                select(
                    commands.c.id,
                    commands.c.tenant,
                    commands.c.version,
                    commands.c.retry_safe,
                    commands.c.attempts,
                    commands.c.argv,
                    commands.c.principal,
                    commands.c.trace_id,
                    commands.c.lease_owner,
                    commands.c.state,
                    commands.c.rollback_on_failure,
                    commands.c.batch_id,
                )
                .where(cond)
                .limit(limit)
            ).all()
        return [
            Expired(
                r.id,
                r.tenant,
                r.version,
                r.retry_safe,
                r.attempts,
                list(r.argv),
                r.principal,
                r.trace_id,
                r.lease_owner,
                State(r.state),
                bool(r.rollback_on_failure),
                r.batch_id,
            )
            for r in rows
        ]

    def awaiting_rollback(self, *, tenant: str, older_than_s: float, limit: int) -> list[str]:
        """Failed commands with rollback_on_failure whose compensation was never queued.

        The worker queues it right after recording the failure; this finds the ones a crash
        between those two writes left behind.
        """
        with self._one() as conn:
            rows = conn.execute(
                select(commands.c.id)
                .where(
                    commands.c.tenant == tenant,
                    _state_in(State.FAILED),
                    commands.c.rollback_on_failure.is_(True),
                    commands.c.compensation.is_(None),
                    # Only a command that ran can have changed something to undo.
                    or_(
                        commands.c.failure_reason.in_(RAN_AND_FAILED),
                        commands.c.failure_reason.like("%\\_limit", escape="\\"),
                    ),
                    commands.c.updated_at < utcnow() - timedelta(seconds=older_than_s),
                )
                .limit(limit)
            ).all()
        return [r.id for r in rows]
