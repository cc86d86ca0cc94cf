"""Leases on PostgreSQL are timed by the database server's clock, not the hosts'.

Found by `make chaos` (clock-ahead): a worker whose clock ran 20 s ahead judged every
other worker's 3 s lease as run out, and its reaper failed their live commands as
`worker_lost`. A lease's end is now written and judged with the server's clock on
PostgreSQL; SQLite is one host, whose clock is the database's.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime, timedelta

import pytest
import sqlalchemy as sa

from producer.client import Producer
from producer.spec import CommandSpec
from producer.store import claims, clock
from producer.store.clock import as_utc

pytestmark = pytest.mark.redis

AHEAD = timedelta(seconds=30)


def _skew(monkeypatch: pytest.MonkeyPatch, by: timedelta) -> None:
    """This process's wall clock, as the store sees it, moved by `by`."""
    real: Callable[[], datetime] = clock.utcnow
    monkeypatch.setattr(clock, "utcnow", lambda: real() + by)
    monkeypatch.setattr(claims, "utcnow", lambda: real() + by)


def _lease_end(producer: Producer, command_id: str) -> tuple[datetime, datetime]:
    """(lease_expires_at, the database's now)."""
    with producer.store.engine.connect() as conn:
        end = conn.execute(
            sa.select(claims.commands.c.lease_expires_at).where(claims.commands.c.id == command_id)
        ).scalar_one()
        now = clock.utcnow()
        if conn.dialect.name == "postgresql":
            now = conn.execute(sa.text("SELECT statement_timestamp()")).scalar_one()
    ends = as_utc(end)
    assert ends is not None
    return ends, now


def _claimed(producer: Producer, lease_s: float) -> str:
    command_id = producer.submit(CommandSpec(tenant="alpha", argv=("/bin/true",))).id
    assert producer.store.claim(command_id, tenant="alpha", worker="w@h:1", lease_s=lease_s)
    return command_id


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_worker_clock_ahead_neither_lengthens_its_lease_nor_ends_others(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert producer.store.engine.dialect.name == "postgresql"
    live = _claimed(producer, lease_s=60)
    _skew(monkeypatch, AHEAD)

    # a claim and a renewal by the skewed host end a lease after the server's now
    mine = _claimed(producer, lease_s=2)
    end, now = _lease_end(producer, mine)
    assert abs((end - now).total_seconds() - 2) < 1, (end, now)
    assert producer.store.renew_lease(mine, owner="w@h:1", lease_s=2) is False
    end, now = _lease_end(producer, mine)
    assert abs((end - now).total_seconds() - 2) < 1, (end, now)

    # its reaper sees no lease run out, until one really has
    assert producer.store.expired_leases(tenant="alpha", limit=10) == []
    time.sleep(2.3)
    assert [e.id for e in producer.store.expired_leases(tenant="alpha", limit=10)] == [mine]
    assert live not in [e.id for e in producer.store.expired_leases(tenant="alpha", limit=10)]


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)
def test_on_sqlite_leases_follow_the_one_host_clock(
    producer: Producer, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert producer.store.engine.dialect.name == "sqlite"
    command_id = _claimed(producer, lease_s=5)
    end, now = _lease_end(producer, command_id)
    assert abs((end - now).total_seconds() - 5) < 1
    assert producer.store.expired_leases(tenant="alpha", limit=10) == []
    _skew(monkeypatch, AHEAD)
    assert [e.id for e in producer.store.expired_leases(tenant="alpha", limit=10)] == [command_id]
