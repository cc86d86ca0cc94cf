"""Time in the store: always timezone-aware UTC.

Leases are the one place where two hosts' clocks meet: a worker writes when its lease ends,
and another host's reaper decides it has ended. On PostgreSQL both sides use the database
server's clock (`lease_deadline`, `lease_now`), so a worker or reaper whose clock is off
neither loses nor steals a lease. SQLite is one file on one host: there the host's clock is
the database's clock, and the writer's time is bound as before.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import DateTime, Float, bindparam, func, literal
from sqlalchemy.engine import Connection
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.sql.elements import ColumnElement
from sqlalchemy.sql.functions import FunctionElement

TS = DateTime(timezone=True)


def utcnow() -> datetime:
    """Timezone-aware now; every timestamp in the store is UTC."""
    return datetime.now(UTC)


def as_utc(value: datetime | None) -> datetime | None:
    """`value` as aware UTC: SQLite hands back naive datetimes for timezone-aware columns."""
    if value is not None and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


class LeaseDeadline(FunctionElement[datetime]):
    """When a lease taken or renewed now ends. Statements using it take two parameters:
    `v_lease_s` (seconds) and `v_expires` (the writer's now plus those seconds); each
    dialect uses the one it needs."""

    type = TS
    name = "lease_deadline"
    inherit_cache = True


@compiles(LeaseDeadline)
def _deadline_bound(element: LeaseDeadline, compiler: Any, **kw: Any) -> str:
    return str(compiler.process(bindparam("v_expires", type_=TS), **kw))


@compiles(LeaseDeadline, "postgresql")
def _deadline_server(element: LeaseDeadline, compiler: Any, **kw: Any) -> str:
    # statement_timestamp(), not now(): inside a transaction now() is its start
    seconds = compiler.process(bindparam("v_lease_s", type_=Float), **kw)
    return f"statement_timestamp() + make_interval(secs => {seconds})"


def lease_params(lease_s: float, now: datetime | None = None) -> dict[str, Any]:
    """The parameters LeaseDeadline takes."""
    return {
        "v_lease_s": float(lease_s),
        "v_expires": (now or utcnow()) + timedelta(seconds=lease_s),
    }


def lease_now(conn: Connection) -> ColumnElement[datetime]:
    """Now, to judge leases by: the server's clock on PostgreSQL, this host's elsewhere."""
    if conn.dialect.name == "postgresql":
        return func.statement_timestamp(type_=TS)
    return literal(utcnow(), TS)
