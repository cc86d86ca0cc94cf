"""submit_many: many commands, one commit and one Redis round trip, the same guarantees as
submit for each — refusals recorded and audited, idempotency keys honoured, nothing lost
while Redis is down."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import redis
import sqlalchemy as sa

from producer.audit.sinks import verify_file
from producer.client import Producer
from producer.errors import IdempotencyConflict
from producer.spec import CommandSpec
from producer.states import State
from producer.store.models import Command
from tests.conftest import Env, start_worker
from tests.test_worker import Start


def _count(producer: Producer) -> int:
    with producer.store.engine.connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(Command)).scalar_one())


def _queued(env: Env, tenant: str = "alpha") -> int:
    client = redis.Redis.from_url(env.settings.broker_url)
    try:
        return int(client.llen(f"execq.{tenant}"))
    finally:
        client.close()


def test_many_commands_run_each_with_its_own_record_and_audit_trail(
    producer: Producer, workers: Start, env: Env
) -> None:
    specs = [
        CommandSpec(tenant="alpha", argv=["/bin/echo", f"n{i}"], idempotency_key=f"k-{i}")
        for i in range(12)
    ]
    specs.insert(5, CommandSpec(tenant="beta", argv=["/bin/echo", "other tenant"]))
    results = producer.submit_many(specs)
    assert [r.state for r in results] == [State.PENDING] * 13
    assert len({r.id for r in results}) == 13 and not any(r.duplicate for r in results)
    workers("alpha")
    workers("beta")
    for spec, result in zip(specs, results, strict=True):
        rec = producer.wait(result.id, timeout=30)
        assert (rec.state, rec.stdout) == (State.SUCCEEDED, spec.argv[1] + "\n")
        phases = [e.phase for e in producer.audit_events(command_id=result.id)]
        assert phases == ["parse", "authz", "bind", "execute", "archive"]
    assert producer.store.audit.verify().ok
    # The file's links are keyed with the store's audit key.
    keys = producer.store.audit.keys()
    assert verify_file(env.settings.audit_log, keys=keys).ok  # type: ignore[arg-type]


def test_a_refusal_in_the_batch_is_recorded_and_the_others_go_on(producer: Producer) -> None:
    results = producer.submit_many(
        [
            CommandSpec(tenant="alpha", argv=["/bin/echo", "fine"]),
            CommandSpec(tenant="beta", argv=["/bin/cat", "/etc/shadow"]),
            CommandSpec(tenant="beta", argv=["/bin/echo", "-rf"]),
            CommandSpec(tenant="alpha", argv=["/bin/true"]),
        ]
    )
    assert [r.state for r in results] == [
        State.PENDING,
        State.REJECTED,
        State.REJECTED,
        State.PENDING,
    ]
    assert (results[1].rule, results[2].rule) == ("executables", "deny_args:^-rf$")
    assert results[1].error is not None and "/bin/cat" in results[1].error
    rejected = producer.get(results[1].id)
    assert (rejected.state, rejected.failure_reason) == (State.REJECTED, "policy:executables")
    phases = [(e.phase, e.outcome) for e in producer.audit_events(command_id=results[1].id)]
    assert phases == [("parse", "ok"), ("authz", "refused"), ("abort", "refused")]


def test_a_repeated_batch_returns_the_first_commands_and_publishes_nothing(
    producer: Producer, env: Env
) -> None:
    specs = [
        CommandSpec(tenant="alpha", argv=["/bin/echo", str(i)], idempotency_key=f"again-{i}")
        for i in range(5)
    ]
    first = producer.submit_many(specs)
    queued, rows = _queued(env), _count(producer)
    assert queued == 5
    again = producer.submit_many(specs)
    assert [r.id for r in again] == [r.id for r in first]
    assert all(r.duplicate and r.state is State.PENDING for r in again)
    assert (_queued(env), _count(producer)) == (queued, rows)
    # A key twice in one call: the second is the first command.
    twice = CommandSpec(tenant="alpha", argv=["/bin/true"], idempotency_key="twice")
    pair = producer.submit_many([twice, twice])
    assert pair[1].id == pair[0].id and pair[1].duplicate and not pair[0].duplicate
    # The plain submit of a key a batch used finds it too.
    assert producer.submit(specs[2]).id == first[2].id


def test_a_key_reused_with_another_spec_stores_nothing_of_the_call(producer: Producer) -> None:
    producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"], idempotency_key="taken"))
    before = _count(producer)
    events_before = len(producer.audit_events(tenant="alpha"))
    with pytest.raises(IdempotencyConflict, match="taken"):
        producer.submit_many(
            [
                CommandSpec(tenant="alpha", argv=["/bin/echo", "innocent"]),
                CommandSpec(tenant="alpha", argv=["/bin/false"], idempotency_key="taken"),
            ]
        )
    assert _count(producer) == before
    assert len(producer.audit_events(tenant="alpha")) == events_before
    assert producer.store.audit.verify().ok


def test_a_batch_submitted_while_redis_is_down_runs_when_it_is_back(
    make_env: Callable[..., Env], database_url: str
) -> None:
    from workers.embedded import EmbeddedRedis

    server = EmbeddedRedis(record=False)
    env = make_env(database_url, server.url)
    producer = env.producer()
    try:
        results = producer.submit_many(
            [
                CommandSpec(
                    tenant="alpha",
                    argv=["/bin/echo", f"kept {i}"],
                    secrets={"TOKEN": "kept-s3cret"},
                )
                for i in range(3)
            ]
        )
        assert all(producer.get(r.id).published_at is None for r in results)
        assert producer.outbox.pending() == 3
        server.start()  # Redis comes back on the same address
        worker = start_worker(env, "alpha")
        try:
            for i, r in enumerate(results):
                rec = producer.wait(r.id, timeout=30)
                assert (rec.state, rec.stdout) == (State.SUCCEEDED, f"kept {i}\n")
        finally:
            worker.stop()
    finally:
        producer.close()
        server.stop()


def test_submit_many_takes_only_specs(producer: Producer) -> None:
    with pytest.raises(TypeError, match="CommandSpecs, not dict"):
        producer.submit_many([{"tenant": "alpha", "argv": ["/bin/true"]}])  # type: ignore[list-item]
    assert producer.submit_many([]) == []


def test_a_large_batch_is_stored_whole_and_its_repeat_finds_every_command(
    producer: Producer, env: Env
) -> None:
    # Larger than one id look-up (1000) and than SQLite's old bound-parameter limit (999).
    specs = [
        CommandSpec(tenant="alpha", argv=["/bin/true"], idempotency_key=f"bulk-{i}")
        for i in range(2500)
    ]
    first = producer.submit_many(specs)
    assert len({r.id for r in first}) == 2500 and not any(r.duplicate for r in first)
    assert _count(producer) == 2500 and _queued(env) == 2500
    again = producer.submit_many(specs)
    assert [r.id for r in again] == [r.id for r in first] and all(r.duplicate for r in again)
    assert _count(producer) == 2500 and _queued(env) == 2500
