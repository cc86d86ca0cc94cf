"""Batches (sagas) in the store: one row per batch; its steps are ordinary command rows that
carry `batch_id` and `batch_step`. Every change of a batch's state is guarded by its version."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import Engine, Table, and_, insert, select, update
from sqlalchemy.exc import IntegrityError

from producer.store.clock import as_utc
from producer.store.ids import resolve
from producer.store.models import Batch

batches = cast(Table, Batch.__table__)

RUNNING, SUCCEEDED, FAILED = "running", "succeeded", "failed"
REVERTING, REVERTED, REVERT_FAILED, REVOKED = "reverting", "reverted", "revert_failed", "revoked"
BATCH_STATES = (RUNNING, SUCCEEDED, FAILED, REVERTING, REVERTED, REVERT_FAILED, REVOKED)
BATCH_TERMINAL = frozenset({SUCCEEDED, FAILED, REVERTED, REVERT_FAILED, REVOKED})


@dataclass(frozen=True)
class BatchRow:
    """A batch as stored (its steps are read with Store.list(batch_id=…))."""

    id: str
    tenant: str
    idempotency_key: str | None
    spec_hash: str
    principal: str | None
    trace_id: str | None
    state: str
    version: int
    steps: int
    failed_step: int | None
    compensate_on_revoke: bool
    error: str | None
    last_actor: str
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None

    @property
    def terminal(self) -> bool:
        """Whether nothing more happens to this batch without an operator."""
        return self.state in BATCH_TERMINAL


class BatchStore:
    """Create, read and move batches."""

    def __init__(self, engine: Engine) -> None:
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def create(self, row: dict[str, Any]) -> BatchRow | None:
        """Insert a batch; None when its (tenant, key) exists already."""
        try:
            with self._auto.connect() as conn:
                conn.execute(insert(batches), row)
        except IntegrityError:
            if row.get("idempotency_key") is None:
                raise
            return None
        found = self.get(row["id"])
        assert found is not None
        return found

    def by_key(self, tenant: str, key: str) -> BatchRow | None:
        """The batch with this idempotency key, or None."""
        return self._one(and_(batches.c.tenant == tenant, batches.c.idempotency_key == key))

    def resolve_id(self, id_or_prefix: str) -> str:
        """The full id of the batch named by its id or a unique prefix of 8 characters or
        more; NotFound or AmbiguousId."""
        with self._auto.connect() as conn:
            return resolve(conn, batches.c.id, id_or_prefix, what="batch")

    def get(self, batch_id: str) -> BatchRow | None:
        """One batch, or None."""
        return self._one(batches.c.id == batch_id)

    def _one(self, cond: Any) -> BatchRow | None:
        with self._auto.connect() as conn:
            row = conn.execute(select(batches).where(cond)).one_or_none()
        if row is None:
            return None
        values = dict(row._mapping)
        for name in ("created_at", "updated_at", "finished_at"):
            values[name] = as_utc(values[name])
        values["compensate_on_revoke"] = bool(values["compensate_on_revoke"])
        return BatchRow(**values)

    def move(self, batch: BatchRow, to: str, *, actor: str, **fields: Any) -> bool:
        """batch (as read) -> `to`; False when someone else moved it first."""
        now = datetime.now(UTC)
        values = {"state": to, "version": batch.version + 1, "updated_at": now, "last_actor": actor}
        if to in BATCH_TERMINAL:
            values["finished_at"] = now
        with self._auto.connect() as conn:
            result = conn.execute(
                update(batches)
                .where(
                    batches.c.id == batch.id,
                    batches.c.state == batch.state,
                    batches.c.version == batch.version,
                )
                .values(**values, **fields)
            )
        return result.rowcount == 1

    def unfinished(self, *, tenant: str, older_than: datetime, limit: int) -> list[str]:
        """Batches not yet settled whose last change is older than `older_than` (a crashed
        worker may have left them waiting for a step that is already over)."""
        with self._auto.connect() as conn:
            rows = conn.execute(
                select(batches.c.id)
                .where(
                    batches.c.tenant == tenant,
                    batches.c.state.in_([RUNNING, REVERTING]),
                    batches.c.updated_at < older_than,
                )
                .limit(limit)
            ).all()
        return [r.id for r in rows]
