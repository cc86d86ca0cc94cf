"""Isolation between tenants: separate queues and pools, so one tenant's flood is not
another tenant's wait."""

from __future__ import annotations

import statistics

import pytest

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import wait_for
from tests.test_worker import Start


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_tenant_flooding_its_queue_does_not_slow_another_tenant(
    producer: Producer, workers: Start
) -> None:
    workers("alpha")
    workers("beta")
    # 60 commands of 0.2 s on alpha's two pool processes: a backlog of about 6 s.
    flood = [
        producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "0.2"])).id
        for _ in range(60)
    ]
    beta = []
    for _ in range(5):
        r = producer.submit(CommandSpec(tenant="beta", argv=["/bin/true"]))
        beta.append(producer.wait(r.id, timeout=30))
    assert all(rec.state is State.SUCCEEDED for rec in beta)
    # beta's commands all ran while alpha's backlog was still queued ...
    still_queued = sum(producer.get(cid).state is State.PENDING for cid in flood)
    assert still_queued >= 20, f"only {still_queued} of alpha's flood still queued"
    wait_for(
        lambda: all(producer.get(cid).state is State.SUCCEEDED for cid in flood),
        90,
        "alpha's flood to drain",
    )
    # ... and each waited less than a typical command of the flood waited for its turn.
    beta_s = [(r.finished_at - r.created_at).total_seconds() for r in beta if r.finished_at]
    waits = []
    for cid in flood:
        rec = producer.get(cid)
        assert rec.started_at is not None
        waits.append((rec.started_at - rec.created_at).total_seconds())
    assert max(beta_s) < statistics.median(waits), (beta_s, statistics.median(waits))
