"""Shared fixtures: a real Redis (or embedded), real PostgreSQL, real worker processes.

With CI=true, Redis and PostgreSQL must be reachable: tests that need them fail, never skip.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
import sqlalchemy as sa

from producer.client import Producer
from producer.settings import Settings
from producer.store.db import make_engine
from producer.store.migrate import upgrade
from producer.store.repository import Store
from producer.tenants import TenantsFile, load_tenants
from workers.embedded import EmbeddedRedis, reachable
from workers.reaper import Reaper

CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}
REDIS_URL = os.environ.get("EXECQ_TEST_REDIS_URL", "redis://127.0.0.1:6379/13")
PG_ADMIN_URL = os.environ.get(
    "EXECQ_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
)
PYTHON = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable

TENANTS_YAML = f"""
tenants:
  alpha:
    concurrency: 2
    executables: [/bin/echo, /bin/sh, /bin/sleep, /bin/true, /bin/false, /usr/bin/env,
                  /bin/cat, /bin/ls, /bin/pwd, {PYTHON}]
    limits: {{timeout_s: 20, cpu_s: 10, memory_mb: 256, processes: 64, output_kb: 64,
              file_mb: 16}}
    env: {{TENANT_GREETING: hello-alpha}}
    env_allow: [LANG, COLOR]
    snapshot_roots: [/tmp]
    actions:
      greet:
        argv: [/bin/echo, "hello {{name}}", "{{count}}"]
        params:
          name: {{type: string, pattern: "^[a-z ]{{1,20}}$"}}
          count: {{type: integer, minimum: 1, maximum: 5, default: 1}}
      show-token:
        argv: [/bin/sh, -c, 'echo "$GREETING:$TOKEN"']
        env: {{GREETING: "hi {{name}}", TOKEN: "{{token}}"}}
        params:
          name: {{type: string, max_length: 10}}
          token: {{type: string, secret: true}}
  beta:
    concurrency: 1
    executables: [/bin/echo, /bin/sh, /bin/sleep, /bin/true]
    limits: {{timeout_s: 10, cpu_s: 5, memory_mb: 128, processes: 16, output_kb: 16,
              file_mb: 4}}
    deny_args: ['^-rf$']
"""


def _need(what: str, detail: str) -> None:
    if CI:
        pytest.fail(f"{what} is required in CI but unreachable: {detail}")
    pytest.skip(f"{what} unreachable: {detail}")


def need_private_servers(what: str) -> None:
    """The chaos harness starts a redis-server and a PostgreSQL cluster of its own (initdb
    run as the postgres user through runuser): fail in CI, skip elsewhere, without them."""
    missing = None
    if not Path("/usr/bin/redis-server").is_file():
        missing = "/usr/bin/redis-server"
    elif not Path("/usr/lib/postgresql/15/bin/initdb").is_file() and not shutil.which(
        "initdb", path="/usr/local/bin"
    ):
        missing = "initdb"
    elif os.geteuid() != 0:
        missing = "root (initdb runs as the postgres user through runuser)"
    if missing:
        _need(what, f"it needs {missing}")


# --- Redis -------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server() -> Iterator[str]:
    """A Redis URL: the configured server, or an embedded one (never embedded in CI)."""
    if reachable(REDIS_URL):
        yield REDIS_URL
        return
    if CI:
        pytest.fail(f"Redis is required in CI but {REDIS_URL} does not answer")
    with EmbeddedRedis(record=False) as server:
        yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> Iterator[str]:
    """The test Redis database, emptied before and after each test."""
    client = redis.Redis.from_url(redis_server)
    client.flushdb()
    yield redis_server
    client.flushdb()
    client.close()


# --- PostgreSQL and SQLite -----------------------------------------------------------------


@contextlib.contextmanager
def fresh_database(prefix: str) -> Iterator[str]:
    """A new PostgreSQL database named `prefix_<random>`, dropped afterwards (its clients
    kicked out first); PostgreSQL unreachable fails in CI and skips elsewhere."""
    admin = sa.create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.execute(sa.text("SELECT 1"))
    except Exception as exc:
        admin.dispose()
        _need("PostgreSQL", f"{PG_ADMIN_URL}: {exc}")
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    with admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    try:
        yield name
    finally:
        with admin.connect() as conn:
            conn.execute(
                sa.text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"
                ),
                {"n": name},
            )
            conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}"'))
        admin.dispose()


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """A fresh PostgreSQL database for this test session, dropped at the end."""
    with fresh_database("execq_test") as name:
        url = sa.engine.make_url(PG_ADMIN_URL).set(database=name)
        yield url.render_as_string(hide_password=False)


def _reset_pg(url: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        conn.execute(sa.text("DROP SCHEMA public CASCADE"))
        conn.execute(sa.text("CREATE SCHEMA public"))
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each store test runs on SQLite and on PostgreSQL, migrated to head."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path}/execq.db"
    else:
        url = request.getfixturevalue("pg_server")
        _reset_pg(url)
    engine = make_engine(url)
    upgrade(engine)
    engine.dispose()
    yield url


@pytest.fixture
def store(database_url: str) -> Iterator[Store]:
    """A repository on a migrated, empty store."""
    s = Store(make_engine(database_url))
    yield s
    s.engine.dispose()


@pytest.fixture
def searchable_dir() -> Iterator[Path]:
    """A directory every uid may search, like a project checkout (pytest's own temporary
    directories are root's only, which would hide what a test of file modes looks for)."""
    base = Path(tempfile.mkdtemp(prefix="execq-searchable-"))
    base.chmod(0o755)
    yield base
    shutil.rmtree(base, ignore_errors=True)


# --- settings, tenants, producer ------------------------------------------------------------


@pytest.fixture(autouse=True)
def _own_audit_witness(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test's audit checkpoints go to a witness of its own (inherited by the processes it
    starts): a store emptied for the next test must not contradict this one's checkpoints."""
    monkeypatch.setenv("EXECQ_AUDIT_WITNESS", str(tmp_path / "audit-witness.jsonl"))


@pytest.fixture
def tenants_path(tmp_path: Path) -> Path:
    """A tenants file with two tenants: alpha (roomy) and beta (tight, deny -rf)."""
    path = tmp_path / "tenants.yaml"
    path.write_text(TENANTS_YAML)
    return path


@pytest.fixture
def tenants(tenants_path: Path) -> TenantsFile:
    return load_tenants(tenants_path)


@dataclass
class Env:
    """Everything a test stack shares: settings as environment variables and as objects."""

    vars: dict[str, str]
    settings: Settings
    tenants: TenantsFile
    root: Path

    def producer(self) -> Producer:
        return Producer.from_settings(self.settings, self.tenants)


@pytest.fixture
def make_env(tmp_path: Path, tenants_path: Path, tenants: TenantsFile) -> Callable[..., Env]:
    """Build settings for a store URL and a broker URL (lease short, so tests are quick)."""

    def build(database_url: str, broker_url: str, **extra: str) -> Env:
        values = {
            "EXECQ_DATABASE_URL": database_url,
            "EXECQ_BROKER_URL": broker_url,
            "EXECQ_TENANTS_FILE": str(tenants_path),
            "EXECQ_AUDIT_LOG": str(tmp_path / "audit.jsonl"),
            "EXECQ_WORKDIR_ROOT": str(tmp_path / "work"),
            "EXECQ_LEASE_S": "2",
            "EXECQ_PUBLISH_TIMEOUT_S": "1",
            **extra,
        }
        settings = Settings(
            database_url=values["EXECQ_DATABASE_URL"],
            broker_url=values["EXECQ_BROKER_URL"],
            tenants_file=Path(values["EXECQ_TENANTS_FILE"]),
            audit_log=Path(values["EXECQ_AUDIT_LOG"]),
            workdir_root=Path(values["EXECQ_WORKDIR_ROOT"]),
            lease_s=float(values["EXECQ_LEASE_S"]),
            publish_timeout_s=float(values["EXECQ_PUBLISH_TIMEOUT_S"]),
        )
        return Env(values, settings, tenants, tmp_path)

    return build


SHIPPED_TENANTS = Path(__file__).resolve().parent.parent / "config" / "tenants.yaml"


@pytest.fixture
def shipped_env(make_env: Callable[..., Env], tmp_path: Path, redis_url: str) -> Env:
    """The shipped tenants file as a newcomer has it (tenant acme), on a migrated SQLite store:
    what the README's tour and examples run against."""
    env = make_env(
        f"sqlite:///{tmp_path / 'shipped.db'}",
        redis_url,
        EXECQ_TENANTS_FILE=str(SHIPPED_TENANTS),
        EXECQ_ENV="dev",
    )
    upgraded = run_cli(env, "db", "upgrade")
    assert upgraded.returncode == 0, upgraded.stderr
    return env


@pytest.fixture
def env(make_env: Callable[..., Env], database_url: str, redis_url: str) -> Env:
    """Settings on both store backends with the test Redis."""
    return make_env(database_url, redis_url)


@pytest.fixture
def sqlite_env(make_env: Callable[..., Env], tmp_path: Path, redis_url: str) -> Env:
    """Settings on a migrated SQLite store with the test Redis (in-process worker logic)."""
    env = make_env(f"sqlite:///{tmp_path}/store.db", redis_url)
    engine = make_engine(env.settings.database_url)
    upgrade(engine)
    engine.dispose()
    return env


def alpha_reaper(env: Env, producer: Producer) -> Reaper:
    """The reaper a worker of tenant alpha runs, on the producer's store and publisher."""
    tenant = env.tenants.get("alpha")
    assert tenant is not None
    return Reaper(
        settings=env.settings,
        tenant=tenant,
        store=producer.store,
        publisher=producer.publisher,
        redis_url=env.settings.broker_url,
        actor="reaper:test",
    )


@pytest.fixture
def producer(env: Env) -> Iterator[Producer]:
    p = env.producer()
    yield p
    p.close()


# --- worker processes -------------------------------------------------------------------


@dataclass
class ExecqProc:
    """A real `execq …` process and its log."""

    proc: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def spawn_execq(
    env: Env, args: list[str], log: Path, extra_env: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`python -m workers.cli ARGS…` in a session of its own, its output into `log`."""
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "workers.cli", *args],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **env.vars, **(extra_env or {})},
            start_new_session=True,
            cwd=Path(__file__).resolve().parent.parent,
        )


@dataclass
class WorkerProc(ExecqProc):
    """A real `execq worker` process and its log."""

    tenant: str

    def pool_pids(self) -> list[int]:
        """The prefork pool processes (children of the worker's main process)."""
        import psutil

        return [c.pid for c in psutil.Process(self.proc.pid).children()]


def start_worker(
    env: Env,
    tenant: str = "alpha",
    *,
    concurrency: int | None = None,
    ready_timeout: float = 60,
    extra_env: dict[str, str] | None = None,
    args: list[str] | None = None,
) -> WorkerProc:
    log = env.root / f"worker-{tenant}-{uuid.uuid4().hex[:6]}.log"
    argv = ["worker", "--tenant", tenant, *(args or [])]
    if concurrency:
        argv += ["--concurrency", str(concurrency)]
    proc = spawn_execq(env, argv, log, extra_env)
    worker = WorkerProc(proc, log, tenant)
    deadline = time.monotonic() + ready_timeout
    while " ready" not in worker.output():
        if proc.poll() is not None or time.monotonic() > deadline:
            worker.stop(signal.SIGKILL)
            raise AssertionError(f"worker did not become ready:\n{worker.output()[-3000:]}")
        time.sleep(0.05)
    return worker


@pytest.fixture
def workers(env: Env) -> Iterator[Callable[..., WorkerProc]]:
    """Start real worker processes; all are stopped (and checked for tracebacks) afterwards."""
    started: list[WorkerProc] = []

    def start(tenant: str = "alpha", **kwargs: object) -> WorkerProc:
        w = start_worker(env, tenant, **kwargs)  # type: ignore[arg-type]
        started.append(w)
        return w

    yield start
    for w in started:
        w.stop(signal.SIGKILL if w.proc.poll() is None else signal.SIGTERM, timeout=10)


# --- OpenTelemetry ---------------------------------------------------------------------------


@dataclass
class OtlpSink:
    """A minimal OTLP/HTTP traces receiver: what a collector would get from execq."""

    url: str
    requests: list[bytes]

    def spans(self) -> list[dict[str, Any]]:
        from google.protobuf.json_format import MessageToDict
        from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
            ExportTraceServiceRequest,
        )

        out = []
        for body in list(self.requests):
            request = ExportTraceServiceRequest.FromString(body)
            for rs in request.resource_spans:
                resource = {a.key: _otlp_value(a.value) for a in rs.resource.attributes}
                for ss in rs.scope_spans:
                    for span in ss.spans:
                        out.append(
                            {
                                "name": span.name,
                                "trace_id": span.trace_id.hex(),
                                "span_id": span.span_id.hex(),
                                "parent_span_id": span.parent_span_id.hex(),
                                "attributes": {
                                    a.key: _otlp_value(a.value) for a in span.attributes
                                },
                                "status": span.status.code,
                                "status_message": span.status.message,
                                "resource": resource,
                                "raw": str(MessageToDict(span)),
                            }
                        )
        return out

    def env(self) -> dict[str, str]:
        """Worker settings that export every span here within a tenth of a second."""
        return {
            "OTEL_TRACES_EXPORTER": "otlp",
            "OTEL_EXPORTER_OTLP_ENDPOINT": self.url,
            "OTEL_BSP_SCHEDULE_DELAY": "100",
        }


def _otlp_value(value: Any) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@pytest.fixture
def otlp_sink() -> Iterator[OtlpSink]:
    import http.server
    import threading

    received: list[bytes] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == "/v1/traces":
                received.append(body)
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield OtlpSink(f"http://127.0.0.1:{server.server_address[1]}", received)
    server.shutdown()


# --- helpers shared by test modules ---------------------------------------------------------


@pytest.fixture
def safe_dir() -> Iterator[Path]:
    """A directory whose whole parent chain is private (unlike /tmp, which is world-writable):
    where an executable may be allow-listed."""
    d = Path(tempfile.mkdtemp(prefix="execq-safe-", dir=Path.home()))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def wait_for(predicate: Callable[[], object], timeout: float = 30, what: str = "") -> None:
    """Poll `predicate` until it is true; AssertionError naming `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.05)


def run_cli(
    env: Env, *args: str, extra: dict[str, str] | None = None, timeout: float = 90
) -> subprocess.CompletedProcess[str]:
    """`execq ARGS…` as a subprocess with the test stack's settings."""
    return subprocess.run(
        [sys.executable, "-m", "workers.cli", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
        env={**os.environ, **env.vars, **(extra or {})},
        timeout=timeout,
        check=False,
    )


def append(log: Path, text: str) -> list[str]:
    """argv that appends one line to `log`: the visible trace of one run."""
    return ["/bin/sh", "-c", f"echo '{text}' >> '{log}'"]


# --- the HTTP gateway -------------------------------------------------------------------


@dataclass
class GatewayProc(ExecqProc):
    """A real `execq gateway` process, its log and base URL."""

    url: str


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_gateway(env: Env, *args: str, extra_env: dict[str, str] | None = None) -> GatewayProc:
    """`execq gateway` on a free port, once it answers /healthz."""
    port = free_port()
    log = env.root / f"gateway-{port}.log"
    proc = spawn_execq(env, ["gateway", "--port", str(port), *args], log, extra_env)
    gateway = GatewayProc(proc, log, f"http://127.0.0.1:{port}")
    deadline = time.monotonic() + 60
    while "ready on" not in gateway.output() or not _answers(f"{gateway.url}/healthz"):
        if proc.poll() is not None or time.monotonic() > deadline:
            gateway.stop()
            raise AssertionError(f"gateway did not start:\n{gateway.output()[-3000:]}")
        time.sleep(0.05)
    return gateway


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return int(answer.status) == 200
    except OSError:
        return False
