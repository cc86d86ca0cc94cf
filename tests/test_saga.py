"""Batches as sagas, end to end: real workers run the steps in order and, when one fails,
the compensations of the steps before it in reverse order.

Every step and every compensation appends a line to one log file, so the order in which
things really ran is read from disk.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
import sqlalchemy as sa
import yaml

from producer import saga
from producer.client import Producer
from producer.errors import IdempotencyConflict, PolicyDenied, SpecError
from producer.states import State
from producer.store.batches import batches as batches_table
from tests.conftest import Env, WorkerProc, append, wait_for
from tests.conftest import run_cli as cli

pytestmark = pytest.mark.slow

Start = Callable[..., WorkerProc]
ROOT = Path(__file__).resolve().parent.parent
PG_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def step(log: Path, n: int, *, fail: bool = False) -> dict[str, Any]:
    """Step n: appends `run n` (then fails if asked); its compensation appends `undo n`."""
    script = f"echo 'run {n}' >> '{log}'" + ("; exit 1" if fail else "")
    return {"argv": ["/bin/sh", "-c", script], "compensate": append(log, f"undo {n}")}


def sleeper(log: Path, n: int, pidfile: Path) -> dict[str, Any]:
    """Step n that records its pid, appends `run n` and sleeps until killed."""
    script = f"echo $$ > '{pidfile}'; echo 'run {n}' >> '{log}'; exec /bin/sleep 60"
    return {"argv": ["/bin/sh", "-c", script], "compensate": append(log, f"undo {n}")}


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def test_a_failing_step_undoes_the_steps_before_it_in_reverse_order(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "saga.log"
    steps = [step(log, 1), step(log, 2), step(log, 3, fail=True), step(log, 4)]
    b = producer.submit_batch("alpha", steps)
    assert (b.state, b.duplicate, len(b.command_ids)) == ("running", False, 4)

    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "reverted", found.batch
    assert found.batch.failed_step == 3
    assert "step 3" in (found.batch.error or "")
    assert lines(log) == ["run 1", "run 2", "run 3", "undo 2", "undo 1"]
    one, two, three, four = found.steps
    assert [s.id for s in found.steps] == b.command_ids
    assert [s.batch_step for s in found.steps] == [1, 2, 3, 4]
    assert all(s.batch_id == b.id for s in found.steps)
    for done in (one, two):
        assert done.state is State.REVERTED, done
        assert done.exit_code == 0  # the step's own result stays
        assert done.compensation is not None and done.compensation["exit_code"] == 0
    assert (three.state, three.exit_code, three.failure_reason) == (State.FAILED, 1, "exit_code")
    assert three.compensation is None  # the failed step itself is not undone
    assert four.state is State.REVOKED
    assert (four.started_at, four.exit_code, four.worker) == (None, None, None)
    revoked = [e for e in producer.audit_events(command_id=four.id) if e.phase == "revoke"]
    assert len(revoked) == 1 and "stopped at step 3" in (revoked[0].reason or "")
    assert not [e for e in producer.audit_events(command_id=four.id) if e.phase == "execute"]
    assert found.batch.finished_at is not None


@PG_ONLY
def test_a_batch_that_succeeds_runs_once_per_idempotency_key(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "saga.log"
    steps = [step(log, 1), step(log, 2), step(log, 3)]
    b = producer.submit_batch("alpha", steps, idempotency_key="deploy-42")
    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "succeeded", found.batch
    assert [s.state for s in found.steps] == [State.SUCCEEDED] * 3
    assert [s.idempotency_key for s in found.steps] == ["deploy-42#1", "deploy-42#2", "deploy-42#3"]
    assert lines(log) == ["run 1", "run 2", "run 3"]

    again = producer.submit_batch("alpha", steps, idempotency_key="deploy-42")
    assert (again.id, again.duplicate, again.state) == (b.id, True, "succeeded")
    assert again.command_ids == b.command_ids
    with pytest.raises(IdempotencyConflict, match="deploy-42"):
        producer.submit_batch("alpha", [step(log, 1), step(log, 9)], idempotency_key="deploy-42")
    time.sleep(1)  # a step wrongly queued again would have run by now
    assert lines(log) == ["run 1", "run 2", "run 3"]
    assert producer.store.count() == 3
    assert producer.get_batch(b.id).batch.version == found.batch.version


@PG_ONLY
def test_a_held_step_never_runs_early_even_when_its_message_arrives(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")  # two pool processes: a second step could run beside the first
    log = tmp_path / "saga.log"
    slow_first = {"argv": ["/bin/sh", "-c", f"sleep 1; echo 'run 1' >> '{log}'"]}
    b = producer.submit_batch("alpha", [slow_first, step(log, 2), step(log, 3)])
    for cid in b.command_ids[1:] * 2:  # forged or repeated messages for the held steps
        producer.publisher.publish(cid, "alpha")
    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "succeeded", found.batch
    assert lines(log) == ["run 1", "run 2", "run 3"]
    assert [s.attempts for s in found.steps] == [1, 1, 1]
    # Each step started only after the one before it had finished (the worker's own clock).
    times = [(s.started_at, s.finished_at) for s in found.steps]
    for (_, ended), (started, _) in itertools.pairwise(times):
        assert ended is not None and started is not None and ended <= started, times


@PG_ONLY
def test_steps_without_a_compensation_are_skipped_when_undoing(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log, other = tmp_path / "saga.log", tmp_path / "other.log"
    bare = {"argv": append(log, "run 1")}
    some = producer.submit_batch("alpha", [bare, step(log, 2), step(log, 3, fail=True)])
    nothing = producer.submit_batch(
        "alpha", [{"argv": append(other, "run 1")}, {"argv": ["/bin/false"]}]
    )
    found = producer.wait_batch(some.id, 45)
    assert found.batch.state == "reverted", found.batch
    assert [s.state for s in found.steps] == [State.SUCCEEDED, State.REVERTED, State.FAILED]
    assert lines(log) == ["run 1", "run 2", "run 3", "undo 2"]
    # Nothing of it could be undone: the batch failed, its steps stay as they ended.
    found = producer.wait_batch(nothing.id, 45)
    assert found.batch.state == "failed", found.batch
    assert [s.state for s in found.steps] == [State.SUCCEEDED, State.FAILED]


@PG_ONLY
def test_a_failed_step_that_rolls_itself_back_is_undone_before_the_others(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "saga.log"
    self_undoing = {**step(log, 3, fail=True), "rollback_on_failure": True}
    b = producer.submit_batch("alpha", [step(log, 1), step(log, 2), self_undoing])
    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "reverted", found.batch
    assert [s.state for s in found.steps] == [State.REVERTED] * 3
    assert lines(log) == ["run 1", "run 2", "run 3", "undo 3", "undo 2", "undo 1"]
    assert found.steps[2].failure_reason == "exit_code"


@PG_ONLY
def test_a_failed_compensation_stops_the_batch_for_a_person(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "saga.log"
    broken = {
        "argv": append(log, "run 2"),
        "compensate": ["/bin/sh", "-c", f"echo 'undo 2 failed' >> '{log}'; exit 9"],
    }
    b = producer.submit_batch("alpha", [step(log, 1), broken, step(log, 3, fail=True)])
    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "revert_failed", found.batch
    assert "step 2" in (found.batch.error or "")
    one, two, three = found.steps
    assert (two.state, two.needs_attention) == (State.REVERT_FAILED, True)
    assert one.state is State.SUCCEEDED  # not undone past a compensation that failed
    assert three.state is State.FAILED
    assert lines(log) == ["run 1", "run 2", "run 3", "undo 2 failed"]


@PG_ONLY
def test_revoking_a_batch_with_compensation_kills_the_running_step_and_undoes_the_rest(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log, pidfile = tmp_path / "saga.log", tmp_path / "pid"
    b = producer.submit_batch("alpha", [step(log, 1), sleeper(log, 2, pidfile), step(log, 3)])
    wait_for(lambda: "run 2" in lines(log), 30, "step 2 to start")
    pid = int(pidfile.read_text())
    assert producer.get(b.command_ids[1]).state is State.RUNNING

    producer.revoke_batch(b.id, compensate=True, operator="olga", reason="wrong release")
    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "reverted", found.batch
    one, two, three = found.steps
    assert one.state is State.REVERTED
    assert (two.state, two.failure_reason) == (State.REVOKED, "revoked")
    assert three.state is State.REVOKED and three.started_at is None
    wait_for(lambda: gone(pid), 10, "the killed step's process to be gone")
    assert lines(log) == ["run 1", "run 2", "undo 1"]
    assert "olga" in (found.batch.error or "")


@PG_ONLY
def test_revoking_a_batch_without_compensation_leaves_finished_steps_alone(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log, pidfile = tmp_path / "saga.log", tmp_path / "pid"
    b = producer.submit_batch(
        "alpha",
        [step(log, 1), sleeper(log, 2, pidfile), step(log, 3)],
        compensate_on_revoke=True,  # the explicit compensate=False below wins
    )
    wait_for(lambda: "run 2" in lines(log), 30, "step 2 to start")
    pid = int(pidfile.read_text())

    returned = producer.revoke_batch(b.id, compensate=False, operator="olga")
    assert returned.batch.state == "revoked"
    wait_for(
        lambda: producer.get(b.command_ids[1]).state is State.REVOKED, 30, "step 2 to be killed"
    )
    wait_for(lambda: gone(pid), 10, "the killed step's process to be gone")
    time.sleep(1)  # a compensation, if one were (wrongly) queued, would have run by now
    found = producer.get_batch(b.id)
    assert found.batch.state == "revoked"
    assert [s.state for s in found.steps] == [State.SUCCEEDED, State.REVOKED, State.REVOKED]
    assert lines(log) == ["run 1", "run 2"]
    with pytest.raises(Exception, match="revoked; nothing to revoke"):
        producer.revoke_batch(b.id, operator="olga")


@PG_ONLY
def test_a_step_that_starts_while_the_batch_is_being_revoked_is_killed_too(
    producer: Producer, workers: Start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The race of an operator's revoke with the worker moving the batch on: the revoke read
    the steps while step 1 ran and step 2 was held; by the time it acts, step 2 runs."""
    workers("alpha")
    log, pidfile = tmp_path / "saga.log", tmp_path / "pid"
    first = {"argv": ["/bin/sh", "-c", f"echo 'run 1' >> '{log}'; sleep 1"]}
    b = producer.submit_batch("alpha", [first, sleeper(log, 2, pidfile), step(log, 3)])
    wait_for(lambda: "run 1" in lines(log), 30, "step 1 to start")

    real_load = saga.load
    calls = []

    def late_load(store: Any, batch_id: str) -> Any:
        found = real_load(store, batch_id)
        calls.append(batch_id)
        if len(calls) == 1:  # the revoke's own read: it acts only once step 2 has started
            assert found is not None and found.steps[1].state is State.PENDING
            wait_for(lambda: "run 2" in lines(log), 30, "step 2 to start")
        return found

    monkeypatch.setattr(saga, "load", late_load)
    producer.revoke_batch(b.id, compensate=False, operator="olga")
    monkeypatch.undo()

    wait_for(
        lambda: producer.get(b.command_ids[1]).state is State.REVOKED,
        15,
        "step 2, which started during the revoke, to be killed",
    )
    wait_for(lambda: gone(int(pidfile.read_text())), 10, "step 2's process to be gone")
    found = producer.get_batch(b.id)
    assert found.batch.state == "revoked"
    assert [s.state for s in found.steps] == [State.SUCCEEDED, State.REVOKED, State.REVOKED]
    assert lines(log) == ["run 1", "run 2"]


@PG_ONLY
def test_a_step_refused_by_policy_or_malformed_creates_no_batch(
    env: Env, producer: Producer, tmp_path: Path
) -> None:
    log = tmp_path / "saga.log"
    with pytest.raises(PolicyDenied) as denied:
        producer.submit_batch("alpha", [step(log, 1), {"argv": ["/bin/rm", "-r", str(tmp_path)]}])
    assert denied.value.rule
    with pytest.raises(SpecError, match="step 2"):
        producer.submit_batch("alpha", [step(log, 1), {"argv": ["relative/rm"]}])
    with pytest.raises(SpecError):
        producer.submit_batch("alpha", [])

    with producer.store.engine.connect() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(batches_table)).scalar() == 0
    # Only the refusal is recorded (as a rejected command); nothing was queued.
    (only,) = producer.list()
    assert only.state is State.REJECTED and only.id == denied.value.command_id
    queue = redis.Redis.from_url(env.vars["EXECQ_BROKER_URL"])
    try:
        assert queue.llen("execq.alpha") == 0
    finally:
        queue.close()


@PG_ONLY
def test_a_lost_worker_fails_its_step_and_the_batch_is_undone(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    first = workers("alpha")
    log, pidfile = tmp_path / "saga.log", tmp_path / "pid"
    b = producer.submit_batch("alpha", [step(log, 1), sleeper(log, 2, pidfile), step(log, 3)])
    wait_for(lambda: "run 2" in lines(log), 30, "step 2 to start")
    second = workers("alpha")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the whole worker: main and pool processes
    first.proc.wait(10)

    found = producer.wait_batch(b.id, 45)
    assert found.batch.state == "reverted", (found.batch, second.output()[-3000:])
    assert found.batch.failed_step == 2
    one, two, three = found.steps
    assert one.state is State.REVERTED
    assert (two.state, two.failure_reason) == (State.FAILED, "worker_lost")
    assert three.state is State.REVOKED and three.started_at is None
    assert lines(log) == ["run 1", "run 2", "undo 1"]


@PG_ONLY
def test_the_cli_submits_a_batch_and_waits_for_it(
    env: Env, producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "saga.log"
    failing = tmp_path / "failing.yaml"
    failing.write_text(
        yaml.safe_dump(
            {"tenant": "alpha", "steps": [step(log, 1), {"argv": ["/bin/false"]}]},
        )
    )
    done = cli(env, "submit-batch", str(failing), "--wait", "--json")
    assert done.returncode == 1, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["state"] == "reverted" and body["failed_step"] == 2
    assert [c["state"] for c in body["commands"]] == ["reverted", "failed"]
    assert lines(log) == ["run 1", "undo 1"]

    good = tmp_path / "good.yaml"
    good.write_text(
        yaml.safe_dump(
            {"tenant": "alpha", "idempotency_key": "cli-1", "steps": [step(log, 5), step(log, 6)]}
        )
    )
    ok = cli(env, "submit-batch", str(good), "--wait", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    first = json.loads(ok.stdout)
    assert first["state"] == "succeeded"
    repeat = cli(env, "submit-batch", str(good), "--json")
    assert repeat.returncode == 0, repeat.stdout + repeat.stderr
    body = json.loads(repeat.stdout)
    assert (body["id"], body["duplicate"], body["state"]) == (first["id"], True, "succeeded")
    assert lines(log) == ["run 1", "undo 1", "run 5", "run 6"]
