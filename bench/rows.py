"""`python -m bench.rows`: fill a PostgreSQL store with a month of realistic commands, fast.

Most rows are settled (succeeded, failed, rejected, revoked, reverted) and spread over 30
days, oldest first, as a real store grows; the newest few thousand are what the workers and
the reaper look for: pending (published or not), running with leases (a few expired),
compensations under way, failures awaiting their rollback, commands needing a person, and
batches. The rows are made by the server (`INSERT … SELECT … generate_series`), so a million
take seconds, not minutes. Audit events are not generated: no hot query reads them.
"""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from sqlalchemy.engine import make_url

from producer.store.db import make_engine
from producer.store.migrate import upgrade

DAYS = 30
CHUNK = 100_000

_COLUMNS = (
    "id, tenant, idempotency_key, spec_hash, principal, argv, env, secret_names, has_secrets, "
    "timeout_s, compensate, rollback_on_failure, retry_safe, max_retries, revert_count, "
    "needs_attention, batch_id, batch_step, held, state, version, attempts, exit_code, stdout, "
    "stderr, stdout_bytes, stderr_bytes, output_truncated, redacted, failure_reason, enforced, "
    "worker, lease_owner, lease_expires_at, cancel_requested, published_at, publish_count, "
    "trace_id, last_actor, compensation, created_at, updated_at, started_at, finished_at"
)

# One row per generated number `g` of a segment. A segment fills in {state}, {created},
# {rollback}, {batch}, {lease_owner}, {lease_expires}, {published} and {held}; everything
# else follows from the state, as the workers would have written it.
_INSERT = f"""
INSERT INTO commands ({_COLUMNS})
SELECT gen_random_uuid()::text, s.tenant,
  CASE WHEN s.r3 < 0.5 THEN 'k-' || %(tag)s || '-' || %(segment)s || '-' || s.g END,
  md5(s.g::text) || md5(%(tag)s || s.g::text), 'svc-' || s.tenant,
  json_build_array('/bin/echo', 'job', s.g::text), '{{{{}}}}'::json, '[]'::json, s.r3 < 0.03,
  30, CASE WHEN s.rollback THEN json_build_array('/bin/true') END, s.rollback,
  s.r3 > 0.8, 0, CASE WHEN x.state IN ('reverted', 'revert_failed') THEN 1 ELSE 0 END,
  x.state = 'revert_failed', s.batch_id, s.batch_step, {{held}}, x.state,
  CASE x.state WHEN 'pending' THEN 1 WHEN 'rejected' THEN 1 WHEN 'running' THEN 2
    WHEN 'revoked' THEN 2 WHEN 'reverting' THEN 4 WHEN 'reverted' THEN 5
    WHEN 'revert_failed' THEN 5 ELSE 3 END,
  1, CASE WHEN x.state IN ('succeeded', 'reverting', 'reverted', 'revert_failed') THEN 0
    WHEN x.failure_reason = 'exit_code' THEN 1 END,
  CASE WHEN x.ran THEN 'job ' || s.g || ' done' || chr(10) END,
  CASE WHEN x.ran THEN '' END,
  CASE WHEN x.ran THEN 16 END, CASE WHEN x.ran THEN 0 END, false, false, x.failure_reason,
  CASE WHEN x.state <> 'rejected' THEN '{{{{"timeout_s": 30, "memory_mb": 256}}}}'::json END,
  CASE WHEN x.ran THEN s.worker END, {{lease_owner}}, {{lease_expires}}, false,
  {{published}}, CASE WHEN {{published}} IS NULL THEN 0 ELSE 1 END,
  md5(s.g::text || %(tag)s), COALESCE(s.worker, 'producer'),
  CASE WHEN x.state IN ('reverted', 'revert_failed')
    THEN json_build_object('exit_code', CASE WHEN x.state = 'reverted' THEN 0 ELSE 1 END) END,
  s.created_at,
  s.created_at + CASE WHEN x.terminal THEN s.took ELSE interval '0' END,
  CASE WHEN x.ran THEN s.created_at + interval '20 milliseconds' END,
  CASE WHEN x.terminal THEN s.created_at + s.took END
FROM (
  SELECT g, r1, r2, r3,
    'tenant-' || lpad(floor(%(tenants)s * power(r2, 1.5))::int::text, 2, '0') AS tenant,
    'celery@host-' || (g %% 8) AS worker,
    {{created}} AS created_at,
    make_interval(secs => 0.05 + 3 * r3 * r3) AS took,
    {{rollback}} AS rollback, {{batch}}
  FROM (SELECT g, random() AS r1, random() AS r2, random() AS r3
        FROM generate_series(%(lo)s::int, %(hi)s::int - 1) AS g) AS n
) AS s
CROSS JOIN LATERAL (SELECT {{state}} AS state) AS st
CROSS JOIN LATERAL (
  SELECT st.state,
    st.state NOT IN ('pending', 'rejected', 'revoked') AS ran,
    st.state IN ('succeeded', 'failed', 'rejected', 'revoked', 'reverted', 'revert_failed')
      AS terminal,
    CASE st.state WHEN 'rejected' THEN 'policy'
      WHEN 'failed' THEN CASE WHEN s.r1 < 0.70 THEN 'exit_code' WHEN s.r1 < 0.85 THEN 'timeout'
        WHEN s.r1 < 0.92 THEN 'memory_limit' WHEN s.r1 < 0.96 THEN 'worker_lost'
        ELSE 'secrets_unavailable' END END AS failure_reason
) AS x
"""  # noqa: S608 (only constants are interpolated; values are bound)

# Commands settled over the month: the bulk of the table, in creation order.
_SETTLED = (
    "CASE WHEN s.r1 < 0.860 THEN 'succeeded' WHEN s.r1 < 0.940 THEN 'failed' "
    "WHEN s.r1 < 0.965 THEN 'rejected' WHEN s.r1 < 0.980 THEN 'revoked' ELSE 'reverted' END"
)
_MONTH = "%(now)s - make_interval(days => %(days)s) * (1 - g::float8 / %(n)s) - interval '10 min'"
_RECENT = "%(now)s - make_interval(secs => 600 * r1)"
_NO_BATCH = "NULL::text AS batch_id, NULL::int AS batch_step"
_IN_BATCH = "md5(%(tag)s || 'batch' || (g / 3))::uuid::text AS batch_id, (g %% 3) + 1 AS batch_step"
_SENT = "s.created_at + interval '3 milliseconds'"


@dataclass(frozen=True)
class Segment:
    """One kind of row: how many, and the SQL that makes them differ from the rest."""

    name: str
    share: float  # of all rows
    minimum: int  # even a small store has some of these
    state: str
    created: str = _RECENT
    rollback: str = "r3 < 0.05"
    batch: str = _NO_BATCH
    lease_owner: str = "NULL"
    lease_expires: str = "NULL::timestamptz"
    published: str = _SENT
    held: str = "false"


SEGMENTS = (
    # A failure with rollback_on_failure was rolled back: settled ones never wait for it.
    Segment(
        "settled",
        0.0,
        0,
        _SETTLED,
        created=_MONTH,
        rollback="r3 < 0.05 AND NOT r1 BETWEEN 0.86 AND 0.94",
    ),
    Segment("batch-step", 0.006, 30, "'succeeded'", created=_MONTH, batch=_IN_BATCH),
    Segment("needs-attention", 0.0002, 5, "'revert_failed'", created=_MONTH, rollback="true"),
    Segment(
        "awaiting-rollback",
        0.00002,
        3,
        "'failed'",
        created="%(now)s - make_interval(secs => 3600 + 600 * r1)",
        rollback="true",
    ),
    Segment("pending", 0.0018, 40, "'pending'"),
    Segment("pending-unpublished", 0.0001, 5, "'pending'", published="NULL::timestamptz"),
    Segment(
        "running",
        0.0014,
        30,
        "'running'",
        lease_owner="s.worker",
        lease_expires="%(now)s + make_interval(secs => 30 * s.r1)",
    ),
    Segment(
        "running-lease-expired",
        0.0001,
        5,
        "'running'",
        lease_owner="s.worker",
        lease_expires="%(now)s - make_interval(secs => 1 + 600 * s.r1)",
    ),
    Segment(
        "reverting",
        0.00005,
        4,
        "'reverting'",
        rollback="true",
        # Every other row (not a coin flip: with the minimum of 4 rows, one store in 16 had
        # no compensation waiting for a worker, which bench.explain needs).
        lease_owner="CASE WHEN mod(s.g, 2) = 0 THEN s.worker END",
        lease_expires="CASE WHEN mod(s.g, 2) = 0 THEN %(now)s + make_interval(secs => 30) END",
    ),
)

# Each command's history as its transitions would have written it, one row per version.
_PATHS = """CASE c.state
  WHEN 'pending' THEN ARRAY['pending'] WHEN 'rejected' THEN ARRAY['rejected']
  WHEN 'running' THEN ARRAY['pending', 'running'] WHEN 'revoked' THEN ARRAY['pending', 'revoked']
  WHEN 'reverting' THEN ARRAY['pending', 'running', 'succeeded', 'reverting']
  WHEN 'reverted' THEN ARRAY['pending', 'running', 'succeeded', 'reverting', 'reverted']
  WHEN 'revert_failed' THEN
    ARRAY['pending', 'running', 'succeeded', 'reverting', 'revert_failed']
  ELSE ARRAY['pending', 'running', c.state] END"""
_HISTORY = f"""
INSERT INTO transitions (command_id, from_state, to_state, version, at, actor, reason)
SELECT c.id, ({_PATHS})[v - 1], ({_PATHS})[v], v,
  c.created_at + (v - 1) * (c.updated_at - c.created_at) / c.version, c.last_actor, NULL
FROM commands c CROSS JOIN LATERAL generate_series(1, c.version) AS v
"""  # noqa: S608 (only constants are interpolated)
_BATCHES = """
INSERT INTO batches (id, tenant, idempotency_key, spec_hash, principal, trace_id, state,
  version, steps, failed_step, compensate_on_revoke, error, last_actor, created_at,
  updated_at, finished_at)
SELECT c.batch_id, min(c.tenant), NULL, md5(c.batch_id) || md5(c.batch_id), NULL, NULL,
  'succeeded', 3, 3, NULL, false, NULL, 'worker', min(c.created_at), max(c.updated_at),
  max(c.updated_at)
FROM commands c WHERE c.batch_id IS NOT NULL GROUP BY c.batch_id
"""
# Steps are generated with the same tenant per batch: the first step's tenant wins.
_BATCH_TENANTS = """
UPDATE commands c SET tenant = b.tenant FROM batches b
WHERE c.batch_id = b.id AND c.tenant <> b.tenant
"""


@dataclass(frozen=True)
class Summary:
    """What was generated, and how long it took."""

    rows: int
    by_segment: dict[str, int]
    by_state: dict[str, int]
    transitions: int
    batches: int
    seconds: float


def counts(rows: int) -> dict[str, int]:
    """Rows per segment: the settled bulk takes what the others leave."""
    others = {s.name: max(s.minimum, round(rows * s.share)) for s in SEGMENTS[1:]}
    others["batch-step"] -= others["batch-step"] % 3  # whole batches of three steps
    settled = rows - sum(others.values())
    if settled < 0:
        raise ValueError(f"--rows {rows} is too small: at least {sum(others.values())} needed")
    return {SEGMENTS[0].name: settled, **others}


def _drop_for_load(conn: psycopg.Connection[tuple[object, ...]]) -> list[str]:
    """Drop what makes a bulk load slow; returns the statements that make it all again."""
    indexes = conn.execute(
        """SELECT i.relname, pg_get_indexdef(i.oid) FROM pg_index x
        JOIN pg_class i ON i.oid = x.indexrelid JOIN pg_class t ON t.oid = x.indrelid
        WHERE t.relname IN ('commands', 'transitions')
          AND t.relnamespace = current_schema()::regnamespace
          AND NOT EXISTS (SELECT 1 FROM pg_constraint c WHERE c.conindid = x.indexrelid)"""
    ).fetchall()
    keys = conn.execute(
        """SELECT conname, pg_get_constraintdef(oid) FROM pg_constraint
        WHERE conrelid = 'transitions'::regclass AND contype = 'f'"""
    ).fetchall()
    again: list[str] = []
    for name, definition in indexes:
        conn.execute(f'DROP INDEX "{name}"'.encode())
        again.append(str(definition))
    for name, definition in keys:
        conn.execute(f'ALTER TABLE transitions DROP CONSTRAINT "{name}"'.encode())
        again.append(f'ALTER TABLE transitions ADD CONSTRAINT "{name}" {definition}')
    return again


def libpq_url(url: str) -> str:
    """The libpq form of a `postgresql+psycopg://` SQLAlchemy URL."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "postgresql":
        raise ValueError(f"a PostgreSQL URL is needed, got {parsed.drivername}://")
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


def generate(
    url: str,
    rows: int,
    *,
    tenants: int = 20,
    reset: bool = False,
    progress: Callable[[str], None] = lambda _: None,
) -> Summary:
    """Migrate the store to head, then add `rows` commands (it must be empty, or `reset`)."""
    if not 1 <= tenants <= 99:
        raise ValueError(f"--tenants must be between 1 and 99, got {tenants}")
    plan = counts(rows)
    engine = make_engine(url)
    try:
        upgrade(engine)
    finally:
        engine.dispose()
    started = time.monotonic()
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:8]
    with psycopg.connect(libpq_url(url)) as conn:
        if reset:
            conn.execute("TRUNCATE commands, transitions, snapshots, batches")
        existing = conn.execute("SELECT count(*) FROM commands").fetchone()
        if existing and existing[0]:
            raise ValueError(
                f"the store holds {existing[0]} commands already: pass --reset to empty it "
                "(audit events are kept)"
            )
        # The history trigger would write one transition per row, one row at a time; the
        # whole history is written below in one statement instead. Secondary indexes and
        # the history's foreign key are dropped for the load and made again in one pass
        # each, from their own definitions. All of it is one transaction: if anything
        # fails, the schema is back as it was.
        conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
        conn.execute("ALTER TABLE commands DISABLE TRIGGER commands_created")
        rebuilt = _drop_for_load(conn)
        done = 0
        for segment in SEGMENTS:
            n = plan[segment.name]
            sql = _INSERT.format(
                state=segment.state,
                created=segment.created,
                rollback=segment.rollback,
                batch=segment.batch,
                lease_owner=segment.lease_owner,
                lease_expires=segment.lease_expires,
                published=segment.published,
                held=segment.held,
            )
            for lo in range(0, n, CHUNK):
                hi = min(n, lo + CHUNK)
                params = {
                    "tag": tag,
                    "segment": segment.name,
                    "tenants": tenants,
                    "lo": lo,
                    "hi": hi,
                    "n": max(n, 1),
                    "now": now,
                    "days": DAYS,
                }
                conn.execute(sql.encode(), params)
                done += hi - lo
                progress(
                    f"{done:>10,} / {rows:,} commands  ({segment.name}, "
                    f"{time.monotonic() - started:.1f} s)"
                )
        conn.execute(_BATCHES)
        conn.execute(_BATCH_TENANTS)
        progress(f"batches written ({time.monotonic() - started:.1f} s)")
        history = conn.execute(_HISTORY).rowcount
        progress(f"{history:,} transitions written ({time.monotonic() - started:.1f} s)")
        for statement in rebuilt:
            conn.execute(statement.encode())
        progress(f"indexes and constraints made again ({time.monotonic() - started:.1f} s)")
        conn.execute("ALTER TABLE commands ENABLE TRIGGER commands_created")
        batches = conn.execute("SELECT count(*) FROM batches").fetchone()
        by_state: dict[Any, Any] = dict(
            conn.execute("SELECT state, count(*) FROM commands GROUP BY state ORDER BY 2 DESC")
        )
    # A store in steady state has been vacuumed and analysed (autovacuum): visibility map
    # set for index-only scans, statistics for the planner.
    with psycopg.connect(libpq_url(url), autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE) commands, transitions, batches")
    progress(f"vacuumed and analysed ({time.monotonic() - started:.1f} s)")
    return Summary(
        rows=rows,
        by_segment=plan,
        by_state={str(k): int(v) for k, v in by_state.items()},
        transitions=history,
        batches=int(batches[0]) if batches else 0,
        seconds=time.monotonic() - started,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.rows", description=__doc__)
    parser.add_argument("--database-url", required=True, help="postgresql+psycopg://… URL")
    parser.add_argument("--rows", type=int, default=1_000_000, help="commands to generate")
    parser.add_argument("--tenants", type=int, default=20, help="tenants (skewed sizes)")
    parser.add_argument(
        "--reset", action="store_true", help="empty commands, history and batches first"
    )
    args = parser.parse_args(argv)
    try:
        summary = generate(
            args.database_url,
            args.rows,
            tenants=args.tenants,
            reset=args.reset,
            progress=lambda line: print(line, flush=True),
        )
    except (ValueError, psycopg.Error) as exc:
        print(f"bench.rows: {exc}", file=sys.stderr)
        return 2
    print(f"\n{summary.rows:,} commands in {summary.seconds:.1f} s")
    print("by segment: " + ", ".join(f"{k} {v:,}" for k, v in summary.by_segment.items()))
    print("by state:   " + ", ".join(f"{k} {v:,}" for k, v in summary.by_state.items()))
    print(f"transitions {summary.transitions:,}, batches {summary.batches:,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
