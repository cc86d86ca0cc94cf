"""What every run needs: worker processes, Redis and PostgreSQL counters, machine facts."""

from __future__ import annotations

import contextlib
import math
import os
import platform
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from importlib.metadata import version
from pathlib import Path
from typing import Any

import psutil
import redis
import sqlalchemy as sa

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ["celery", "kombu", "billiard", "redis", "SQLAlchemy", "psycopg"]
_LIVE: set[Worker] = set()  # every worker not yet stopped, for stop_all()


class Worker:
    """A worker started in its own process group, its output in a log file."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                argv,
                cwd=ROOT,
                env=env,
                stdout=out,
                stderr=out,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        _LIVE.add(self)

    def alive(self) -> bool:
        """Whether the main process still runs."""
        return self.proc.poll() is None

    def output(self, tail: int = 2000) -> str:
        """The end of the worker's log."""
        return self.log.read_text(errors="replace")[-tail:]

    def wait_line(self, needle: str, deadline: float) -> bool:
        """Poll the log until `needle` appears; False if the worker died or time ran out."""
        while needle not in self.log.read_text(errors="replace"):
            if not self.alive() or time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def rss_mb(self) -> tuple[float | None, list[float]]:
        """RSS of the main process and of each pool process (its children), MB."""
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(self.proc.pid)
            pool = [c.memory_info().rss / 2**20 for c in main.children()]
            return main.memory_info().rss / 2**20, pool
        return None, []

    def cpu_s(self) -> float:
        """CPU seconds of the worker's process tree, including reaped children (/bin/true)."""
        total = 0.0
        with contextlib.suppress(psutil.Error):
            main = psutil.Process(self.proc.pid)
            for p in [main, *main.children(recursive=True)]:
                with contextlib.suppress(psutil.Error):
                    t = p.cpu_times()
                    total += t.user + t.system + t.children_user + t.children_system
        return total

    def stop(self, grace: float = 10.0) -> None:
        """SIGTERM the process group, then SIGKILL whatever is left of it."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        _LIVE.discard(self)


class Workers:
    """Several worker processes of one run, measured as one: alive while all are, their CPU
    summed, their pool processes pooled (`rss_mb`'s main: the first's)."""

    def __init__(self, members: list[Worker]) -> None:
        self.members = members

    def alive(self) -> bool:
        """Whether every main process still runs (one dying fails the run)."""
        return all(w.alive() for w in self.members)

    def output(self, tail: int = 2000) -> str:
        """The end of each worker's log."""
        return "\n".join(w.output(tail // len(self.members)) for w in self.members)

    def wait_line(self, needle: str, deadline: float) -> bool:
        """Wait for `needle` in every worker's log."""
        return all(w.wait_line(needle, deadline) for w in self.members)

    def rss_mb(self) -> tuple[float | None, list[float]]:
        """RSS of the first main process and of every pool process, MB."""
        each = [w.rss_mb() for w in self.members]
        return each[0][0], [mb for _, pool in each for mb in pool]

    def cpu_s(self) -> float:
        """CPU seconds of every worker's process tree."""
        return sum(w.cpu_s() for w in self.members)

    def stop(self, grace: float = 10.0) -> None:
        """Stop them all."""
        for w in self.members:
            w.stop(grace)


def stop_all() -> None:
    """Stop every worker still running (exit, Ctrl-C, errors)."""
    for w in list(_LIVE):
        w.stop(grace=3.0)


def _own_cpu(p: psutil.Process, *, reaped: bool) -> float:
    t = p.cpu_times()
    return t.user + t.system + ((t.children_user + t.children_system) if reaped else 0.0)


def server_cpu_s() -> dict[str, float]:
    """CPU seconds so far of this host's redis-server and PostgreSQL (every backend).

    A backend that exits is counted in the postmaster's reaped-children time, so deltas stay
    right when connections come and go.
    """
    totals = {"redis": 0.0, "postgres": 0.0}
    for p in psutil.process_iter(["name"]):
        with contextlib.suppress(psutil.Error):
            name = p.info["name"] or ""
            if name.startswith("redis-server"):
                totals["redis"] += _own_cpu(p, reaped=False)
            elif name in ("postgres", "postmaster"):
                # the postmaster is the one whose parent is not postgres
                parent = p.parent()
                top = parent is None or parent.name() not in ("postgres", "postmaster")
                totals["postgres"] += _own_cpu(p, reaped=top)
    return totals


def latency_ms(lat_s: list[float]) -> dict[str, float]:
    """Nearest-rank p50/p95/p99 and max of latencies given in seconds, in ms."""
    xs = sorted(x * 1000 for x in lat_s)
    out = {f"p{p}_ms": xs[max(0, math.ceil(p / 100 * len(xs)) - 1)] for p in (50, 95, 99)}
    return {**out, "max_ms": xs[-1]}


def redis_calls(r: redis.Redis) -> Counter[str]:
    """Commands the whole server has executed, by command (INFO commandstats)."""
    stats = r.info("commandstats")
    return Counter({k[8:]: int(v["calls"]) for k, v in stats.items() if k.startswith("cmdstat_")})


def other_db_traffic(r: redis.Redis, window_s: float) -> bool:
    """Whether clients on other DBs were active lately (the server-wide count includes them)."""
    db = r.connection_pool.connection_kwargs.get("db", 0)
    clients = r.client_list()
    return any(int(c["db"]) != db and int(c["idle"]) < window_s for c in clients)


class PgDatabase:
    """A fresh database for the bench, dropped by drop(); counters from pg_stat_database."""

    # not tup_returned/fetched or xact_rollback: the bench's own polling reads inflate those
    COUNTERS = "xact_commit tup_inserted tup_updated tup_deleted"

    def __init__(self, admin_url: str) -> None:
        self.admin = sa.create_engine(admin_url, isolation_level="AUTOCOMMIT")
        self.name = f"execq_bench_{uuid.uuid4().hex[:10]}"
        self._sql(f'CREATE DATABASE "{self.name}"')
        self.url = sa.make_url(admin_url).set(database=self.name).render_as_string(False)

    def _sql(self, query: str) -> Any:
        with self.admin.connect() as conn:
            result = conn.execute(sa.text(query), {"n": self.name})
            return result.first() if result.returns_rows else None

    def quiesce(self, timeout: float = 15.0) -> bool:
        """Wait until no client is connected: a backend flushes its counters when it exits."""
        deadline = time.monotonic() + timeout
        while self._sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = :n "
            "AND backend_type = 'client backend'"
        )[0]:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def counters(self) -> dict[str, int]:
        """This database's cumulative counters (exact once quiesce() returned True)."""
        cols = self.COUNTERS.replace(" ", ", ")
        row = self._sql(f"SELECT {cols} FROM pg_stat_database WHERE datname = :n")  # noqa: S608
        return dict(zip(self.COUNTERS.split(), map(int, row), strict=True))

    def drop(self) -> None:
        """Drop the database (kicking out anything still connected)."""
        self._sql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n")
        self._sql(f'DROP DATABASE IF EXISTS "{self.name}"')
        self.admin.dispose()


def _proc_field(path: str, key: str) -> str:
    with contextlib.suppress(OSError):
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return line.split(":", 1)[1].strip()
    return "?"


def machine(r: redis.Redis, pg: PgDatabase | None) -> dict[str, Any]:
    """Where the numbers come from: CPU, RAM, OS and the versions of everything measured."""
    mem_kb = _proc_field("/proc/meminfo", "MemTotal").split()[0]
    info: dict[str, Any] = {
        "nproc": os.cpu_count(),
        "cpu": _proc_field("/proc/cpuinfo", "model name"),
        "ram_gb": round(int(mem_kb) / 2**20, 1) if mem_kb.isdigit() else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        **{pkg: version(pkg) for pkg in PACKAGES},
        "redis_server": r.info("server")["redis_version"],
        "sqlite": sqlite3.sqlite_version,
    }
    if pg is not None:
        info["postgresql"] = pg._sql("SHOW server_version")[0]
    return info
