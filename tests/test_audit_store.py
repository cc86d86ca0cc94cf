"""The store's audit chains on SQLite and PostgreSQL: atomic with transitions, tamper-evident."""

from __future__ import annotations

import itertools
import multiprocessing
from datetime import UTC, datetime

import pytest
from sqlalchemy import text

from producer.audit.events import GENESIS, Outcome, Phase, Subject, make_event
from producer.errors import StaleVersion
from producer.spec import CommandSpec, cmd_hash
from producer.states import State
from producer.store import audit
from producer.store.db import make_engine
from producer.store.repository import Store


def spec(key: str | None = None, tenant: str = "alpha") -> CommandSpec:
    return CommandSpec(tenant=tenant, argv=("/bin/echo", "hi"), idempotency_key=key)


def subject(command_id: str = "c-1", tenant: str = "alpha") -> Subject:
    return Subject(command_id, tenant, "alice", cmd_hash(["/bin/echo", "hi"]), "ab" * 16)


def submit_events(tenant: str = "alpha") -> list:
    s = subject(tenant=tenant)
    return [
        make_event(s, Phase.PARSE, Outcome.OK, actor="producer"),
        make_event(s, Phase.AUTHZ, Outcome.OK, actor="producer"),
    ]


def drop_guards(store: Store) -> None:
    """What someone with full database rights could do before tampering."""
    with store.engine.begin() as conn:
        if store.engine.dialect.name == "postgresql":
            conn.execute(text("DROP TRIGGER audit_events_append_only ON audit_events"))
            conn.execute(text("DROP TRIGGER audit_heads_forward ON audit_heads"))
        else:
            conn.execute(text("DROP TRIGGER audit_events_no_update"))
            conn.execute(text("DROP TRIGGER audit_events_no_delete"))
            conn.execute(text("DROP TRIGGER audit_heads_forward"))


def test_a_created_command_and_its_events_are_one_verifiable_chain(store: Store) -> None:
    created = store.create(spec(), actor="alice", events=submit_events())
    store.transition(
        created.id,
        expect_state=State.PENDING,
        expect_version=1,
        to=State.REVOKED,
        actor="op",
        events=[make_event(subject(created.id), Phase.REVOKE, Outcome.OK, actor="op")],
    )
    events = list(store.audit.events())
    assert [(e.seq, e.phase) for e in events] == [(1, "parse"), (2, "authz"), (3, "revoke")]
    assert events[0].prev_hash == GENESIS
    assert all(b.prev_hash == a.hash for a, b in itertools.pairwise(events))
    report = store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].last_seq == 3


def test_a_stale_transition_writes_no_events(store: Store) -> None:
    created = store.create(spec(), actor="alice", events=submit_events())
    with pytest.raises(StaleVersion):
        store.transition(
            created.id,
            expect_state=State.PENDING,
            expect_version=7,
            to=State.REVOKED,
            actor="op",
            events=[make_event(subject(created.id), Phase.REVOKE, Outcome.OK, actor="op")],
        )
    assert [e.phase for e in store.audit.events()] == ["parse", "authz"]
    assert store.audit.verify().ok


def test_a_repeated_key_writes_no_second_set_of_events(store: Store) -> None:
    store.create(spec("k"), actor="alice", events=submit_events())
    again = store.create(spec("k"), actor="alice", events=submit_events())
    assert again.duplicate
    assert len(list(store.audit.events())) == 2


def test_tenants_have_separate_chains(store: Store) -> None:
    store.create(spec(tenant="alpha"), actor="a", events=submit_events("alpha"))
    store.create(spec(tenant="beta"), actor="b", events=submit_events("beta"))
    report = store.audit.verify()
    assert report.ok
    assert {c: (s.first_seq, s.last_seq) for c, s in report.chains.items()} == {
        "alpha": (1, 2),
        "beta": (1, 2),
    }


def test_no_code_path_and_no_sql_can_update_or_delete_an_event(store: Store) -> None:
    store.create(spec(), actor="alice", events=submit_events())
    for sql in ("UPDATE audit_events SET outcome = 'refused'", "DELETE FROM audit_events"):
        with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
            conn.execute(text(sql))
    assert store.audit.verify().ok


def _fill(store: Store, n: int = 4) -> list[str]:
    ids = []
    for i in range(n):
        created = store.create(spec(f"k{i}"), actor="alice", events=submit_events())
        ids.append(created.id)
    return ids


@pytest.mark.parametrize(
    ("tamper", "expect_seq", "words"),
    [
        ("UPDATE audit_events SET reason = 'nothing to see' WHERE seq = 3", 3, "altered"),
        ("DELETE FROM audit_events WHERE seq = 4", 5, "missing"),
        ("DELETE FROM audit_events WHERE seq = 8", 7, "deleted"),
        ("DELETE FROM audit_events WHERE seq = 1", 2, "deleted"),
        ("UPDATE audit_events SET seq = 100 + seq WHERE seq IN (3, 4)", 5, "missing"),
    ],
)
def test_verify_names_the_first_bad_event(
    store: Store, tamper: str, expect_seq: int, words: str
) -> None:
    _fill(store)
    assert store.audit.verify().ok
    drop_guards(store)
    with store.engine.begin() as conn:
        conn.execute(text(tamper))
    report = store.audit.verify()
    assert not report.ok
    assert report.problem is not None
    assert report.problem.seq == expect_seq, report.problem
    assert words in report.problem.message


def test_a_reordered_event_is_found(store: Store) -> None:
    _fill(store, 3)
    drop_guards(store)
    with store.engine.begin() as conn:
        for a, b in ((2, -2), (3, 2), (-2, 3)):
            conn.execute(text("UPDATE audit_events SET seq = :b WHERE seq = :a"), {"a": a, "b": b})
    report = store.audit.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.seq == 2


@pytest.mark.parametrize(
    ("with_key", "expect_seq", "words"),
    [(False, 3, "without the audit key"), (True, 4, "altered")],
)
def test_an_inserted_event_is_found_even_with_a_correct_hash(
    store: Store, with_key: bool, expect_seq: int, words: str
) -> None:
    # Without the audit key, a correctly computed plain SHA-256 link no longer passes (it
    # did before chains were keyed); with the key, the events after it still break.
    _fill(store, 3)
    events = list(store.audit.events())
    drop_guards(store)
    forged = make_event(subject(), Phase.OVERRIDE, Outcome.OK, actor="intruder").linked(
        "alpha", 3, events[1].hash or "", store.audit.keys() if with_key else None
    )
    with store.engine.begin() as conn:
        conn.execute(text("UPDATE audit_events SET seq = seq + 1000 WHERE seq >= 3"))
        conn.execute(text("UPDATE audit_events SET seq = seq - 999 WHERE seq >= 1000"))
        conn.execute(
            audit.events_t.insert(),
            {
                **audit.row_values(forged),
                "chain": "alpha",
                "seq": 3,
                "prev_hash": forged.prev_hash,
                "hash": forged.hash,
            },
        )
    report = store.audit.verify()
    assert not report.ok and report.problem is not None
    assert report.problem.seq == expect_seq, report.problem
    assert words in report.problem.message


def _append_many(url: str, worker: int, n: int) -> None:
    store = Store(make_engine(url))
    s = Subject(f"w{worker}", "alpha", "p", cmd_hash(["/bin/true"]), None)
    for i in range(n):
        store.append_events(
            [
                make_event(s, Phase.BIND, Outcome.OK, actor=f"w{worker}", detail={"i": i}),
                make_event(s, Phase.EXECUTE, Outcome.OK, actor=f"w{worker}"),
            ]
        )
    store.engine.dispose()


def test_concurrent_writers_in_many_processes_keep_one_valid_chain(
    store: Store, database_url: str
) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_append_many, args=(database_url, w, 40)) for w in range(6)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    report = store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].last_seq == 6 * 40 * 2
    # Each append's two events stayed adjacent: no writer interleaved inside another's.
    events = list(store.audit.events())
    for first, second in zip(events[::2], events[1::2], strict=True):
        assert (first.phase, second.phase) == ("bind", "execute")
        assert first.actor == second.actor


def test_prune_keeps_the_rest_of_the_chain_verifiable(store: Store) -> None:
    _fill(store, 3)
    cutoff = datetime.now(UTC)
    _fill_more = [store.create(spec(f"late{i}"), actor="a", events=submit_events()) for i in "ab"]
    assert _fill_more
    result = store.audit.prune(before=cutoff, actor="ops")
    assert result == {"alpha": 6}
    events = list(store.audit.events())
    assert [e.seq for e in events] == [7, 8, 9, 10, 11]
    assert events[-1].phase == "prune" and events[-1].detail["pruned_events"] == 6
    report = store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].anchor == events[0].prev_hash
    # Deleting past the anchor is still refused.
    with pytest.raises(Exception, match="append-only"), store.engine.begin() as conn:
        conn.execute(text("DELETE FROM audit_events WHERE seq = 7"))
