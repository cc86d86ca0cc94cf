"""The bare-Celery baseline: the same subprocess call execq runs, and nothing else.

`celery -A bench.baseline worker` finds `app`; the bench's producer builds its own with make_app().
"""

from __future__ import annotations

import os
import subprocess
import time

import redis
from celery import Celery

QUEUE = "bench.celery"
TASK = "bench.exec"
DONE_KEY = "bench:done"
URL_ENV = "EXECQ_BENCH_REDIS_URL"

_conn: redis.Redis | None = None
_conn_pid = 0


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
    return capp


app = make_app(os.environ.get(URL_ENV, "redis://127.0.0.1:6379/14"))
