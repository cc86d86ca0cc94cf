"""One scenario's execq deployment: settings on the private servers, a tenant whose commands
leave markers, and real `execq worker` processes that the scenario may kill."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from producer.client import Producer
from producer.settings import Settings
from producer.tenants import TenantsFile, load_tenants

ROOT = Path(__file__).resolve().parent.parent
TENANT = "chaos"
LEASE_S = 3.0  # short, so a lost worker's commands are settled within seconds
CONCURRENCY = 2


def tenants_yaml() -> str:
    """The chaos tenant: /bin/sh only; without a filesystem view its commands (run as the
    worker's user) may append to the markers directory."""
    return f"""tenants:
  {TENANT}:
    concurrency: {CONCURRENCY}
    executables: [/bin/sh]
    max_attempts: 3
    limits: {{timeout_s: 30, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 16,
              file_mb: 4}}
"""


class WorkerError(RuntimeError):
    """Raised when an `execq worker` does not say it is ready."""


@dataclass
class WorkerProc:
    """A real `execq worker` process in a session of its own, its output in `log`."""

    proc: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def pool_pids(self) -> list[int]:
        """The prefork pool processes (children of the main process)."""
        with contextlib.suppress(psutil.Error):
            return [c.pid for c in psutil.Process(self.pid).children()]
        return []

    def kill_group(self) -> None:
        """SIGKILL the whole session: main, pool and any command still running."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)

    def stop(self, grace_s: float = 20.0) -> None:
        """Warm shutdown (SIGTERM), then SIGKILL what is left."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(grace_s)
        self.kill_group()


@dataclass
class Stack:
    """Settings, tenant file, markers and workers of one scenario, under one temp dir."""

    redis_url: str
    database_url: str
    root: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="execq-chaos-")))
    workers: list[WorkerProc] = field(default_factory=list)
    # every pool pid seen, for the leak checks (a cgroup is named after its pool process)
    seen_pool_pids: set[int] = field(default_factory=set)
    # a secret every command of the stream is given; see chaos/canary.py
    canary: str = field(default_factory=lambda: f"canary{secrets.token_hex(16)}")
    # another tenants file (for tenant TENANT still): the soak needs actions and more programs
    tenants_text: str | None = None

    def __post_init__(self) -> None:
        self.markers = self.root / "markers"
        self.markers.mkdir()
        self.workdir_root = self.root / "work"
        self.tenants_path = self.root / "tenants.yaml"
        self.tenants_path.write_text(self.tenants_text or tenants_yaml())
        self.vars = {
            "EXECQ_DATABASE_URL": self.database_url,
            "EXECQ_BROKER_URL": self.redis_url,
            "EXECQ_TENANTS_FILE": str(self.tenants_path),
            "EXECQ_AUDIT_LOG": str(self.root / "audit.jsonl"),
            "EXECQ_AUDIT_WITNESS": str(self.root / "audit-witness.jsonl"),
            "EXECQ_WORKDIR_ROOT": str(self.workdir_root),
            "EXECQ_LEASE_S": str(LEASE_S),
            "EXECQ_PUBLISH_TIMEOUT_S": "1",
            "EXECQ_ENV": "dev",
        }
        self.tenants: TenantsFile = load_tenants(self.tenants_path)
        self.settings = Settings(
            database_url=self.database_url,
            broker_url=self.redis_url,
            tenants_file=self.tenants_path,
            audit_log=self.root / "audit.jsonl",
            audit_witness=self.root / "audit-witness.jsonl",
            workdir_root=self.workdir_root,
            lease_s=LEASE_S,
            publish_timeout_s=1.0,
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, **self.vars}

    def cli(self, *args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
        """`execq ARGS…` against this stack."""
        return subprocess.run(
            [sys.executable, "-m", "workers.cli", *args],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env=self.env(),
            timeout=timeout_s,
            check=False,
        )

    def upgrade(self) -> None:
        done = self.cli("db", "upgrade")
        if done.returncode != 0:
            raise WorkerError(f"execq db upgrade failed: {done.stderr[-2000:]}")

    def producer(self) -> Producer:
        # The witness path is read from the environment (AuditKeySettings), not Settings:
        # the producer's checkpoints go where the workers' go, not to the project's file.
        os.environ["EXECQ_AUDIT_WITNESS"] = self.vars["EXECQ_AUDIT_WITNESS"]
        return Producer.from_settings(self.settings, self.tenants)

    def start_worker(
        self, ready_timeout_s: float = 60, extra_env: dict[str, str] | None = None
    ) -> WorkerProc:
        log = self.root / f"worker-{len(self.workers)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "worker", "--tenant", TENANT],
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env={**self.env(), **(extra_env or {})},
                cwd=ROOT,
                start_new_session=True,
            )
        worker = WorkerProc(proc, log)
        self.workers.append(worker)
        deadline = time.monotonic() + ready_timeout_s
        while " ready" not in worker.output():
            if not worker.alive() or time.monotonic() > deadline:
                worker.kill_group()
                raise WorkerError(f"worker did not become ready:\n{worker.output()[-3000:]}")
            time.sleep(0.05)
        self.note_pools()
        return worker

    def live_workers(self) -> list[WorkerProc]:
        return [w for w in self.workers if w.alive()]

    def note_pools(self) -> None:
        for w in self.live_workers():
            self.seen_pool_pids.update(w.pool_pids())

    def stop_live(self, grace_s: float = 20.0) -> None:
        """Warm shutdown of the workers still running; their groups are left alone so the leak
        checks still see whatever a killed or stopped worker left behind."""
        live = self.live_workers()
        for w in live:
            w.proc.send_signal(signal.SIGTERM)
        for w in live:
            with contextlib.suppress(subprocess.TimeoutExpired):
                w.proc.wait(grace_s)

    def close(self) -> None:
        """Stop every worker (SIGKILL what a warm shutdown leaves), remove the temp dir."""
        try:
            for w in self.workers:
                w.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
