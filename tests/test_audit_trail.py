"""The audit trail end to end: real workers write one event per phase, to the store and file."""

from __future__ import annotations

import json
import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from producer.audit.sinks import verify_file
from producer.client import Producer
from producer.errors import PolicyDenied, UnknownTenant
from producer.spec import CommandSpec, cmd_hash
from producer.states import State
from tests.conftest import Env, WorkerProc
from tests.conftest import run_cli as cli
from tests.test_worker import Start, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
CONTRACT_FIELDS = {
    "event_id",
    "command_id",
    "tenant",
    "principal",
    "phase",
    "outcome",
    "cmd_hash",
    "exec_time_ns",
    "duration_ns",
    "trace_id",
    "prev_hash",
    "hash",
}


def phases(producer: Producer, command_id: str) -> list[tuple[int, str, str]]:
    return [(e.attempt, e.phase, e.outcome) for e in producer.audit_events(command_id=command_id)]


def file_events(env: Env) -> list[dict]:
    """The events of the audit file (each file of it begins with a signed head record)."""
    path = env.settings.audit_log
    assert path is not None
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [row for row in rows if row.get("record") != "file_head"]


def test_a_successful_command_writes_each_phase_once_to_the_store_and_the_file(
    producer: Producer, workers: Start, env: Env
) -> None:
    workers("alpha")
    argv = ["/bin/echo", "audited"]
    spec = CommandSpec(tenant="alpha", argv=argv, principal="web:orders")
    r = producer.submit(spec)
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.SUCCEEDED
    events = producer.audit_events(command_id=r.id)
    assert [(e.phase, e.outcome) for e in events] == [
        ("parse", "ok"),
        ("authz", "ok"),
        ("bind", "ok"),
        ("execute", "ok"),
        ("archive", "ok"),
    ]
    for e in events:
        doc = e.to_json()
        assert set(doc) >= CONTRACT_FIELDS
        assert e.cmd_hash == cmd_hash(argv) and len(e.cmd_hash) == 64
        assert e.trace_id == rec.trace_id and e.principal == "web:orders"
        assert e.chain == "alpha"
    execute = events[3]
    assert execute.duration_ns > 0 and execute.detail["exit_code"] == 0
    # The file got the same events (its own chain links), in the same order.
    in_file = [d for d in file_events(env) if d["command_id"] == r.id]
    assert [d["event_id"] for d in in_file] == [e.event_id for e in events]
    assert producer.store.audit.verify().ok
    # The file's links are keyed: it verifies with the store's audit key.
    keys = producer.store.audit.keys()
    assert verify_file(env.settings.audit_log, keys=keys).ok  # type: ignore[arg-type]


def test_a_failed_command_ends_with_abort(producer: Producer, workers: Start) -> None:
    workers("alpha")
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "exit 3"]))
    assert producer.wait(r.id, timeout=30).state is State.FAILED
    assert phases(producer, r.id) == [
        (1, "parse", "ok"),
        (1, "authz", "ok"),
        (1, "bind", "ok"),
        (1, "execute", "failed"),
        (1, "archive", "ok"),
        (1, "abort", "failed"),
    ]
    abort = producer.audit_events(command_id=r.id)[-1]
    assert abort.reason == "exit_code"


def test_refusals_at_submit_are_recorded_and_audited(producer: Producer, env: Env) -> None:
    with pytest.raises(PolicyDenied) as denied:
        producer.submit(CommandSpec(tenant="alpha", argv=["/usr/bin/id"]))
    assert denied.value.command_id is not None
    assert phases(producer, denied.value.command_id) == [
        (1, "parse", "ok"),
        (1, "authz", "refused"),
        (1, "abort", "refused"),
    ]


def test_a_tenant_not_in_the_file_leaves_no_record_and_no_audit_event(
    producer: Producer, env: Env
) -> None:
    # A malformed spec, not a policy refusal: no tenant's history or chain may hold it.
    before = len(producer.audit_events())
    with pytest.raises(UnknownTenant, match="'nobody' is not defined"):
        producer.submit(CommandSpec(tenant="nobody", argv=["/bin/echo"]))
    with pytest.raises(UnknownTenant):
        producer.submit_many(
            [
                CommandSpec(tenant="alpha", argv=["/bin/echo"]),
                CommandSpec(tenant="nobody", argv=["/bin/echo"], idempotency_key="k"),
            ]
        )
    assert producer.store.count() == 0
    assert len(producer.audit_events()) == before
    path = env.settings.audit_log
    assert path is None or not path.exists() or file_events(env) == []


def test_operator_actions_are_events_with_operator_ticket_and_reason(
    producer: Producer, workers: Start
) -> None:
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "exit 1"]))
    producer.revoke(r.id, operator="olga", reason="wrong host", ticket="CHG-7")
    producer.retry(r.id, operator="omar", reason="host fixed", ticket="CHG-8")
    workers("alpha")
    producer.wait(r.id, timeout=30)
    trail = producer.audit_events(command_id=r.id)
    revoke = next(e for e in trail if e.phase == "revoke")
    retry = next(e for e in trail if e.phase == "retry")
    assert (revoke.operator, revoke.ticket, revoke.reason) == ("olga", "CHG-7", "wrong host")
    assert (retry.operator, retry.ticket, retry.reason) == ("omar", "CHG-8", "host fixed")
    assert [e.phase for e in trail] == [
        "parse",
        "authz",
        "revoke",
        "abort",
        "retry",
        "bind",
        "execute",
        "archive",
        "abort",
    ]
    assert [e.attempt for e in trail][-4:] == [2, 2, 2, 2]
    per_attempt = Counter((e.attempt, e.phase) for e in trail)
    assert max(per_attempt.values()) == 1


def test_a_lost_worker_is_an_abort_by_the_reaper(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:

    w: WorkerProc = workers("alpha", concurrency=1)
    started = tmp_path / "started"
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"touch {started}; exec sleep 300"])
    )
    wait_for(started.exists, 15, "the payload")
    os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    workers("alpha")
    assert producer.wait(r.id, timeout=4 * env.settings.lease_s + 10).state is State.FAILED
    trail = producer.audit_events(command_id=r.id)
    assert [e.phase for e in trail] == ["parse", "authz", "abort"]
    assert trail[-1].reason == "worker_lost" and trail[-1].actor.startswith("reaper:")


def test_cli_verify_export_and_show_work_on_a_real_trail(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    workers("alpha")
    ids = [
        producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", str(i)])).id
        for i in range(3)
    ]
    for cid in ids:
        producer.wait(cid, timeout=30)
    ok = cli(env, "audit", "verify", "--json")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["chains"]["alpha"]["events"] == 15
    exported = cli(env, "audit", "export", "--tenant", "alpha")
    assert exported.returncode == 0
    export_file = tmp_path / "export.jsonl"
    export_file.write_text(exported.stdout)
    assert len(exported.stdout.splitlines()) == 15
    assert cli(env, "audit", "verify", "--file", str(export_file)).returncode == 0
    shown = cli(env, "audit", "show", ids[0])
    assert shown.returncode == 0 and "archive" in shown.stdout
    assert cli(env, "audit", "verify", "--file", str(env.settings.audit_log)).returncode == 0


def test_cli_prune_asks_first_then_keeps_the_chain_verifiable(producer: Producer, env: Env) -> None:
    with pytest.raises(PolicyDenied):
        producer.submit(CommandSpec(tenant="alpha", argv=["/usr/bin/id"]))
    future = "2999-01-01T00:00:00Z"
    dry = cli(env, "audit", "prune", "--before", future, "--json")
    assert dry.returncode == 0 and json.loads(dry.stdout)["would_remove"] == {"alpha": 3}
    assert len(producer.audit_events()) == 3
    done = cli(env, "audit", "prune", "--before", future, "--yes", "--operator", "ops")
    assert done.returncode == 0, done.stderr
    remaining = producer.audit_events()
    assert [(e.phase, e.operator) for e in remaining] == [("prune", "ops")]
    assert cli(env, "audit", "verify").returncode == 0
    bad = cli(env, "audit", "prune", "--before", "last tuesday")
    assert bad.returncode == 2 and "ISO 8601" in bad.stderr


def test_two_workers_of_one_tenant_appending_at_once_keep_one_chain(
    producer: Producer, workers: Start, env: Env
) -> None:
    workers("alpha", concurrency=2)
    workers("alpha", concurrency=2)
    ids = [
        producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", str(i)])).id
        for i in range(40)
    ]
    for cid in ids:
        assert producer.wait(cid, timeout=60).state is State.SUCCEEDED
    report = producer.store.audit.verify()
    assert report.ok, report.problem
    assert report.chains["alpha"].events == 40 * 5
    per_command = Counter(e.command_id for e in producer.audit_events())
    assert set(per_command.values()) == {5}
    # Four pool processes in two workers wrote them.
    assert len({e.actor for e in producer.audit_events() if e.phase == "execute"}) >= 2
    keys = producer.store.audit.keys()
    file_report = verify_file(env.settings.audit_log, keys=keys)  # type: ignore[arg-type]
    assert file_report.ok and file_report.events == 40 * 5
