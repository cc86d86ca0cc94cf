"""The store's repository: every state change is a conditional UPDATE plus one history row."""

from __future__ import annotations

import os
import uuid
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Engine,
    Insert,
    Table,
    Update,
    bindparam,
    insert,
    select,
    update,
)
from sqlalchemy.dialects.postgresql import insert as _pg_insert
from sqlalchemy.dialects.sqlite import insert as _sqlite_insert
from sqlalchemy.exc import IntegrityError

from producer.audit.events import (
    AuditEvent,
)
from producer.errors import IdempotencyConflict, StaleVersion
from producer.spec import CommandSpec
from producer.states import State, check_transition
from producer.store import audit
from producer.store.audit_log import AuditLog
from producer.store.batches import BatchStore
from producer.store.claims import Claims
from producer.store.clock import utcnow
from producer.store.models import Command, Transition, by_id_only
from producer.store.pinned import Pinned
from producer.store.reads import Reads
from producer.store.snapshots import SnapshotStore
from producer.store.sweeps import Sweeps

commands = cast(Table, Command.__table__)
transitions = cast(Table, Transition.__table__)


# Hot statements are built once: constructing a statement costs more CPU than running it.
@lru_cache(maxsize=64)
def _transition_statement(names: tuple[str, ...]) -> Update:
    """The conditional UPDATE on (id, state, version) setting `names`, built once per shape."""
    return (
        update(commands)
        .where(
            commands.c.id == bindparam("w_id"),
            by_id_only(commands.c.state) == bindparam("w_state", type_=commands.c.state.type),
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
class NewCommand:
    """One command for `create_many`: its spec, id, first state and audit events."""

    spec: CommandSpec
    command_id: str
    actor: str
    events: Sequence[AuditEvent]
    state: State = State.PENDING
    reason: str | None = None
    failure_reason: str | None = None
    trace_id: str | None = None


@dataclass(frozen=True)
class Created:
    """The outcome of `create`: the command's id and whether the key had been seen."""

    id: str
    state: State
    duplicate: bool
    published: bool


class Store(Claims, Reads, Sweeps):
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
        self._pinned = Pinned(self._auto)
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
        """A connection for one atomic statement (the pinned thread's own, see `pin`)."""
        if self._pinned.holds():
            with self._pinned.connection() as conn:
                yield conn
            return
        with self._auto.connect() as conn:
            yield conn

    def pin(self) -> None:
        """Keep one connection for the calling thread's single statements (producer.store.
        pinned says why); `close_pinned` gives it back."""
        self._pinned.pin()

    def close_pinned(self) -> None:
        """Give back the pinned thread's connection."""
        self._pinned.close()

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
        cid = command_id or str(uuid.uuid4())
        spec_hash = spec.spec_hash()
        row = _new_row(spec, cid, spec_hash, state, actor, reason, failure_reason, trace_id, batch)
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
        key = (spec.tenant, spec.idempotency_key)
        with self._one() as conn:
            found = self._firsts(conn, {key})[key]
        return _repeat_of(spec, spec_hash, found)

    def create_many(self, items: Sequence[NewCommand]) -> list[Created]:
        """Insert many commands and their audit events in one transaction (one commit).

        The same outcomes as `create` for each, in order: a known (tenant, key) — in the store
        or earlier in `items` — returns the first command, and one with another spec raises
        IdempotencyConflict with nothing of the call written. Three statements plus three
        per audit chain, whatever the number of commands.
        """
        if not items:
            return []
        for item in items:
            check_transition(None, item.state)
        rows = [
            _new_row(
                i.spec,
                i.command_id,
                i.spec.spec_hash(),
                i.state,
                i.actor,
                i.reason,
                i.failure_reason,
                i.trace_id,
                None,
            )
            for i in items
        ]
        insert_new = (_pg_insert if self._pg else _sqlite_insert)(commands)
        statement = insert_new.on_conflict_do_nothing(index_elements=["tenant", "idempotency_key"])
        with self.engine.begin() as conn:
            # A plain executemany (pipelined by psycopg) and a look-up of the ids, rather than
            # INSERT ... RETURNING: that becomes one statement of thousands of placeholders,
            # which the driver parses anew for each call (0.5 ms a command, measured).
            conn.execute(statement, rows)
            ids = [row["id"] for row in rows]
            inserted: set[str] = set()
            for start in range(0, len(ids), 1000):  # bound parameters per statement
                chunk = ids[start : start + 1000]
                found = conn.execute(select(commands.c.id).where(commands.c.id.in_(chunk)))
                inserted.update(found.scalars())
            repeats = {
                (i.spec.tenant, i.spec.idempotency_key)
                for i in items
                if i.command_id not in inserted
            }
            first = self._firsts(conn, repeats)
            out = []
            chains: dict[str, list[AuditEvent]] = {}
            for item, row in zip(items, rows, strict=True):
                if item.command_id in inserted:
                    out.append(Created(item.command_id, item.state, False, published=False))
                    chains.setdefault(item.spec.tenant, []).extend(item.events)
                    continue
                found = first[(item.spec.tenant, item.spec.idempotency_key)]
                out.append(_repeat_of(item.spec, row["spec_hash"], found))
            for chain, events in chains.items():
                if events:
                    audit.append_linked(conn, chain, events)
        return out

    @staticmethod
    def _firsts(conn: Connection, keys: set[tuple[str, str | None]]) -> dict[Any, Any]:
        """The commands holding these (tenant, idempotency key) pairs, by pair."""
        if not keys:
            return {}
        cols = (commands.c.id, commands.c.spec_hash, commands.c.state, commands.c.published_at)
        found = {}
        for tenant in {t for t, _ in keys}:
            wanted = [k for t, k in keys if t == tenant]
            query = select(commands.c.idempotency_key, *cols).where(
                commands.c.tenant == tenant, commands.c.idempotency_key.in_(wanted)
            )
            for r in conn.execute(query):
                found[(tenant, r.idempotency_key)] = r
        return found

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


def _repeat_of(spec: CommandSpec, spec_hash: str, found: Any) -> Created:
    """The first command of a repeated (tenant, key), or IdempotencyConflict if its spec
    differs; `found` is its row from `Store._firsts`."""
    if found.spec_hash != spec_hash:
        raise IdempotencyConflict(
            f"idempotency key {spec.idempotency_key!r} of tenant {spec.tenant!r} was used for "
            f"another command ({found.id}) with a different spec",
            command_id=found.id,
        )
    published = found.published_at is not None
    return Created(found.id, State(found.state), duplicate=True, published=published)


def _new_row(
    spec: CommandSpec,
    cid: str,
    spec_hash: str,
    state: State,
    actor: str,
    reason: str | None,
    failure_reason: str | None,
    trace_id: str | None,
    batch: tuple[str, int, bool] | None,
) -> dict[str, Any]:
    """The `commands` row of a new command."""
    now = utcnow()
    return {
        "id": cid,
        "tenant": spec.tenant,
        "idempotency_key": spec.idempotency_key,
        "spec_hash": spec_hash,
        "principal": spec.principal,
        "argv": list(spec.argv),
        "action": spec.action,
        "params": dict(spec.params) if spec.action is not None else None,
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
