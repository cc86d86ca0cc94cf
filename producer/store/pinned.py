"""A connection one thread keeps for its single-statement writes: a pool process's pipeline.

Checking a connection out of SQLAlchemy's pool and back in costs more client CPU than the
claim it runs (0.16 against 0.10 ms per statement here, measured): the pipeline thread runs
every claim and finish of its pool process, one at a time, so it keeps one connection in
autocommit instead. It is still a SQLAlchemy Connection: statement events (tracing), error
mapping and invalidation after a lost server are as before. Other threads (the lease
keeper's) keep using the pool.
"""

from __future__ import annotations

import os
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager

from sqlalchemy import Connection, Engine


class Pinned:
    """The connection of the thread that called `pin()`; nothing for other threads."""

    def __init__(self, engine: Engine) -> None:
        """`engine`: the store's autocommit engine."""
        self._engine = engine
        self._ident: int | None = None
        self._conn: Connection | None = None
        # Connections inherited over fork(): their sockets are the parent's, so the child
        # must neither use nor close them, and keeps them from the garbage collector (whose
        # clean-up would roll back on the parent's socket).
        self._inherited: list[Connection] = []
        ref = weakref.ref(self)
        os.register_at_fork(after_in_child=lambda: _forget_after_fork(ref))

    def pin(self) -> None:
        """From now on the calling thread keeps a connection of its own."""
        self._ident = threading.get_ident()

    def holds(self) -> bool:
        """Whether the calling thread is the pinned one."""
        return self._ident is not None and self._ident == threading.get_ident()

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        """The pinned connection, made on first use and made anew after any error."""
        conn = self._conn
        if conn is None or conn.closed:
            conn = self._conn = self._engine.connect()
        try:
            yield conn
        except BaseException:
            # Whatever failed (a lost server, a constraint), the next statement starts on a
            # fresh connection: no half-finished state is carried over.
            self._conn = None
            conn.close()
            raise
        else:
            # SQLAlchemy begins a (server-side no-op) transaction on each autocommit execute;
            # ending it keeps the next statement from inheriting anything.
            conn.commit()

    def close(self) -> None:
        """Give the connection back (at pool-process shutdown)."""
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()


def _forget_after_fork(ref: weakref.ref[Pinned]) -> None:
    pinned = ref()
    if pinned is None:
        return
    if pinned._conn is not None:
        pinned._inherited.append(pinned._conn)
    pinned._conn = None
    pinned._ident = None
