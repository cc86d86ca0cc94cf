"""Time in the store: always timezone-aware UTC."""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the store is UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """`value` as aware UTC: SQLite hands back naive datetimes for timezone-aware columns."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value
