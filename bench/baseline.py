"""The bare-Celery baselines: the same subprocess call execq runs, and nothing else; and the
same with the least a durable record of each run costs (the `celery-pg` floor).

`celery -A bench.baseline worker` finds `app`; the bench's producer builds its own with make_app().
"""

from __future__ import annotations

import os
import subprocess
import time

import psycopg
import redis
from celery import Celery

QUEUE = "bench.celery"
TASK = "bench.exec"
DONE_KEY = "bench:done"
URL_ENV = "EXECQ_BENCH_REDIS_URL"
TASK_RECORDED = "bench.exec_recorded"
PG_DSN_ENV = "EXECQ_BENCH_PG_DSN"
# One row per run, written as execq's store writes its hot path: created (by the producer),
# claimed, finished; each its own committed transaction.
RUNS_DDL = """CREATE TABLE IF NOT EXISTS bench_runs (
    id text PRIMARY KEY, state text NOT NULL, created_at timestamptz NOT NULL,
    started_at timestamptz, finished_at timestamptz, exit_code integer)"""

_conn: redis.Redis | None = None
_conn_pid = 0
_pg: psycopg.Connection | None = None
_pg_pid = 0


def _redis() -> redis.Redis:
    """One connection per pool process (made again after fork)."""
    global _conn, _conn_pid  # noqa: PLW0603  (per-process cache)
    if _conn is None or _conn_pid != os.getpid():
        _conn = redis.Redis.from_url(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/14"))
        _conn_pid = os.getpid()
    return _conn


def run_true(t_enqueued: float) -> None:
    """The workload, then completion recorded as "<enqueued> <done>" (one RPUSH)."""
    subprocess.run(["/bin/true"], capture_output=True, timeout=10, check=False)
    _redis().rpush(DONE_KEY, f"{t_enqueued!r} {time.time()!r}")


def _store() -> psycopg.Connection:
    """One autocommit connection per pool process: the cheapest durable path there is."""
    global _pg, _pg_pid  # noqa: PLW0603  (per-process cache)
    if _pg is None or _pg_pid != os.getpid():
        _pg = psycopg.connect(os.environ[PG_DSN_ENV], autocommit=True)
        _pg_pid = os.getpid()
    return _pg


def record_created(conn: psycopg.Connection, run_id: str) -> None:
    """The producer's side of the floor: the run exists before its message does."""
    conn.execute(
        "INSERT INTO bench_runs (id, state, created_at) VALUES (%s, 'pending', now())", (run_id,)
    )


def run_true_recorded(run_id: str, t_enqueued: float) -> None:
    """run_true with a claim (one delivery wins) and a finish, each committed, raw psycopg."""
    db = _store()
    claimed = db.execute(
        "UPDATE bench_runs SET state = 'running', started_at = now() "
        "WHERE id = %s AND state = 'pending' RETURNING id",
        (run_id,),
    ).fetchone()
    if claimed is None:
        return
    proc = subprocess.run(["/bin/true"], capture_output=True, timeout=10, check=False)
    db.execute(
        "UPDATE bench_runs SET state = 'done', finished_at = now(), exit_code = %s WHERE id = %s",
        (proc.returncode, run_id),
    )
    _redis().rpush(DONE_KEY, f"{t_enqueued!r} {time.time()!r}")


def make_app(url: str) -> Celery:
    """Celery as execq configures it where it matters: JSON, late ack, prefetch 1, no results."""
    capp = Celery("bench", broker=url, set_as_current=False)
    capp.conf.update(
        task_serializer="json",
        accept_content=["json"],
        task_acks_late=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        task_default_queue=QUEUE,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    capp.task(name=TASK)(run_true)
    capp.task(name=TASK_RECORDED)(run_true_recorded)
    return capp


app = make_app(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/14"))
