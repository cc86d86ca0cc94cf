"""Isolation between tenants: separate queues and pools, so one tenant's flood is not
another tenant's wait."""

from __future__ import annotations

import dataclasses
import itertools
import os
import shutil
import statistics
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
import redis as redis_lib

from producer.client import Producer
from producer.errors import PolicyDenied
from producer.spec import CommandSpec
from producer.states import State
from producer.tenants import load_tenants
from tests.conftest import CI, PYTHON, Env, start_worker, wait_for
from tests.test_worker import Start
from workers.sandbox import detect_capabilities


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


# --- separate identities and no network ---------------------------------------------------

ISOLATED_YAML = f"""
tenants:
  alpha:
    concurrency: 2
    executables: [/bin/sh, /bin/sleep, /bin/true, {PYTHON}]
    run_as: {{uid_min: 41000, uid_max: 41001, gid: 41000}}
  beta:
    concurrency: 1
    executables: [/bin/sh, /bin/sleep, /bin/true, {PYTHON}]
    run_as: {{uid_min: 42000, uid_max: 42000, gid: 42000}}
    network: false
    submit_rate: {{per_s: 0.5, burst: 3}}
  gamma:
    concurrency: 1
    executables: [/bin/sh, /bin/cat, {PYTHON}]
    run_as: {{uid_min: 43000, uid_max: 43000, gid: 43000}}
    filesystem: {{tmp_mb: 4, hidden: [/home, /var/tmp]}}
"""

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="separate uids need a root worker")


def _isolated(tmp_path: Path, make_env: Callable[..., Env], env: Env) -> Env:
    path = tmp_path / "isolated.yaml"
    path.write_text(ISOLATED_YAML)
    isolated = make_env(env.settings.database_url, env.settings.broker_url)
    isolated.vars["EXECQ_TENANTS_FILE"] = str(path)
    isolated.tenants = load_tenants(path)
    return isolated


def _pid_of(marker: str) -> int | None:
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                if marker.encode() in (proc / "cmdline").read_bytes():
                    return int(proc.name)
            except OSError:
                continue
    return None


def _uid_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("Uid:")[1].split()[0])


PROBE = (
    'kill -0 {pid} 2>/dev/null; echo "signal=$?"; '
    'cat /proc/{pid}/environ >/dev/null 2>&1; echo "environ=$?"; '
    'ls /proc/{pid}/cwd/ >/dev/null 2>&1; echo "files=$?"; id -u'
)


@needs_root
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_tenants_and_commands_cannot_read_or_signal_each_other(
    tmp_path: Path, make_env: Callable[..., Env], env: Env
) -> None:
    isolated = _isolated(tmp_path, make_env, env)
    started = [start_worker(isolated, "alpha"), start_worker(isolated, "beta")]
    try:
        with isolated.producer() as producer:
            marker = f"{30 + uuid.uuid4().int % 1000 / 1000:.3f}"
            victim = producer.submit(
                CommandSpec(
                    tenant="alpha",
                    argv=["/bin/sh", "-c", f"echo secret > private; exec /bin/sleep {marker}"],
                    secrets={"TOKEN": "alpha-t0ken-value"},
                )
            )
            wait_for(lambda: _pid_of(marker) is not None, 20, "alpha's command")
            pid = _pid_of(marker)
            assert pid is not None
            victim_uid = _uid_of(pid)
            assert victim_uid in (41000, 41001)
            probe = ["/bin/sh", "-c", PROBE.format(pid=pid)]
            other_tenant = producer.submit(CommandSpec(tenant="beta", argv=probe))
            same_tenant = producer.submit(CommandSpec(tenant="alpha", argv=probe))
            for r, uids in ((other_tenant, {42000}), (same_tenant, {41000, 41001} - {victim_uid})):
                rec = producer.wait(r.id, timeout=30)
                lines = (rec.stdout or "").split()
                # kill, /proc/PID/environ and its files: all refused (exit status 1 or 2).
                assert lines[:3] != ["signal=0", "environ=0", "files=0"]
                assert "signal=0" not in lines and "environ=0" not in lines, lines
                assert "files=0" not in lines, lines
                assert int(lines[-1]) in uids, lines
            producer.revoke(victim.id, terminate=True, operator="test")
            producer.wait(victim.id, timeout=30)
    finally:
        for w in started:
            w.stop()


@needs_root
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_tenant_without_network_cannot_connect_anywhere(
    tmp_path: Path, make_env: Callable[..., Env], env: Env
) -> None:
    isolated = _isolated(tmp_path, make_env, env)
    host, port = "127.0.0.1", 6379
    connect = [
        PYTHON,
        "-c",
        f"import socket; socket.create_connection(({host!r}, {port}), timeout=2); print('ok')",
    ]
    started = [start_worker(isolated, "alpha"), start_worker(isolated, "beta")]
    try:
        with isolated.producer() as producer:
            online = producer.wait(
                producer.submit(CommandSpec(tenant="alpha", argv=connect)).id, 30
            )
            offline = producer.wait(
                producer.submit(CommandSpec(tenant="beta", argv=connect)).id, 30
            )
        assert (online.state, (online.stdout or "").strip()) == (State.SUCCEEDED, "ok")
        assert offline.state is State.FAILED
        # Refused outright (seccomp), not merely unreachable (the namespace alone).
        assert "PermissionError" in (offline.stderr or ""), offline.stderr
        assert offline.enforced is not None
        assert offline.enforced["network"].startswith("none")
        assert offline.enforced["identity"] == "uid 42000 gid 42000"
    finally:
        for w in started:
            w.stop()


def test_a_host_that_cannot_isolate_says_why() -> None:
    caps = dataclasses.replace(detect_capabilities(), euid=1000)
    assert "root worker" in (caps.can_isolate(run_as=True, no_network=False) or "")
    assert "unshare" in (caps.can_isolate(run_as=False, no_network=True) or "")
    assert caps.can_isolate(run_as=False, no_network=False) is None


@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_tenant_over_its_submit_rate_is_refused_recorded_and_audited(
    tmp_path: Path, make_env: Callable[..., Env], env: Env
) -> None:
    isolated = _isolated(tmp_path, make_env, env)
    with isolated.producer() as producer:
        redis_lib.Redis.from_url(isolated.settings.broker_url).delete("execq.rate.beta")
        accepted, refused = [], []
        for n in range(5):
            spec = CommandSpec(tenant="beta", argv=["/bin/true"], idempotency_key=f"rate-{n}")
            try:
                accepted.append(producer.submit(spec).id)
            except PolicyDenied as denied:
                assert denied.rule == "submit_rate" and "submit_rate allows" in str(denied)
                assert denied.command_id is not None
                refused.append(denied.command_id)
        # The burst of 3 passes; then one token every 2 s, so the next two are refused.
        assert (len(accepted), len(refused)) == (3, 2)
        for cid in refused:
            rec = producer.get(cid)
            assert (rec.state, rec.failure_reason) == (State.REJECTED, "policy:submit_rate")
            phases = [(e.phase, e.outcome) for e in producer.audit_events(command_id=cid)]
            assert ("authz", "refused") in phases
        # Other tenants have their own bucket (none at all, here).
        for _ in range(5):
            producer.submit(CommandSpec(tenant="alpha", argv=["/bin/true"]))


LIMITED_YAML = """
tenants:
  alpha:
    concurrency: 2
    executables: [/bin/sh, /bin/sleep, /bin/true]
    max_concurrent: 1
"""


@pytest.mark.parametrize("database_url", ["sqlite", "postgresql"], indirect=True)
def test_max_concurrent_holds_across_pool_processes_and_workers(
    tmp_path: Path, make_env: Callable[..., Env], env: Env
) -> None:
    path = tmp_path / "limited.yaml"
    path.write_text(LIMITED_YAML)
    limited = make_env(env.settings.database_url, env.settings.broker_url)
    limited.vars["EXECQ_TENANTS_FILE"] = str(path)
    limited.tenants = load_tenants(path)
    # Two workers of two pool processes each: four could run at once, the tenant allows one.
    started = [start_worker(limited, "alpha"), start_worker(limited, "alpha")]
    try:
        with limited.producer() as producer:
            # Each command reports when it really ran: the store's started_at is taken when
            # the claim is prepared, which on SQLite may then wait for the previous command's
            # finishing write to release the lock (a millisecond of false overlap).
            timed = ["/bin/sh", "-c", "date +%s.%N; sleep 0.3; date +%s.%N"]
            ids = [producer.submit(CommandSpec(tenant="alpha", argv=timed)).id for _ in range(6)]
            done = [producer.wait(cid, timeout=60) for cid in ids]
    finally:
        for w in started:
            w.stop()
    assert all(r.state is State.SUCCEEDED for r in done)
    spans = sorted(tuple(float(t) for t in (r.stdout or "").split()) for r in done)
    assert len(spans) == 6 and all(len(span) == 2 for span in spans), spans
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two commands of a max_concurrent: 1 tenant overlapped"
    # Throttled deliveries came back later: some claims had to wait for their turn.
    assert any("tenant at max_concurrent" in w.output() for w in started)


@needs_root
@pytest.mark.skipif(
    detect_capabilities().bwrap is None and not CI, reason="no bubblewrap on this host"
)
@pytest.mark.parametrize("database_url", ["postgresql"], indirect=True)
def test_a_tenant_with_a_filesystem_view_sees_a_read_only_host_and_no_worker_secrets(
    tmp_path: Path,
    make_env: Callable[..., Env],
    env: Env,
    monkeypatch: pytest.MonkeyPatch,
    request: pytest.FixtureRequest,
) -> None:
    isolated = _isolated(tmp_path, make_env, env)
    # Readable by anyone on the host (pytest's tmp_path is not): only the view hides it (a
    # worker refuses to start when a run_as uid could read a key it does not hide).
    keys = Path(tempfile.mkdtemp(dir="/var/tmp"))
    request.addfinalizer(lambda: shutil.rmtree(keys, ignore_errors=True))
    keys.chmod(0o755)
    key = keys / "signing.key"
    key.write_text("0123456789abcdef" * 4)
    key.chmod(0o644)
    isolated.vars.pop("EXECQ_SIGNING_KEY", None)
    isolated.vars["EXECQ_SIGNING_KEY_FILE"] = str(key)
    monkeypatch.setenv("EXECQ_SIGNING_KEY_FILE", str(key))  # the producer signs with it too
    monkeypatch.delenv("EXECQ_SIGNING_KEY", raising=False)
    worker = start_worker(isolated, "gamma")
    try:
        assert "filesystem view: bubblewrap (private /tmp 4 MB)" in worker.output()
        probe = (
            f"cat {key} >/dev/null 2>&1; echo key=$?; "
            "touch /etc/execq-probe 2>/dev/null; echo etc=$?; "
            "ls /run | wc -l; id -u; "
            "dd if=/dev/zero of=/tmp/fill bs=1M count=8 2>/dev/null; echo tmp=$?"
        )
        with isolated.producer() as producer:
            rec = producer.wait(
                producer.submit(CommandSpec(tenant="gamma", argv=["/bin/sh", "-c", probe])).id,
                30,
            )
        assert rec.state is State.FAILED or rec.state is State.SUCCEEDED, rec
        lines = (rec.stdout or "").split()
        assert lines == ["key=1", "etc=1", "0", "43000", "tmp=1"], (lines, rec.stderr)
        assert rec.enforced is not None
        assert rec.enforced["filesystem"].startswith("bubblewrap")
        assert rec.enforced["identity"] == "uid 43000 gid 43000"
    finally:
        worker.stop()
