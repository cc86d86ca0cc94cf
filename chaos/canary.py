"""The canary: a secret every command of the stream is given. It must reach the child (the
marker line holds its length) and nothing else: not Redis (keys, values, streams, the AOF),
not the store (any row of any table, nor PostgreSQL's files and WAL, which keep what was ever
written), not the audit file, its witness or any process's log."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import redis
import sqlalchemy as sa

from chaos.checks import Report
from chaos.servers import PgCluster, RedisServer
from chaos.stack import Stack


def _redis_values(client: redis.Redis) -> Iterator[bytes]:
    for raw in _redis_raw(client):
        yield raw if isinstance(raw, bytes) else str(raw).encode()


def _redis_raw(client: redis.Redis) -> Iterator[object]:
    for key in client.scan_iter(count=1000):
        yield key
        kind = client.type(key)
        kind = kind.decode() if isinstance(kind, bytes) else kind
        if kind == "string":
            yield client.get(key) or b""
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                yield field
                yield value
        elif kind == "set":
            yield from client.smembers(key)
        elif kind == "zset":
            yield from client.zrange(key, 0, -1)
        elif kind == "stream":
            for _, entry in client.xrange(key) or []:
                for field, value in (entry or {}).items():
                    yield field
                    yield value


def _store_rows(url: str) -> Iterator[bytes]:
    """Every row of every table of the public schema, as PostgreSQL prints it."""
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            tables = conn.execute(
                sa.text("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
            ).scalars()
            for table in list(tables):
                # table names come from the catalogue, not from input
                query = sa.text(f'SELECT t::text FROM "{table}" t')  # noqa: S608
                for (row,) in conn.execute(query):
                    yield str(row).encode()
    finally:
        engine.dispose()


def _files(*roots: Path, skip: Path) -> Iterator[tuple[Path, bytes]]:
    for root in roots:
        for path in root.rglob("*"):
            if path.is_file() and skip not in path.parents:
                with contextlib.suppress(OSError):
                    yield path, path.read_bytes()


def check_canary(report: Report, stack: Stack, rds: RedisServer, pg: PgCluster) -> None:
    """The child saw the canary; nothing else holds it (called once the workers stopped)."""
    canary = stack.canary
    needle = canary.encode()
    # "<pid> <length of CANARY>" per run (commands without the canary write "<pid>")
    runs = [line.split() for p in stack.markers.iterdir() for line in p.read_text().splitlines()]
    seen = {fields[1] for fields in runs if len(fields) == 2}
    if seen and seen != {str(len(canary))}:
        report.problems.append(f"the children saw a CANARY of lengths {sorted(seen)}")
    found: list[str] = []
    client = rds.client()
    try:
        if any(needle in value for value in _redis_values(client)):
            found.append("a Redis key or value")
    finally:
        client.close()
    if any(needle in row for row in _store_rows(pg.url)):
        found.append("a row of the store")
    for path, data in _files(stack.root, rds.root, pg.root, skip=stack.markers):
        if needle in data:
            found.append(str(path))
    report.problems.extend(f"the canary secret is in {where}" for where in found)
