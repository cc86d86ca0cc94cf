"""An unreachable store must not turn a live worker's commands into `worker_lost`.

Found by `make chaos` (pg-stop): with PostgreSQL down longer than a lease, workers could
neither renew their leases nor record the outcomes of commands that had run; once it was
back, reapers failed those commands as if their workers had died.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy.exc import OperationalError

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from producer.store.repository import Store
from tests.conftest import Env, alpha_reaper
from workers.binding import Delivery
from workers.runtime import Runtime, WorkerConfig
from workers.tasks import handle

pytestmark = pytest.mark.redis


@pytest.fixture
def producer(sqlite_env: Env) -> Iterator[Producer]:
    p = sqlite_env.producer()
    yield p
    p.close()


def _down(*_: Any, **__: Any) -> None:
    raise OperationalError("UPDATE commands ...", {}, ConnectionRefusedError("store down"))


def test_leases_are_judged_a_lease_after_the_store_came_back(
    sqlite_env: Env, producer: Producer
) -> None:
    reaper = alpha_reaper(sqlite_env, producer)
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/true",))).id
    assert producer.store.claim(command_id, tenant="alpha", worker="alive", lease_s=0.001)
    time.sleep(0.01)

    reaper.store_failed()  # its last pass could not reach the store
    assert reaper.run_once().lost == 0
    assert producer.get(command_id).state is State.RUNNING
    reaper._judge_leases_after = 0.0  # a lease (and a pass) later
    assert reaper.run_once().lost == 1
    assert producer.get(command_id).state is State.FAILED


def test_a_pass_that_fails_defers_the_judgement(
    sqlite_env: Env, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    reaper = alpha_reaper(sqlite_env, producer)
    monkeypatch.setattr(reaper.store, "expired_leases", _down)
    monkeypatch.setattr(reaper, "interval_s", 0.01)
    reaper.start()
    try:
        deadline = time.monotonic() + 10
        while reaper._judge_leases_after == 0.0 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        reaper.stop()
    assert reaper._judge_leases_after >= time.monotonic() + sqlite_env.settings.lease_s - 1


def test_a_finished_commands_outcome_waits_for_the_store(
    sqlite_env: Env, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The worker's logic in-process (no Celery): the command runs, then the store refuses
    # the finishing write twice before it comes back.
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/echo", "ran"))).id
    runtime = _runtime(sqlite_env)
    real = Store.transition
    failures = iter([True, True])

    def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        if kwargs.get("expect_state") is State.RUNNING and next(failures, False):
            _down()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "transition", flaky)
    try:
        done = handle(lambda: runtime, Delivery(command_id, "alpha", {}, None, None))
    finally:
        runtime.close()
    assert done == "ran"
    record = producer.get(command_id)
    assert record.state is State.SUCCEEDED
    assert record.stdout == "ran\n"
    assert next(failures, None) is None  # both failures were met, then it was recorded


def _runtime(env: Env) -> Runtime:
    tenant = env.tenants.get("alpha")
    assert tenant is not None
    return Runtime(
        WorkerConfig(
            settings=env.settings,
            tenants=env.tenants,
            tenant=tenant,
            broker_url=env.settings.broker_url,
            concurrency=1,
        )
    )


def _claims_fail(monkeypatch: pytest.MonkeyPatch, times: int) -> Iterator[bool]:
    real = Store.claim
    failures = iter([True] * times)

    def flaky(self: Store, *args: Any, **kwargs: Any) -> Any:
        if next(failures, False):
            _down()
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Store, "claim", flaky)
    return failures


def test_a_delivery_with_secrets_waits_for_the_store_to_claim(
    sqlite_env: Env, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by `make chaos` (pg-stop): a delivery dropped while the store was down came back
    from the outbox without its secrets (never stored) and failed with secrets_unavailable."""
    spec = CommandSpec(
        tenant="alpha",
        argv=("/bin/sh", "-c", 'echo "${#TOKEN}"'),
        secrets={"TOKEN": "s3cr3t-v4lue"},
    )
    command_id = producer.submit(spec).id
    failures = _claims_fail(monkeypatch, 2)
    runtime = _runtime(sqlite_env)
    try:
        done = handle(lambda: runtime, Delivery(command_id, "alpha", spec.secrets, None, None))
    finally:
        runtime.close()
    assert done == "ran"
    assert next(failures, None) is None  # both failures were met, then it claimed
    record = producer.get(command_id)
    assert record.state is State.SUCCEEDED
    assert record.stdout == "12\n"  # the child had the secret


def test_a_delivery_without_secrets_is_left_to_the_outbox(
    sqlite_env: Env, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/true",))).id
    _claims_fail(monkeypatch, 1)
    runtime = _runtime(sqlite_env)
    try:
        done = handle(lambda: runtime, Delivery(command_id, "alpha", {}, None, None))
    finally:
        runtime.close()
    assert done == "store_unavailable"
    assert producer.get(command_id).state is State.PENDING  # the outbox publishes it again


def test_a_finishing_write_whose_answer_was_lost_is_recognised(
    sqlite_env: Env, producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/echo", "ran"))).id
    real = Store.transition
    lost_answers = iter([True])

    def committed_then_cut(self: Store, *args: Any, **kwargs: Any) -> Any:
        done = real(self, *args, **kwargs)
        if kwargs.get("expect_state") is State.RUNNING and next(lost_answers, False):
            _down()  # the write committed; its answer never came back
        return done

    monkeypatch.setattr(Store, "transition", committed_then_cut)
    runtime = _runtime(sqlite_env)
    try:
        done = handle(lambda: runtime, Delivery(command_id, "alpha", {}, None, None))
    finally:
        runtime.close()
    assert done == "ran"  # the retry found its own outcome stored, not another decision
    assert producer.get(command_id).state is State.SUCCEEDED
