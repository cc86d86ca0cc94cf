"""Reading, verifying and pruning the store's audit chains (appends go with transitions)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime

from sqlalchemy import Connection, Engine

from producer.audit.events import NO_COMMAND_HASH, AuditEvent, Outcome, Phase, Subject, make_event
from producer.audit.verify import Report
from producer.store import audit as sql


def _ns(when: datetime) -> int:
    # Epoch nanoseconds fit a signed 64-bit column until 2262; later cut-offs mean "all".
    return min(int(when.timestamp() * 1_000_000_000), 2**63 - 1)


class AuditLog:
    """The audit side of the store: `Store.audit`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._pg = engine.dialect.name == "postgresql"

    def events(
        self,
        *,
        tenant: str | None = None,
        since_ns: int | None = None,
        command_id: str | None = None,
    ) -> Iterator[AuditEvent]:
        """Stored audit events in the order they were appended."""
        with self._snapshot() as conn:
            yield from sql.iter_events(
                conn, tenant=tenant, since_ns=since_ns, command_id=command_id
            )

    def verify(self, *, tenant: str | None = None) -> Report:
        """Verify the store's chains (every tenant's, or one) in one consistent snapshot."""
        with self._snapshot() as conn:
            return sql.verify(conn, tenant=tenant)

    def prune_plan(self, *, before: datetime, tenant: str | None = None) -> dict[str, int]:
        """How many events `prune` would remove from each chain."""
        with self._auto.connect() as conn:
            plan = sql.prune_plan(conn, _ns(before), tenant=tenant)
        return {chain: count for chain, (_, count) in plan.items()}

    def prune(self, *, before: datetime, actor: str, tenant: str | None = None) -> dict[str, int]:
        """Delete events older than `before`, chain by chain, keeping each chain verifiable.

        Each chain gets an anchor (where it now starts) and a `prune` event saying who
        removed how much, in the same transaction as the deletion.
        """
        with self._auto.connect() as conn:
            plan = sql.prune_plan(conn, _ns(before), tenant=tenant)
        done: dict[str, int] = {}
        for chain, (upto, _) in sorted(plan.items()):
            with self.engine.begin() as conn:
                count = sql.prune_chain(conn, chain, upto, actor=actor, at=datetime.now(UTC))
                subject = Subject("", chain, actor, NO_COMMAND_HASH, None)
                event = make_event(
                    subject,
                    Phase.PRUNE,
                    Outcome.OK,
                    actor=actor,
                    operator=actor,
                    reason=f"events before {before.isoformat()} removed",
                    detail={"pruned_events": count, "anchor_seq": upto + 1},
                )
                sql.append_linked(conn, chain, [event])
            done[chain] = count
        return done

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read-only view that concurrent appends do not change while it is read."""
        if self._pg:
            options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
            with self.engine.execution_options(**options).connect() as conn:
                yield conn
                conn.rollback()
        else:
            with self._auto.connect() as conn:
                # A deferred BEGIN is a read snapshot in WAL mode and takes no write lock.
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("COMMIT")
