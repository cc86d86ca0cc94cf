"""The store's side of `python -m bench.growth`: claim and finish latency against backlog and
table size, `audit verify` against chain length, and a reaper pass against its backlogs.

Everything runs in this process against a private PostgreSQL database, through the same
Store methods the worker and the reaper call; backlogs are cloned from one real row by the
server (`INSERT … SELECT … generate_series`), so 100,000 take seconds.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast

import sqlalchemy as sa

from bench import rows as rowgen
from bench.infra import latency_ms
from producer.audit.events import Outcome, Phase, Subject, make_event
from producer.client import Producer
from producer.settings import Settings
from producer.spec import CommandSpec, cmd_hash
from producer.states import State
from producer.store.clock import utcnow
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.models import Command
from producer.store.repository import Store
from producer.tenants import load_tenants
from workers.reaper import SECRET_GRACE_S, Reaper

Progress = Callable[[str], None]
Row = dict[str, Any]
commands = cast(sa.Table, Command.__table__)
CLAIM_TENANT = "bench"
SWEEP_TENANT = "sweep"
WARMUP_OPS = 20  # first connections and statement caches, not what a running worker sees
SWEEP_REPS = 15
SWEEP_TENANTS_YAML = """tenants:
  sweep:
    concurrency: 2
    executables: [/bin/true]
    limits: {timeout_s: 30, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 256}
"""
# How a cloned row differs from its template; every other column is copied as is.
_ALWAYS = {
    "id": "gen_random_uuid()::text",
    "idempotency_key": "NULL",
    "spec_hash": "md5(g::text) || md5(t.id || g::text)",
    "created_at": "t.created_at - g * interval '1 millisecond'",
}
# Pending and published: waiting in Redis for a worker, as a deep queue looks.
PENDING = {"state": "'pending'", "published_at": "t.created_at", "publish_count": "1"}
# A worker that died holding the lease a minute ago.
EXPIRED = {
    "state": "'running'",
    "version": "2",
    "worker": "'lost@host:1'",
    "lease_owner": "'lost@host:1'",
    "lease_expires_at": "now() - interval '1 minute'",
    "started_at": "t.created_at",
    "published_at": "t.created_at",
}
# Stored but never published (the producer died between the commit and the publish).
UNPUBLISHED = {
    "state": "'pending'",
    "published_at": "NULL",
    "updated_at": "now() - interval '1 hour'",
}


def clone(engine: sa.Engine, template_id: str, n: int, overrides: dict[str, str]) -> None:
    """`n` copies of one command row, made by the server (its history trigger included)."""
    if n <= 0:
        return
    fields = {**_ALWAYS, **overrides}
    names = [c.name for c in commands.columns]
    select = ", ".join(fields.get(name, f"t.{name}") for name in names)
    sql = (
        f"INSERT INTO commands ({', '.join(names)}) SELECT {select} "  # noqa: S608 (constants)
        "FROM commands t CROSS JOIN generate_series(1, :n) AS g WHERE t.id = :id"
    )
    with engine.begin() as conn:
        conn.execute(sa.text(sql), {"n": n, "id": template_id})
    vacuum(engine)


def vacuum(engine: sa.Engine) -> None:
    """What autovacuum would have done by the time a backlog this size is a steady state:
    statistics for the planner, the visibility map for index-only scans."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(sa.text("VACUUM (ANALYZE) commands, transitions"))


def count(engine: sa.Engine, where: str) -> int:
    """Rows of `commands` matching a constant condition."""
    with engine.connect() as conn:
        q = f"SELECT count(*) FROM commands WHERE {where}"  # noqa: S608 (constants only)
        return int(conn.execute(sa.text(q)).scalar_one())


def _template(store: Store, tenant: str) -> str:
    """A settled row to clone from (rejected: no sweep or claim ever picks it up)."""
    spec = CommandSpec(tenant=tenant, argv=("/bin/true",), principal="bench")
    return store.create(
        spec, state=State.REJECTED, failure_reason="policy", actor="bench", reason="template"
    ).id


def _finish_events(cid: str, tenant: str) -> list[Any]:
    subject = Subject(cid, tenant, "bench", cmd_hash(["/bin/true"]), None)
    phases = (Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE)
    return [make_event(subject, p, Outcome.OK, actor="w") for p in phases]


def claim_and_finish(store: Store, ops: int) -> Row:
    """p50/p99 of the worker's claim and of its finishing write (with the three audit events
    the worker appends there), over `ops` fresh commands of the tenant, one after the other."""
    spec = CommandSpec(tenant=CLAIM_TENANT, argv=("/bin/true",), principal="bench")
    ids = [store.create(spec, actor="bench").id for _ in range(ops + WARMUP_OPS)]
    claims: list[float] = []
    finishes: list[float] = []
    for cid in ids:
        t0 = time.perf_counter()
        claimed = store.claim(cid, tenant=CLAIM_TENANT, worker="w", lease_s=30)
        t1 = time.perf_counter()
        assert claimed is not None, cid
        store.transition(
            cid,
            expect_state=State.RUNNING,
            expect_version=claimed.version,
            to=State.SUCCEEDED,
            actor="w",
            events=_finish_events(cid, CLAIM_TENANT),
            finished_at=utcnow(),
            lease_expires_at=None,
            exit_code=0,
            stdout="",
            stderr="",
            stdout_bytes=0,
            stderr_bytes=0,
        )
        claims.append(t1 - t0)
        finishes.append(time.perf_counter() - t1)
    claim = latency_ms(claims[WARMUP_OPS:])
    finish = latency_ms(finishes[WARMUP_OPS:])
    return {
        "claim_p50_ms": claim["p50_ms"],
        "claim_p99_ms": claim["p99_ms"],
        "finish_p50_ms": finish["p50_ms"],
        "finish_p99_ms": finish["p99_ms"],
    }


def claims_section(
    store: Store, finished_tiers: list[int], pending_tiers: list[int], ops: int, say: Progress
) -> list[Row]:
    """Every (store size, pending backlog) pair; the store is regenerated per size tier."""
    url = store.engine.url.render_as_string(hide_password=False)
    out: list[Row] = []
    for finished in sorted(finished_tiers):
        generated_s = 0.0
        if finished:
            say(f"claims: generating {finished:,} rows (bench/rows.py)")
            summary = rowgen.generate(url, finished, reset=True, progress=lambda _: None)
            generated_s = summary.seconds
            say(f"claims: {finished:,} rows in {generated_s:.0f} s")
        else:
            with store.engine.begin() as conn:
                conn.execute(sa.text("TRUNCATE commands, transitions, snapshots, batches"))
        template = _template(store, CLAIM_TENANT)
        for pending in sorted(pending_tiers):
            have = count(store.engine, f"tenant = '{CLAIM_TENANT}' AND state = 'pending'")
            clone(store.engine, template, pending - have, PENDING)
            row: Row = {"store_rows": finished, "pending": pending, "generate_s": generated_s}
            row.update(claim_and_finish(store, ops))
            say(
                f"claims: {finished:>10,} rows, {pending:>7,} pending: claim "
                f"{row['claim_p50_ms']:.2f}/{row['claim_p99_ms']:.2f} ms, finish "
                f"{row['finish_p50_ms']:.2f}/{row['finish_p99_ms']:.2f} ms (p50/p99)"
            )
            out.append(row)
    return out


def fill_chain(store: Store, events: int, batch: int = 100) -> None:
    """Append `events` audit events to the tenant's chain, a command's five phases each, in
    appends of `batch` events (one statement each: the chain, not the appends, is measured)."""
    phases = (Phase.PARSE, Phase.AUTHZ, Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE)
    pending: list[Any] = []
    for i in range(events):
        if i % len(phases) == 0:
            subject = Subject(
                str(uuid.uuid4()), CLAIM_TENANT, "bench", cmd_hash(["/bin/true"]), None
            )
        pending.append(make_event(subject, phases[i % len(phases)], Outcome.OK, actor="bench"))
        if len(pending) == batch:
            store.append_events(pending)
            pending = []
    store.append_events(pending)


def audit_section(store: Store, tiers: list[int], say: Progress) -> list[Row]:
    """Time `audit verify` (the store's, in-process) as one chain grows through the tiers."""
    out: list[Row] = []
    have = 0
    for events in sorted(tiers):
        fill_chain(store, events - have)
        have = events
        t0 = time.perf_counter()
        report = store.audit.verify()
        elapsed = time.perf_counter() - t0
        assert report.ok, report.problem
        out.append({"events": events, "verify_s": elapsed, "events_per_s": events / elapsed})
        say(f"audit: verify of {events:,} events {elapsed:.3f} s")
    return out


def _timed(fn: Callable[[], object], reps: int) -> float:
    """Median ms of `reps` calls."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return latency_ms(times)["p50_ms"]


@contextmanager
def sweeper(url: str, redis_url: str, tmp: Path) -> Iterator[tuple[Producer, Reaper]]:
    """A producer (store and publisher) and the reaper a worker of tenant `sweep` runs."""
    tenants_file = tmp / "sweep-tenants.yaml"
    tenants_file.write_text(SWEEP_TENANTS_YAML)
    settings = Settings(
        database_url=url,
        broker_url=redis_url,
        tenants_file=tenants_file,
        workdir_root=tmp / "work" / "sweep",
        audit_log=tmp / "sweep-audit.jsonl",
    )
    tenants = load_tenants(tenants_file)
    tenant = tenants.get(SWEEP_TENANT)
    assert tenant is not None
    producer = Producer.from_settings(settings, tenants)
    reaper = Reaper(
        settings=settings,
        tenant=tenant,
        store=producer.store,
        publisher=producer.publisher,
        redis_url=redis_url,
        actor="reaper:bench",
    )
    try:
        yield producer, reaper
    finally:
        producer.close()


def sweeps_section(
    url: str, redis_url: str, tmp: Path, tiers: list[int], say: Progress
) -> list[Row]:
    """The reaper's two scans, then one whole pass, with `tier` expired leases and as many
    unpublished commands of its tenant in the store (on top of what the store holds)."""
    out: list[Row] = []
    # A warning per lost command is the reaper's job; here it would be thousands of lines.
    logging.getLogger("execq.reaper").setLevel(logging.ERROR)
    with sweeper(url, redis_url, tmp) as (producer, reaper):
        store = producer.store
        template = _template(store, SWEEP_TENANT)
        base = count(store.engine, "true")
        expired_q = f"tenant = '{SWEEP_TENANT}' AND state = 'running'"
        unpub_q = f"tenant = '{SWEEP_TENANT}' AND state = 'pending' AND published_at IS NULL"
        lock = reaper.settings.key("reaper", SWEEP_TENANT)
        for tier in sorted(tiers):
            # The previous pass settled or published some: top both backlogs up again.
            clone(store.engine, template, tier - count(store.engine, expired_q), EXPIRED)
            clone(store.engine, template, tier - count(store.engine, unpub_q), UNPUBLISHED)
            expired_ms = _timed(
                lambda: store.expired_leases(tenant=SWEEP_TENANT, limit=100), SWEEP_REPS
            )
            unpublished_ms = _timed(
                lambda: store.unpublished(
                    tenant=SWEEP_TENANT,
                    older_than_s=reaper.outbox_grace_s,
                    republish_after_s=10 * reaper.republish_after_s,
                    secret_grace_s=SECRET_GRACE_S,
                    limit=500,
                ),
                SWEEP_REPS,
            )
            reaper._take_turn()  # the Redis client, made before the clock starts
            assert reaper._redis is not None
            reaper._redis.delete(lock)  # this pass's turn, whoever took the last one
            t0 = time.perf_counter()
            report = reaper.run_once()
            pass_ms = (time.perf_counter() - t0) * 1000
            row: Row = {
                "backlog": tier,
                "store_rows": base,
                "expired_leases_ms": expired_ms,
                "unpublished_ms": unpublished_ms,
                "pass_ms": pass_ms,
                "pass_lost": report.lost + report.requeued,
                "pass_published": report.published,
            }
            say(
                f"sweeps: {tier:>7,} each: scans {expired_ms:.2f} + {unpublished_ms:.2f} ms, "
                f"pass {pass_ms:.0f} ms ({row['pass_lost']} lost, {report.published} published)"
            )
            out.append(row)
    return out


def open_store(url: str) -> Store:
    """The store of a private database, migrated to head."""
    engine = make_engine(url)
    upgrade(engine)
    return Store(engine)
