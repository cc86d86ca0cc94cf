"""Two tenants on one host, each running as its own uids: B's command goes after A and finds
nothing — not A's store, audit log, keys, worker environment, processes or queued secrets."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import pytest
from sqlalchemy.engine import make_url

from producer.client import Producer
from producer.settings import Settings
from producer.spec import CommandSpec
from producer.states import State
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import load_tenants
from tests.conftest import PYTHON, Env, WorkerProc, start_worker, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs a root worker")

CANARY = "tenant-a-canary-5d2c9e41"
SIGNING = "boundary-signing-key-" + "x" * 16
NAP = "15.4242"  # a duration nothing else on the host sleeps: how the test finds A's command

TENANTS = f"""
tenants:
  alpha:
    concurrency: 1
    executables: [/bin/sleep, /bin/sh]
    run_as: {{uid_min: 20300, uid_max: 20300, gid: 20300}}
  beta:
    concurrency: 1
    executables: [{PYTHON}]
    run_as: {{uid_min: 20310, uid_max: 20310, gid: 20310}}
    limits: {{timeout_s: 20}}
"""

# What a hostile command of tenant B tries, as its own uid; it prints one JSON report.
PROBE = r"""
import json, os, socket, sys
targets = json.loads(sys.argv[1])
report = {}
def attempt(name, fn):
    try:
        report[name] = "GOT: " + repr(fn())[:200]
    except Exception as exc:
        report[name] = "denied: " + type(exc).__name__
for label, path in targets["files"].items():
    attempt("read " + label, lambda p=path: open(p, "rb").read(64))
attempt("list the keys directory", lambda: os.listdir(targets["keys_dir"]))
attempt("read A's worker environment",
        lambda: open(f"/proc/{targets['worker_pid']}/environ", "rb").read())
attempt("signal A's command", lambda: os.kill(targets["command_pid"], 0))
def redis_dump():
    s = socket.create_connection(("127.0.0.1", targets["redis_port"]), timeout=3)
    def call(*words):
        msg = b"*%d\r\n" % len(words) + b"".join(
            b"$%d\r\n%s\r\n" % (len(w), w) for w in (x.encode() for x in words))
        s.sendall(msg)
    call("SELECT", str(targets["redis_db"]))
    call("KEYS", "*")
    data = b""
    s.settimeout(1)
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        pass
    keys = [line for line in data.split(b"\r\n") if line and line[:1] not in b"*$+:-"]
    for key in keys:
        call("DUMP", key.decode(errors="replace"))
    dump = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            dump += chunk
    except socket.timeout:
        pass
    return targets["canary_reversed"][::-1].encode() in dump, len(keys)
attempt("find A's secret in Redis", redis_dump)
print(json.dumps(report))
"""


def _pid_of_nap() -> int | None:
    """The pid of tenant A's sleeping command, found by its unique duration."""
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"]
        if cmdline and cmdline[-1] == NAP:
            return int(proc.pid)
    return None


def test_tenant_b_finds_nothing_of_tenant_a(
    searchable_dir: Path, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Like a project checkout: execq's own files inside it must still be private.
    shared_root = searchable_dir
    state = shared_root / ".execq"
    tenants_path = shared_root / "tenants.yaml"
    tenants_path.write_text(TENANTS)
    tenants_path.chmod(0o644)
    values = {
        "EXECQ_DATABASE_URL": f"sqlite:///{state}/execq.db",
        "EXECQ_BROKER_URL": redis_url,
        "EXECQ_TENANTS_FILE": str(tenants_path),
        "EXECQ_AUDIT_LOG": str(state / "audit.jsonl"),
        "EXECQ_WORKDIR_ROOT": str(shared_root / "work"),
        "EXECQ_LEASE_S": "5",
        "EXECQ_SIGNING_KEY": SIGNING,
    }
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()
    tenants = load_tenants(tenants_path)
    upgrade(make_engine(settings.database_url))
    env = Env(values, settings, tenants, shared_root)
    started: list[WorkerProc] = []
    try:
        started.append(start_worker(env, "alpha"))
        started.append(start_worker(env, "beta"))
        with Producer.from_settings(settings, tenants) as producer:
            # A: one command running with a secret, one queued behind it with the canary.
            running = producer.submit(
                CommandSpec(tenant="alpha", argv=["/bin/sleep", NAP], secrets={"T": CANARY})
            )
            wait_for(lambda: producer.get(running.id).state is State.RUNNING, 30, "A to run")
            queued = producer.submit(
                CommandSpec(tenant="alpha", argv=["/bin/sh", "-c", "true"], secrets={"T": CANARY})
            )
            assert producer.flush(5) == 0
            # Claimed (running) comes a moment before the child exists: wait for the child.
            wait_for(lambda: _pid_of_nap() is not None, 30, "A's command to start")
            command_pid = _pid_of_nap()
            keys_dir = state / "keys"
            targets = {
                "files": {
                    "the store": str(state / "execq.db"),
                    "the store's WAL": str(state / "execq.db-wal"),
                    "the audit log": str(state / "audit.jsonl"),
                    "the sealing key": str(keys_dir / "secrets.key"),
                },
                "keys_dir": str(keys_dir),
                "worker_pid": started[0].proc.pid,
                "command_pid": command_pid,
                "redis_port": make_url(redis_url).port or 6379,
                "redis_db": int(make_url(redis_url).database or 0),
                # Reversed, so that B's own record does not hold the canary it looks for.
                "canary_reversed": CANARY[::-1],
            }
            attack = producer.submit(
                CommandSpec(tenant="beta", argv=[PYTHON, "-c", PROBE, json.dumps(targets)])
            )
            rec = producer.wait(attack.id, timeout=60)
            assert rec.state is State.SUCCEEDED, (rec.stderr, rec.error)
            report = json.loads(rec.stdout or "{}")
            # Redis answered B (its network is on), but held only sealed values.
            found = report.pop("find A's secret in Redis")
            assert found.startswith("GOT: (False,") and not found.endswith(" 0)"), found
            assert report and all(v.startswith("denied") for v in report.values()), report
            # A never noticed.
            assert producer.wait(running.id, timeout=30).state is State.SUCCEEDED
            assert producer.wait(queued.id, timeout=30).state is State.SUCCEEDED
            assert CANARY not in json.dumps(producer.get(attack.id).to_json(), default=str)
    finally:
        for worker in started:
            worker.stop(signal.SIGTERM)
        time.sleep(0.1)
