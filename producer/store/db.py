"""Engines for the results store: SQLite by default, PostgreSQL in production."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from producer.errors import StoreError
from producer.files import private_file

# A query option of a PostgreSQL URL that execq takes for psycopg instead of passing it to
# libpq: `?prepare_threshold=none` stops server-side prepared statements, which a pooler in
# transaction mode (PgBouncer before 1.21) cannot keep, since it hands each transaction to
# any server connection. Everything else the store does is transaction-scoped.
PREPARE_OPTION = "prepare_threshold"


def make_engine(url: str, *, pool_size: int = 5) -> Engine:
    """An engine tuned per backend: SQLite serialises writers, PostgreSQL pools connections.

    PostgreSQL URLs may carry `?prepare_threshold=none` (behind PgBouncer in transaction
    mode) or a number: psycopg prepares a statement after that many executions (default 5).
    """
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        return _sqlite_engine(url)
    threshold = parsed.query.get(PREPARE_OPTION)
    connect_args: dict[str, Any] = {}
    if threshold is not None:
        parsed = parsed.difference_update_query([PREPARE_OPTION])
        connect_args["prepare_threshold"] = _prepare_threshold(threshold)
    return create_engine(
        parsed,
        connect_args=connect_args,
        pool_size=pool_size,
        max_overflow=pool_size,
        # No ping per checkout: it is a round trip (and a commit) per statement. After a
        # server restart the first statement fails, and SQLAlchemy replaces the whole pool.
        pool_pre_ping=False,
        pool_recycle=1800,
    )


def _prepare_threshold(value: str | tuple[str, ...]) -> int | None:
    """psycopg's `prepare_threshold` from the URL: a count of executions, or `none` (never)."""
    text = value if isinstance(value, str) else value[-1]
    if text.strip().lower() in ("none", "off", "never"):
        return None
    if text.strip().isdigit():
        return int(text)
    raise StoreError(
        f"{PREPARE_OPTION}={text!r} in the database URL: expected `none` (never prepare "
        "statements, needed behind PgBouncer < 1.21 in transaction mode) or a whole number"
    )


def _sqlite_engine(url: str) -> Engine:
    parsed = make_url(url)
    if parsed.database and parsed.database != ":memory:":
        # Made 0600 before SQLite opens it: SQLite gives its -wal and -shm files the same
        # mode as the database file, so all three stay private.
        private_file(Path(parsed.database))
    # Connections are cheap and must not cross fork(): no pool to inherit.
    engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 30})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Let SQLAlchemy drive transactions (pysqlite's own BEGIN handling is broken for this).
        dbapi_conn.isolation_level = None
        cur = dbapi_conn.cursor()
        cur.execute("PRAGMA journal_mode=WAL")
        cur.execute("PRAGMA synchronous=NORMAL")
        cur.execute("PRAGMA foreign_keys=ON")
        cur.execute("PRAGMA busy_timeout=30000")
        cur.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # Autocommit connections run each statement as its own implicit transaction.
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            return
        # IMMEDIATE takes the write lock up front, so two processes never deadlock upgrading
        # a read lock (SQLITE_BUSY without waiting); the busy timeout then queues writers.
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    return engine


def require_schema(engine: Engine) -> None:
    """Refuse early, with the fix in the message, when `execq db upgrade` was not run."""
    try:
        tables = set(inspect(engine).get_table_names())
    except Exception as exc:
        raise StoreError(f"cannot reach the results store {engine.url!r}: {exc}") from None
    missing = {"commands", "transitions"} - tables
    if missing:
        raise StoreError(
            f"the results store {engine.url.render_as_string(hide_password=True)} has no "
            f"{', '.join(sorted(missing))} table: run `execq db upgrade` first"
        )
