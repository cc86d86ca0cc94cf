"""The soak's sampler: every interval, what a slow leak would show in (memory, descriptors,
threads, directories, cgroups, store rows, Redis), and the backlog that explains the rest.

Each sample is a few /proc reads per process, four indexed queries and two Redis INFO calls,
so sampling itself adds nothing that grows; `sample_ms` records what it cost."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import sqlalchemy as sa

from chaos.checks import CGROUP_PID
from chaos.servers import RedisServer
from chaos.stack import TENANT, Stack
from producer.store.db import make_engine
from workers.sandbox import detect_capabilities

MB = 1024 * 1024
Sample = dict[str, Any]

# max(id) of insert-only tables reads the primary key's last page; count(*) would scan
# hundreds of thousands of rows by the end of a 30-minute run
_STORE = sa.text(
    "SELECT (SELECT count(*) FROM commands WHERE tenant = :t) AS commands,"
    " (SELECT coalesce(max(id), 0) FROM transitions) AS transitions,"
    " (SELECT coalesce(max(id), 0) FROM audit_events) AS audit_events,"
    " (SELECT count(*) FROM batches WHERE tenant = :t) AS batches,"
    " (SELECT count(*) FROM commands WHERE tenant = :t"
    "   AND state IN ('pending', 'running', 'reverting')) AS unsettled,"
    " pg_database_size(current_database()) AS store_bytes"
)


def _proc_stats(pids: list[int]) -> tuple[list[int], list[int], list[int]]:
    rss, fds, threads = [], [], []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            with p.oneshot():
                rss.append(p.memory_info().rss)
                fds.append(p.num_fds())
                threads.append(p.num_threads())
    return rss, fds, threads


def _entries(path: Path) -> int:
    with contextlib.suppress(OSError):
        return len(os.listdir(path))
    return 0


class Sampler:
    """Samples from a thread of its own every `interval_s` until stopped."""

    def __init__(
        self,
        stack: Stack,
        rds: RedisServer,
        interval_s: float,
        progress: Callable[[], dict[str, Any]],
    ) -> None:
        self.stack, self.rds, self.interval_s = stack, rds, interval_s
        self.progress = progress  # the load's counters (submitted, lag)
        self.samples: list[Sample] = []
        self.phase = "load"  # then "settle": slopes are fitted on the load's samples only
        self.errors: list[str] = []
        self.tmpdir = stack.root / "tmp"  # the workers' TMPDIR (see soak.py)
        self._engine = make_engine(stack.database_url, pool_size=1)
        self._redis = rds.client()
        caps = detect_capabilities()
        self._cgroup_parents = [c for c in (caps.memory_v1, caps.pids_v1, caps.cgroup_v2) if c]
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="soak-sampler", daemon=True)
        self._t0 = time.monotonic()

    def start(self) -> None:
        self._t0 = time.monotonic()
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        self._engine.dispose()
        self._redis.close()

    def _run(self) -> None:
        n = 0
        while True:
            try:
                self.samples.append(self.sample())
            except Exception as exc:  # a sample missed is reported, never fatal to the run
                self.errors.append(f"{time.strftime('%H:%M:%S')} {type(exc).__name__}: {exc}")
            n += 1
            # on a fixed grid, so samples stay `interval_s` apart however long each took
            if self._stop.wait(max(0.0, self._t0 + n * self.interval_s - time.monotonic())):
                return

    def sample(self) -> Sample:
        started = time.monotonic()
        s: Sample = {"t": round(started - self._t0, 2), "phase": self.phase}
        s.update(self.progress())
        self.stack.note_pools()
        mains = [w.pid for w in self.stack.live_workers()]
        pools = [p for w in self.stack.live_workers() for p in w.pool_pids()]
        rss, fds, threads = _proc_stats(mains + pools)
        s.update(
            worker_procs=len(rss),
            worker_rss_mb=sum(rss) / MB,
            worker_rss_max_mb=max(rss, default=0) / MB,
            worker_fds=sum(fds),
            worker_fds_max=max(fds, default=0),
            worker_threads=sum(threads),
            worker_threads_max=max(threads, default=0),
        )
        me_rss, me_fds, me_threads = _proc_stats([os.getpid()])
        s.update(
            producer_rss_mb=me_rss[0] / MB, producer_fds=me_fds[0], producer_threads=me_threads[0]
        )
        s.update(
            workdir_entries=_entries(self.stack.workdir_root),
            tmp_entries=_entries(self.tmpdir),
            cgroups=self._cgroups(),
        )
        with self._engine.connect() as conn:
            row = conn.execute(_STORE, {"t": TENANT}).one()
        s.update({k: int(v) for k, v in row._mapping.items()})
        s["store_mb"] = s.pop("store_bytes") / MB
        memory = self._redis.info("memory")
        clients = self._redis.info("clients")
        keys = int(self._redis.dbsize())
        streams = self._live_streams()
        s.update(
            redis_used_mb=int(memory["used_memory"]) / MB,
            redis_keys=keys,
            live_streams=streams,
            redis_other_keys=keys - streams,
            redis_clients=int(clients["connected_clients"]),
        )
        # other work on the host slows everything down: the figures are read against it
        s["host_load1"] = os.getloadavg()[0]
        s["sample_ms"] = round((time.monotonic() - started) * 1000, 1)
        return s

    def _live_streams(self) -> int:
        """Live-output streams: a command that printed keeps one for an hour after its last
        write (workers/live.py TTL_S), so they grow for the first hour of any run by design.
        SCAN walks the keyspace in steps, never blocking Redis for long."""
        pattern = self.stack.settings.key("live", "*")
        return sum(1 for _ in self._redis.scan_iter(match=pattern, count=1000))

    def _cgroups(self) -> int:
        """execq-<pid> cgroups of this stack's pool processes (others' runs share the host)."""
        pids = self.stack.seen_pool_pids
        n = 0
        for parent in self._cgroup_parents:
            with contextlib.suppress(OSError):
                for name in os.listdir(parent):
                    match = CGROUP_PID.match(name)
                    n += bool(match and int(match.group(1)) in pids)
        return n
