"""Rollback end to end: compensations and snapshots run by real workers on a real store.

Every compensation here leaves a trace on disk (a line appended to a log file), so "ran once"
and "never ran" are read from what really happened, not from the store's own account.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from producer.client import Producer
from producer.errors import InvalidOperation, PolicyDenied, SpecError
from producer.identity import os_identity
from producer.record import CommandRecord
from producer.spec import CommandSpec
from producer.states import State
from producer.store.repository import requeue_fields, utcnow
from tests.conftest import PYTHON, Env, WorkerProc, append, wait_for
from tests.conftest import run_cli as cli

pytestmark = pytest.mark.slow

Start = Callable[..., WorkerProc]
ROOT = Path(__file__).resolve().parent.parent
PG_ONLY = pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
SETTLED = (State.REVERTED, State.REVERT_FAILED)


# --- helpers ------------------------------------------------------------------------------


def settle(producer: Producer, command_id: str, timeout: float = 30) -> CommandRecord:
    """The record once its rollback is over (reverted or revert_failed).

    `Producer.wait` is not enough: `failed` is terminal, and a rollback_on_failure command
    is `failed` for a moment before its rollback makes it `reverting`.
    """
    deadline = time.monotonic() + timeout
    while True:
        rec = producer.get(command_id, with_transitions=True)
        if rec.state in SETTLED:
            return rec
        if time.monotonic() > deadline:
            raise AssertionError(f"command {command_id} still {rec.state} after {timeout} s")
        time.sleep(0.05)


def lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def path_of(rec: CommandRecord) -> list[tuple[str | None, str]]:
    return [(t.from_state, t.to_state) for t in rec.transitions]


def events(producer: Producer, command_id: str, phase: str) -> list[Any]:
    return [e for e in producer.audit_events(command_id=command_id) if e.phase == phase]


def log_records(worker: WorkerProc) -> list[dict[str, Any]]:
    """The worker's JSON log lines (Celery's banner and other plain text skipped)."""
    out = []
    for line in worker.output().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
    return out


# --- automatic rollback ----------------------------------------------------------------------


def test_a_failing_command_is_rolled_back_and_keeps_its_own_result(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "undo.log"
    spec = CommandSpec(
        tenant="alpha",
        argv=["/bin/sh", "-c", "echo did-it; echo oops >&2; exit 7"],
        compensate=["/bin/sh", "-c", f"echo undone >> '{log}'; echo compensated"],
        rollback_on_failure=True,
    )
    r = producer.submit(spec)
    rec = settle(producer, r.id)

    assert rec.state is State.REVERTED, rec
    # The command's own result is kept as it was ...
    assert (rec.exit_code, rec.failure_reason) == (7, "exit_code")
    assert rec.stdout == "did-it\n" and rec.stderr == "oops\n"
    # ... and the compensation's result is beside it.
    comp = rec.compensation
    assert comp is not None
    assert comp["state"] == "reverted" and comp["exit_code"] == 0
    assert comp["stdout"] == "compensated\n" and comp["failure_reason"] is None
    assert comp["attempt"] == 1 and "rollback_on_failure" in (comp["why"] or "")
    assert rec.revert_count == 1 and rec.needs_attention is False
    assert lines(log) == ["undone"]
    (started,) = events(producer, r.id, "rollback")
    assert started.outcome == "ok" and started.detail["trigger"] == "failure"
    (ran,) = events(producer, r.id, "compensate")
    assert ran.outcome == "ok" and ran.detail["exit_code"] == 0

    # Without rollback_on_failure a failure is just a failure: nothing is undone.
    plain = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/false"], compensate=append(log, "wrong"))
    )
    assert producer.wait(plain.id, 30).state is State.FAILED
    time.sleep(1.5)  # a rollback, if one were (wrongly) started, would have run by now
    rec = producer.get(plain.id)
    assert (rec.state, rec.compensation, rec.revert_count) == (State.FAILED, None, 0)
    assert lines(log) == ["undone"]

    # The history, written by the store itself (on both backends), shows the whole way.
    assert path_of(producer.get(r.id, with_transitions=True)) == [
        (None, State.PENDING),
        (State.PENDING, State.RUNNING),
        (State.RUNNING, State.FAILED),
        (State.FAILED, State.REVERTING),
        (State.REVERTING, State.REVERTED),
    ]


@PG_ONLY
def test_timeouts_and_limit_kills_are_rolled_back(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    w = workers("alpha")
    slow_log, hog_log = tmp_path / "slow.log", tmp_path / "hog.log"
    slow = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sleep", "30"],
            timeout_s=1,
            compensate=append(slow_log, "undo slow"),
            rollback_on_failure=True,
        )
    )
    hog = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=[PYTHON, "-c", "x = b'a' * (1 << 30)"],
            memory_mb=64,
            compensate=append(hog_log, "undo hog"),
            rollback_on_failure=True,
        )
    )
    rec = settle(producer, slow.id)
    assert rec.state is State.REVERTED, rec
    assert rec.failure_reason == "timeout"
    assert lines(slow_log) == ["undo slow"]
    assert (State.RUNNING, State.FAILED) in path_of(rec)

    rec = settle(producer, hog.id)
    assert rec.state is State.REVERTED, (rec, w.output()[-2000:])
    if (rec.enforced or {}).get("memory", "").startswith("cgroup"):
        assert rec.failure_reason == "memory_limit"
    else:  # without a memory cgroup the address-space rlimit makes Python itself fail
        assert rec.failure_reason in ("memory_limit", "exit_code")
    assert lines(hog_log) == ["undo hog"]


@PG_ONLY
def test_a_lost_worker_is_failed_by_the_reaper_and_rolled_back(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    first = workers("alpha")
    mark, log = tmp_path / "started", tmp_path / "undo.log"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", f"touch '{mark}'; exec /bin/sleep 60"],
            compensate=append(log, "undo"),
            rollback_on_failure=True,
        )
    )
    wait_for(mark.exists, 30, "the command to start")
    assert producer.get(r.id).state is State.RUNNING
    second = workers("alpha")
    os.killpg(first.proc.pid, signal.SIGKILL)  # the whole worker: main and pool processes
    first.proc.wait(10)

    rec = settle(producer, r.id, timeout=45)
    assert rec.state is State.REVERTED, (rec, second.output()[-3000:])
    assert rec.failure_reason == "worker_lost"
    lost = [t for t in rec.transitions if t.to_state is State.FAILED]
    assert len(lost) == 1 and lost[0].reason == "worker_lost"
    assert path_of(rec)[-2:] == [(State.FAILED, State.REVERTING), (State.REVERTING, State.REVERTED)]
    assert lines(log) == ["undo"]
    comp = rec.compensation
    assert comp is not None and comp["exit_code"] == 0
    # The compensation ran on the surviving worker (its id names a pool process of it).
    assert int(comp["worker"].rsplit(":", 1)[1]) in second.pool_pids()
    (started,) = events(producer, r.id, "rollback")
    assert started.detail["trigger"] == "worker_lost"


def _fail_as_a_crashed_worker(producer: Producer, command_id: str, *, retried: bool) -> None:
    """What a worker that died right after recording the failure leaves in the store: failed,
    and no rollback queued. `retried`: it failed once before and was re-queued automatically."""
    store = producer.store
    claimed = store.claim(command_id, tenant="alpha", worker="crashed@elsewhere:1", lease_s=2)
    assert claimed is not None
    done = {"lease_owner": None, "lease_expires_at": None, "finished_at": utcnow()}
    if retried:
        version = store.transition(
            command_id,
            expect_state=State.RUNNING,
            expect_version=claimed.version,
            to=State.PENDING,
            actor="crashed@elsewhere:1",
            reason="exit_code",
            **requeue_fields(claimed.attempts + 1),
        )
        claimed = store.claim(command_id, tenant="alpha", worker="crashed@elsewhere:1", lease_s=2)
        assert claimed is not None and claimed.version == version + 1
    store.transition(
        command_id,
        expect_state=State.RUNNING,
        expect_version=claimed.version,
        to=State.FAILED,
        actor="crashed@elsewhere:1",
        reason="exit_code",
        exit_code=1,
        failure_reason="exit_code",
        **done,
    )


@PG_ONLY
@pytest.mark.parametrize("retried", [False, True], ids=["first-attempt", "after-a-retry"])
def test_the_reaper_starts_a_rollback_a_crashed_worker_never_queued(
    env: Env, producer: Producer, workers: Start, tmp_path: Path, retried: bool
) -> None:
    log = tmp_path / "undo.log"
    spec = CommandSpec(
        tenant="alpha",
        argv=["/bin/true"],
        compensate=append(log, "undo"),
        rollback_on_failure=True,
        retry_safe=True,
        max_retries=1,
    )
    r = producer.submit(spec)  # no worker yet: the message waits in the queue
    _fail_as_a_crashed_worker(producer, r.id, retried=retried)
    assert producer.get(r.id).state is State.FAILED
    workers("alpha")  # its reaper finds the failure nobody rolled back

    rec = settle(producer, r.id, timeout=15)
    assert rec.state is State.REVERTED, rec
    assert lines(log) == ["undo"]
    (started,) = events(producer, r.id, "rollback")
    assert started.actor.startswith("reaper:") and started.detail["trigger"] == "failure"


@PG_ONLY
def test_a_command_refused_before_it_ran_is_never_rolled_back(
    producer: Producer, workers: Start, tmp_path: Path, tenants_path: Path
) -> None:
    # The worker's tenants file no longer allows /bin/ls (changed after the submit), and a
    # snapshot path holds a fifo (it cannot be archived): neither command ever starts.
    tighter = tmp_path / "tenants-now.yaml"
    allowed = tenants_path.read_text()
    assert "/bin/ls, " in allowed
    tighter.write_text(allowed.replace("/bin/ls, ", ""))
    workers("alpha", extra_env={"EXECQ_TENANTS_FILE": str(tighter)})
    log, site = tmp_path / "undo.log", tmp_path / "site"
    site.mkdir()
    os.mkfifo(site / "pipe")
    refused = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/ls"],
            compensate=append(log, "undo refused"),
            rollback_on_failure=True,
        )
    )
    unsnapped = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/true"],
            snapshot_paths=[str(site)],
            compensate=append(log, "undo unsnapped"),
            rollback_on_failure=True,
        )
    )
    rec = producer.wait(refused.id, 30)
    assert (rec.state, rec.failure_reason) == (State.FAILED, "policy:executables")
    rec = producer.wait(unsnapped.id, 30)
    assert (rec.state, rec.failure_reason) == (State.FAILED, "snapshot_failed")
    time.sleep(4)  # two lease lengths: the reaper's repair pass has looked at both by now
    for cid in (refused.id, unsnapped.id):
        rec = producer.get(cid)
        assert (rec.state, rec.compensation, rec.revert_count) == (State.FAILED, None, 0), rec
        assert events(producer, cid, "rollback") == []
    assert lines(log) == []


# --- failed compensations ----------------------------------------------------------------------


def test_a_failing_compensation_needs_attention_until_rolled_back_again(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    w = workers("alpha")
    log, fixed = tmp_path / "tries.log", tmp_path / "fixed"
    compensate = [
        "/bin/sh",
        "-c",
        f"echo try >> '{log}'; [ -f '{fixed}' ] || {{ echo broken >&2; exit 4; }}",
    ]
    r = producer.submit(
        CommandSpec(
            tenant="alpha", argv=["/bin/false"], compensate=compensate, rollback_on_failure=True
        )
    )
    rec = settle(producer, r.id)
    assert rec.state is State.REVERT_FAILED, rec
    assert rec.needs_attention is True
    assert (rec.exit_code, rec.failure_reason) == (1, "exit_code")  # the command's own
    comp = rec.compensation
    assert comp is not None
    assert (comp["state"], comp["exit_code"], comp["failure_reason"]) == (
        "revert_failed",
        4,
        "exit_code",
    )
    assert comp["stderr"] == "broken\n"
    assert r.id in [c.id for c in producer.list(needs_attention=True)]
    assert producer.wait(r.id, 1).state is State.REVERT_FAILED  # settled for a waiter
    (failed,) = events(producer, r.id, "compensate")
    assert failed.outcome == "failed"

    def warned() -> bool:
        return any(
            x.get("level") == "warning"
            and r.id in x.get("event", "")
            and "needs attention" in x.get("event", "")
            for x in log_records(w)
        )

    wait_for(warned, 10, "a WARNING naming the command and 'needs attention'")

    # Someone fixes the cause; rolling back again runs the compensation a second time.
    fixed.touch()
    again = producer.rollback(r.id, operator="alice", reason="fixed the cause", ticket="OPS-7")
    assert again.state is State.REVERTING
    rec = settle(producer, r.id)
    assert rec.state is State.REVERTED, rec
    assert rec.needs_attention is False and rec.revert_count == 2
    assert rec.compensation is not None and rec.compensation["attempt"] == 2
    assert rec.compensation["requested_by"] == "alice"
    assert lines(log) == ["try", "try"]
    assert r.id not in [c.id for c in producer.list(needs_attention=True)]
    operator_started = [e for e in events(producer, r.id, "rollback") if e.operator == "alice"]
    assert len(operator_started) == 1 and operator_started[0].ticket == "OPS-7"
    assert path_of(rec)[-3:] == [
        (State.REVERTING, State.REVERT_FAILED),
        (State.REVERT_FAILED, State.REVERTING),
        (State.REVERTING, State.REVERTED),
    ]


@PG_ONLY
def test_override_needs_ticket_operator_and_reason_and_is_audited(
    producer: Producer, workers: Start
) -> None:
    workers("alpha")
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/false"],
            # A compensation that hangs is killed at its own limit: that is a failure too.
            compensate=["/bin/sleep", "30"],
            compensate_limits={"timeout_s": 1},
            rollback_on_failure=True,
        )
    )
    rec = settle(producer, r.id)
    assert rec.state is State.REVERT_FAILED and rec.needs_attention is True
    assert rec.compensation is not None and rec.compensation["failure_reason"] == "timeout"
    ok = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
    assert producer.wait(ok.id, 30).state is State.SUCCEEDED

    full = {"ticket": "OPS-1", "operator": "alice", "reason": "cleaned up by hand"}
    for missing in ("ticket", "operator", "reason"):
        given = {**full, missing: None}
        with pytest.raises(InvalidOperation, match=f"--{missing}"):
            producer.override(r.id, resolution="failed", **given)
    with pytest.raises(InvalidOperation, match="--ticket"):
        producer.override(r.id, ticket="  ", operator="alice", reason="x")
    with pytest.raises(InvalidOperation, match="only revert_failed"):
        producer.override(ok.id, **full)
    with pytest.raises(InvalidOperation, match="--approver is no longer accepted"):
        producer.override(ok.id, resolution="failed", force=True, approver="bob", **full)
    assert producer.get(r.id).state is State.REVERT_FAILED
    assert producer.get(ok.id).state is State.SUCCEEDED

    rec = producer.override(r.id, resolution="failed", **full)
    assert rec.state is State.FAILED and rec.needs_attention is False
    assert r.id not in [c.id for c in producer.list(needs_attention=True)]
    overrides = events(producer, r.id, "override")
    assert [e.outcome for e in overrides] == ["refused"] * 4 + ["ok"]
    done = overrides[-1]
    assert (done.operator, done.ticket, done.reason) == ("alice", "OPS-1", "cleaned up by hand")
    assert done.actor == done.detail["identity"] == os_identity()
    assert all(e.reason and "needs --" in e.reason for e in overrides[:4])

    # A command in another state may be settled too, once a different identity approves.
    asked = producer.override(ok.id, resolution="failed", force=True, identity="alice", **full)
    assert asked.state is State.SUCCEEDED
    forced = producer.approve(ok.id, ticket="OPS-1", identity="bob")
    assert forced.state is State.FAILED
    (forced_event,) = [e for e in events(producer, ok.id, "override") if e.outcome == "ok"]
    assert forced_event.detail["approver"] == "bob" and forced_event.detail["forced"] is True
    assert forced_event.detail["requested_by"] == "alice"


@PG_ONLY
def test_a_compensation_whose_worker_is_lost_is_not_run_again(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    first = workers("alpha")
    log = tmp_path / "undo.log"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/true"],
            compensate=["/bin/sh", "-c", f"echo undo >> '{log}'; exec /bin/sleep 60"],
        )
    )
    assert producer.wait(r.id, 30).state is State.SUCCEEDED
    producer.rollback(r.id, operator="op")
    wait_for(lambda: lines(log) == ["undo"], 30, "the compensation to start")
    second = workers("alpha")
    os.killpg(first.proc.pid, signal.SIGKILL)
    first.proc.wait(10)

    rec = settle(producer, r.id, timeout=45)
    # It may have half run: a person decides, the reaper does not run it blindly again.
    assert rec.state is State.REVERT_FAILED, (rec, second.output()[-3000:])
    assert rec.needs_attention is True
    assert rec.compensation is not None
    assert rec.compensation["failure_reason"] == "worker_lost"
    time.sleep(1.5)  # a re-run, if one were (wrongly) queued, would have started by now
    assert lines(log) == ["undo"]
    assert producer.get(r.id).revert_count == 1
    assert r.id in [c.id for c in producer.list(needs_attention=True)]


# --- operator rollbacks ----------------------------------------------------------------------


@PG_ONLY
def test_rollback_refusals_say_why_and_are_audited(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "undo.log"
    bare = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
    slow = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/true"],
            compensate=["/bin/sh", "-c", f"sleep 2; echo slow >> '{log}'"],
        )
    )
    versioned = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=append(log, "versioned"))
    )
    with pytest.raises(PolicyDenied) as denied:
        producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/rm", "-r", "/x"], compensate=["/bin/true"])
        )
    rejected = denied.value.command_id
    assert rejected is not None
    for cid in (bare.id, slow.id, versioned.id):
        assert producer.wait(cid, 30).state is State.SUCCEEDED

    def refused(cid: str, match: str, **kwargs: Any) -> None:
        before = producer.get(cid)
        with pytest.raises(InvalidOperation, match=match) as exc:
            producer.rollback(cid, operator="olga", ticket="OPS-9", **kwargs)
        after = producer.get(cid)
        assert (after.state, after.version) == (before.state, before.version)
        last = events(producer, cid, "rollback")[-1]
        assert (last.outcome, last.operator, last.ticket) == ("refused", "olga", "OPS-9")
        assert last.reason == str(exc.value)

    refused(bare.id, "has no compensation")
    refused(rejected, "is rejected; only")
    current = producer.get(versioned.id).version
    refused(versioned.id, f"at version {current}, not {current - 1}", expect_version=current - 1)
    rec = producer.rollback(versioned.id, operator="olga", expect_version=current)
    assert rec.state is State.REVERTING

    producer.rollback(slow.id, operator="first")
    refused(slow.id, r"already being rolled back \(asked by first\)")
    assert settle(producer, slow.id).state is State.REVERTED
    refused(slow.id, "already rolled back")
    assert settle(producer, versioned.id).state is State.REVERTED
    assert sorted(lines(log)) == ["slow", "versioned"]


@pytest.mark.parametrize("database_url", ["postgresql", "sqlite"], indirect=True)
def test_concurrent_operator_rollbacks_start_one_compensation(
    env: Env, producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "undo.log"
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=append(log, "undo"))
    )
    assert producer.wait(r.id, 30).state is State.SUCCEEDED

    operators = [env.producer() for _ in range(4)]
    barrier = threading.Barrier(len(operators))
    results: list[object] = [None] * len(operators)

    def roll(i: int) -> None:
        barrier.wait()
        try:
            results[i] = operators[i].rollback(r.id, operator=f"op{i}")
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=roll, args=(i,)) for i in range(len(operators))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        for p in operators:
            p.close()

    won = [x for x in results if isinstance(x, CommandRecord)]
    lost = [x for x in results if isinstance(x, InvalidOperation)]
    assert len(won) == 1 and len(lost) == 3, results
    assert all("already" in str(x) for x in lost), lost
    rec = settle(producer, r.id)
    assert rec.state is State.REVERTED and rec.revert_count == 1
    time.sleep(1)  # a second compensation, if one were (wrongly) queued, would have run
    assert lines(log) == ["undo"]
    rollbacks = events(producer, r.id, "rollback")
    assert sorted(e.outcome for e in rollbacks) == ["ok", "refused", "refused", "refused"]
    assert len(path_of(producer.get(r.id, with_transitions=True))) == 5


@PG_ONLY
def test_a_redelivered_compensation_message_runs_it_once(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    w = workers("alpha")  # concurrency 2: a duplicate may land beside the running compensation
    log = tmp_path / "undo.log"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/true"],
            compensate=["/bin/sh", "-c", f"echo undo >> '{log}'; sleep 1.5"],
        )
    )
    assert producer.wait(r.id, 30).state is State.SUCCEEDED
    producer.rollback(r.id, operator="op")
    # The same message again while the compensation may be running ...
    for _ in range(3):
        producer.publisher.publish(r.id, "alpha")
    rec = settle(producer, r.id)
    assert rec.state is State.REVERTED
    # ... and after it finished.
    for _ in range(3):
        producer.publisher.publish(r.id, "alpha")
    store = producer.store
    assert store.claim_revert(r.id, tenant="alpha", worker="intruder", lease_s=2) is None

    def ignored() -> int:
        return sum(
            1
            for x in log_records(w)
            if "ignored repeated delivery" in x.get("event", "") and r.id in x["event"]
        )

    wait_for(lambda: ignored() >= 6, 30, "the worker to ignore all six repeats")
    rec = producer.get(r.id, with_transitions=True)
    assert lines(log) == ["undo"]
    assert rec.state is State.REVERTED and rec.revert_count == 1
    assert rec.compensation is not None and rec.compensation["attempt"] == 1
    assert len(events(producer, r.id, "compensate")) == 1


# --- snapshots -------------------------------------------------------------------------------


def test_a_snapshot_undoes_content_mode_new_and_deleted_files(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    site = tmp_path / "site"
    site.mkdir()
    (site / "a.txt").write_text("one\n")
    (site / "run.sh").write_text("#!/bin/sh\n")
    (site / "run.sh").chmod(0o644)
    (site / "gone.txt").write_text("keep me\n")
    seen = tmp_path / "seen"
    script = (
        f"cd '{site}' && echo two > a.txt && chmod 755 run.sh && echo new > new.txt "
        "&& rm gone.txt && exit 1"
    )
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", script],
            snapshot_paths=[str(site)],
            # Runs after the restore: it sees the files as they were.
            compensate=["/bin/sh", "-c", f"cat '{site}/a.txt' > '{seen}'"],
            rollback_on_failure=True,
        )
    )
    rec = settle(producer, r.id)
    assert rec.state is State.REVERTED, rec
    assert (site / "a.txt").read_text() == "one\n"
    assert stat.S_IMODE((site / "run.sh").stat().st_mode) == 0o644
    assert (site / "gone.txt").read_text() == "keep me\n"
    assert not (site / "new.txt").exists()
    assert seen.read_text() == "one\n"
    assert rec.compensation is not None
    undone = rec.compensation["snapshot"]
    assert (undone["added"], undone["changed"], undone["removed"]) == (1, 2, 1), undone
    assert undone["paths"]["added"] == [str(site / "new.txt")]
    assert undone["paths"]["removed"] == [str(site / "gone.txt")]
    assert sorted(undone["paths"]["changed"]) == [str(site / "a.txt"), str(site / "run.sh")]
    (archived,) = events(producer, r.id, "archive")
    changes = archived.detail["snapshot_changes"]
    assert (changes["added"], changes["changed"], changes["removed"]) == (1, 2, 1), changes
    # Restored: the archive is dropped (right after the record says reverted).
    wait_for(lambda: not producer.store.snapshots.exists(r.id), 10, "the archive to go")

    # A snapshot alone (no compensate argv) is enough to roll back a command that succeeded.
    ok = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", f"echo three > '{site}/a.txt'; touch '{site}/extra'"],
            snapshot_paths=[str(site)],
        )
    )
    assert producer.wait(ok.id, 30).state is State.SUCCEEDED
    assert (site / "a.txt").read_text() == "three\n"
    producer.rollback(ok.id, operator="op")
    rec = settle(producer, ok.id)
    assert rec.state is State.REVERTED, rec
    assert (site / "a.txt").read_text() == "one\n"
    assert not (site / "extra").exists()
    assert rec.compensation is not None and "exit_code" not in rec.compensation
    assert rec.compensation["snapshot"]["added"] == 1


# --- automatic retries ------------------------------------------------------------------------


@PG_ONLY
def test_retry_safe_commands_retry_with_backoff_before_any_rollback(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha", extra_env={"EXECQ_RETRY_BACKOFF_S": "0.2"})
    counter = tmp_path / "count"
    third_time_lucky = (
        f"n=$(cat '{counter}' 2>/dev/null || echo 0); n=$((n+1)); echo $n > '{counter}'; "
        "[ $n -ge 3 ]"
    )
    lucky = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", third_time_lucky],
            retry_safe=True,
            max_retries=2,
        )
    )
    runs, undo = tmp_path / "runs.log", tmp_path / "undo.log"
    hopeless = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/sh", "-c", f"echo run >> '{runs}'; exit 2"],
            retry_safe=True,
            max_retries=1,
            compensate=append(undo, "undo"),
            rollback_on_failure=True,
        )
    )

    rec = producer.wait(lucky.id, 30)
    rec = producer.get(lucky.id, with_transitions=True)
    assert rec.state is State.SUCCEEDED, rec
    assert rec.attempts == 3 and counter.read_text().strip() == "3"
    assert path_of(rec).count((State.RUNNING, State.PENDING)) == 2
    retries = events(producer, lucky.id, "retry")
    assert len(retries) == 2
    for e in retries:
        # base 0.2 s doubling, with jitter down to half: never more than 0.4 s here
        assert 0 < e.detail["delay_s"] <= 0.4, e.detail
    assert [e.detail["next_attempt"] for e in retries] == [2, 3]

    rec = settle(producer, hopeless.id)
    assert rec.state is State.REVERTED, rec
    assert rec.attempts == 2 and rec.max_retries == 1
    assert (rec.exit_code, rec.failure_reason) == (2, "exit_code")
    assert lines(runs) == ["run", "run"]
    assert lines(undo) == ["undo"]  # undone once, after the last attempt only
    assert path_of(rec).count((State.RUNNING, State.PENDING)) == 1


@PG_ONLY
def test_retry_settings_are_checked_at_submit(producer: Producer) -> None:
    with pytest.raises(SpecError, match="retry_safe"):
        CommandSpec(tenant="alpha", argv=["/bin/true"], max_retries=2)
    with pytest.raises(PolicyDenied, match="ceiling") as denied:
        producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/true"], retry_safe=True, max_retries=6)
        )
    assert denied.value.rule == "max_retries"
    assert denied.value.command_id is not None
    assert producer.get(denied.value.command_id).state is State.REJECTED
    fine = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/true"], retry_safe=True, max_retries=5)
    )
    assert fine.state is State.PENDING and producer.get(fine.id).max_retries == 5


# --- the command line ------------------------------------------------------------------------


@PG_ONLY
def test_the_cli_rolls_back_overrides_and_lists_what_needs_attention(
    env: Env, producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    log = tmp_path / "undo.log"
    ok = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/true"], compensate=append(log, "undo"))
    )
    bad = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/bin/false"],
            compensate=["/bin/sh", "-c", "echo nope >&2; exit 5"],
            rollback_on_failure=True,
        )
    )
    bare = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
    assert producer.wait(ok.id, 30).state is State.SUCCEEDED
    assert producer.wait(bare.id, 30).state is State.SUCCEEDED
    assert settle(producer, bad.id).state is State.REVERT_FAILED

    done = cli(env, "rollback", ok.id, "--operator", "carol", "--wait", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    body = json.loads(done.stdout)
    assert body["state"] == "reverted" and body["compensation"]["requested_by"] == "carol"
    assert lines(log) == ["undo"]

    none = cli(env, "rollback", bare.id, "--operator", "carol", "--json")
    assert none.returncode == 1
    assert "no compensation" in json.loads(none.stdout)["error"]

    again = cli(env, "rollback", bad.id, "--operator", "carol", "--wait", "--json")
    assert again.returncode == 1, again.stdout + again.stderr
    body = json.loads(again.stdout)
    assert body["state"] == "revert_failed" and body["revert_count"] == 2

    listed = cli(env, "list", "--needs-attention", "--json")
    assert listed.returncode == 0, listed.stderr
    assert [c["id"] for c in json.loads(listed.stdout)] == [bad.id]

    args = ["--operator", "dave", "--reason", "cleaned by hand", "--resolution", "failed"]
    no_ticket = cli(env, "override", bad.id, *args, "--json")
    assert no_ticket.returncode == 1
    assert "--ticket" in json.loads(no_ticket.stdout)["error"]
    settled = cli(env, "override", bad.id, "--ticket", "OPS-3", *args, "--json")
    assert settled.returncode == 0, settled.stdout + settled.stderr
    body = json.loads(settled.stdout)
    assert body["state"] == "failed" and body["needs_attention"] is False
    assert json.loads(cli(env, "list", "--needs-attention", "--json").stdout) == []
    outcomes = [e.outcome for e in events(producer, bad.id, "override")]
    assert outcomes == ["refused", "ok"]
