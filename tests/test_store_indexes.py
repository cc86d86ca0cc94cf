"""The store's hot queries read `commands` through an index, not a Seq Scan (PostgreSQL).

A small store made by the benchmark's own generator (`bench.rows`) stands in for a big one:
the plans checked are the ones `python -m bench.explain` reports at a million rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from bench.explain import HotQuery, Sample, capture, explain, hot_queries, sample
from bench.rows import generate, libpq_url
from producer.store.db import make_engine
from producer.store.repository import Store
from tests.conftest import _reset_pg

ROWS = 20_000
Filled = tuple[Store, "psycopg.Connection[tuple[object, ...]]", Sample]
# The reaper's scans, each with the partial index made for it (migration 0004).
PARTIAL = {
    "reaper: unpublished (outbox)": "ix_commands_outbox_due",
    "reaper: expired leases": "ix_commands_live_leases",
    "reaper: awaiting rollback": "ix_commands_rollback_due",
}


@pytest.fixture(scope="module")
def filled(pg_server: str) -> Iterator[Filled]:
    """A store of ROWS realistic commands, analysed, with a connection to explain on."""
    _reset_pg(pg_server)
    generate(pg_server, ROWS)
    store = Store(make_engine(pg_server))
    with psycopg.connect(libpq_url(pg_server)) as conn:
        yield store, conn, sample(store.engine)
    store.engine.dispose()


def _queries() -> list[str]:
    placeholder = Sample(*("x" for _ in range(8)))
    return [q.name for q in hot_queries(placeholder)]


def _query(name: str, s: Sample) -> HotQuery:
    return next(q for q in hot_queries(s) if q.name == name)


@pytest.mark.parametrize("name", _queries())
def test_a_hot_query_never_seq_scans_commands(filled: Filled, name: str) -> None:
    store, conn, s = filled
    statement = capture(store, _query(name, s))
    for generic in (False, True):
        plan = explain(conn, statement, generic=generic, repeat=1)
        assert plan.seq_scans == [], (name, "generic" if generic else "custom", plan.nodes)
        assert plan.indexes, (name, plan.nodes)


@pytest.mark.parametrize("name", sorted(PARTIAL))
def test_the_reaper_scans_use_their_partial_index_even_as_prepared_statements(
    filled: Filled, name: str
) -> None:
    store, conn, s = filled
    statement = capture(store, _query(name, s))
    # The states are literals in the SQL: the planner can match them to the index predicate
    # without seeing parameter values.
    assert "'" in statement.sql.split("WHERE", 1)[1]
    for generic in (False, True):
        assert PARTIAL[name] in explain(conn, statement, generic=generic, repeat=1).indexes


def test_without_indexes_the_rollback_sweep_seq_scans_and_the_check_says_so(
    filled: Filled,
) -> None:
    store, conn, s = filled
    statement = capture(store, _query("reaper: awaiting rollback", s))
    with conn.transaction(force_rollback=True):
        # Every index on commands but its primary key, for this transaction only.
        conn.execute("ALTER TABLE commands DROP CONSTRAINT uq_commands_tenant_key")
        for (name,) in conn.execute(
            "SELECT indexname FROM pg_indexes WHERE tablename = 'commands' "
            "AND indexname <> 'commands_pkey'"
        ).fetchall():
            conn.execute(f'DROP INDEX "{name}"'.encode())
        plan = explain(conn, statement, generic=False, repeat=1)
    assert plan.seq_scans == ["Seq Scan on commands"]


# Statements about one command, by id: each must reach it through the primary key whatever
# the statistics say, never by scanning a partial index of live rows.
BY_ID = [
    "claim",
    "claim compensation",
    "renew lease",
    "cancel requested?",
    "finish (transition)",
    "lookup",
]


@pytest.mark.parametrize("name", BY_ID)
def test_a_statement_about_one_command_uses_the_primary_key_with_stale_statistics(
    filled: Filled, name: str
) -> None:
    # The trap: statistics gathered while nothing was live (a quiet night) make the partial
    # indexes look empty; then a burst arrives. A claim that let the planner prove a partial
    # index's predicate (state = 'pending' implies state IN ('pending', 'reverting')) picked
    # that index, as the cheapest way to find "at most one row", and scanned every pending
    # command of the tenant: O(backlog) per claim, exactly when there is a backlog.
    store, conn, s = filled
    statement = capture(store, _query(name, s))
    live = "state IN ('pending', 'running', 'reverting')"
    with conn.transaction(force_rollback=True):
        # The version guard would refuse these edits; triggers are off for this transaction.
        conn.execute("SET LOCAL session_replication_role = replica")
        copy = (
            f"CREATE TEMP TABLE live ON COMMIT DROP AS SELECT id, state FROM commands WHERE {live}"
        )
        conn.execute(copy.encode())
        conn.execute(f"UPDATE commands SET state = 'succeeded' WHERE {live}".encode())
        conn.execute("ANALYZE commands")  # in this transaction only, rolled back below
        conn.execute("UPDATE commands c SET state = l.state FROM live l WHERE c.id = l.id")
        for generic in (False, True):
            plan = explain(conn, statement, generic=generic, repeat=1)
            on_commands = [i for i in plan.indexes if "commands" in i]
            assert on_commands == ["commands_pkey"], (name, generic, plan.nodes)
