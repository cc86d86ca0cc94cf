"""Subreaper duties: adopt what commands leave behind, kill it, and reap the zombies.

As a subreaper the pool process receives every orphan of its commands (setsid and double-fork
escapees included) instead of PID 1, so they can be found and reaped rather than pile up.
Children this module never spawned (started before the first run, or registered as a running
command's leader) are left alone.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from .capabilities import Capabilities, set_subreaper
from .procfs import children_of, is_alive, start_ticks

_lock = threading.Lock()
_active: set[int] = set()  # leaders of runs in progress: their own run waits for them
_subreaper_pids: set[int] = set()  # the attribute is not inherited across fork: keyed by pid
_first_spawn: dict[int, int] = {}  # our pid -> start ticks of our first command


def ensure_subreaper(caps: Capabilities) -> bool:
    """Become a subreaper once per process; False when the host does not allow it."""
    if not caps.subreaper:
        return False
    if os.getpid() in _subreaper_pids:
        return True
    if set_subreaper():
        _subreaper_pids.add(os.getpid())
        return True
    return False


def register(pid: int, ticks: int | None) -> None:
    """Record a command's leader: its own run reaps it, nobody else may."""
    with _lock:
        _active.add(pid)
        if ticks is not None:
            _first_spawn.setdefault(os.getpid(), ticks)


def unregister(pid: int) -> None:
    """The leader was reaped (or abandoned to the zombie sweep)."""
    with _lock:
        _active.discard(pid)


def _candidate(pid: int, since: int | None) -> bool:
    """A child we may kill or reap: not a running leader, and born after `since`."""
    if since is None:
        return False
    with _lock:
        if pid in _active:
            return False
    ticks = start_ticks(pid)
    return ticks is not None and ticks >= since


def kill_orphans(since_ticks: int | None, leader: int) -> int:
    """SIGKILL live children re-parented to us that started after `since_ticks`.

    Only needed without cgroups (a cgroup kill already reaches them). Orphans reach us only
    once their parent has exited, so wait for the leader first, and for each killed round.
    """
    killed = 0
    me = os.getpid()
    _wait_dead([leader])
    for _ in range(50):
        found = [
            st.pid for st in children_of(me) if not st.zombie and _candidate(st.pid, since_ticks)
        ]
        if not found:
            break
        for pid in found:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        killed += len(found)
        _wait_dead(found)
    return killed


def _wait_dead(pids: list[int], timeout_s: float = 0.5) -> None:
    """Until every pid has exited (zombie or gone); SIGKILLed processes take ~1 ms."""
    deadline = time.monotonic() + timeout_s
    pending = list(pids)
    while pending and time.monotonic() < deadline:
        pending = [p for p in pending if is_alive(p)]
        if pending:
            time.sleep(0.0005)


def reap_zombies() -> int:
    """waitpid every exited orphan of our commands; returns how many were reaped."""
    since = _first_spawn.get(os.getpid())
    if since is None:
        return 0
    reaped = 0
    for _ in range(100_000):
        try:
            # WNOWAIT peeks: a child that is not ours to reap stays waitable for its owner.
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return reaped
        if info is None:
            return reaped
        if not _candidate(info.si_pid, since):
            break
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, os.WNOHANG)
            reaped += 1
    # Someone else's child is first in line: look past it the slow way.
    for st in children_of(os.getpid()):
        if st.zombie and _candidate(st.pid, since):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(st.pid, os.WNOHANG)
                reaped += 1
    return reaped
