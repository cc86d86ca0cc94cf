"""Small readers for /proc: who a process is (start time) and who its parent is.

A pid alone can be reused (pid_max is 32768 on small hosts), so identity is (pid, start ticks).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from dataclasses import dataclass

_CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class ProcStat:
    """The few /proc/<pid>/stat fields the sandbox needs."""

    pid: int
    state: str
    ppid: int
    pgid: int
    threads: int
    start_ticks: int

    @property
    def zombie(self) -> bool:
        """True for a process that has exited but was not reaped yet."""
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """Parse /proc/<pid>/stat; None when the process is gone (or /proc is missing)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    # comm may contain spaces and parentheses: the fields start after the LAST ')'.
    fields = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(
            pid=pid,
            state=fields[0].decode(),
            ppid=int(fields[1]),
            pgid=int(fields[2]),
            threads=int(fields[17]),
            start_ticks=int(fields[19]),
        )
    except (IndexError, ValueError):
        return None


def start_ticks(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None when it is gone."""
    st = read_stat(pid)
    return None if st is None else st.start_ticks


def boot_ticks_now() -> int:
    """Now, on the clock /proc start times use (ticks since boot), without touching /proc.

    Reading a just-spawned child's stat blocks until its exec finishes (~0.7 ms here).
    """
    return int(time.clock_gettime(time.CLOCK_BOOTTIME) * _CLK_TCK)


def is_alive(pid: int, ticks: int | None = None) -> bool:
    """True when pid exists, is not a zombie, and (if given) started at `ticks`."""
    st = read_stat(pid)
    if st is None or st.zombie:
        return False
    return ticks is None or st.start_ticks == ticks


def iter_pids() -> Iterator[int]:
    """Every pid visible in /proc (racy by nature: processes come and go while we look)."""
    try:
        names = os.listdir("/proc")
    except OSError:
        return
    for name in names:
        if name.isdigit():
            yield int(name)


def children_of(ppid: int) -> list[ProcStat]:
    """Processes whose parent is `ppid` (a full /proc scan: the kernel here lacks .../children)."""
    out: list[ProcStat] = []
    for pid in iter_pids():
        st = read_stat(pid)
        if st is not None and st.ppid == ppid:
            out.append(st)
    return out


def count_tasks_of_uid(uid: int) -> int:
    """Threads owned by `uid`, which is what RLIMIT_NPROC counts against."""
    total = 0
    for pid in iter_pids():
        try:
            if os.stat(f"/proc/{pid}").st_uid != uid:
                continue
        except OSError:
            continue
        st = read_stat(pid)
        if st is not None:
            total += st.threads
    return total
