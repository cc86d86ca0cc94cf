"""One measured run of a system: start its worker, warm up, submit N, wait, collect, stop."""

from __future__ import annotations

import cProfile
import io
import itertools
import os
import pstats
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg
import redis
import sqlalchemy as sa

from bench.baseline import (
    DONE_KEY,
    PG_DSN_ENV,
    QUEUE,
    RUNS_DDL,
    TASK,
    TASK_RECORDED,
    URL_ENV,
    make_app,
    record_created,
)
from bench.infra import (
    PgDatabase,
    Worker,
    Workers,
    latency_ms,
    other_db_traffic,
    redis_calls,
    server_cpu_s,
)
from producer.client import Producer
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import TERMINAL, State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.models import Base, Command
from producer.tenants import load_tenants

TENANTS_YAML = """tenants:
  bench:
    concurrency: 2
    executables: [/bin/true]
    limits: {timeout_s: 30, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 256}
"""
CELERY_ARGV = "-m celery -A bench.baseline worker -P prefork -l WARNING -Q " + QUEUE
CELERY_FLAGS = "--without-gossip --without-mingle --without-heartbeat"
EXECQ_ARGV = "-m workers.cli worker --tenant bench --loglevel WARNING"
POLL_S = 0.05  # completion polling; e2e uses recorded timestamps, so this only adds load
STAGES = ("created_at", "started_at", "finished_at")
commands = Command.__table__
Res = dict[str, Any]


@dataclass(frozen=True)
class Ctx:
    """What all runs share."""

    redis_url: str
    pg: PgDatabase | None
    tmp: Path
    timeout_s: float
    warmup: int
    otlp_url: str | None = None  # a local OTLP/HTTP sink for the traced runs


def submit_loop(
    send: Callable[[int], object], n: int, rate: float, deadline: float, per_call: int = 1
) -> tuple[float, float, int]:
    """Send n commands, per_call at a time (send(k) sends k), flat out (rate 0) or paced,
    until the deadline.

    Returns (first submit, loop end) on the wall clock, and how many were sent.
    """
    interval = per_call / rate if rate > 0 else 0.0
    t0 = time.time()
    sent = 0
    for i in itertools.count():
        if sent >= n or time.monotonic() > deadline:
            break
        if interval and (delay := t0 + i * interval - time.time()) > 0:
            time.sleep(delay)
        k = min(per_call, n - sent)
        send(k)
        sent += k
    return t0, time.time(), sent


def wait_for(
    count: Callable[[], int], target: int, w: Worker | Workers, deadline: float
) -> tuple[int, str]:
    """Poll count() until it reaches target; (last count, "ok" / "timeout" / "worker died")."""
    while (c := count()) < target:
        if not w.alive():
            return c, "worker died"
        if time.monotonic() > deadline:
            return c, "timeout"
        time.sleep(POLL_S)
    return c, "ok"


def measure(
    res: Res,
    w: Worker | Workers,
    r: redis.Redis,
    send: Callable[[int], object],
    deadline: float,
    prof: cProfile.Profile | None = None,
    per_call: int = 1,
) -> tuple[Callable[[Counter[str]], None], int]:
    """Run the submit loop; returns what to call once all are done (with the bench's own
    Redis commands), and how many were submitted before the deadline."""
    calls0, t0, cpu0, wcpu0 = redis_calls(r), time.monotonic(), time.process_time(), w.cpu_s()
    servers0 = server_cpu_s()
    loop = prof.runcall if prof else (lambda f, *a: f(*a))
    res["t_first"], t_end, n = loop(submit_loop, send, res["n"], res["rate"], deadline, per_call)
    res["submitted"] = n = max(n, 1)
    res["submit_per_s"] = n / (t_end - res["t_first"])
    res["producer_cpu_ms"] = 1000 * (time.process_time() - cpu0) / n

    def finish(own: Counter[str]) -> None:
        if res["submitted"] < res["n"]:
            res["status"] = f"timeout ({res['submitted']} of {res['n']} submitted)"
        delta = redis_calls(r) - calls0 - own
        res["worker_cpu_ms"] = 1000 * (w.cpu_s() - wcpu0) / n  # warm-up excluded
        for name, cpu in server_cpu_s().items():  # the bench's own polling included
            res[f"{name}_cpu_ms"] = 1000 * (cpu - servers0[name]) / n
        res["redis_cmds_per_cmd"] = delta.total() / n
        res["redis_cmds_by_type"] = {k: round(v / n, 2) for k, v in delta.most_common()}
        res["redis_other_db_traffic"] = other_db_traffic(r, time.monotonic() - t0 + 1)
        res["rss_main_mb"], res["rss_pool_mb"] = w.rss_mb()

    return finish, n


def _fail(res: Res, status: str, w: Worker | Workers) -> Res:
    res.update(status=status, log_tail=w.output())
    return res


def run_celery(
    ctx: Ctx,
    n: int,
    rate: float,
    tag: str,
    *,
    durable: bool = False,
    concurrency: int = 2,
    processes: int = 1,
) -> Res:
    """Bare Celery, prefork -c `concurrency` in `processes` workers; the task records its
    completion with one RPUSH.

    `durable` (system `celery-pg`): each run also gets a PostgreSQL row, inserted before its
    message is sent, claimed and finished by the task (three commits, raw psycopg): the
    floor any design with a durable record per command pays, execq's overhead excluded.
    """
    system = "celery-pg" if durable else "celery"
    res: Res = {"system": system, "n": n, "rate": rate, "status": "?", "failures": {}}
    r = redis.Redis.from_url(ctx.redis_url)
    r.flushdb()
    deadline = time.monotonic() + ctx.timeout_s
    argv = [sys.executable, *CELERY_ARGV.split(), "-c", str(concurrency), *CELERY_FLAGS.split()]
    env = {**os.environ, URL_ENV: ctx.redis_url}
    db: psycopg.Connection | None = None
    if durable:
        assert ctx.pg is not None
        env[PG_DSN_ENV] = dsn = ctx.pg.url.replace("postgresql+psycopg://", "postgresql://")
        db = psycopg.connect(dsn, autocommit=True)
        db.execute(RUNS_DDL)
        db.execute("TRUNCATE bench_runs")
    w = Workers(
        [
            Worker([*argv, "-n", f"{tag}-{i}@%h"], env, ctx.tmp / f"{tag}-{i}.log")
            for i in range(processes)
        ]
    )
    capp = make_app(ctx.redis_url)
    polls = Counter[str]()
    ids = itertools.count()

    def done() -> int:
        polls["llen"] += 1
        return int(r.llen(DONE_KEY))

    def send(_: int = 1) -> object:
        if db is None:
            return capp.send_task(TASK, args=(time.time(),), queue=QUEUE)
        run_id = f"{tag}-{next(ids)}"
        record_created(db, run_id)
        return capp.send_task(TASK_RECORDED, args=(run_id, time.time()), queue=QUEUE)

    try:
        for _ in range(ctx.warmup):
            send()
        if (status := wait_for(done, ctx.warmup, w, deadline)[1]) != "ok":
            return _fail(res, f"warm-up: {status}", w)
        r.delete(DONE_KEY)
        polls.clear()
        finish, sent = measure(res, w, r, send, deadline)
        res["completed"], res["status"] = wait_for(done, sent, w, deadline)
        finish(polls + Counter({"rpush": sent, "info": 1}))  # the bench's own commands
        recs = [tuple(map(float, b.split())) for b in r.lrange(DONE_KEY, 0, -1)]
        if recs:
            res["e2e_per_s"] = len(recs) / (max(d for _, d in recs) - res["t_first"])
            res.update(latency_ms([d - e for e, d in recs]))
        return res
    finally:
        capp.close()
        w.stop()
        r.close()
        if db is not None:
            db.close()


# Every table but the audit trail's, which refuses TRUNCATE by design (its chains go on).
_TRUNCATED = ", ".join(
    t.name for t in Base.metadata.sorted_tables if not t.name.startswith("audit_")
)


def _prepare_store(ctx: Ctx, backend: str, tag: str) -> str:
    """An empty, migrated store: the PostgreSQL tables truncated, or a new SQLite file."""
    url = ctx.pg.url if ctx.pg and backend == "pg" else f"sqlite:///{ctx.tmp}/{tag}.db"
    engine = make_engine(url)
    if backend == "pg":
        with engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {_TRUNCATED}"))
    else:
        upgrade(engine)
    engine.dispose()
    return url


def _ts(dt: datetime) -> float:
    # SQLite hands back naive datetimes; the store writes UTC
    return (dt if dt.tzinfo else dt.replace(tzinfo=UTC)).timestamp()


def _outcome(res: Res, rows: list[Any]) -> None:
    """e2e/s, submit→finish latencies, time per stage and failures, from the records."""
    done = [x for x in rows if x.finished_at is not None]
    res["failures"] = Counter(
        f"{x.state}:{x.failure_reason}" for x in rows if x.state != State.SUCCEEDED
    )
    if errors := [x.error for x in rows if x.error]:
        res["error_sample"] = errors[0][:300]
    if done:
        res["e2e_per_s"] = len(done) / (max(_ts(x.finished_at) for x in done) - res["t_first"])
        res.update(latency_ms([_ts(x.finished_at) - _ts(x.created_at) for x in done]))
        # submit + queue + claim, then authz + sandbox + archive
        ran = [x for x in done if x.started_at is not None]
        res["stages_p50_ms"] = {
            f"{a}->{b}": latency_ms([_ts(getattr(x, b)) - _ts(getattr(x, a)) for x in ran])[
                "p50_ms"
            ]
            for a, b in itertools.pairwise(STAGES)
            if ran
        }


def run_execq(
    ctx: Ctx,
    backend: str,
    n: int,
    rate: float,
    tag: str,
    profile: bool = False,
    batch: int = 1,
    concurrency: int | None = None,
    processes: int = 1,
) -> Res:
    """The full execq pipeline: Producer.submit → Redis → `execq worker` → store.

    `processes` workers of the tenant, each with `concurrency` pool processes (default: the
    tenant's, 2).
    Traced as the bench process is (10 %, OTLP/HTTP to a local sink that discards spans).
    `batch` > 1: submit_many of that many commands per call instead of submit.
    """
    system = f"execq-{backend}" + ("-batch" if batch > 1 else "")
    res: Res = {"system": system, "n": n, "rate": rate, "status": "?"}
    db_url = _prepare_store(ctx, backend, tag)
    pg = ctx.pg if backend == "pg" else None
    if pg is not None:
        pg.quiesce()  # the TRUNCATE's backend has exited, so its counts are in
        pg0 = pg.counters()
    tenants_file = ctx.tmp / "tenants.yaml"
    tenants_file.write_text(TENANTS_YAML)
    settings = Settings(
        database_url=db_url,
        broker_url=ctx.redis_url,
        tenants_file=tenants_file,
        workdir_root=ctx.tmp / "work" / tag,
        audit_log=ctx.tmp / "audit.jsonl",
    )
    env = {f"EXECQ_{k.upper()}": str(v) for k, v in settings.model_dump(mode="json").items()}
    otel = dict(os.environ)  # the bench's OTEL_* (10 % sampled), as its producer uses
    r = redis.Redis.from_url(ctx.redis_url)
    r.flushdb()
    deadline = time.monotonic() + ctx.timeout_s
    argv = [sys.executable, *EXECQ_ARGV.split()]
    argv += ["--concurrency", str(concurrency)] if concurrency else []
    w = Workers(
        [Worker(argv, {**otel, **env}, ctx.tmp / f"{tag}-{i}.log") for i in range(processes)]
    )
    producer: Producer | None = None
    # no pool pre-ping here: on PostgreSQL each ping is one more committed transaction
    poll = sa.create_engine(db_url) if pg else make_engine(db_url)
    count_q = sa.select(sa.func.count()).where(commands.c.state.in_([s.value for s in TERMINAL]))

    def finished() -> int:
        with poll.connect() as conn:
            return int(conn.execute(count_q).scalar_one())

    try:
        if not w.wait_line(" ready", deadline):
            return _fail(res, "worker not ready", w)
        producer = p = Producer.from_settings(settings, load_tenants(tenants_file))

        spec = CommandSpec(tenant="bench", argv=("/bin/true",))

        def send(k: int) -> object:
            return p.submit_many([spec] * k) if batch > 1 else p.submit(spec).id

        warm = {p.submit(spec).id for _ in range(ctx.warmup)}
        if (status := wait_for(finished, ctx.warmup, w, deadline)[1]) != "ok":
            return _fail(res, f"warm-up: {status}", w)
        prof = cProfile.Profile() if profile else None
        finish, sent = measure(res, w, r, send, deadline, prof, per_call=batch)
        count, res["status"] = wait_for(finished, ctx.warmup + sent, w, deadline)
        res["completed"] = count - ctx.warmup
        finish(Counter({"info": 1}))
        cols = [commands.c[k] for k in ("id", "state", "failure_reason", "error", *STAGES)]
        with poll.connect() as conn:
            _outcome(res, [x for x in conn.execute(sa.select(*cols)) if x.id not in warm])
        if prof is not None:
            out = io.StringIO()
            pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(25)
            res["profile"] = out.getvalue()
        return res
    finally:
        if producer is not None:
            producer.close()
        poll.dispose()
        w.stop()
        r.close()
        if pg is not None and res["status"] == "ok":
            _pg_cost(res, pg, pg0, res["submitted"] + ctx.warmup)


def _pg_cost(res: Res, pg: PgDatabase, before: dict[str, int], n: int) -> None:
    """Per-command deltas of pg_stat_database, once every client has gone (stats flushed)."""
    if not pg.quiesce():
        res["pg_counters_inexact"] = True  # a client stayed connected: its counts lag
    after = pg.counters()
    res["pg_per_cmd"] = {k: (after[k] - before[k]) / n for k in before}
