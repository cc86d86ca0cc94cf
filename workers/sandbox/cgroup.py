"""Per-pool-process cgroups: memory + pids limits, an OOM counter and a whole-tree kill.

One set of directories (`execq-<pid>-<start ticks>-<slot>`) per pool process, created lazily and
reused for every command, since creating one per command halves throughput. A command gets in
by the self-join trick: the spawning thread moves itself in, spawns, and moves back.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from producer.errors import SandboxError

from .capabilities import Capabilities
from .procfs import is_alive, start_ticks

_NAME = re.compile(r"^execq-(?:probe-(\d+)|(\d+)-(\d+)-\d+)$")
# Moving a whole process in cgroup v2 drags every thread along; serialise those moves so two
# threads of one process never interleave join/leave (v1 moves only the calling thread).
_V2_PROCESS_MOVE = threading.Lock()
# Unique across every Sandbox of this process (two managers must never share a directory).
_SLOT_NUMBERS = itertools.count(1)
_SWEPT: set[int] = set()  # processes that already swept stale cgroups once


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


@dataclass
class CgroupSlot:
    """One command at a time runs here; None directories are hierarchies we could not use."""

    name: str
    memory: str | None
    pids: str | None
    v2: str | None
    broken: bool = False  # limits could not be set or we could not leave: do not reuse
    _memory_limit: int | None = field(default=None, repr=False)
    _pids_max: int | None = field(default=None, repr=False)

    @property
    def dirs(self) -> list[str]:
        return [d for d in (self.memory, self.pids, self.v2) if d]

    @property
    def v2_self_join(self) -> bool:
        """Without a v1 hierarchy to catch early forks, v2 membership must precede the exec."""
        return self.v2 is not None and self.memory is None and self.pids is None

    def set_limits(self, memory_bytes: int | None, processes: int | None) -> None:
        """Write this command's limits; pids.max gets +1 for our own thread during the spawn."""
        if self.memory and memory_bytes is not None and memory_bytes != self._memory_limit:
            self._set_memory(memory_bytes)
        if self.pids and processes is not None:
            self._set_pids(processes + 1)
        if self.memory:
            with contextlib.suppress(OSError):  # peak per command; absent on some kernels
                _write(f"{self.memory}/memory.max_usage_in_bytes", "0")

    def _set_memory(self, limit: int) -> None:
        assert self.memory is not None
        mem = f"{self.memory}/memory.limit_in_bytes"
        memsw = f"{self.memory}/memory.memsw.limit_in_bytes"
        current = self._memory_limit
        if current is None:
            current = int(_read(mem))
        # memsw must stay >= limit at every step, so the order depends on the direction.
        order = [memsw, mem] if limit > current else [mem, memsw]
        for path in order:
            if path == memsw and not os.path.exists(memsw):
                continue
            try:
                _write(path, str(limit))
            except OSError as exc:
                if exc.errno != errno.EBUSY:
                    raise
                # Pages still charged (page cache of the last command) block a lower limit.
                _write(f"{self.memory}/memory.force_empty", "0")
                _write(path, str(limit))
        self._memory_limit = limit

    def _set_pids(self, value: int) -> None:
        if self.pids and value != self._pids_max:
            _write(f"{self.pids}/pids.max", str(value))
            self._pids_max = value

    @contextlib.contextmanager
    def spawning(self, processes: int | None) -> Iterator[Callable[[int], None]]:
        """Put the calling thread in the cgroups while the body spawns; yields `adopt(pid)`.

        The home to move back to is the slot's parent: the pool process's own cgroup.
        """
        tid = str(threading.get_native_id())
        pid = str(os.getpid())
        v1 = [d for d in (self.memory, self.pids) if d]
        lock = _V2_PROCESS_MOVE if self.v2_self_join else contextlib.nullcontext()
        with lock:
            joined: list[str] = []
            try:
                try:
                    for d in v1:
                        _write(f"{d}/tasks", tid)
                        joined.append(d)
                    if self.v2 and self.v2_self_join:
                        _write(f"{self.v2}/cgroup.procs", pid)
                        joined.append(self.v2)
                except OSError as exc:
                    self.broken = True
                    raise SandboxError(f"cannot join cgroup {self.name}: {exc}") from exc
                yield self._adopt
            finally:
                failed: list[str] = []
                for d in joined:
                    home = os.path.dirname(d)
                    try:
                        if d == self.v2:
                            _write(f"{home}/cgroup.procs", pid)
                        else:
                            _write(f"{home}/tasks", tid)
                    except OSError as exc:
                        failed.append(f"{home}: {exc.strerror}")
                if failed:
                    self.broken = True
                    raise SandboxError(f"could not move back out of {self.name}: {failed}")
        if processes is not None:
            try:
                self._set_pids(processes)
            except OSError as exc:
                self.broken = True
                raise SandboxError(f"cannot lower pids.max in {self.name}: {exc}") from exc

    def _adopt(self, child: int) -> None:
        """v2 membership after the spawn: early forks escape it, but not the v1 hierarchies."""
        if self.v2 and not self.v2_self_join:
            with contextlib.suppress(OSError):  # the child may already be gone
                _write(f"{self.v2}/cgroup.procs", str(child))

    def members(self) -> set[int]:
        """Every live process in any of this slot's cgroups (zombies are not listed)."""
        out: set[int] = set()
        # Every process of the slot is in each v1 hierarchy, so one list is enough; v2 holds
        # only what was adopted after the spawn, a subset (unless v2 is all there is).
        for d in self.dirs:
            try:
                out.update(int(x) for x in _read(f"{d}/cgroup.procs").split())
            except OSError:
                continue
            break
        out.discard(os.getpid())
        return out

    def kill(self, timeout_s: float = 2.0) -> bool:
        """SIGKILL everything inside; True once the cgroups are empty."""
        deadline = time.monotonic() + timeout_s
        delay = 0.0005
        while True:
            pids = self.members()
            if not pids:
                return True
            self._cgroup_kill()
            for p in pids:
                with contextlib.suppress(OSError):
                    os.kill(p, signal.SIGKILL)
            if time.monotonic() >= deadline:
                return False
            time.sleep(delay)
            delay = min(delay * 2, 0.02)

    def _cgroup_kill(self) -> None:
        if not self.v2 or not os.path.exists(f"{self.v2}/cgroup.kill"):
            return
        with contextlib.suppress(OSError):
            # Never while this process is inside (possible only mid-spawn in self-join mode).
            if str(os.getpid()) in _read(f"{self.v2}/cgroup.procs").split():
                return
            _write(f"{self.v2}/cgroup.kill", "1")

    def oom_kills(self) -> int | None:
        """The kernel's count of OOM kills in this memory cgroup (None when unknown)."""
        if not self.memory:
            return None
        with contextlib.suppress(OSError):
            for line in _read(f"{self.memory}/memory.oom_control").splitlines():
                key, _, value = line.partition(" ")
                if key == "oom_kill":
                    return int(value)
        return None

    def peak_memory(self) -> int | None:
        """Largest memory use since `set_limits` (bytes), or None."""
        if not self.memory:
            return None
        with contextlib.suppress(OSError, ValueError):
            return int(_read(f"{self.memory}/memory.max_usage_in_bytes"))
        return None

    def remove(self) -> None:
        """Kill what is left and rmdir every directory (best effort: retried briefly)."""
        self.kill()
        for d in self.dirs:
            for _ in range(50):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.01)


class CgroupManager:
    """Hands out this process's slots: normally one, more only for concurrent runs."""

    def __init__(self, caps: Capabilities) -> None:
        self._caps = caps
        self._lock = threading.Lock()
        self._free: list[CgroupSlot] = []
        self._all: list[CgroupSlot] = []
        self._owner = os.getpid()

    @property
    def available(self) -> bool:
        caps = self._caps
        return bool(caps.memory_v1 or caps.pids_v1 or caps.cgroup_v2)

    def acquire(self) -> CgroupSlot | None:
        """A free slot (made on first use); None when this host has no usable cgroup."""
        if not self.available:
            return None
        with self._lock:
            if self._owner != os.getpid():
                # Forked from the process that made these: they are not ours to use.
                self._free, self._all, self._owner = [], [], os.getpid()
            if self._free:
                return self._free.pop()
            if os.getpid() not in _SWEPT:
                # Self-healing: pool processes killed with SIGKILL never clean up after
                # themselves, so the first slot of each process clears what they left.
                _SWEPT.add(os.getpid())
                sweep_stale(self._caps)
            slot = self._create(next(_SLOT_NUMBERS))
            if slot is not None:
                self._all.append(slot)
            return slot

    def release(self, slot: CgroupSlot, *, reusable: bool = True) -> None:
        """Give the slot back; an unusable one (left non-empty) is removed instead."""
        with self._lock:
            if slot not in self._all:
                return
            if reusable:
                self._free.append(slot)
                return
            self._all.remove(slot)
        slot.remove()

    def close(self) -> None:
        """Remove every slot of this process."""
        with self._lock:
            slots = self._all if self._owner == os.getpid() else []
            self._all, self._free = [], []
        for slot in slots:
            slot.remove()

    def _create(self, n: int) -> CgroupSlot | None:
        ticks = start_ticks(os.getpid()) or 0
        name = f"execq-{os.getpid()}-{ticks}-{n}"
        made: dict[str, str | None] = {}
        for key, parent in (
            ("memory", self._caps.memory_v1),
            ("pids", self._caps.pids_v1),
            ("v2", self._caps.cgroup_v2),
        ):
            made[key] = None
            if parent:
                path = os.path.join(parent, name)
                try:
                    os.makedirs(path, exist_ok=True)
                    made[key] = path
                except OSError:
                    continue
        if not any(made.values()):
            return None
        return CgroupSlot(name=name, memory=made["memory"], pids=made["pids"], v2=made["v2"])


def migrations_favored(mounts: str = "/proc/self/mounts") -> bool:
    """Whether a cgroup hierarchy is mounted with `favordynmods`.

    Each command moves the spawning thread into its slot and back (and the child into v2):
    every move takes the kernel's cgroup_threadgroup_rwsem for writing. Without the option,
    a writer that comes after a quiet moment waits for an RCU grace period first: measured
    here at 50 commands/s, the moves took 6 ms at p90 and 16 ms at p99 against 0.03 ms in a
    busy worker, and doubled a command's median time in the worker. `favordynmods` (kernel
    5.19+, any hierarchy, host-wide) keeps that lock ready for writers, for a little more
    work in every fork and exit on the host.
    """
    try:
        with open(mounts) as f:
            lines = f.read().splitlines()
    except OSError:
        return False
    for line in lines:
        fields = line.split()
        cgroup = len(fields) > 3 and fields[2] in ("cgroup", "cgroup2")
        if cgroup and "favordynmods" in fields[3].split(","):
            return True
    return False


def sweep_stale(caps: Capabilities) -> list[str]:
    """Kill and rmdir execq cgroups whose owning pool process is dead; returns their names."""
    found: dict[str, dict[str, str]] = {}
    for key, parent in (
        ("memory", caps.memory_v1),
        ("pids", caps.pids_v1),
        ("v2", caps.cgroup_v2),
    ):
        if not parent:
            continue
        try:
            entries = os.listdir(parent)
        except OSError:
            continue
        for name in entries:
            m = _NAME.match(name)
            if m is None:
                continue
            probe_pid, pid, ticks = m.groups()
            # ticks 0: the owner could not read its own start time; trust the pid alone.
            owner_alive = is_alive(
                int(probe_pid or pid), None if probe_pid or ticks == "0" else int(ticks)
            )
            if not owner_alive:
                found.setdefault(name, {})[key] = os.path.join(parent, name)
    for name, dirs in found.items():
        CgroupSlot(name, dirs.get("memory"), dirs.get("pids"), dirs.get("v2")).remove()
    return sorted(found)
