"""Adding worker hosts for a tenant: two `execq worker` processes for the same tenant (two
hosts, as far as execq can tell: own node names, own pools) share its queue through Redis and
its commands through the store."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, WorkerProc, wait_for

pytestmark = [
    pytest.mark.slow,
    # Several hosts share one store only through a server: PostgreSQL.
    pytest.mark.parametrize("database_url", ["postgresql"], indirect=True),
]

Start = Callable[..., WorkerProc]


@pytest.fixture
def hosts(workers: Start) -> Iterator[list[WorkerProc]]:
    """The worker processes a test started; their logs are shown when it fails."""
    started: list[WorkerProc] = []
    yield started
    for w in started:
        print(f"--- worker {w.proc.pid}\n{w.output()[-5000:]}")


def _pool_pid(worker_id: str | None) -> int:
    """The pool process in a record's `worker` (`tenant@host:pid`)."""
    assert worker_id is not None
    return int(worker_id.rsplit(":", 1)[1])


def test_forty_commands_on_two_worker_hosts_each_run_exactly_once(
    producer: Producer, workers: Start, hosts: list[WorkerProc], tmp_path: Path
) -> None:
    hosts += [workers("alpha"), workers("alpha")]
    for w in hosts:
        # Celery node names carry the main pid: two processes never share one.
        assert f"alpha.{w.proc.pid}@" in w.output()
    pools = [set(w.pool_pids()) for w in hosts]
    runs = tmp_path / "runs"
    ids = [
        producer.submit(
            CommandSpec(
                tenant="alpha",
                argv=["/bin/sh", "-c", f"sleep 0.2; echo {n} >> {runs}; echo {n}"],
            )
        ).id
        for n in range(40)
    ]
    done = [producer.wait(i, timeout=60) for i in ids]
    assert [(r.state, r.attempts) for r in done] == [(State.SUCCEEDED, 1)] * 40
    assert [r.stdout for r in done] == [f"{n}\n" for n in range(40)]
    # The trace each run leaves: every command ran once, none twice, none lost.
    assert sorted(int(line) for line in runs.read_text().split()) == list(range(40))
    for r in done:
        claims = [
            t
            for t in producer.store.get(r.id, with_transitions=True).transitions
            if t.to_state is State.RUNNING
        ]
        assert len(claims) == 1, f"{r.id} was claimed {len(claims)} times"
    ran_on = [next(h for h, pool in enumerate(pools) if _pool_pid(r.worker) in pool) for r in done]
    assert set(ran_on) == {0, 1}, f"one host ran everything: {ran_on}"


def test_a_command_of_a_killed_host_is_rerun_by_the_other_host_within_a_lease(
    producer: Producer, workers: Start, hosts: list[WorkerProc], env: Env, tmp_path: Path
) -> None:
    hosts += [workers("alpha", concurrency=1), workers("alpha", concurrency=1)]
    runs = tmp_path / "runs"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            retry_safe=True,
            argv=["/bin/sh", "-c", f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] || sleep 300"],
        )
    )
    wait_for(lambda: runs.exists(), 15, "the first run")
    first = producer.get(r.id)
    victim = next(w for w in hosts if _pool_pid(first.worker) in w.pool_pids())
    survivor = next(w for w in hosts if w is not victim)
    killed_at = time.monotonic()
    os.killpg(victim.proc.pid, signal.SIGKILL)  # the whole host: main and pool processes
    victim.proc.wait()
    rec = producer.wait(r.id, timeout=30)
    taken_over_s = time.monotonic() - killed_at
    assert (rec.state, rec.attempts) == (State.SUCCEEDED, 2)
    assert runs.read_text() == "run\nrun\n"
    # No new worker was started: the surviving host's reaper found the expired lease, and
    # its pool ran the command again.
    assert _pool_pid(rec.worker) in survivor.pool_pids()
    assert survivor.proc.poll() is None
    # One lease to expire, one reaper pass (a third of a lease) to notice, then the run.
    assert taken_over_s < 2 * env.settings.lease_s + 2, f"took {taken_over_s:.1f} s"
    history = producer.store.get(r.id, with_transitions=True).transitions
    requeued = [t for t in history if t.from_state is State.RUNNING and t.to_state is State.PENDING]
    # Re-queued once, by the reaper of the surviving host (its actor names that process).
    assert len(requeued) == 1 and "worker lost" in (requeued[0].reason or "")
    assert requeued[0].actor.startswith("reaper:")
    assert requeued[0].actor.endswith(f":{survivor.proc.pid}")
