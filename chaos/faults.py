"""Injectors beyond killed workers and restarted servers: killed children, a worker stopped
past its lease, PostgreSQL restarted, broker messages duplicated, reordered and replayed, and
a worker whose clock runs ahead."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

import psutil
import redis

from chaos.stack import LEASE_S, TENANT
from producer.broker import queue_key

if TYPE_CHECKING:
    from chaos.scenarios import Run

LIBFAKETIME = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
CLOCK_AHEAD_S = 20.0  # several leases: every lease this worker's clock judges looks expired


def _marker_children(run: Run) -> list[tuple[int, int, str]]:
    """(pid, parent pid, marker label) of the commands' shells running right now (the
    policy runs /bin/sh by its resolved path, /usr/bin/dash here)."""
    markers = f"{run.stack.markers}/"
    found = []
    for p in psutil.process_iter(["cmdline", "ppid"]):
        argv = p.info["cmdline"] or []
        if len(argv) == 3 and argv[1] == "-c" and markers in argv[2]:
            label = argv[2].split(markers, 1)[1].split()[0]
            found.append((p.pid, p.info["ppid"], label))
    return found


def kill_children(run: Run) -> None:
    """SIGKILL a running command's shell every 0.3-1 s: each such command fails with
    `signal` and its tree (the shell's `sleep`) is killed by the sandbox."""
    run.at_fraction(0.1)
    limit = 5 if run.opts.short else 1000
    kills = 0
    while run.streaming() and kills < limit:
        time.sleep(run.rng.uniform(0.3, 1.0))
        running = _marker_children(run)
        if not running:
            continue
        pid, _, label = run.rng.choice(running)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            run.faults.killed_labels.add(label)
            kills += 1
        run.faults.end = time.time()
    run.faults.note(f"SIGKILLed {kills} command shell(s)")


def stop_worker(run: Run) -> None:
    """SIGSTOP a worker (main and pool) for three leases, then SIGCONT: the other worker's
    reaper settles its commands, and the late worker must not record over that."""
    run.at_fraction(0.3)
    run.stack.note_pools()
    victim = run.rng.choice(run.stack.live_workers())
    # stop it while one of its pool processes runs a command, so there is a lease to lose
    until = time.monotonic() + 10
    while time.monotonic() < until:
        parents = {ppid for _, ppid, _ in _marker_children(run)}
        busy = [w for w in run.stack.live_workers() if parents & set(w.pool_pids())]
        if busy:
            victim = busy[0]
            break
        time.sleep(0.01)
    pool = victim.pool_pids()
    # its pool processes are lost for the store's purposes while stopped
    run.faults.killed_pids.update(pool)
    stopped_s = 3 * LEASE_S + 2
    os.killpg(victim.pid, signal.SIGSTOP)
    run.faults.note(f"SIGSTOP worker {victim.pid} (pool {pool}) for {stopped_s} s")
    time.sleep(stopped_s)
    os.killpg(victim.pid, signal.SIGCONT)
    run.faults.end = time.time()
    run.faults.note(f"SIGCONT worker {victim.pid}")


def restart_postgres(run: Run) -> None:
    """`pg_ctl stop -m fast` then start again at once: every connection is cut."""
    for fraction in (0.3,) if run.opts.short else (0.3, 0.6):
        run.at_fraction(fraction)
        run.pg.stop("fast")
        run.pg.start()
        run.faults.end = time.time()
        run.faults.note("postgresql restarted (fast shutdown)")


class _Broker:
    """The tenant's queue list seen from outside: what was queued is kept for replays."""

    def __init__(self, run: Run) -> None:
        self.client: redis.Redis = run.redis.client()
        self.key = queue_key(run.stack.settings, run.stack.tenants.tenants[TENANT])
        self.seen: dict[bytes | str, float] = {}  # message -> when first seen (time.monotonic())
        self.counts = {"duplicated": 0, "reordered": 0, "replayed": 0}

    def capture(self) -> None:
        now = time.monotonic()
        for raw in self.client.lrange(self.key, 0, -1):
            self.seen.setdefault(raw, now)

    def duplicate(self) -> None:
        """The next message to be delivered, queued twice more."""
        head = self.client.lindex(self.key, -1)
        if head is not None:
            self.client.lpush(self.key, head, head)
            self.counts["duplicated"] += 2

    def reorder(self, n: int = 6) -> None:
        """The next `n` messages delivered in the opposite order."""
        taken = self.client.rpop(self.key, n) or []
        if taken:
            # RPUSH puts the last one given at the delivering end
            self.client.rpush(self.key, *taken)
            self.counts["reordered"] += len(taken)

    def replay(self, older_than_s: float, limit: int | None = None) -> None:
        """Messages seen a while ago (their commands most likely done), queued again."""
        cutoff = time.monotonic() - older_than_s
        old = [m for m, t in self.seen.items() if t < cutoff][:limit]
        if old:
            self.client.lpush(self.key, *old)
            self.counts["replayed"] += len(old)


def tamper_broker(run: Run) -> None:
    """Watch the queue; every 0.3 s duplicate, reorder or replay; at the end replay every
    message seen. Each command must still run at most once (retry-safe: once per attempt)."""
    broker = _Broker(run)
    try:
        run.at_fraction(0.05)
        actions = (broker.duplicate, broker.reorder, lambda: broker.replay(2.0, 20))
        turn = 0
        last = 0.0
        while run.streaming():
            with contextlib.suppress(redis.RedisError):
                broker.capture()
                if time.monotonic() - last > 0.3:
                    actions[turn % len(actions)]()
                    turn, last = turn + 1, time.monotonic()
            time.sleep(0.01)
        time.sleep(2.0)
        broker.replay(0.0)
        run.faults.end = time.time()
        run.faults.note(f"broker messages: {broker.counts} ({len(broker.seen)} captured)")
    finally:
        broker.client.close()


def clock_ahead(run: Run) -> None:
    """A third worker whose wall clock runs CLOCK_AHEAD_S ahead (libfaketime; monotonic
    clocks are left alone). See docs/chaos.md for what is guaranteed then."""
    if not LIBFAKETIME.is_file():
        raise RuntimeError(f"{LIBFAKETIME} is missing: install the faketime package")
    run.at_fraction(0.2)
    skewed = run.stack.start_worker(
        extra_env={
            "LD_PRELOAD": str(LIBFAKETIME),
            "FAKETIME": f"+{int(CLOCK_AHEAD_S)}s",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_DONT_RESET": "1",
        }
    )
    run.faults.end = time.time()
    run.faults.note(f"worker {skewed.pid} started with its clock {CLOCK_AHEAD_S} s ahead")
