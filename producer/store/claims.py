"""The worker's path through the store: claiming a command (or its compensation), holding
its lease, hearing a cancel, and releasing a batch's next step (Store mixes these in)."""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Integer,
    Table,
    Update,
    bindparam,
    func,
    select,
    text,
    update,
)

from producer.states import State, check_transition
from producer.store.batches import RUNNING as BATCH_RUNNING
from producer.store.batches import batches as batches_table
from producer.store.clock import LeaseDeadline, lease_params, utcnow
from producer.store.clock import as_utc as _utc
from producer.store.models import Command, by_id_only

commands = cast(Table, Command.__table__)
# In statements about one command, by id: see by_id_only.
_state = by_id_only(commands.c.state)
_tenant = by_id_only(commands.c.tenant)

# Hot statements are built once: constructing a statement costs more CPU than running it.
# What every claim returns (a command's or a compensation's).
_LEASED = (
    commands.c.id,
    commands.c.tenant,
    commands.c.version,
    commands.c.attempts,
    commands.c.argv,
    commands.c.action,
    commands.c.env,
    commands.c.trace_id,
    commands.c.principal,
    commands.c.snapshot_paths,
    commands.c.batch_id,
)
_CLAIM = (
    update(commands)
    .where(
        commands.c.id == bindparam("w_id"),
        _tenant == bindparam("w_tenant"),
        _state == State.PENDING.value,
        # A held step of a batch waits for the step before it, whatever message arrives.
        commands.c.held.is_(False),
    )
    .values(
        state=State.RUNNING.value,
        retry_at=None,
        version=commands.c.version + 1,
        updated_at=bindparam("v_now"),
        started_at=bindparam("v_now"),
        worker=bindparam("v_worker"),
        lease_owner=bindparam("v_worker"),
        lease_expires_at=LeaseDeadline(),
        cancel_requested=False,
        published_at=func.coalesce(commands.c.published_at, bindparam("v_now")),
        last_actor=bindparam("v_worker"),
        last_reason=None,
    )
    .returning(
        *_LEASED,
        commands.c.secret_names,
        commands.c.timeout_s,
        commands.c.cpu_s,
        commands.c.memory_mb,
        commands.c.retry_safe,
        commands.c.published_at,
        commands.c.max_retries,
        commands.c.rollback_on_failure,
    )
)
# The same claim for a tenant with max_concurrent: only while fewer of its commands run.
_RUNNING = commands.alias("running")
_CLAIM_WITHIN = _CLAIM.where(
    select(func.count())
    .select_from(_RUNNING)
    .where(_RUNNING.c.tenant == bindparam("w_tenant"), _RUNNING.c.state == State.RUNNING.value)
    .scalar_subquery()
    < bindparam("w_max", type_=Integer)
)
# A compensation is claimed without a change of state (the command stays `reverting`): the
# lease makes the claim, so only one delivery can run it, and the finishing transition
# (reverting -> reverted | revert_failed) is the one version bump.
_CLAIM_REVERT = (
    update(commands)
    .where(
        commands.c.id == bindparam("w_id"),
        _tenant == bindparam("w_tenant"),
        _state == State.REVERTING.value,
        commands.c.lease_owner.is_(None),
    )
    .values(
        lease_owner=bindparam("v_worker"),
        lease_expires_at=LeaseDeadline(),
        lease_pid=None,
        cancel_requested=False,
        revert_count=commands.c.revert_count + 1,
    )
    .returning(
        *_LEASED,
        commands.c.compensate,
        commands.c.compensate_limits,
        commands.c.revert_count,
        commands.c.last_actor,
        commands.c.last_reason,
    )
)
_RENEW = (
    update(commands)
    .where(
        commands.c.id == bindparam("w_id"),
        _state.in_([State.RUNNING.value, State.REVERTING.value]),
        commands.c.lease_owner == bindparam("w_owner"),
    )
    .values(
        lease_expires_at=LeaseDeadline(),
        lease_pid=func.coalesce(bindparam("v_pid", type_=Integer), commands.c.lease_pid),
    )
    .returning(commands.c.cancel_requested)
)


@dataclass(frozen=True)
class Claimed:
    """A command this worker now owns (state running): what it needs to run it."""

    id: str
    tenant: str
    version: int
    attempts: int
    argv: list[str]
    env: dict[str, str]
    secret_names: list[str]
    timeout_s: float | None
    cpu_s: int | None
    memory_mb: int | None
    retry_safe: bool
    trace_id: str | None
    principal: str | None
    published_at: datetime | None = None
    max_retries: int = 0
    rollback_on_failure: bool = False
    snapshot_paths: tuple[str, ...] = ()
    batch_id: str | None = None
    action: str | None = None


@dataclass(frozen=True)
class ClaimedRevert:
    """A command whose compensation this worker now runs (state stays reverting)."""

    id: str
    tenant: str
    version: int
    attempts: int
    argv: list[str]
    env: dict[str, str]
    compensate: list[str] | None
    compensate_limits: dict[str, Any] | None
    snapshot_paths: tuple[str, ...]
    trace_id: str | None
    principal: str | None
    revert_count: int
    batch_id: str | None
    requested_by: str
    why: str | None


def _claim_params(
    command_id: str, tenant: str, worker: str, lease_s: float, *, with_now: bool
) -> dict[str, Any]:
    """The bind parameters every claim statement takes (`v_now` where it stamps times)."""
    now = utcnow()
    params: dict[str, Any] = {
        "w_id": command_id,
        "w_tenant": tenant,
        "v_worker": worker,
        **lease_params(lease_s, now),
    }
    if with_now:
        params["v_now"] = now
    return params


class Claims:
    """Claims and leases; `_one` is the Store's connection for one statement."""

    engine: Engine

    def _one(self) -> AbstractContextManager[Connection]:
        raise NotImplementedError

    def claim(
        self,
        command_id: str,
        *,
        tenant: str,
        worker: str,
        lease_s: float,
        max_running: int | None = None,
    ) -> Claimed | None:
        """pending -> running for this worker, or None when another delivery already won
        (or, with `max_running`, when that many of the tenant's commands run already).

        One conditional UPDATE guarded by (id, tenant, state): whatever the version is, only
        one claimer can see `pending`, and the version is bumped in the same statement.
        """
        check_transition(State.PENDING, State.RUNNING)
        if max_running is None:
            row = self._lease(_CLAIM, command_id, tenant, worker, lease_s, with_now=True)
        else:
            row = self._lease_within(command_id, tenant, worker, lease_s, max_running)
        if row is None:
            return None
        return Claimed(
            id=row.id,
            tenant=row.tenant,
            version=row.version,
            attempts=row.attempts,
            argv=list(row.argv),
            env=dict(row.env),
            secret_names=list(row.secret_names),
            timeout_s=row.timeout_s,
            cpu_s=row.cpu_s,
            memory_mb=row.memory_mb,
            retry_safe=row.retry_safe,
            trace_id=row.trace_id,
            principal=row.principal,
            published_at=_utc(row.published_at),
            max_retries=row.max_retries or 0,
            rollback_on_failure=bool(row.rollback_on_failure),
            snapshot_paths=tuple(row.snapshot_paths or ()),
            batch_id=row.batch_id,
            action=row.action,
        )

    def _lease_within(
        self, command_id: str, tenant: str, worker: str, lease_s: float, max_running: int
    ) -> Any:
        """The claim, counted against the tenant's running commands, one claimer at a time.

        PostgreSQL: a transaction-scoped advisory lock per tenant serializes the count and the
        update across workers and hosts. SQLite: the UPDATE holds the database's write lock.
        """
        params = _claim_params(command_id, tenant, worker, lease_s, with_now=True)
        params["w_max"] = max_running
        with self.engine.begin() as conn:
            if conn.dialect.name == "postgresql":
                # A lock of the database, not a Redis name: deployments sharing a database
                # share its rows, so this stays per tenant whatever EXECQ_NAMESPACE says.
                conn.execute(
                    text("SELECT pg_advisory_xact_lock(hashtextextended(:k, 0))"),
                    {"k": f"execq.running.{tenant}"},
                )
            return conn.execute(_CLAIM_WITHIN, params).one_or_none()

    def claim_revert(
        self, command_id: str, *, tenant: str, worker: str, lease_s: float
    ) -> ClaimedRevert | None:
        """Take the lease of a `reverting` command nobody runs yet; None if not that."""
        row = self._lease(_CLAIM_REVERT, command_id, tenant, worker, lease_s, with_now=False)
        if row is None:
            return None
        return ClaimedRevert(
            id=row.id,
            tenant=row.tenant,
            version=row.version,
            attempts=row.attempts,
            argv=list(row.argv),
            env=dict(row.env or {}),
            compensate=list(row.compensate) if row.compensate else None,
            compensate_limits=row.compensate_limits,
            snapshot_paths=tuple(row.snapshot_paths or ()),
            trace_id=row.trace_id,
            principal=row.principal,
            revert_count=row.revert_count,
            batch_id=row.batch_id,
            requested_by=row.last_actor,
            why=row.last_reason,
        )

    def _lease(
        self,
        statement: Update,
        command_id: str,
        tenant: str,
        worker: str,
        lease_s: float,
        *,
        with_now: bool,
    ) -> Any:
        """Run a claim statement for (id, tenant); the returned row, or None if it lost."""
        params = _claim_params(command_id, tenant, worker, lease_s, with_now=with_now)
        with self._one() as conn:
            return conn.execute(statement, params).one_or_none()

    def renew_lease(
        self, command_id: str, *, owner: str, lease_s: float, pid: int | None = None
    ) -> bool | None:
        """Extend a running command's lease. None: the lease is lost; else cancel_requested."""
        with self._one() as conn:
            row = conn.execute(
                _RENEW,
                {
                    "w_id": command_id,
                    "w_owner": owner,
                    **lease_params(lease_s),
                    "v_pid": pid,
                },
            ).one_or_none()
        return None if row is None else bool(row.cancel_requested)

    def cancel_requested(self, command_id: str) -> bool:
        """Whether an operator asked to terminate this running command (checked in the store)."""
        with self._one() as conn:
            value = conn.execute(
                select(commands.c.cancel_requested).where(
                    commands.c.id == command_id, _state == State.RUNNING.value
                )
            ).scalar_one_or_none()
        return bool(value)

    def _changed_one(self, statement: Update) -> bool:
        """Run a conditional UPDATE; True when it changed the one row (this caller won)."""
        with self._one() as conn:
            return conn.execute(statement).rowcount == 1

    def request_cancel(self, command_id: str) -> bool:
        """Flag a running command for termination; False when it is not running."""
        return self._changed_one(
            update(commands)
            .where(commands.c.id == command_id, _state == State.RUNNING.value)
            .values(cancel_requested=True)
        )

    def release(self, command_id: str) -> bool:
        """Let a held batch step run (it is pending already); True for the one caller that did."""
        return self._changed_one(
            update(commands)
            .where(
                commands.c.id == command_id,
                _state == State.PENDING.value,
                commands.c.held.is_(True),
                # Checked in the same statement: a batch revoked a moment ago keeps it held.
                by_id_only(commands.c.batch_id).in_(
                    select(batches_table.c.id).where(batches_table.c.state == BATCH_RUNNING)
                ),
            )
            .values(held=False, published_at=None)
        )

    def flag_cancel(self, command_id: str) -> bool:
        """Set a running command's cancel flag; True only for the caller that set it."""
        return self._changed_one(
            update(commands)
            .where(
                commands.c.id == command_id,
                _state == State.RUNNING.value,
                commands.c.cancel_requested.is_(False),
            )
            .values(cancel_requested=True)
        )
