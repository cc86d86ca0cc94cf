"""Keys leave a worker's environment once read: /proc/PID/environ no longer shows them."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import psutil

from producer.client import Producer
from producer.spec import CommandSpec
from producer.states import State
from tests.conftest import Env, WorkerProc
from workers import secrecy

SIGNING = "signing-key-value-" + "s" * 20
SEALING = "sealing-key-value-" + "k" * 20
AUDITING = "audit-key-value-" + "a" * 20


def test_forget_wipes_the_value_from_the_process_environment_block(tmp_path: Path) -> None:
    script = (
        "import os, sys; from workers import secrecy\n"
        "gone = secrecy.forget()\n"
        "raw = open(f'/proc/{os.getpid()}/environ', 'rb').read()\n"
        "sys.stdout.write(repr((gone, b'wipe-me-please' in raw, 'EXECQ_SECRETS_KEY' in os.environ,"
        " os.environ['KEEP_ME'])))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        env={**os.environ, "EXECQ_SECRETS_KEY": "wipe-me-please" * 3, "KEEP_ME": "kept"},
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.stdout == repr((["EXECQ_SECRETS_KEY"], False, False, "kept"))


def test_forget_without_keys_does_nothing() -> None:
    assert secrecy.forget(["EXECQ_NO_SUCH_VARIABLE_HERE"]) == []


def test_a_running_worker_shows_no_key_in_its_environment(
    env: Env, make_env: Callable[..., Env], workers: Callable[..., WorkerProc], tmp_path: Path
) -> None:
    keyed = make_env(
        env.settings.database_url,
        env.settings.broker_url,
        EXECQ_SIGNING_KEY=SIGNING,
        EXECQ_SECRETS_KEY=SEALING,
        EXECQ_AUDIT_KEY=AUDITING,
    )
    names = ("EXECQ_SIGNING_KEY", "EXECQ_SECRETS_KEY", "EXECQ_AUDIT_KEY")
    worker = workers("alpha", extra_env={k: keyed.vars[k] for k in names})
    # It still works: a signed, sealed command from a producer with the same keys runs.
    os.environ.update(
        EXECQ_SIGNING_KEY=SIGNING, EXECQ_SECRETS_KEY=SEALING, EXECQ_AUDIT_KEY=AUDITING
    )
    try:
        producer = Producer.from_settings(env.settings, env.tenants)
        r = producer.submit(
            CommandSpec(tenant="alpha", argv=["/bin/echo", "ok"], secrets={"T": "value-1"})
        )
        assert producer.wait(r.id, timeout=30).state is State.SUCCEEDED
        # The worker linked its events with the configured audit key, read before the wipe.
        report = producer.store.audit.verify()
        assert report.ok, report.problem
        producer.close()
    finally:
        for name in names:
            del os.environ[name]
    main = psutil.Process(worker.proc.pid)
    for proc in [main, *main.children(recursive=True)]:
        raw = Path(f"/proc/{proc.pid}/environ").read_bytes()
        for value in (SIGNING, SEALING, AUDITING):
            assert value.encode() not in raw, (proc.pid, value[:10])
