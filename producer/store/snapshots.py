"""Snapshot archives in the store: taken by a worker before a command runs, read back by the
compensation that restores them (on the same host: the paths are that host's)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import cast

from sqlalchemy import Engine, Table, delete, insert, select
from sqlalchemy.exc import IntegrityError

from producer.store.clock import as_utc
from producer.store.models import Snapshot

snapshots = cast(Table, Snapshot.__table__)


@dataclass(frozen=True)
class StoredSnapshot:
    """An archive and where it was taken."""

    command_id: str
    host: str
    archive: bytes
    files: int
    bytes: int
    created_at: datetime


class SnapshotStore:
    """Insert-once, read, delete: a command keeps the snapshot of its first attempt until it
    is reverted, so a retry after a failure does not archive what the failure left behind."""

    def __init__(self, engine: Engine) -> None:
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")

    def save(
        self, command_id: str, *, tenant: str, host: str, archive: bytes, files: int, size: int
    ) -> bool:
        """Store the archive unless the command has one already; True when this one was kept."""
        try:
            with self._auto.connect() as conn:
                conn.execute(
                    insert(snapshots),
                    {
                        "command_id": command_id,
                        "tenant": tenant,
                        "host": host,
                        "archive": archive,
                        "files": files,
                        "bytes": size,
                        "created_at": datetime.now(UTC),
                    },
                )
        except IntegrityError:
            return False
        return True

    def exists(self, command_id: str) -> bool:
        """Whether the command has a snapshot."""
        with self._auto.connect() as conn:
            found = conn.execute(
                select(snapshots.c.command_id).where(snapshots.c.command_id == command_id)
            ).first()
        return found is not None

    def load(self, command_id: str) -> StoredSnapshot | None:
        """The command's snapshot, or None."""
        with self._auto.connect() as conn:
            row = conn.execute(
                select(snapshots).where(snapshots.c.command_id == command_id)
            ).one_or_none()
        if row is None:
            return None
        created = as_utc(row.created_at)
        assert created is not None
        return StoredSnapshot(
            row.command_id, row.host, bytes(row.archive), row.files, row.bytes, created
        )

    def delete(self, command_id: str) -> None:
        """Forget the snapshot (after it was restored: the next run takes a new one)."""
        with self._auto.connect() as conn:
            conn.execute(delete(snapshots).where(snapshots.c.command_id == command_id))
