"""The store's repository: every state change is a conditional UPDATE plus one history row."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Integer,
    Table,
    Update,
    and_,
    bindparam,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.exc import IntegrityError

from producer.audit.events import (
    AuditEvent,
)
from producer.errors import IdempotencyConflict, NotFound, StaleVersion
from producer.record import CommandRecord, TransitionRecord
from producer.spec import CommandSpec
from producer.states import State, check_transition
from producer.store import audit
from producer.store.audit_log import AuditLog
from producer.store.batches import RUNNING as BATCH_RUNNING
from producer.store.batches import BatchStore
from producer.store.batches import batches as batches_table
from producer.store.clock import as_utc as _utc
from producer.store.clock import utcnow
from producer.store.models import Command, Transition
from producer.store.snapshots import SnapshotStore

commands = cast(Table, Command.__table__)
transitions = cast(Table, Transition.__table__)


# Hot statements are built once: constructing a statement costs more CPU than running it.
# What every claim returns (a command's or a compensation's).
_LEASED = (
    commands.c.id,
    commands.c.tenant,
    commands.c.version,
    commands.c.attempts,
    commands.c.argv,
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
        commands.c.tenant == bindparam("w_tenant"),
        commands.c.state == State.PENDING.value,
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
        lease_expires_at=bindparam("v_expires"),
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
# A compensation is claimed without a change of state (the command stays `reverting`): the
# lease makes the claim, so only one delivery can run it, and the finishing transition
# (reverting -> reverted | revert_failed) is the one version bump.
_CLAIM_REVERT = (
    update(commands)
    .where(
        commands.c.id == bindparam("w_id"),
        commands.c.tenant == bindparam("w_tenant"),
        commands.c.state == State.REVERTING.value,
        commands.c.lease_owner.is_(None),
    )
    .values(
        lease_owner=bindparam("v_worker"),
        lease_expires_at=bindparam("v_expires"),
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
        commands.c.state.in_([State.RUNNING.value, State.REVERTING.value]),
        commands.c.lease_owner == bindparam("w_owner"),
    )
    .values(
        lease_expires_at=bindparam("v_expires"),
        lease_pid=func.coalesce(bindparam("v_pid", type_=Integer), commands.c.lease_pid),
    )
    .returning(commands.c.cancel_requested)
)


@lru_cache(maxsize=64)
def _transition_statement(names: tuple[str, ...]) -> Update:
    """The conditional UPDATE on (id, state, version) setting `names`, built once per shape."""
    return (
        update(commands)
        .where(
            commands.c.id == bindparam("w_id"),
            commands.c.state == bindparam("w_state"),
            commands.c.version == bindparam("w_version"),
        )
        .values({name: bindparam(f"v_{name}", type_=commands.c[name].type) for name in names})
    )


def _dispose_after_fork(ref: weakref.ref[Store]) -> None:
    store = ref()
    if store is not None:
        store.engine.dispose(close=False)


def _chain_of(events: Sequence[AuditEvent]) -> str:
    """The store chains events per tenant."""
    return events[0].tenant if events else ""


# Failure reasons of a command that ran (and so may have changed something): the ones a
# rollback_on_failure undoes. Limit kills are `<kind>_limit`.
RAN_AND_FAILED = ("exit_code", "signal", "timeout", "worker_lost")


def ran_and_failed(reason: str | None) -> bool:
    """Whether a failure means the command ran (so `rollback_on_failure` undoes it): a non-zero
    exit, a signal, a limit or the timeout, or its worker lost while it ran. A refusal before
    it started (policy, secrets, snapshot, sandbox) changed nothing: there is nothing to undo."""
    return reason is not None and (reason in RAN_AND_FAILED or reason.endswith("_limit"))


def requeue_fields(attempts: int) -> dict[str, Any]:
    """What a re-queued command starts from (retry, lost-worker re-run): no result, no lease."""
    return {
        "attempts": attempts,
        "exit_code": None,
        "signal": None,
        "stdout": None,
        "stderr": None,
        "stdout_bytes": None,
        "stderr_bytes": None,
        "output_truncated": False,
        "redacted": False,
        "failure_reason": None,
        "error": None,
        "lease_owner": None,
        "lease_pid": None,
        "lease_expires_at": None,
        "cancel_requested": False,
        "published_at": None,
        "started_at": None,
        "finished_at": None,
        "worker": None,
        "compensation": None,
        "retry_at": None,
        # A batch step revoked while it waited its turn runs when an operator retries it.
        "held": False,
    }


@dataclass(frozen=True)
class Created:
    """The outcome of `create`: the command's id and whether the key had been seen."""

    id: str
    state: State
    duplicate: bool
    published: bool


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


class Store:
    """All reads and writes of commands and transitions; the store is the source of truth."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        # Every write here is one statement (the history rows come from triggers), so it runs
        # in autocommit: one round trip on PostgreSQL instead of BEGIN/statement/COMMIT, and
        # no read-then-upgrade lock on SQLite. Reads are single statements too.
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        # A web server that forks after creating its Producer (gunicorn --preload) must not
        # share pooled connections between processes: the child starts with a fresh pool.
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _dispose_after_fork(ref))
        self._pg = engine.dialect.name == "postgresql"
        self._chains: set[str] = set()  # chains whose head row is known to exist
        self.audit = AuditLog(engine)
        self.snapshots = SnapshotStore(engine)
        self.batches = BatchStore(engine)

    @contextmanager
    def _tx(self, atomic: bool) -> Iterator[Connection]:
        """A transaction when several statements must commit together, else autocommit."""
        if atomic:
            with self.engine.begin() as conn:
                yield conn
        else:
            with self._auto.connect() as conn:
                yield conn

    def _write(
        self,
        lead: Insert | Update | None,
        params: dict[str, Any],
        chain: str,
        events: Sequence[AuditEvent],
        pg_lead: tuple[str, tuple[str, ...]] | None = None,
    ) -> bool:
        """Run `lead` and append `events` atomically; False when `lead` changed no row.

        On PostgreSQL, `pg_lead` names the same lead for the single-statement append.
        """
        if not events:
            assert lead is not None
            with self._one() as conn:
                return conn.execute(lead, params).rowcount == 1
        if self._pg:
            if chain not in self._chains:
                with self._one() as conn:
                    audit.ensure_head(conn, chain)
                self._chains.add(chain)
            with self._one() as conn:
                row = conn.execute(
                    audit.pg_chained(pg_lead), {**params, **audit.pg_params(chain, events)}
                ).one()
            return audit.check_appended(row, len(events), chain)
        with self.engine.begin() as conn:
            if lead is not None and conn.execute(lead, params).rowcount != 1:
                return False
            audit.append_linked(conn, chain, events)
        return True

    # --- audit ---------------------------------------------------------------------------

    def append_events(self, events: Sequence[AuditEvent], *, chain: str | None = None) -> None:
        """Append events that go with no state change (refused deliveries, revoke requests)."""
        if events:
            self._write(None, {}, chain or _chain_of(events), events)

    @contextmanager
    def _one(self) -> Iterator[Connection]:
        """A connection for one atomic statement."""
        with self._auto.connect() as conn:
            yield conn

    # --- creation ----------------------------------------------------------------------

    def create(
        self,
        spec: CommandSpec,
        *,
        state: State = State.PENDING,
        actor: str,
        reason: str | None = None,
        failure_reason: str | None = None,
        trace_id: str | None = None,
        command_id: str | None = None,
        events: Sequence[AuditEvent] = (),
        batch: tuple[str, int, bool] | None = None,
    ) -> Created:
        """Insert a command; a known (tenant, key) returns the first one or raises a conflict.

        `events` (its parse/authz audit events) are appended in the same transaction; a
        repeated key writes none. `batch`: (batch id, step number, held) for a batch's step.
        """
        check_transition(None, state)
        now = utcnow()
        cid = command_id or str(uuid.uuid4())
        spec_hash = spec.spec_hash()
        row = {
            "id": cid,
            "tenant": spec.tenant,
            "idempotency_key": spec.idempotency_key,
            "spec_hash": spec_hash,
            "principal": spec.principal,
            "argv": list(spec.argv),
            "env": dict(spec.env),
            "secret_names": sorted(spec.secrets),
            "has_secrets": bool(spec.secrets),
            "timeout_s": spec.timeout_s,
            "cpu_s": spec.cpu_s,
            "memory_mb": spec.memory_mb,
            "compensate": list(spec.compensate) if spec.compensate else None,
            "rollback_on_failure": spec.rollback_on_failure,
            "retry_safe": spec.retry_safe,
            "compensate_limits": (
                spec.compensate_limits.model_dump() if spec.compensate_limits else None
            ),
            "snapshot_paths": list(spec.snapshot_paths) or None,
            "max_retries": spec.max_retries,
            "revert_count": 0,
            "needs_attention": False,
            "batch_id": batch[0] if batch else None,
            "batch_step": batch[1] if batch else None,
            "held": batch[2] if batch else False,
            "state": state.value,
            "version": 1,
            "attempts": 1,
            "output_truncated": False,
            "redacted": False,
            "failure_reason": failure_reason,
            "error": reason if state is State.REJECTED else None,
            "cancel_requested": False,
            "publish_count": 0,
            "trace_id": trace_id,
            "last_actor": actor,
            "last_reason": reason,
            "created_at": now,
            "updated_at": now,
            "finished_at": now if state is State.REJECTED else None,
        }
        try:
            if self._pg and events:
                params = {f"v_{name}": value for name, value in row.items()}
                lead_key = ("insert", tuple(sorted(row)))
                if self._write(None, params, spec.tenant, events, pg_lead=lead_key):
                    return Created(cid, state, duplicate=False, published=False)
            else:
                with self._tx(bool(events)) as conn:
                    conn.execute(insert(commands), row)
                    if events:
                        audit.append_linked(conn, spec.tenant, events)
                return Created(cid, state, duplicate=False, published=False)
        except IntegrityError:
            if spec.idempotency_key is None:
                raise
        # The key exists: the unique constraint decided the race, now report the winner.
        with self._one() as conn:
            found = conn.execute(
                select(
                    commands.c.id, commands.c.spec_hash, commands.c.state, commands.c.published_at
                ).where(
                    commands.c.tenant == spec.tenant,
                    commands.c.idempotency_key == spec.idempotency_key,
                )
            ).one()
        if found.spec_hash != spec_hash:
            raise IdempotencyConflict(
                f"idempotency key {spec.idempotency_key!r} of tenant {spec.tenant!r} was used for "
                f"another command ({found.id}) with a different spec",
                command_id=found.id,
            )
        return Created(
            found.id, State(found.state), duplicate=True, published=found.published_at is not None
        )

    # --- generic transition ------------------------------------------------------------

    def transition(
        self,
        command_id: str,
        *,
        expect_state: State,
        expect_version: int,
        to: State,
        actor: str,
        reason: str | None = None,
        events: Sequence[AuditEvent] = (),
        chain: str | None = None,
        override: bool = False,
        **fields: Any,
    ) -> int:
        """Move (id, state, version) to `to`, or raise StaleVersion; returns the new version.

        `events` are appended to `chain` (default: their tenant's) in the same transaction,
        and only if the transition happens. `override`: an operator's forced settlement.
        """
        check_transition(expect_state, to, override=override)
        values = {
            "state": to.value,
            "version": expect_version + 1,
            "updated_at": utcnow(),
            "last_actor": actor,
            "last_reason": reason,
            **fields,
        }
        params = {f"v_{name}": value for name, value in values.items()}
        params.update(w_id=command_id, w_state=expect_state.value, w_version=expect_version)
        names = tuple(sorted(values))
        statement = _transition_statement(names)
        if not self._write(
            statement, params, chain or _chain_of(events), events, pg_lead=("update", names)
        ):
            raise StaleVersion(
                f"command {command_id} is no longer {expect_state} at version {expect_version}"
            )
        return expect_version + 1

    # --- the worker's path -------------------------------------------------------------

    def claim(self, command_id: str, *, tenant: str, worker: str, lease_s: float) -> Claimed | None:
        """pending -> running for this worker, or None when another delivery already won.

        One conditional UPDATE guarded by (id, tenant, state): whatever the version is, only
        one claimer can see `pending`, and the version is bumped in the same statement.
        """
        check_transition(State.PENDING, State.RUNNING)
        row = self._lease(_CLAIM, command_id, tenant, worker, lease_s, with_now=True)
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
        )

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
        now = utcnow()
        params = {
            "w_id": command_id,
            "w_tenant": tenant,
            "v_worker": worker,
            "v_expires": now + timedelta(seconds=lease_s),
        }
        if with_now:
            params["v_now"] = now
        with self._one() as conn:
            return conn.execute(statement, params).one_or_none()

    def lookup(self, command_id: str) -> tuple[str, str, int] | None:
        """(tenant, state, version) of a command, or None; a cheap read for logging refusals."""
        with self._one() as conn:
            row = conn.execute(
                select(commands.c.tenant, commands.c.state, commands.c.version).where(
                    commands.c.id == command_id
                )
            ).one_or_none()
        return None if row is None else (row.tenant, row.state, row.version)

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
                    "v_expires": utcnow() + timedelta(seconds=lease_s),
                    "v_pid": pid,
                },
            ).one_or_none()
        return None if row is None else bool(row.cancel_requested)

    def cancel_requested(self, command_id: str) -> bool:
        """Whether an operator asked to terminate this running command (checked in the store)."""
        with self._one() as conn:
            value = conn.execute(
                select(commands.c.cancel_requested).where(
                    commands.c.id == command_id, commands.c.state == State.RUNNING.value
                )
            ).scalar_one_or_none()
        return bool(value)

    def request_cancel(self, command_id: str) -> bool:
        """Flag a running command for termination; False when it is not running."""
        with self._one() as conn:
            result = conn.execute(
                update(commands)
                .where(commands.c.id == command_id, commands.c.state == State.RUNNING.value)
                .values(cancel_requested=True)
            )
        return result.rowcount == 1

    def release(self, command_id: str) -> bool:
        """Let a held batch step run (it is pending already); True for the one caller that did."""
        with self._one() as conn:
            result = conn.execute(
                update(commands)
                .where(
                    commands.c.id == command_id,
                    commands.c.state == State.PENDING.value,
                    commands.c.held.is_(True),
                    # Checked in the same statement: a batch revoked a moment ago keeps it held.
                    commands.c.batch_id.in_(
                        select(batches_table.c.id).where(batches_table.c.state == BATCH_RUNNING)
                    ),
                )
                .values(held=False, published_at=None)
            )
        return result.rowcount == 1

    def flag_cancel(self, command_id: str) -> bool:
        """Set a running command's cancel flag; True only for the caller that set it."""
        with self._one() as conn:
            result = conn.execute(
                update(commands)
                .where(
                    commands.c.id == command_id,
                    commands.c.state == State.RUNNING.value,
                    commands.c.cancel_requested.is_(False),
                )
                .values(cancel_requested=True)
            )
        return result.rowcount == 1

    # --- the outbox and the reaper -----------------------------------------------------

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
                and_(commands.c.state == State.PENDING.value, commands.c.held.is_(False)),
                # A compensation nobody has started yet travels the same way.
                and_(commands.c.state == State.REVERTING.value, commands.c.lease_owner.is_(None)),
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
        cond = and_(
            commands.c.state.in_([State.RUNNING.value, State.REVERTING.value]),
            commands.c.lease_expires_at < utcnow(),
        )
        if tenant is not None:
            cond = and_(cond, commands.c.tenant == tenant)
        with self._one() as conn:
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
                    commands.c.state == State.FAILED.value,
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

    def attention_counts(self) -> dict[str, int]:
        """How many commands need a person, per tenant."""
        with self._one() as conn:
            rows = conn.execute(
                select(commands.c.tenant, func.count())
                .where(commands.c.needs_attention.is_(True))
                .group_by(commands.c.tenant)
            ).all()
        return {r[0]: int(r[1]) for r in rows}

    # --- reads ---------------------------------------------------------------------------

    def get(self, command_id: str, *, with_transitions: bool = False) -> CommandRecord:
        """The record of one command, or NotFound."""
        with self._one() as conn:
            row = conn.execute(select(commands).where(commands.c.id == command_id)).one_or_none()
            if row is None:
                raise NotFound(f"no command with id {command_id!r}")
            history: list[TransitionRecord] = []
            if with_transitions:
                for t in conn.execute(
                    select(transitions)
                    .where(transitions.c.command_id == command_id)
                    .order_by(transitions.c.id)
                ):
                    history.append(
                        TransitionRecord(
                            from_state=State(t.from_state) if t.from_state else None,
                            to_state=State(t.to_state),
                            version=t.version,
                            at=_utc(t.at) or t.at,
                            actor=t.actor,
                            reason=t.reason,
                        )
                    )
        return _record(row._mapping, history)

    def list(
        self,
        *,
        tenant: str | None = None,
        state: State | None = None,
        since: datetime | None = None,
        needs_attention: bool = False,
        batch_id: str | None = None,
        limit: int = 50,
    ) -> list[CommandRecord]:
        """Newest first (a batch's steps in step order), optionally filtered."""
        if batch_id is not None:
            query = (
                select(commands)
                .where(commands.c.batch_id == batch_id)
                .order_by(commands.c.batch_step)
                .limit(limit)
            )
        else:
            query = select(commands).order_by(commands.c.created_at.desc()).limit(limit)
        if tenant is not None:
            query = query.where(commands.c.tenant == tenant)
        if state is not None:
            query = query.where(commands.c.state == state.value)
        if since is not None:
            query = query.where(commands.c.created_at >= since)
        if needs_attention:
            query = query.where(commands.c.needs_attention.is_(True))
        with self._one() as conn:
            return [_record(r._mapping, []) for r in conn.execute(query)]

    def count(self) -> int:
        """How many commands the store holds."""
        with self._one() as conn:
            return int(conn.execute(select(func.count()).select_from(commands)).scalar_one())


_RECORD_FIELDS = tuple(f.name for f in fields(CommandRecord) if f.name != "transitions")
_TIMESTAMPS = frozenset(
    {"created_at", "updated_at", "started_at", "finished_at", "published_at", "lease_expires_at"}
)
_TIMESTAMPS = _TIMESTAMPS | {"retry_at"}
_FLAGS = frozenset(
    {
        "output_truncated",
        "redacted",
        "retry_safe",
        "rollback_on_failure",
        "cancel_requested",
        "needs_attention",
        "held",
    }
)


def _record(m: Any, history: list[TransitionRecord]) -> CommandRecord:
    values: dict[str, Any] = {}
    for name in _RECORD_FIELDS:
        value = m[name]
        if name in _TIMESTAMPS:
            value = _utc(value)
        elif name in _FLAGS:
            value = bool(value)
        values[name] = value
    values["state"] = State(values["state"])
    values["secret_names"] = list(values["secret_names"] or [])
    values["env"] = dict(values["env"] or {})
    return CommandRecord(**values, transitions=history)
