"""A local execq stack for `execq up` and `execq demo`: broker, store, one worker per tenant."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from producer.settings import Settings, project_path
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.tenants import TenantsFile
from workers.embedded import EmbeddedRedis, ensure_broker, wait_for_file_line


@dataclass
class Stack:
    """Starts what is missing, remembers what it started, and stops exactly that."""

    settings: Settings
    tenants: TenantsFile
    log_dir: Path = field(default_factory=lambda: project_path(Path(".execq/logs")))
    broker_url: str = ""
    embedded: EmbeddedRedis | None = None
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def start(self, *, ready_timeout_s: float = 90.0) -> None:
        """Broker (embedded if none answers), `db upgrade`, then a worker per tenant, ready."""
        configured = None if self.settings.broker_url == "embedded" else self.settings.broker_url
        self.broker_url, self.embedded = ensure_broker(configured)
        engine = make_engine(self.settings.database_url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            self._start_workers(ready_timeout_s)
        except BaseException:
            # Ctrl-C or a failure half-way: the workers run in sessions of their own, so
            # nothing else would stop the ones already started.
            self.stop()
            raise

    def _start_workers(self, ready_timeout_s: float) -> None:
        env = {**os.environ, "EXECQ_BROKER_URL": self.broker_url}
        for name in self.tenants.tenants:
            log_path = self.log_dir / f"worker-{name}.log"
            log_path.write_bytes(b"")
            with log_path.open("ab") as out:
                self.workers[name] = subprocess.Popen(
                    [sys.executable, "-m", "workers.cli", "worker", "--tenant", name],
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
        for name, proc in self.workers.items():
            log_path = self.log_dir / f"worker-{name}.log"
            if not wait_for_file_line(log_path, " ready", ready_timeout_s) or proc.poll():
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"worker for tenant {name!r} did not start:\n{tail}")

    def stop(self, *, grace_s: float = 30.0) -> None:
        """Warm-stop the workers (SIGTERM), then the embedded broker if we started it."""
        for proc in self.workers.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in self.workers.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.workers.clear()
        if self.embedded is not None:
            self.embedded.stop()
            self.embedded = None

    def __enter__(self) -> Stack:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()
