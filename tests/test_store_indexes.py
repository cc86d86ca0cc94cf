"""The store's hot queries read `commands` through an index, not a Seq Scan (PostgreSQL).

A small store made by the benchmark's own generator (`bench.rows`) stands in for a big one:
the plans checked are the ones `python -m bench.explain` reports at a million rows.
"""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from bench.explain import HotQuery, Sample, capture, explain, hot_queries, sample
from bench.rows import generate, libpq_url
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.repository import Store
from tests.conftest import PG_ADMIN_URL, _reset_pg, fresh_database

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


@pytest.fixture(scope="module")
def new_store() -> Iterator[Filled]:
    """A store that was never analysed: one tenant's first burst of 3000 commands, two of
    them running and one being rolled back (autovacuum off, so nothing analyses it)."""
    with fresh_database("execq_new_store") as name:
        url = sa.make_url(PG_ADMIN_URL).set(database=name).render_as_string(False)
        store = Store(make_engine(url))
        upgrade(store.engine)
        with store.engine.begin() as c:
            c.execute(sa.text("ALTER TABLE commands SET (autovacuum_enabled = off)"))
        spec = CommandSpec(tenant="burst", argv=["/bin/true"])
        ids = [store.create(spec, actor="test").id for _ in range(3000)]
        running = [store.claim(i, tenant="burst", worker="w@test", lease_s=30) for i in ids[:3]]
        assert all(running)
        last = running[2]
        assert last is not None
        store.transition(
            last.id,
            expect_state=State.RUNNING,
            expect_version=last.version,
            to=State.FAILED,
            actor="test",
        )
        store.transition(
            last.id,
            expect_state=State.FAILED,
            expect_version=last.version + 1,
            to=State.REVERTING,
            actor="test",
            lease_owner=None,
        )
        never = "SELECT reltuples FROM pg_class WHERE relname = 'commands'"
        with psycopg.connect(libpq_url(url)) as conn:
            assert conn.execute(never).fetchone() == (-1.0,)  # never analysed
            yield store, conn, Sample("burst", ids[-1], ids[0], "w@test", ids[2], *"xxx")
        store.engine.dispose()


# Statements about one command, by id: each must reach it through the primary key whatever
# the statistics say, never by scanning an index of the tenant's or of the live rows.
BY_ID = [
    "claim",
    "claim compensation",
    "renew lease",
    "cancel requested?",
    "finish (transition)",
    "lookup",
]


def _pkey_only(conn: psycopg.Connection[tuple[object, ...]], statement: object, name: str) -> None:
    for generic in (False, True):
        plan = explain(conn, statement, generic=generic, repeat=1)  # type: ignore[arg-type]
        on_commands = [i for i in plan.indexes if "commands" in i]
        assert on_commands == ["commands_pkey"], (name, generic, plan.nodes)


@pytest.mark.parametrize("name", BY_ID)
def test_a_statement_about_one_command_uses_the_primary_key_in_a_new_store(
    new_store: Filled, name: str
) -> None:
    # The trap: without statistics every index with a usable condition looks as good as the
    # primary key for "at most one row". A claim that let the planner use its tenant (which
    # leads four indexes) read every pending command of the tenant through one of them:
    # O(backlog) per claim, exactly when there is a backlog.
    store, conn, s = new_store
    _pkey_only(conn, capture(store, _query(name, s)), name)


@pytest.mark.parametrize("name", BY_ID)
def test_a_statement_about_one_command_uses_the_primary_key_with_stale_statistics(
    filled: Filled, name: str
) -> None:
    # Statistics gathered while nothing was live (a quiet night), then a burst: the partial
    # indexes of live rows look empty, and state = 'pending' proves ix_commands_outbox_due's
    # predicate (state IN ('pending', 'reverting')).
    store, conn, s = filled
    statement = capture(store, _query(name, s))
    live = "state IN ('pending', 'running', 'reverting')"
    with conn.transaction(force_rollback=True):
        # The version guard would refuse these edits; triggers are off for this transaction,
        # and every change below (the statistics too) is rolled back with it.
        conn.execute("SET LOCAL session_replication_role = replica")
        copy = (
            f"CREATE TEMP TABLE live ON COMMIT DROP AS SELECT id, state FROM commands WHERE {live}"
        )
        conn.execute(copy.encode())
        conn.execute(f"UPDATE commands SET state = 'succeeded' WHERE {live}".encode())
        conn.execute("ANALYZE commands")
        conn.execute("UPDATE commands c SET state = l.state FROM live l WHERE c.id = l.id")
        _pkey_only(conn, statement, name)
