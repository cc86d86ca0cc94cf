"""A command (or batch) named by a unique prefix of its id, 8 characters or more."""

from __future__ import annotations

import pytest

from producer.client import Producer
from producer.errors import AmbiguousId, NotFound
from producer.spec import CommandSpec
from producer.states import State
from producer.store.clock import utcnow
from producer.store.repository import Store
from tests.conftest import Env, run_cli

TWINS = ("3f2a91c0-5b1e-4c4e-9a43-6f0d2b7e8a19", "3f2a91c0-5b1f-4c4e-9a43-6f0d2b7e8a19")
LONER = "7d0c44e2-11aa-4bbb-8ccc-0123456789ab"


def make(store: Store, command_id: str, tenant: str = "alpha") -> str:
    spec = CommandSpec(tenant=tenant, argv=("/bin/echo", "hi"))
    return store.create(spec, actor="t", command_id=command_id).id


def test_an_exact_id_or_a_unique_prefix_of_8_or_more_characters_names_the_command(
    store: Store,
) -> None:
    make(store, LONER)
    for given in (LONER, LONER[:8], LONER[:13], LONER[:35]):
        assert store.resolve_id(given) == LONER


def test_a_prefix_under_8_characters_is_refused_saying_so_even_when_unique(
    store: Store,
) -> None:
    make(store, LONER)
    with pytest.raises(NotFound, match="at least 8 characters"):
        store.resolve_id(LONER[:7])


def test_an_ambiguous_prefix_lists_the_candidates_and_more_characters_settle_it(
    store: Store,
) -> None:
    for cid in TWINS:
        make(store, cid)
    with pytest.raises(AmbiguousId) as caught:
        store.resolve_id(TWINS[0][:8])
    assert caught.value.candidates == sorted(TWINS)
    assert all(cid in str(caught.value) for cid in TWINS)
    assert "give more characters" in str(caught.value)
    assert isinstance(caught.value, NotFound)  # no single command has that id
    assert store.resolve_id(TWINS[1][:13]) == TWINS[1]


def test_an_ambiguous_prefix_shows_a_few_candidates_not_all(store: Store) -> None:
    ids = [f"5eed5eed-0000-4000-8000-{n:012d}" for n in range(8)]
    for cid in ids:
        make(store, cid)
    with pytest.raises(AmbiguousId) as caught:
        store.resolve_id("5eed5eed")
    assert caught.value.candidates == ids[:5]
    assert str(caught.value).count("5eed5eed-") == 5 and "…" in str(caught.value)


def test_a_prefix_nothing_begins_with_is_not_found(store: Store) -> None:
    make(store, LONER)
    with pytest.raises(NotFound, match="no command with id '7d0c44e3'"):
        store.resolve_id("7d0c44e3")


def test_like_wildcards_in_a_prefix_match_nothing(store: Store) -> None:
    make(store, LONER)
    for given in ("7d0c44e_", "%%%%%%%%", "7d0c44e%", "________"):
        with pytest.raises(NotFound):
            store.resolve_id(given)


def test_case_matters_on_every_store(store: Store) -> None:
    make(store, LONER)
    with pytest.raises(NotFound):
        store.resolve_id(LONER[:10].upper().replace("7D0C", "7D0c"))


def test_a_tenant_sees_only_its_own_commands_when_resolving(store: Store) -> None:
    make(store, TWINS[0], tenant="alpha")
    make(store, TWINS[1], tenant="beta")
    assert store.resolve_id(TWINS[0][:8], tenant="beta") == TWINS[1]
    with pytest.raises(NotFound):
        store.resolve_id(TWINS[0][:13], tenant="beta")


def test_batches_resolve_their_ids_the_same_way(store: Store) -> None:
    now = utcnow()
    for cid in TWINS:
        store.batches.create(
            {
                "id": cid,
                "tenant": "alpha",
                "idempotency_key": None,
                "spec_hash": "0" * 64,
                "principal": "t",
                "trace_id": None,
                "state": "running",
                "version": 1,
                "steps": 1,
                "failed_step": None,
                "compensate_on_revoke": False,
                "error": None,
                "last_actor": "t",
                "created_at": now,
                "updated_at": now,
                "finished_at": None,
            }
        )
    assert store.batches.resolve_id(TWINS[0][:13]) == TWINS[0]
    with pytest.raises(AmbiguousId, match="more than one batch"):
        store.batches.resolve_id(TWINS[0][:8])


def test_the_producer_takes_a_prefix_wherever_it_takes_an_id(producer: Producer) -> None:
    make(producer.store, LONER)
    assert producer.resolve_id(LONER[:8]) == LONER
    assert producer.get(LONER[:8]).id == LONER
    assert producer.revoke(LONER[:9], reason="test").state is State.REVOKED
    assert producer.wait(LONER[:8], timeout=1).id == LONER
    assert producer.retry(LONER[:8], reason="again").state is State.PENDING
    assert producer.pending_override(LONER[:8]) is None
    events = producer.audit_events(command_id=LONER)
    assert {"revoke", "retry"} <= {e.phase for e in events}


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_the_cli_takes_a_prefix_and_says_why_one_does_not_do(env: Env) -> None:
    with env.producer() as producer:
        make(producer.store, LONER)
        for cid in TWINS:
            make(producer.store, cid)
    shown = run_cli(env, "status", LONER[:8], "--json")
    assert shown.returncode == 0, shown.stderr
    assert '"id": "7d0c44e2-11aa-4bbb-8ccc-0123456789ab"' in shown.stdout
    ambiguous = run_cli(env, "revoke", TWINS[0][:8])
    said = " ".join(ambiguous.stderr.split())  # the console wraps long lines
    assert ambiguous.returncode == 1
    assert TWINS[0] in said and TWINS[1] in said
    short = run_cli(env, "status", LONER[:6])
    said = " ".join(short.stderr.split())
    assert short.returncode == 1
    assert f"no command or batch with id '{LONER[:6]}'" in said and "at least 8 characters" in said
    revoked = run_cli(env, "revoke", LONER[:8], "--json")
    assert revoked.returncode == 0 and '"state": "revoked"' in revoked.stdout, revoked.stderr
    trail = run_cli(env, "audit", "show", LONER[:8], "--json")
    assert trail.returncode == 0 and LONER in trail.stdout


def test_the_shortest_unique_prefix_of_an_id_resolves_back_to_it(store: Store) -> None:
    ids = [*TWINS, "3f2a91c0-5b1e-4c4e-9a43-6f0d2b7e8a18", LONER]
    for cid in ids:
        make(store, cid)
    shown = store.unique_prefixes(ids[1:])
    # ids[2] differs from TWINS[0] in its last character only.
    assert shown == {TWINS[1]: "3f2a91c0-5b1f", ids[2]: ids[2], LONER: LONER[:8]}
    for cid, prefix in shown.items():
        assert store.resolve_id(prefix) == cid
        # One character less would not do (or would be under the minimum).
        assert len(prefix) == 8 or any(
            other != cid and other.startswith(prefix[:-1]) for other in ids
        )
