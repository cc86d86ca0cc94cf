"""The store behind PgBouncer in transaction mode: real workers, real producer, real pooler.

PgBouncer before 1.21 cannot keep server-side prepared statements in transaction mode (each
transaction may land on another server connection); `?prepare_threshold=none` in the database
URL turns them off. Everything else the store does is transaction-scoped.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa

from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from tests.conftest import PG_ADMIN_URL, Env, _need, fresh_database, start_worker

PGBOUNCER = shutil.which("pgbouncer") or "/usr/sbin/pgbouncer"

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class Pooler:
    """A running PgBouncer: `url(alias)` reaches the test database through it."""

    port: int
    log: Path

    def url(self, alias: str = "execq", **query: str) -> str:
        tail = "&".join(f"{k}={v}" for k, v in query.items())
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{alias}" + (
            f"?{tail}" if tail else ""
        )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def pooler() -> Iterator[Pooler]:
    """Its own database, and a PgBouncer in transaction mode in front of it."""
    if not os.path.exists(PGBOUNCER):
        _need("PgBouncer", f"{PGBOUNCER} is not installed")
    with fresh_database("execq_pooler") as name:
        yield from _pgbouncer_for(name)


def _pgbouncer_for(name: str) -> Iterator[Pooler]:
    """PgBouncer in transaction mode in front of database `name`, stopped afterwards."""
    server = sa.engine.make_url(PG_ADMIN_URL)
    target = f"host={server.host} port={server.port or 5432} dbname={name} user=postgres"
    # PgBouncer refuses to run as root: it drops to `nobody`, who must reach its files.
    root = Path(tempfile.mkdtemp(prefix="execq-pgbouncer-"))
    root.chmod(0o777)
    port = _free_port()
    ini = root / "pgbouncer.ini"
    ini.write_text(
        f"""[databases]
execq = {target} pool_size=3
execq_one = {target} pool_size=1

[pgbouncer]
listen_addr = 127.0.0.1
listen_port = {port}
unix_socket_dir =
auth_type = any
pool_mode = transaction
max_client_conn = 200
default_pool_size = 3
logfile = {root}/pgbouncer.log
pidfile = {root}/pgbouncer.pid
ignore_startup_parameters = extra_float_digits,options
"""
    )
    ini.chmod(0o644)
    argv = [PGBOUNCER, str(ini)] + (["-u", "nobody"] if os.geteuid() == 0 else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log = root / "pgbouncer.log"
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            if proc.poll() is not None or time.monotonic() > deadline:
                out = proc.stdout.read().decode() if proc.stdout else ""
                raise AssertionError(f"pgbouncer did not start: {out}")
            time.sleep(0.05)
        yield Pooler(port, log)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(root, ignore_errors=True)


def test_workers_and_producer_run_commands_through_pgbouncer_in_transaction_mode(
    pooler: Pooler, make_env: Callable[..., Env], redis_url: str
) -> None:
    url = pooler.url(prepare_threshold="none")
    engine = make_engine(url)
    try:
        assert upgrade(engine)[1] is not None  # the migrations' advisory lock is per transaction
    finally:
        engine.dispose()
    env = make_env(url, redis_url)
    worker = start_worker(env, "alpha")
    producer = env.producer()
    try:
        ids = [
            producer.submit(
                CommandSpec(tenant="alpha", argv=["/bin/echo", f"n{i}"], idempotency_key=f"k{i}")
            ).id
            for i in range(30)
        ]
        # The same key again: the idempotency lookup also goes through the pooler.
        again = producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/echo", "n0"], idempotency_key="k0")
        )
        assert again.duplicate and again.id == ids[0]
        records = [producer.wait(cid, timeout=30) for cid in ids]
    finally:
        producer.close()
        assert worker.stop() == 0, worker.output()[-3000:]
    assert [r.state for r in records] == [State.SUCCEEDED] * 30, [
        (r.state, r.failure_reason, r.error) for r in records if r.state != State.SUCCEEDED
    ]
    assert [r.stdout for r in records] == [f"n{i}\n" for i in range(30)]
    assert "prepared statement" not in worker.output()


def _alternate(url: str) -> None:
    """Two clients take turns running the same statement, as a worker's pool processes do."""
    conninfo = sa.engine.make_url(url).set(drivername="postgresql")
    dsn = conninfo.render_as_string(hide_password=False).split("?")[0]
    threshold = None if "prepare_threshold=none" in url else 5
    with (
        psycopg.connect(dsn, autocommit=True, prepare_threshold=threshold) as a,
        psycopg.connect(dsn, autocommit=True, prepare_threshold=threshold) as b,
    ):
        for _ in range(10):
            for conn in (a, b):
                conn.execute("SELECT count(*) FROM pg_class WHERE relname = %s", ["x"])


def test_prepared_statements_break_behind_the_pooler_unless_turned_off(pooler: Pooler) -> None:
    with pytest.raises(psycopg.errors.DuplicatePreparedStatement):
        _alternate(pooler.url("execq_one"))
    _alternate(pooler.url("execq_one", prepare_threshold="none"))
