"""The reaper drains a backlog in passes back to back, not one page per third of a lease."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from producer.broker import queue_key
from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, alpha_reaper, wait_for
from workers import reaper as reaper_module
from workers.reaper import EXPIRED_PAGE, Reaper, ReapReport

pytestmark = pytest.mark.redis


@pytest.fixture
def producer_and_reaper(sqlite_env: Env) -> Iterator[tuple[Producer, Reaper]]:
    producer = sqlite_env.producer()
    reaper = alpha_reaper(sqlite_env, producer)
    try:
        yield producer, reaper
    finally:
        producer.close()


def _lost_workers(producer: Producer, n: int) -> list[str]:
    """n commands claimed by a worker that then died: running, their leases already out."""
    results = producer.submit_many([CommandSpec(tenant="alpha", argv=("/bin/true",))] * n)
    ids = [r.id for r in results]
    for command_id in ids:
        claimed = producer.store.claim(command_id, tenant="alpha", worker="gone", lease_s=0.001)
        assert claimed is not None
    time.sleep(0.01)
    return ids


def test_a_full_page_asks_for_another_pass_at_once(
    producer_and_reaper: tuple[Producer, Reaper],
) -> None:
    producer, reaper = producer_and_reaper
    ids = _lost_workers(producer, EXPIRED_PAGE + 20)

    first = reaper.run_once()
    assert first.lost == EXPIRED_PAGE
    assert first.more  # 20 more wait
    second = reaper.run_once()
    assert second.lost == 20
    assert not second.more
    states = {producer.get(command_id).state for command_id in ids}
    assert states == {State.FAILED}


def test_the_outbox_turn_stays_with_the_reaper_that_holds_it(
    producer_and_reaper: tuple[Producer, Reaper],
) -> None:
    _, reaper = producer_and_reaper
    assert reaper._take_turn()
    assert reaper._take_turn()  # its own turn still: a drain's next pass publishes too
    assert reaper._redis is not None
    key = reaper.settings.key("reaper", reaper.tenant.name)
    reaper._redis.set(key, "another-reaper", px=5000)
    assert not reaper._take_turn()


class _Waits:
    """Stands in for the reaper's stop event: records each wait, stops after `passes`."""

    def __init__(self, passes: int) -> None:
        self.delays: list[float] = []
        self.passes = passes

    def wait(self, delay: float) -> bool:
        self.delays.append(delay)
        return len(self.delays) > self.passes

    def set(self) -> None:
        pass


def test_passes_follow_each_other_while_pages_are_full(
    producer_and_reaper: tuple[Producer, Reaper], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, reaper = producer_and_reaper
    reports = iter([ReapReport(lost=100, more=True), ReapReport(lost=100, more=True)])
    monkeypatch.setattr(reaper, "run_once", lambda: next(reports, ReapReport()))
    waits = _Waits(passes=4)
    monkeypatch.setattr(reaper, "_stop", waits)
    reaper._loop()

    first, after_full, after_full_again, after_last, *_ = waits.delays
    pause = reaper_module.DRAIN_PAUSE_S
    assert after_full == after_full_again == pause
    for delay in (first, after_last):
        assert 0.8 * reaper.interval_s <= delay <= 1.2 * reaper.interval_s


def test_every_pass_sweeps_what_dead_pool_processes_left_even_without_a_store(
    producer_and_reaper: tuple[Producer, Reaper], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A tenant whose pool process was SIGKILLed may run nothing for hours: its cgroup and
    # private directory must not wait for the replacement's first command.
    _, reaper = producer_and_reaper
    swept: list[int] = []
    monkeypatch.setattr(reaper, "_host_sweep", lambda: swept.append(1))

    def down() -> ReapReport:
        raise ConnectionError("store down")

    monkeypatch.setattr(reaper, "run_once", down)
    monkeypatch.setattr(reaper, "_stop", _Waits(passes=3))
    reaper._loop()
    assert len(swept) == 3


def test_a_new_broker_server_gets_the_pending_messages_at_once(
    producer_and_reaper: tuple[Producer, Reaper], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by `make chaos` (redis-volatile, redis-aof): after a restart the lost messages
    waited for the outbox's 30 s republish age, so every restart stalled 30-60 s."""
    producer, reaper = producer_and_reaper
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/true",))).id
    queue = queue_key(reaper.settings, reaper.tenant)
    # the producer records the publish after the fact
    wait_for(lambda: producer.store.get(command_id).published_at, 10, "published_at")
    reaper.outbox_grace_s = 0.0  # the command was published a moment ago
    assert reaper.run_once().published == 0  # the broker as it is: nothing to republish
    assert reaper._redis is not None
    reaper._redis.delete(queue)  # what a restart without persistence does to the message

    server = {"run_id": "a-new-server", "uptime_in_seconds": 0}
    monkeypatch.setattr(reaper._redis, "info", lambda *_: server)
    assert reaper.run_once().published == 1
    assert reaper._redis.llen(queue) == 1
    assert producer.get(command_id).state is State.PENDING
    # caught up: the same server again republishes nothing more
    assert reaper.run_once().published == 0
    assert reaper._redis.llen(queue) == 1


def test_a_replica_promoted_by_sentinel_gets_the_pending_messages_at_once(
    producer_and_reaper: tuple[Producer, Reaper], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by the sentinel-failover chaos scenario: the promoted replica had been up as
    long as the old primary, so judging by its uptime nothing was re-published, and the
    messages lost in the failover waited 30 s for the outbox."""
    producer, reaper = producer_and_reaper
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/true",))).id
    queue = queue_key(reaper.settings, reaper.tenant)
    wait_for(lambda: producer.store.get(command_id).published_at, 10, "published_at")
    reaper.outbox_grace_s = 0.0
    assert reaper.run_once().published == 0
    assert reaper._redis is not None
    reaper._redis.delete(queue)  # the message the old primary had not replicated

    sections = {
        "server": {"run_id": "the-promoted-replica", "uptime_in_seconds": 3600},
        "replication": {"role": "master", "second_repl_offset": 417},
    }
    monkeypatch.setattr(reaper._redis, "info", lambda section="server", *_: sections[section])
    assert reaper.run_once().published == 1
    assert reaper._redis.llen(queue) == 1
    assert reaper.run_once().published == 0
