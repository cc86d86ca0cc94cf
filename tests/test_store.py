"""The store on SQLite and PostgreSQL: idempotent creation, conditional transitions, history."""

from __future__ import annotations

import multiprocessing
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from producer.errors import IdempotencyConflict, IllegalTransition, NotFound, StaleVersion
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.repository import Store


def spec(key: str | None = None, argv: tuple[str, ...] = ("/bin/echo", "hi")) -> CommandSpec:
    return CommandSpec(tenant="alpha", argv=argv, idempotency_key=key)


def test_create_records_a_pending_command_with_one_history_row(store: Store) -> None:
    created = store.create(spec(), actor="tester", reason="submitted")
    rec = store.get(created.id, with_transitions=True)
    assert (rec.state, rec.version, rec.attempts) == (State.PENDING, 1, 1)
    assert [(t.from_state, t.to_state, t.actor) for t in rec.transitions] == [
        (None, State.PENDING, "tester")
    ]


def test_a_repeated_key_returns_the_first_command(store: Store) -> None:
    first = store.create(spec("k1"), actor="t")
    again = store.create(spec("k1"), actor="t")
    assert again.duplicate and again.id == first.id
    assert store.count() == 1


def test_the_same_key_with_another_spec_is_a_conflict(store: Store) -> None:
    first = store.create(spec("k1"), actor="t")
    with pytest.raises(IdempotencyConflict) as info:
        store.create(spec("k1", ("/bin/echo", "other")), actor="t")
    assert info.value.command_id == first.id


def test_keys_are_per_tenant(store: Store) -> None:
    a = store.create(spec("k1"), actor="t")
    b = store.create(
        CommandSpec(tenant="beta", argv=("/bin/echo", "hi"), idempotency_key="k1"), actor="t"
    )
    assert a.id != b.id and not b.duplicate


def test_a_transition_bumps_the_version_and_writes_history(store: Store) -> None:
    cid = store.create(spec(), actor="t").id
    v = store.transition(
        cid,
        expect_state=State.PENDING,
        expect_version=1,
        to=State.REVOKED,
        actor="op",
        reason="not needed",
    )
    rec = store.get(cid, with_transitions=True)
    assert v == 2 and rec.version == 2 and rec.state is State.REVOKED
    assert rec.transitions[-1].reason == "not needed" and rec.transitions[-1].version == 2


def test_a_stale_version_or_state_loses(store: Store) -> None:
    cid = store.create(spec(), actor="t").id
    store.transition(cid, expect_state=State.PENDING, expect_version=1, to=State.REVOKED, actor="a")
    with pytest.raises(StaleVersion):
        store.transition(
            cid, expect_state=State.PENDING, expect_version=1, to=State.REVOKED, actor="b"
        )
    assert len(store.get(cid, with_transitions=True).transitions) == 2


def test_illegal_transitions_never_reach_the_database(store: Store) -> None:
    cid = store.create(spec(), actor="t").id
    with pytest.raises(IllegalTransition):
        store.transition(
            cid, expect_state=State.PENDING, expect_version=1, to=State.SUCCEEDED, actor="x"
        )
    assert store.get(cid).version == 1


def test_unknown_ids_are_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("00000000-0000-4000-8000-000000000000")


def test_only_one_of_many_racing_actors_wins_a_transition(store: Store) -> None:
    cid = store.create(spec(), actor="t").id
    wins: list[str] = []
    barrier = threading.Barrier(8)

    def act(i: int) -> None:
        barrier.wait()
        try:
            store.transition(
                cid,
                expect_state=State.PENDING,
                expect_version=1,
                to=State.REVOKED if i % 2 else State.RUNNING,
                actor=f"a{i}",
            )
            wins.append(f"a{i}")
        except StaleVersion:
            pass

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(act, range(8)))
    rec = store.get(cid, with_transitions=True)
    assert len(wins) == 1
    assert rec.version == 2 and len(rec.transitions) == 2 and rec.transitions[-1].actor == wins[0]


def test_only_one_claim_wins_and_the_tenant_must_match(store: Store) -> None:
    cid = store.create(spec(), actor="t").id
    assert store.claim(cid, tenant="beta", worker="w0", lease_s=5) is None
    results = []
    barrier = threading.Barrier(6)

    def claim(i: int) -> None:
        barrier.wait()
        results.append(store.claim(cid, tenant="alpha", worker=f"w{i}", lease_s=5))

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(claim, range(6)))
    won = [r for r in results if r is not None]
    assert len(won) == 1
    rec = store.get(cid)
    assert rec.state is State.RUNNING and rec.lease_expires_at is not None


def test_an_idempotency_storm_from_threads_makes_one_command(store: Store) -> None:
    barrier = threading.Barrier(16)

    def submit(_: int) -> tuple[str, bool]:
        barrier.wait()
        created = store.create(spec("storm"), actor="t")
        return created.id, created.duplicate

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(submit, range(16)))
    assert len({cid for cid, _ in results}) == 1
    assert sum(1 for _, dup in results if not dup) == 1
    assert store.count() == 1


def _storm_process(
    url: str,
    barrier: multiprocessing.synchronize.Barrier,
    out: multiprocessing.Queue[tuple[str, bool]],
) -> None:
    s = Store(make_engine(url))
    barrier.wait()
    for _ in range(5):
        created = s.create(spec("pstorm"), actor="p")
        out.put((created.id, created.duplicate))
    s.engine.dispose()


def test_an_idempotency_storm_from_processes_makes_one_command(
    store: Store, database_url: str
) -> None:
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(6)
    out: multiprocessing.Queue[tuple[str, bool]] = ctx.Queue()
    procs = [
        ctx.Process(target=_storm_process, args=(database_url, barrier, out)) for _ in range(6)
    ]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(30)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert len({cid for cid, _ in results}) == 1
    assert sum(1 for _, dup in results if not dup) == 1
    assert store.count() == 1


def test_the_database_refuses_a_state_change_without_a_version_bump(store: Store) -> None:
    import sqlalchemy as sa

    cid = store.create(spec(), actor="t").id
    for bad in ("state = 'succeeded'", "version = version + 2"):
        refused = pytest.raises(sa.exc.DBAPIError, match="without bumping its version")
        with refused, store.engine.begin() as conn:
            conn.execute(sa.text(f"UPDATE commands SET {bad} WHERE id = :id"), {"id": cid})
    assert store.get(cid).state is State.PENDING


def test_every_version_bump_writes_history_whoever_writes_the_row(store: Store) -> None:
    import sqlalchemy as sa

    cid = store.create(spec(), actor="t").id
    with store.engine.begin() as conn:
        conn.execute(
            sa.text(
                "UPDATE commands SET state = 'revoked', version = version + 1, "
                "last_actor = 'dba', last_reason = 'manual fix' WHERE id = :id"
            ),
            {"id": cid},
        )
        conn.execute(sa.text("UPDATE commands SET lease_pid = 42 WHERE id = :id"), {"id": cid})
    history = store.get(cid, with_transitions=True).transitions
    assert [(t.from_state, t.to_state, t.version, t.actor, t.reason) for t in history] == [
        (None, State.PENDING, 1, "t", None),
        (State.PENDING, State.REVOKED, 2, "dba", "manual fix"),
    ]


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_the_benchmark_can_empty_a_store_whatever_tables_reference_commands(
    store: Store,
) -> None:
    import sqlalchemy as sa

    from bench.systems import _TRUNCATED

    store.create(spec("k"), actor="t")
    with store.engine.begin() as conn:
        conn.execute(sa.text(f"TRUNCATE {_TRUNCATED}"))
    assert store.count() == 0
