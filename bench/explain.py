"""`python -m bench.explain`: how PostgreSQL runs each of the store's hot queries.

Each query is the exact SQL the store emits: the store's own method is called with realistic
arguments and its statement is caught at the driver, before it runs. Each is then explained
with `EXPLAIN (ANALYZE, BUFFERS)` in a transaction that is rolled back (claims and updates
change nothing), twice:

- custom: as sent by the driver, the planner seeing the parameter values;
- generic: as a prepared statement's generic plan, which is what PostgreSQL may switch to
  once psycopg has prepared a statement (after 5 executions) and run it 5 more times.

Exits 1 when a hot query reads the `commands` table with a Seq Scan in either plan.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import psycopg
import psycopg.sql
from sqlalchemy import Engine, event, text

from bench.rows import libpq_url
from producer.spec import CommandSpec
from producer.states import State
from producer.store.clock import utcnow
from producer.store.db import make_engine
from producer.store.repository import Store

# The reaper's arguments at the default lease of 30 s (workers/reaper.py).
OUTBOX_GRACE_S, REPUBLISH_AFTER_S, SECRET_GRACE_S, ROLLBACK_GRACE_S = 10.0, 60.0, 300.0, 20.0


class _Caught(Exception):
    """The statement was caught before it ran."""


@dataclass(frozen=True)
class Statement:
    """One statement as the store sends it to psycopg."""

    sql: str
    params: dict[str, Any]


@dataclass(frozen=True)
class HotQuery:
    """A store call, and which of its statements is the hot one."""

    name: str
    call: Callable[[Store], object]
    match: str = r"^\s*(SELECT|UPDATE|WITH)"


@dataclass
class Plan:
    """What EXPLAIN said about one statement."""

    nodes: list[str]
    indexes: list[str]
    seq_scans: list[str]
    ms: float
    buffers: int
    raw: dict[str, Any] = field(repr=False)


@dataclass
class Sample:
    """Ids and names the queries are asked about, taken from the store."""

    tenant: str
    pending: str
    running: str
    running_owner: str
    reverting: str
    settled: str
    batch: str
    key: str


def sample(engine: Engine) -> Sample:
    """Realistic arguments: the busiest tenant and one row of each kind."""
    with engine.connect() as conn:

        def one(sql: str, **params: Any) -> Any:
            row = conn.execute(text(sql), params).first()
            if row is None:
                raise LookupError(f"the store has no row for: {sql}")
            return row

        tenant = one(
            "SELECT tenant FROM commands GROUP BY tenant ORDER BY count(*) DESC LIMIT 1"
        ).tenant
        pick = "SELECT id, lease_owner FROM commands WHERE state = :s ORDER BY created_at DESC"
        running = one(pick, s="running")
        return Sample(
            tenant=tenant,
            pending=one(pick, s="pending").id,
            running=running.id,
            running_owner=running.lease_owner or "",
            reverting=one(
                "SELECT id FROM commands WHERE state = 'reverting' AND lease_owner IS NULL"
            ).id,
            settled=one(pick, s="succeeded").id,
            batch=one("SELECT batch_id FROM commands WHERE batch_id IS NOT NULL").batch_id,
            key=one(
                "SELECT idempotency_key FROM commands WHERE tenant = :t "
                "AND idempotency_key IS NOT NULL",
                t=tenant,
            ).idempotency_key,
        )


def hot_queries(s: Sample) -> list[HotQuery]:
    """The statements every command, worker or reaper pass runs, with realistic arguments."""
    t = s.tenant
    lease = {"worker": "celery@bench", "lease_s": 30.0}
    return [
        HotQuery("claim", lambda st: st.claim(s.pending, tenant=t, **lease)),  # type: ignore[arg-type]
        HotQuery(
            "claim (max_concurrent)",
            lambda st: st.claim(s.pending, tenant=t, max_running=4, **lease),  # type: ignore[arg-type]
            match=r"^\s*UPDATE",
        ),
        HotQuery("claim compensation", lambda st: st.claim_revert(s.reverting, tenant=t, **lease)),  # type: ignore[arg-type]
        HotQuery(
            "renew lease", lambda st: st.renew_lease(s.running, owner=s.running_owner, lease_s=30)
        ),
        HotQuery("cancel requested?", lambda st: st.cancel_requested(s.running)),
        HotQuery(
            "finish (transition)",
            lambda st: st.transition(
                s.running,
                expect_state=State.RUNNING,
                expect_version=2,
                to=State.SUCCEEDED,
                actor="celery@bench",
            ),
        ),
        HotQuery(
            "submit: idempotency lookup",
            lambda st: st.create(
                CommandSpec(tenant=t, argv=["/bin/true"], idempotency_key=s.key), actor="bench"
            ),
            match=r"^\s*SELECT",
        ),
        HotQuery("lookup", lambda st: st.lookup(s.pending)),
        HotQuery("get", lambda st: st.get(s.settled)),
        HotQuery(
            "get: history",
            lambda st: st.get(s.settled, with_transitions=True),
            match=r"FROM transitions",
        ),
        HotQuery("list", lambda st: st.list()),
        HotQuery("list --tenant", lambda st: st.list(tenant=t)),
        HotQuery("list --tenant --state failed", lambda st: st.list(tenant=t, state=State.FAILED)),
        HotQuery(
            "list --tenant --state running", lambda st: st.list(tenant=t, state=State.RUNNING)
        ),
        HotQuery("list --state pending", lambda st: st.list(state=State.PENDING)),
        HotQuery("list --state failed", lambda st: st.list(state=State.FAILED)),
        HotQuery("list --since 1 day", lambda st: st.list(since=utcnow() - timedelta(days=1))),
        HotQuery(
            "list --tenant --since 1 day",
            lambda st: st.list(tenant=t, since=utcnow() - timedelta(days=1)),
        ),
        HotQuery("list --needs-attention", lambda st: st.list(needs_attention=True)),
        HotQuery("needs-attention counts", lambda st: st.attention_counts()),
        HotQuery("batch steps", lambda st: st.list(batch_id=s.batch)),
        HotQuery(
            "reaper: unpublished (outbox)",
            lambda st: st.unpublished(
                tenant=t,
                older_than_s=OUTBOX_GRACE_S,
                republish_after_s=REPUBLISH_AFTER_S,
                secret_grace_s=SECRET_GRACE_S,
                limit=500,
            ),
        ),
        HotQuery("reaper: expired leases", lambda st: st.expired_leases(tenant=t, limit=100)),
        HotQuery(
            "reaper: awaiting rollback",
            lambda st: st.awaiting_rollback(tenant=t, older_than_s=ROLLBACK_GRACE_S, limit=50),
        ),
    ]


@contextmanager
def catching(engine: Engine, pattern: str) -> Iterator[list[Statement]]:
    """Statements matching `pattern` are recorded and stopped before they reach the server."""
    caught: list[Statement] = []
    wanted = re.compile(pattern, re.IGNORECASE)

    def before(
        _conn: Any, _cursor: Any, statement: str, params: Any, _context: Any, _many: bool
    ) -> tuple[str, Any]:
        if not caught and wanted.search(statement):
            caught.append(Statement(statement, dict(params or {})))
            raise _Caught
        return statement, params

    event.listen(engine, "before_cursor_execute", before, retval=True)
    try:
        yield caught
    finally:
        event.remove(engine, "before_cursor_execute", before)


def capture(store: Store, query: HotQuery) -> Statement:
    """The hot statement of one store call, exactly as the store would send it."""
    with catching(store.engine, query.match) as caught, suppress(_Caught):
        query.call(store)
    if not caught:
        raise LookupError(f"{query.name}: the store sent no statement matching {query.match!r}")
    return caught[0]


def _walk(node: dict[str, Any], depth: int = 0) -> Iterator[tuple[int, dict[str, Any]]]:
    yield depth, node
    for child in node.get("Plans", []):
        yield from _walk(child, depth + 1)


def _describe(node: dict[str, Any]) -> str:
    kind = str(node["Node Type"])
    if "Index Name" in node:
        kind += f" using {node['Index Name']}"
    if "Relation Name" in node:
        kind += f" on {node['Relation Name']}"
    return kind


def summarize(raw: dict[str, Any]) -> Plan:
    """Top nodes, indexes used and Seq Scans on commands, from an EXPLAIN (FORMAT JSON)."""
    root = raw["Plan"]
    nodes, indexes, seq = [], [], []
    for depth, node in _walk(root):
        if depth < 4:
            nodes.append("  " * depth + _describe(node))
        if "Index Name" in node:
            indexes.append(str(node["Index Name"]))
        if node["Node Type"] == "Seq Scan" and node.get("Relation Name") == "commands":
            seq.append(_describe(node))
    shared = root.get("Shared Hit Blocks", 0) + root.get("Shared Read Blocks", 0)
    return Plan(nodes, sorted(set(indexes)), seq, float(raw["Execution Time"]), shared, raw)


_PARAM = re.compile(r"%\((\w+)\)s")


def _explain(conn: psycopg.Connection[Any], sql: str, params: Any) -> dict[str, Any]:
    row = conn.execute(sql.encode(), params).fetchone()
    assert row is not None
    value = row[0]
    return dict((json.loads(value) if isinstance(value, str) else value)[0])


def _numbered(sql: str) -> tuple[str, list[str]]:
    """The statement with `$n` for each `%(name)s`, and the names in order."""
    names: list[str] = []

    def number(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    return _PARAM.sub(number, sql).replace("%%", "%"), names


def explain(
    conn: psycopg.Connection[Any], statement: Statement, *, generic: bool, repeat: int = 5
) -> Plan:
    """EXPLAIN (ANALYZE, BUFFERS) of one statement, rolled back; the median time of `repeat`."""
    options = "EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) "
    plans = []
    for _ in range(repeat):
        with conn.transaction(force_rollback=True):
            if not generic:
                plans.append(_explain(conn, options + statement.sql, statement.params))
                continue
            # PREPARE takes $n parameters; EXECUTE gets the values as literals.
            body, names = _numbered(statement.sql)
            conn.execute(f"PREPARE execq_hot AS {body}".encode())
            conn.execute("SET LOCAL plan_cache_mode = force_generic_plan")
            values = psycopg.sql.SQL(", ").join(
                psycopg.sql.Literal(statement.params[n]) for n in names
            )
            call = "EXECUTE execq_hot ({})" if names else "EXECUTE execq_hot"
            query = psycopg.sql.SQL(options + call).format(values)
            plans.append(_explain(conn, query.as_string(conn), None))
            conn.execute("DEALLOCATE execq_hot")
    plan = summarize(plans[-1])
    plan.ms = statistics.median(float(p["Execution Time"]) for p in plans)
    return plan


@dataclass(frozen=True)
class Result:
    """One hot query's custom and generic plans."""

    name: str
    sql: str
    custom: Plan
    generic: Plan

    @property
    def seq_scans(self) -> list[str]:
        return [f"custom: {s}" for s in self.custom.seq_scans] + [
            f"generic: {s}" for s in self.generic.seq_scans
        ]


def run(url: str, *, repeat: int = 5) -> list[Result]:
    """Capture and explain every hot query against the store at `url`."""
    engine = make_engine(url)
    store = Store(engine)
    results = []
    try:
        s = sample(engine)
        with psycopg.connect(libpq_url(url)) as conn:
            for query in hot_queries(s):
                statement = capture(store, query)
                results.append(
                    Result(
                        query.name,
                        statement.sql,
                        explain(conn, statement, generic=False, repeat=repeat),
                        explain(conn, statement, generic=True, repeat=repeat),
                    )
                )
    finally:
        engine.dispose()
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.explain", description=__doc__)
    parser.add_argument("--database-url", required=True, help="postgresql+psycopg://… URL")
    parser.add_argument("--repeat", type=int, default=5, help="runs per plan (median time)")
    parser.add_argument("--sql", action="store_true", help="print each statement too")
    parser.add_argument("--json", action="store_true", help="one JSON object per query")
    args = parser.parse_args(argv)
    try:
        results = run(args.database_url, repeat=args.repeat)
    except (LookupError, psycopg.Error) as exc:
        print(f"bench.explain: {exc}", file=sys.stderr)
        return 2
    with psycopg.connect(libpq_url(args.database_url)) as conn:
        row = conn.execute("SELECT count(*) FROM commands").fetchone()
    rows = int(row[0]) if row else 0
    if args.json:
        for r in results:
            print(
                json.dumps(
                    {
                        "query": r.name,
                        "rows": rows,
                        "custom_ms": r.custom.ms,
                        "custom_indexes": r.custom.indexes,
                        "custom_buffers": r.custom.buffers,
                        "generic_ms": r.generic.ms,
                        "generic_indexes": r.generic.indexes,
                        "generic_buffers": r.generic.buffers,
                        "seq_scans": r.seq_scans,
                    }
                )
            )
    else:
        print(f"commands: {rows:,} rows; times are medians of {args.repeat} runs\n")
        for r in results:
            flag = "SEQ SCAN" if r.seq_scans else "ok"
            print(
                f"== {r.name}: {r.custom.ms:.3f} ms, {r.custom.buffers} buffers "
                f"(generic plan {r.generic.ms:.3f} ms, {r.generic.buffers} buffers) [{flag}]"
            )
            if args.sql:
                print("   " + " ".join(r.sql.split()))
            for line in r.custom.nodes:
                print(f"   {line}")
            if r.generic.nodes != r.custom.nodes:
                print("   generic plan:")
                for line in r.generic.nodes:
                    print(f"     {line}")
            print()
    bad = [(r.name, s) for r in results for s in r.seq_scans]
    for name, scan in bad:
        print(f"bench.explain: {name}: {scan}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
