"""Private Redis and PostgreSQL servers on loopback, each in a temporary directory of its own,
so a scenario can crash, stop and restart them without touching anyone else's."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any

import redis
import sqlalchemy as sa

REDIS_BIN = "/usr/bin/redis-server"
PG_BIN_DIRS = ("/usr/lib/postgresql/15/bin", "/usr/local/bin")
PG_USER = "postgres"
DATABASE = "chaos"


class ServerError(RuntimeError):
    """Raised when a private server does not start or stop in time."""


def free_port() -> int:
    """A loopback port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _pg_bin(name: str) -> str:
    for directory in PG_BIN_DIRS:
        path = Path(directory) / name
        if path.is_file():
            return str(path)
    raise ServerError(f"{name} not found in {', '.join(PG_BIN_DIRS)}")


class RedisServer:
    """A redis-server of our own: `aof` False keeps nothing across a restart, True keeps an
    append-only file fsynced every second (what a production broker usually runs with)."""

    def __init__(self, aof: bool = False) -> None:
        self.aof = aof
        self.root = Path(tempfile.mkdtemp(prefix="execq-chaos-redis-"))
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 15.0) -> None:
        """Start on the same port and directory (an AOF written before is replayed)."""
        argv = [
            REDIS_BIN,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--dir", str(self.root),
            "--save", "",
            "--daemonize", "no",
            "--appendonly", "yes" if self.aof else "no",
            "--appendfsync", "everysec",
        ]  # fmt: skip
        with (self.root / "redis.log").open("ab") as log:
            self.proc = subprocess.Popen(
                argv, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
            )
        client = redis.Redis.from_url(self.url, socket_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                with contextlib.suppress(redis.RedisError):
                    # LOADING is answered until an AOF is replayed: only PING after it counts
                    if client.ping():
                        return
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise ServerError(f"redis-server did not start: {self.log_tail()}")
                time.sleep(0.05)
        finally:
            client.close()

    def client(self) -> redis.Redis:
        """A client of the server that holds the data now (a subclass that fails over
        answers with the current primary)."""
        return redis.Redis.from_url(self.url, socket_timeout=2)

    def own_client(self, info: dict[str, Any]) -> bool:
        """Whether a CLIENT LIST entry is a connection the servers make among themselves
        (a sentinel's subscription to its primary), not one of execq's."""
        return False

    def crash(self) -> None:
        """SIGKILL: whatever was not on disk (all of it without AOF) is gone."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def log_tail(self) -> str:
        with contextlib.suppress(OSError):
            return (self.root / "redis.log").read_text(errors="replace")[-1500:]
        return ""

    def close(self) -> None:
        self.crash()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


class PgCluster:
    """A PostgreSQL cluster of our own (initdb as the postgres user, trust on loopback)."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="execq-chaos-pg-"))
        self.data = self.root / "data"
        self.port = free_port()
        self.url = f"postgresql+psycopg://{PG_USER}@127.0.0.1:{self.port}/{DATABASE}"
        self.running = False

    def _as_postgres(self, *argv: str, timeout_s: float = 120) -> None:
        done = subprocess.run(
            ["/usr/sbin/runuser", "-u", PG_USER, "--", *argv],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
        )
        if done.returncode != 0:
            raise ServerError(f"{' '.join(argv)} failed: {done.stdout}{done.stderr}")

    def init(self) -> None:
        """initdb, start, create the database."""
        # the postgres user must reach its data dir: mkdtemp makes root's directory 0700
        shutil.chown(self.root, PG_USER, PG_USER)
        self._as_postgres(
            _pg_bin("initdb"), "-D", str(self.data), "-U", PG_USER, "--auth=trust", "-E", "UTF8"
        )
        self.start()
        admin = sa.create_engine(
            sa.make_url(self.url).set(database="postgres"), isolation_level="AUTOCOMMIT"
        )
        try:
            with admin.connect() as conn:
                conn.execute(sa.text(f'CREATE DATABASE "{DATABASE}"'))
        finally:
            admin.dispose()

    def start(self) -> None:
        opts = (
            f"-p {self.port} -c listen_addresses=127.0.0.1 "
            f"-c unix_socket_directories={self.root} -c max_connections=200"
        )
        self._as_postgres(
            _pg_bin("pg_ctl"), "-D", str(self.data), "-o", opts,
            "-l", str(self.root / "pg.log"), "-w", "-t", "60", "start",
        )  # fmt: skip
        self.running = True

    def stop(self, mode: str = "fast") -> None:
        """pg_ctl stop: `fast` disconnects every client and shuts down cleanly."""
        self._as_postgres(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop")
        self.running = False

    def close(self) -> None:
        if self.running:
            with contextlib.suppress(ServerError, subprocess.TimeoutExpired):
                self.stop("immediate")
        if self.running:
            # pg_ctl failed: the postmaster's pid is the first line of postmaster.pid
            with contextlib.suppress(OSError, ValueError):
                pid = int((self.data / "postmaster.pid").read_text().split()[0])
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PgCluster:
        try:
            self.init()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
