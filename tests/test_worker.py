"""End to end with real worker processes, a real Redis and both store backends."""

from __future__ import annotations

import json
import os
import shlex
import signal
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import pytest
import redis
from kombu import Connection

from producer.broker import TASK_NAME
from producer.client import Producer
from producer.errors import InvalidOperation, PolicyDenied
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import PYTHON, Env, WorkerProc, wait_for

pytestmark = pytest.mark.slow

Start = Callable[..., WorkerProc]


def alive(pids: list[int]) -> list[int]:
    """Pids that still run (zombies count as gone)."""
    left = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                left.append(pid)
        except psutil.NoSuchProcess:
            pass
    return left


def test_a_command_runs_and_its_output_and_limits_are_recorded(
    producer: Producer, workers: Start
) -> None:
    workers("alpha")
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "hello", "world"]))
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.SUCCEEDED and rec.exit_code == 0
    assert rec.stdout == "hello world\n" and rec.stderr == ""
    assert rec.version == 3 and rec.attempts == 1
    assert rec.enforced and {"time", "cpu", "memory", "processes", "file_size"} <= set(rec.enforced)
    history = producer.get(r.id, with_transitions=True).transitions
    assert [t.to_state for t in history] == [State.PENDING, State.RUNNING, State.SUCCEEDED]


def test_a_failing_command_keeps_exit_code_and_stderr(producer: Producer, workers: Start) -> None:
    workers("alpha")
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "echo oops >&2; exit 3"])
    )
    rec = producer.wait(r.id, timeout=30)
    assert (rec.state, rec.exit_code, rec.failure_reason) == (State.FAILED, 3, "exit_code")
    assert rec.stderr == "oops\n"


def test_the_child_sees_only_its_whitelisted_environment(
    producer: Producer, workers: Start, env: Env
) -> None:
    workers("alpha", extra_env={"WORKER_SECRET_CANARY": "must-not-leak"})
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=["/usr/bin/env"],
            env={"LANG": "C.UTF-8", "COLOR": "blue"},
            secrets={"API_TOKEN": "tok-123"},
        )
    )
    rec = producer.wait(r.id, timeout=30)
    seen = dict(line.split("=", 1) for line in (rec.stdout or "").splitlines())
    assert "WORKER_SECRET_CANARY" not in seen
    assert seen["PATH"] == "/usr/local/bin:/usr/bin:/bin"
    assert seen["HOME"] == seen["TMPDIR"] and seen["HOME"].startswith(str(env.root / "work"))
    # The child had the exact value; the stored output shows it scrubbed.
    assert seen["COLOR"] == "blue" and seen["API_TOKEN"] == "[secret:API_TOKEN]"
    assert seen["TENANT_GREETING"] == "hello-alpha" and seen["LANG"] == "C.UTF-8"
    assert seen["TRACEPARENT"].startswith(f"00-{rec.trace_id}-")
    assert set(seen) <= {
        "PATH",
        "HOME",
        "TMPDIR",
        "LANG",
        "COLOR",
        "API_TOKEN",
        "TENANT_GREETING",
        "TRACEPARENT",
        "TRACESTATE",
        "PWD",
        "SHLVL",
        "_",
    }
    assert not Path(seen["HOME"]).exists(), "private directory must be removed afterwards"


def test_injection_strings_in_argv_are_inert(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    target = tmp_path / "pwned"
    payloads = [
        f"$(touch {target})",
        f"`touch {target}`",
        f"; touch {target}",
        f"&& touch {target}",
        f"| touch {target}",
        "${PATH}",
        "*",
    ]
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", *payloads]))
    rec = producer.wait(r.id, timeout=30)
    assert rec.stdout == " ".join(payloads) + "\n"
    assert not target.exists()


def test_a_timeout_kills_the_whole_tree_including_a_setsid_escapee(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    workers("alpha")
    pidfile = tmp_path / f"pids-{uuid.uuid4().hex}"
    script = (
        "import os, subprocess, sys, time\n"
        f"f = open({str(pidfile)!r}, 'a')\n"
        "child = subprocess.Popen(['/bin/sleep', '300'])\n"
        "esc = subprocess.Popen(['/bin/sleep', '301'], start_new_session=True)\n"
        "f.write(f'{os.getpid()} {child.pid} {esc.pid}\\n'); f.close()\n"
        "time.sleep(300)\n"
    )
    r = producer.submit(CommandSpec(tenant="alpha", argv=[PYTHON, "-c", script], timeout_s=2.0))
    rec = producer.wait(r.id, timeout=30)
    assert (rec.state, rec.failure_reason) == (State.FAILED, "timeout")
    pids = [int(p) for p in pidfile.read_text().split()]
    assert len(pids) == 3
    wait_for(lambda: not alive(pids), 5, "the process tree to die")


def test_revoking_a_pending_command_means_it_never_runs(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    r = producer.submit(CommandSpec(tenant="beta", argv=["/bin/sh", "-c", f"touch {marker}"]))
    rec = producer.revoke(r.id)
    assert rec.state is State.REVOKED
    workers("beta")
    done = producer.submit(CommandSpec(tenant="beta", argv=["/bin/true"]))
    assert producer.wait(done.id, timeout=30).state is State.SUCCEEDED  # queue drained past it
    assert not marker.exists()
    assert producer.get(r.id).state is State.REVOKED


def test_revoke_terminate_kills_a_running_tree_and_records_revoked(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    w = workers("alpha")
    pidfile = tmp_path / "tree"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            argv=[
                "/bin/sh",
                "-c",
                f"sleep 300 & echo $! >> {pidfile}; setsid sleep 301 & "
                f"echo $! >> {pidfile}; echo $$ >> {pidfile}; wait",
            ],
        )
    )
    wait_for(lambda: pidfile.exists() and len(pidfile.read_text().split()) == 3, 15, "start")
    with pytest.raises(InvalidOperation):
        producer.revoke(r.id)  # running needs terminate=True
    producer.revoke(r.id, terminate=True, operator="ops", reason="stuck")
    rec = producer.wait(r.id, timeout=15)
    assert (rec.state, rec.failure_reason) == (State.REVOKED, "revoked")
    pids = [int(p) for p in pidfile.read_text().split()]
    wait_for(lambda: not alive(pids), 5, "the process tree to die")
    # The lease thread's line about the cancel names the command, like the task's lines.
    lines = [json.loads(x) for x in w.output().splitlines() if x.startswith("{")]
    cancel = [x for x in lines if x["event"].startswith("cancel requested for command")]
    assert cancel and all(x["command_id"] == r.id for x in cancel)


def test_retry_requeues_a_failed_command_with_attempts_plus_one(
    producer: Producer, workers: Start
) -> None:
    workers("alpha")
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/false"]))
    assert producer.wait(r.id, timeout=30).state is State.FAILED
    producer.retry(r.id, operator="ops")
    rec = producer.wait(r.id, timeout=30)
    assert rec.state is State.FAILED and rec.attempts == 2 and rec.version == 6
    ok = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))
    assert producer.wait(ok.id, timeout=30).state is State.SUCCEEDED
    with pytest.raises(InvalidOperation, match="only failed, reverted, revoked"):
        producer.retry(ok.id)


def test_a_policy_refusal_is_recorded_and_raises(producer: Producer) -> None:
    with pytest.raises(PolicyDenied) as info:
        producer.submit(CommandSpec(tenant="beta", argv=["/bin/sh", "-rf"]))
    assert info.value.command_id is not None
    rec = producer.get(info.value.command_id)
    assert rec.state is State.REJECTED and rec.failure_reason == "policy:deny_args:^-rf$"
    with pytest.raises(PolicyDenied):
        producer.submit(CommandSpec(tenant="beta", argv=["/usr/bin/env"]))  # not allow-listed


def test_a_duplicate_key_queues_nothing_new(producer: Producer, workers: Start) -> None:
    workers("alpha")
    spec = CommandSpec(tenant="alpha", argv=["/bin/echo", "once"], idempotency_key="order-42")
    first = producer.submit(spec)
    second = producer.submit(spec)
    assert second.duplicate and second.id == first.id and not first.duplicate
    assert producer.wait(first.id, timeout=30).state is State.SUCCEEDED
    third = producer.submit(spec)
    assert third.duplicate and third.state is State.SUCCEEDED


def _publish_raw(
    url: str,
    queue: str,
    task_id: str,
    kwargs: dict[str, object],
    headers: dict[str, object] | None = None,
    *,
    exchange: str = "execq",
) -> None:
    """Push a hand-made Celery message into `queue` of the default namespace, as anyone with
    Redis access could (through the anonymous exchange `""` it lands in the queue's list even
    before any worker bound it)."""
    with Connection(url, transport_options={"global_keyprefix": "execq."}) as conn:
        producer = conn.Producer(serializer="json")
        producer.publish(
            [[], kwargs, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}],
            exchange=exchange,
            routing_key=queue,
            declare=[],
            headers={
                "lang": "py",
                "task": TASK_NAME,
                "id": task_id,
                "root_id": task_id,
                "parent_id": None,
                "group": None,
                "argsrepr": "()",
                "kwargsrepr": "{}",
                "retries": 0,
                "eta": None,
                "expires": None,
                "origin": "forger",
                **(headers or {}),
            },
        )


def test_duplicate_forged_and_misrouted_deliveries_do_nothing(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    w = workers("alpha")
    url = env.settings.broker_url
    marker = tmp_path / "count"
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"echo x >> {marker}"]))
    assert producer.wait(r.id, timeout=30).state is State.SUCCEEDED
    # the same message again (a redelivery), an unknown id, a beta command sent to alpha's queue
    _publish_raw(url, "alpha", r.id, {"command_id": r.id, "tenant": "alpha"})
    forged = str(uuid.uuid4())
    _publish_raw(url, "alpha", forged, {"command_id": forged, "tenant": "alpha"})
    b = producer.submit(CommandSpec(tenant="beta", argv=["/bin/sh", "-c", f"echo b >> {marker}"]))
    _publish_raw(url, "alpha", b.id, {"command_id": b.id, "tenant": "alpha"})
    _publish_raw(url, "alpha", b.id, {"command_id": b.id, "tenant": "beta"})
    garbage = str(uuid.uuid4())
    _publish_raw(url, "alpha", garbage, {"command_id": "../../etc", "tenant": "alpha"})

    def refusals() -> list[str]:
        return [
            e.reason or ""
            for e in producer.audit_events(tenant="alpha")
            if e.phase == "parse" and e.outcome == "refused"
        ]

    wait_for(lambda: len(refusals()) >= 4, 20, "the worker to audit four refusals")
    assert marker.read_text() == "x\n"
    assert producer.get(r.id).version == 3
    assert producer.get(b.id).state is State.PENDING
    reasons = refusals()
    assert "unknown command id" in reasons
    assert "command belongs to tenant 'beta'" in reasons
    assert "message addressed to another tenant" in reasons
    assert "command_id is not a command id" in reasons
    wait_for(lambda: "ignored repeated delivery" in w.output(), 10, "the duplicate to be logged")
    # Each refusal is a parse event and an abort in the pool's own chain, which stays intact.
    assert producer.store.audit.verify().ok


def test_a_killed_worker_gives_worker_lost_within_a_lease(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    w = workers("alpha", concurrency=1)
    pidfile = tmp_path / "payload"
    r = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", f"echo $$ > {pidfile}; exec sleep 300"])
    )
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), 15, "the payload")
    payload = int(pidfile.read_text())
    os.killpg(w.proc.pid, signal.SIGKILL)  # the whole worker: main and pool processes
    w.proc.wait()
    wait_for(lambda: not alive([payload]), 5, "the payload to die with its worker")
    rescuer = workers("alpha")  # the reaper runs in every worker
    rec = producer.wait(r.id, timeout=4 * env.settings.lease_s + 10)
    assert (rec.state, rec.failure_reason) == (State.FAILED, "worker_lost")
    assert rescuer.proc.poll() is None


def test_a_retry_safe_command_is_rerun_after_its_worker_is_lost(
    producer: Producer, workers: Start, tmp_path: Path
) -> None:
    w = workers("alpha", concurrency=1)
    runs = tmp_path / "runs"
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            retry_safe=True,
            argv=["/bin/sh", "-c", f"echo run >> {runs}; [ $(wc -l < {runs}) -ge 2 ] || sleep 300"],
        )
    )
    wait_for(lambda: runs.exists(), 15, "the first run")
    os.killpg(w.proc.pid, signal.SIGKILL)
    w.proc.wait()
    workers("alpha")
    rec = producer.wait(r.id, timeout=40)
    assert rec.state is State.SUCCEEDED and rec.attempts == 2
    assert runs.read_text() == "run\nrun\n"


def test_sigterm_is_a_warm_shutdown(producer: Producer, workers: Start) -> None:
    w = workers("alpha")
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "sleep 2; echo done"]))
    wait_for(lambda: producer.get(r.id).state is State.RUNNING, 15, "the command to start")
    assert w.stop(signal.SIGTERM, timeout=30) == 0
    rec = producer.get(r.id)
    assert rec.state is State.SUCCEEDED and rec.stdout == "done\n"


def test_submit_while_redis_is_down_loses_nothing(
    make_env: Callable[..., Env], database_url: str
) -> None:
    from workers.embedded import EmbeddedRedis

    server = EmbeddedRedis(record=False)
    env = make_env(database_url, server.url)
    producer = env.producer()
    try:
        r = producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/echo", "survived"], secrets={"TOKEN": "t"})
        )
        assert producer.get(r.id).state is State.PENDING
        assert producer.get(r.id).published_at is None
        server.start()  # Redis comes back on the same address
        from tests.conftest import start_worker

        w = start_worker(env, "alpha")
        try:
            rec = producer.wait(r.id, timeout=30)
            assert rec.state is State.SUCCEEDED and rec.stdout == "survived\n"
        finally:
            w.stop()
    finally:
        producer.close()
        server.stop()


def test_a_worker_publishes_commands_a_crashed_producer_left_unpublished(
    producer: Producer, workers: Start, env: Env
) -> None:
    # A producer that died between commit and publish leaves exactly this row behind.
    created = producer.store.create(
        CommandSpec(tenant="alpha", argv=["/bin/echo", "outbox"]), actor="crashed-producer"
    )
    workers("alpha")
    rec = producer.wait(created.id, timeout=30)
    assert rec.state is State.SUCCEEDED and rec.stdout == "outbox\n"


def test_the_cli_speaks_json_and_uses_the_contracts_exit_codes(env: Env, workers: Start) -> None:
    import subprocess
    import sys

    workers("alpha")
    run_env = {**os.environ, **env.vars}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            env=run_env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    ok = cli("submit", "--json", "--tenant", "alpha", "--wait", "--", "/bin/echo", "hi")
    assert ok.returncode == 0, ok.stderr
    body = json.loads(ok.stdout)
    assert body["state"] == "succeeded" and body["stdout"] == "hi\n"
    st = json.loads(cli("status", "--json", body["id"]).stdout)
    for field in (
        "id",
        "tenant",
        "state",
        "exit_code",
        "stdout",
        "stderr",
        "failure_reason",
        "attempts",
        "version",
        "trace_id",
    ):
        assert field in st
    sub = json.loads(cli("submit", "--json", "--tenant", "alpha", "--", "/bin/true").stdout)
    assert set(sub) == {"id", "state", "duplicate"}
    assert cli("submit", "--tenant", "alpha", "--wait", "--", "/bin/false").returncode == 1
    assert cli("submit", "--tenant", "beta", "--", "/bin/sh", "-rf").returncode == 1
    assert cli("submit", "--tenant", "alpha", "--", "relative/path").returncode == 2
    assert cli("status", str(uuid.uuid4())).returncode == 1
    bad = subprocess.run(
        [sys.executable, "-m", "workers.cli", "list"],
        capture_output=True,
        text=True,
        env={**run_env, "EXECQ_LEASE_S": "-1"},
        timeout=60,
    )
    assert bad.returncode == 2 and "EXECQ_LEASE_S" in bad.stderr
    listed = json.loads(cli("list", "--json", "--tenant", "alpha").stdout)
    assert len(listed) >= 3
    _ = redis


def test_a_redis_restart_neither_kills_nor_reruns_a_running_command(
    make_env: Callable[..., Env], database_url: str, tmp_path: Path
) -> None:
    from tests.conftest import start_worker
    from workers.embedded import EmbeddedRedis

    server = EmbeddedRedis(record=False).start()
    env = make_env(database_url, server.url)
    producer = env.producer()
    runs = tmp_path / "runs"
    w = start_worker(env, "alpha")
    try:
        r = producer.submit(
            CommandSpec(
                tenant="alpha", argv=["/bin/sh", "-c", f"echo run >> {runs}; sleep 3; echo done"]
            )
        )
        wait_for(lambda: producer.get(r.id).state is State.RUNNING, 15, "the command to start")
        server.stop()
        time.sleep(1)
        server = EmbeddedRedis(record=False, port=server.port).start()
        rec = producer.wait(r.id, timeout=30)
        assert (rec.state, rec.stdout) == (State.SUCCEEDED, "done\n")
        after = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/echo", "again"]))
        assert producer.wait(after.id, timeout=60).state is State.SUCCEEDED
        assert runs.read_text() == "run\n"
    finally:
        w.stop()
        producer.close()
        server.stop()


def test_a_command_longer_than_its_lease_keeps_it_by_renewal(
    producer: Producer, workers: Start, env: Env
) -> None:
    workers("alpha")
    seconds = 3 * env.settings.lease_s
    r = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", str(seconds)]))
    rec = producer.wait(r.id, timeout=seconds + 20)
    assert rec.state is State.SUCCEEDED and rec.failure_reason is None
    assert [t.to_state for t in producer.get(r.id, with_transitions=True).transitions] == [
        State.PENDING,
        State.RUNNING,
        State.SUCCEEDED,
    ]


def test_a_message_redis_lost_is_published_again_from_the_store(
    producer: Producer, workers: Start
) -> None:
    import sqlalchemy as sa

    # Published long ago, never claimed, and not in the queue: Redis lost it (restart).
    created = producer.store.create(
        CommandSpec(tenant="alpha", argv=["/bin/echo", "found"]), actor="t"
    )
    with producer.store.engine.begin() as conn:
        conn.execute(
            sa.text("UPDATE commands SET published_at = :t WHERE id = :id"),
            {"t": datetime.now(UTC) - timedelta(hours=1), "id": created.id},
        )
    workers("alpha")
    rec = producer.wait(created.id, timeout=30)
    assert rec.state is State.SUCCEEDED and rec.stdout == "found\n"


def test_a_command_whose_secrets_did_not_arrive_fails_instead_of_running_without_them(
    producer: Producer, workers: Start, env: Env, tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    workers("alpha")
    created = producer.store.create(
        CommandSpec(
            tenant="alpha", argv=["/bin/sh", "-c", f"touch {marker}"], secrets={"TOKEN": "x"}
        ),
        actor="t",
    )
    _publish_raw(
        env.settings.broker_url,
        "alpha",
        created.id,
        {"command_id": created.id, "tenant": "alpha"},
    )
    rec = producer.wait(created.id, timeout=30)
    assert (rec.state, rec.failure_reason) == (State.FAILED, "secrets_unavailable")
    assert "TOKEN" in (rec.error or "") and not marker.exists()


def test_a_warm_shutdown_loses_no_command_it_received_but_never_started(
    producer: Producer, workers: Start
) -> None:
    w = workers("alpha", concurrency=1)
    first = producer.submit(CommandSpec(tenant="alpha", argv=["/bin/sleep", "2"]))
    wait_for(lambda: producer.get(first.id).state is State.RUNNING, 15, "the first command")
    second = producer.submit(
        CommandSpec(tenant="alpha", argv=["/bin/echo", "second"], secrets={"TOKEN": "t"})
    )
    wait_for(lambda: f"execq.run[{second.id}] received" in w.output(), 15, "the reservation")
    assert w.stop(signal.SIGTERM) == 0
    assert producer.get(first.id).state is State.SUCCEEDED
    assert producer.get(second.id).state is State.PENDING
    workers("alpha")
    # Early ack happens when a pool process starts a task: the reserved message is restored.
    rec = producer.wait(second.id, timeout=15)  # far sooner than the reaper would publish it
    assert rec.state is State.SUCCEEDED and rec.stdout == "second\n"


def test_a_secret_the_command_prints_never_reaches_the_store(
    producer: Producer, workers: Start, env: Env
) -> None:
    import sqlalchemy as sa

    canary = f"canary-{uuid.uuid4().hex}"
    workers("alpha")
    r = producer.submit(
        CommandSpec(
            tenant="alpha",
            secrets={"API_TOKEN": canary},
            argv=[
                "/bin/sh",
                "-c",
                'echo "token=$API_TOKEN"; printf %s "$API_TOKEN" | base64 >&2; '
                'echo "x$API_TOKEN" >&2; exit 4',
            ],
        )
    )
    rec = producer.wait(r.id, timeout=30)
    assert (rec.state, rec.exit_code, rec.redacted) == (State.FAILED, 4, True)
    assert rec.stdout == "token=[secret:API_TOKEN]\n"
    dump = []
    with producer.store.engine.connect() as conn:
        for table in ("commands", "transitions"):
            dump += [repr(tuple(row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))]
    assert dump and not [row for row in dump if canary in row]
    import base64

    assert base64.b64encode(canary.encode()).decode()[:20] not in "".join(dump)
    assert rec.secret_names == ["API_TOKEN"]


def test_a_secret_printed_through_json_dumps_or_split_by_the_cut_never_reaches_the_store(
    producer: Producer, workers: Start
) -> None:
    import sqlalchemy as sa

    secret = f'q"uo/te-{uuid.uuid4().hex}-\u00e9'
    printed = json.dumps(secret)
    forms = [secret, printed[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]]
    forms += [printed[1:-1].replace("/", "\\/"), shlex.quote(secret)]
    workers("alpha")
    dumped = producer.submit(
        CommandSpec(
            tenant="alpha",
            secrets={"TOKEN": secret},
            argv=[PYTHON, "-c", 'import json,os;print(json.dumps(os.environ["TOKEN"]))'],
        )
    )
    # alpha keeps 64 KiB at each end: the head's cut falls 12 bytes into the first copy.
    flood = (
        "import json,os,sys;t=json.dumps(os.environ['TOKEN']);"
        "sys.stdout.write('a' * (65536 - 12) + t * 4000)"
    )
    cut = producer.submit(
        CommandSpec(tenant="alpha", secrets={"TOKEN": secret}, argv=[PYTHON, "-c", flood])
    )
    rec = producer.wait(dumped.id, timeout=30)
    assert (rec.state, rec.redacted, rec.stdout) == (State.SUCCEEDED, True, '"[secret:TOKEN]"\n')
    rec = producer.wait(cut.id, timeout=30)
    assert (rec.state, rec.redacted, rec.output_truncated) == (State.SUCCEEDED, True, True)
    assert rec.stdout_bytes == 65524 + 4000 * len(printed)
    assert (rec.stdout or "").startswith("a" * 65524 + '"[secret:TOKEN]\n…[')
    dump = []
    with producer.store.engine.connect() as conn:
        for table in ("commands", "transitions"):
            dump += [repr(tuple(row)) for row in conn.execute(sa.text(f"SELECT * FROM {table}"))]
    assert dump and not [form for form in forms if form in "".join(dump)]
    pieces = {form[i : i + 8] for form in forms for i in range(len(form) - 7)}
    assert not [piece for piece in pieces if piece in (rec.stdout or "") + (rec.stderr or "")]
