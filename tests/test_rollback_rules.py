"""The rules of compensation without workers: spec and policy checks, the state table, and
the store's exactly-once claims of compensations and batch steps."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from producer import policy
from producer.errors import IllegalTransition, PolicyDenied, SpecError
from producer.spec import CommandSpec
from producer.states import State, can_transition, check_transition
from producer.store.clock import utcnow
from producer.store.repository import Store
from producer.tenants import TenantsFile


def test_rollback_on_failure_needs_something_to_run() -> None:
    with pytest.raises(SpecError, match="compensate command or snapshot_paths"):
        CommandSpec(tenant="alpha", argv=["/bin/true"], rollback_on_failure=True)
    CommandSpec(
        tenant="alpha", argv=["/bin/true"], rollback_on_failure=True, snapshot_paths=["/tmp/x"]
    )


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"max_retries": 2}, "max_retries needs retry_safe"),
        ({"max_retries": 21, "retry_safe": True}, "max_retries"),
        ({"snapshot_paths": ["relative/path"]}, "not an absolute path"),
        ({"snapshot_paths": ["/tmp/../etc"]}, r"\. or \.\."),
        ({"snapshot_paths": ["/tmp/a\x00b"]}, "not an absolute path"),
        ({"compensate_limits": {"timeout_s": 5}}, "without a compensate command"),
        ({"compensate": ["/bin/true"], "compensate_limits": {"bogus": 1}}, "bogus"),
    ],
)
def test_bad_compensation_fields_are_refused_by_name(
    fields: dict[str, object], message: str
) -> None:
    with pytest.raises(SpecError, match=message):
        CommandSpec(tenant="alpha", argv=["/bin/true"], **fields)


def test_new_fields_leave_old_spec_hashes_alone() -> None:
    # A key stored before these fields existed must still match the same spec today.
    plain = CommandSpec(tenant="alpha", argv=["/bin/true"])
    assert "max_retries" not in plain.canonical()
    assert "snapshot_paths" not in plain.canonical()
    assert (
        plain.spec_hash()
        != CommandSpec(tenant="alpha", argv=["/bin/true"], snapshot_paths=["/tmp/x"]).spec_hash()
    )


def test_policy_checks_compensation_limits_retries_and_snapshot_roots(
    tenants: TenantsFile, tmp_path: Path
) -> None:
    def denied(**fields: object) -> str:
        with pytest.raises(PolicyDenied) as caught:
            policy.check(CommandSpec(tenant="alpha", argv=["/bin/true"], **fields), tenants)
        return caught.value.rule

    assert denied(compensate=["/usr/bin/id"]) == "executables"
    assert denied(compensate=["/bin/true"], compensate_limits={"timeout_s": 999.0}) == (
        "limits.timeout_s"
    )
    assert denied(retry_safe=True, max_retries=6) == "max_retries"
    assert denied(snapshot_paths=["/etc/passwd"]) == "snapshot_roots"
    # beta has no snapshot roots at all.
    with pytest.raises(PolicyDenied, match="none configured"):
        policy.check(
            CommandSpec(tenant="beta", argv=["/bin/true"], snapshot_paths=[str(tmp_path)]), tenants
        )
    # A symlink under a root that points outside is judged by where it leads.
    (tmp_path / "escape").symlink_to("/etc")
    assert denied(snapshot_paths=[str(tmp_path / "escape")]) == "snapshot_roots"
    policy.check(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/true"],
            compensate=["/bin/echo", "undo"],
            snapshot_paths=[str(tmp_path)],
            retry_safe=True,
            max_retries=5,
        ),
        tenants,
    )


def test_the_state_table_for_rollback_and_override() -> None:
    for src in (State.SUCCEEDED, State.FAILED, State.REVERT_FAILED):
        assert can_transition(src, State.REVERTING)
    for src in (State.PENDING, State.RUNNING, State.REVOKED, State.REJECTED, State.REVERTED):
        assert not can_transition(src, State.REVERTING)
    # Without --force only revert_failed is settled by hand.
    with pytest.raises(IllegalTransition):
        check_transition(State.SUCCEEDED, State.REVERTED)
    check_transition(State.SUCCEEDED, State.REVERTED, override=True)
    with pytest.raises(IllegalTransition):
        check_transition(State.PENDING, State.FAILED, override=True)
    with pytest.raises(IllegalTransition):
        check_transition(State.REVERTED, State.REVERTED, override=True)


def _reverting(store: Store) -> str:
    spec = CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=["/bin/echo", "undo"])
    cid = store.create(spec, actor="t").id
    store.transition(cid, expect_state=State.PENDING, expect_version=1, to=State.RUNNING, actor="t")
    store.transition(
        cid, expect_state=State.RUNNING, expect_version=2, to=State.SUCCEEDED, actor="t"
    )
    store.transition(
        cid, expect_state=State.SUCCEEDED, expect_version=3, to=State.REVERTING, actor="op"
    )
    return cid


def test_only_one_of_many_claims_takes_a_compensation(store: Store) -> None:
    cid = _reverting(store)
    won: list[object] = []
    barrier = threading.Barrier(8)

    def claim(n: int) -> None:
        barrier.wait()
        got = store.claim_revert(cid, tenant="alpha", worker=f"w{n}", lease_s=30)
        if got is not None:
            won.append(got)

    threads = [threading.Thread(target=claim, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(won) == 1
    rec = store.get(cid, with_transitions=True)
    # The claim is a lease, not a change of state: no history row, the version unchanged.
    assert (rec.state, rec.version, rec.revert_count) == (State.REVERTING, 4, 1)
    assert len(rec.transitions) == 4
    # The wrong tenant, and a command that is not reverting, are never claimed.
    assert store.claim_revert(cid, tenant="beta", worker="w", lease_s=30) is None
    other = store.create(CommandSpec(tenant="alpha", argv=["/bin/true"]), actor="t").id
    assert store.claim_revert(other, tenant="alpha", worker="w", lease_s=30) is None


def _batch(store: Store, batch_id: str) -> None:
    now = utcnow()
    store.batches.create(
        {
            "id": batch_id,
            "tenant": "alpha",
            "idempotency_key": None,
            "spec_hash": "0" * 64,
            "principal": "t",
            "trace_id": None,
            "state": "running",
            "version": 1,
            "steps": 2,
            "failed_step": None,
            "compensate_on_revoke": False,
            "error": None,
            "last_actor": "t",
            "created_at": now,
            "updated_at": now,
            "finished_at": None,
        }
    )


def test_a_held_batch_step_cannot_be_claimed_until_released(store: Store) -> None:
    spec = CommandSpec(tenant="alpha", argv=["/bin/true"])
    _batch(store, "b" * 36)
    cid = store.create(spec, actor="t", batch=("b" * 36, 2, True)).id
    assert store.claim(cid, tenant="alpha", worker="w", lease_s=30) is None
    assert not [c for c, _ in _unpublished(store) if c == cid]
    assert store.release(cid)
    assert not store.release(cid)  # only one caller releases it
    assert [c for c, _ in _unpublished(store) if c == cid] == [cid]
    assert store.claim(cid, tenant="alpha", worker="w", lease_s=30) is not None


def test_a_step_of_a_batch_no_longer_running_is_never_released(store: Store) -> None:
    _batch(store, "c" * 36)
    cid = store.create(
        CommandSpec(tenant="alpha", argv=["/bin/true"]), actor="t", batch=("c" * 36, 2, True)
    ).id
    batch = store.batches.get("c" * 36)
    assert batch is not None and store.batches.move(batch, "revoked", actor="op")
    assert not store.release(cid)
    assert store.get(cid).held


def _unpublished(store: Store) -> list[tuple[str, str]]:
    return store.unpublished(
        tenant="alpha", older_than_s=-60, republish_after_s=3600, secret_grace_s=0, limit=100
    )


def test_an_unleased_compensation_is_published_by_the_outbox(store: Store) -> None:
    cid = _reverting(store)
    assert cid in [c for c, _ in _unpublished(store)]
    store.claim_revert(cid, tenant="alpha", worker="w", lease_s=30)
    assert cid not in [c for c, _ in _unpublished(store)]


def test_snapshots_are_kept_once_per_command(store: Store) -> None:
    cid = store.create(CommandSpec(tenant="alpha", argv=["/bin/true"]), actor="t").id
    assert store.snapshots.save(cid, tenant="alpha", host="h", archive=b"one", files=1, size=3)
    assert not store.snapshots.save(cid, tenant="alpha", host="h", archive=b"two", files=1, size=3)
    loaded = store.snapshots.load(cid)
    assert loaded is not None and loaded.archive == b"one" and loaded.host == "h"
    store.snapshots.delete(cid)
    assert store.snapshots.load(cid) is None


def test_migration_0003_goes_down_and_up_keeping_the_history_triggers(database_url: str) -> None:
    from alembic import command
    from sqlalchemy import inspect

    from producer.store.db import make_engine
    from producer.store.migrate import _config, upgrade

    engine = make_engine(database_url)
    cfg = _config()
    try:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.downgrade(cfg, "0002")
        upgrade(engine)
        store = Store(engine)
        cid = store.create(CommandSpec(tenant="alpha", argv=["/bin/true"]), actor="t").id
        store.transition(
            cid, expect_state=State.PENDING, expect_version=1, to=State.RUNNING, actor="t"
        )
        # The triggers of migration 0001 survived: two history rows.
        assert len(store.get(cid, with_transitions=True).transitions) == 2
        # Migration 0004 went down and up with the rest: its partial indexes are back.
        indexes = {i["name"] for i in inspect(engine).get_indexes("commands")}
        assert {"ix_commands_outbox_due", "ix_commands_rollback_due"} <= indexes
        assert "ix_commands_outbox" not in indexes
    finally:
        engine.dispose()


def test_only_failures_that_ran_are_rolled_back_by_the_sweep(store: Store) -> None:
    spec = CommandSpec(
        tenant="alpha", argv=["/bin/true"], compensate=["/bin/true"], rollback_on_failure=True
    )
    ids = {}
    for reason in ("exit_code", "memory_limit", "worker_lost", "secrets_unavailable", "policy:x"):
        cid = store.create(spec, actor="t").id
        store.transition(
            cid, expect_state=State.PENDING, expect_version=1, to=State.RUNNING, actor="t"
        )
        store.transition(
            cid,
            expect_state=State.RUNNING,
            expect_version=2,
            to=State.FAILED,
            actor="t",
            failure_reason=reason,
        )
        ids[cid] = reason
    found = store.awaiting_rollback(tenant="alpha", older_than_s=-60, limit=50)
    assert sorted(ids[c] for c in found) == ["exit_code", "memory_limit", "worker_lost"]
