"""Bounded output capture: keep the head and tail of each stream, count the rest.

A selector loop over both pipes (and a pidfd for the exit) instead of communicate(), which
buffers everything (416 MiB RSS for 200 MB of output) and waits for every pipe holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

_READ = 1 << 20
_PIPE_SIZE = 1 << 20  # fewer wake-ups for a flood; the kernel caps it (pipe-max-size)


class HeadTail:
    """The first and last `cap` bytes of a stream plus its total length."""

    __slots__ = ("cap", "head", "tail", "total")

    def __init__(self, cap: int) -> None:
        self.cap = max(cap, 0)
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Account for `data`; memory stays below ~3x cap whatever the stream's size."""
        self.total += len(data)
        if self.cap == 0:
            return
        view = memoryview(data)
        room = self.cap - len(self.head)
        if room > 0:
            self.head += view[:room]
            view = view[room:]
        if len(view) >= self.cap:
            self.tail[:] = view[-self.cap :]  # the chunk alone outlives the old tail
        elif view:
            self.tail += view
            if len(self.tail) > 2 * self.cap:
                del self.tail[: len(self.tail) - self.cap]

    @property
    def kept_tail(self) -> bytes:
        return bytes(self.tail[-self.cap :]) if self.cap else b""

    @property
    def omitted(self) -> int:
        """Bytes dropped between head and tail."""
        return self.total - len(self.head) - len(self.kept_tail)

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def text(self) -> str:
        """UTF-8 (invalid bytes replaced), with a marker where bytes were dropped."""
        head = self.head.decode("utf-8", errors="replace")
        tail = self.kept_tail.decode("utf-8", errors="replace")
        if self.omitted:
            return f"{head}\n…[{self.omitted} bytes omitted]…\n{tail}"
        return head + tail


@dataclass
class Captured:
    """What the loop saw: both streams, why it stopped the command (if it did), and the exit."""

    stdout: HeadTail
    stderr: HeadTail
    stopped: str | None = None  # "timeout" or "cancelled"
    pipe_held: bool = False  # a descendant kept a pipe open after the command exited
    exited: bool = False
    ended_at: float = field(default_factory=time.monotonic)


def capture(
    *,
    pid: int,
    stdout_fd: int,
    stderr_fd: int,
    cap_bytes: int,
    deadline: float,
    terminate: Callable[[], None],
    kill: Callable[[], None],
    cancel: threading.Event | None = None,
    term_grace_s: float = 0.5,
    exit_grace_s: float = 0.5,
    drain_s: float = 2.0,
) -> Captured:
    """Read both pipes until the command exits and they close, or stop it.

    On `deadline` or `cancel`: terminate(), keep reading for term_grace_s, then kill(). After
    the command exits, a descendant holding a pipe gets exit_grace_s before kill(). Pipes are
    not closed here (their owner does that); the command is not reaped (only detected).
    """
    out, err = HeadTail(cap_bytes), HeadTail(cap_bytes)
    result = Captured(out, err)
    sel = selectors.DefaultSelector()
    pidfd = _pidfd(pid)
    for fd in (stdout_fd, stderr_fd):
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_SIZE)
    try:
        sel.register(stdout_fd, selectors.EVENT_READ, out)
        sel.register(stderr_fd, selectors.EVENT_READ, err)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ, None)
        open_pipes = 2
        kill_at: float | None = None
        exit_grace_end: float | None = None
        give_up_at: float | None = None
        while True:
            now = time.monotonic()
            if not result.exited and pidfd is None:
                result.exited = _exited(pid)
            if result.exited and open_pipes == 0:
                break
            if not result.exited and result.stopped is None:
                if cancel is not None and cancel.is_set():
                    result.stopped = "cancelled"
                elif now >= deadline:
                    result.stopped = "timeout"
                if result.stopped is not None:
                    terminate()
                    kill_at = now + term_grace_s
            if result.exited and exit_grace_end is None and kill_at is None:
                exit_grace_end = now + exit_grace_s
            if give_up_at is None:
                if kill_at is not None and now >= kill_at:
                    kill()
                    give_up_at = now + drain_s
                elif exit_grace_end is not None and now >= exit_grace_end:
                    result.pipe_held = True
                    kill()
                    give_up_at = now + drain_s
            elif now >= give_up_at:
                break  # unkillable (D state) or a pipe passed outside: stop waiting for it
            wait = _next_wake(
                now,
                deadline=deadline,
                stopped=result.stopped,
                kill_at=kill_at,
                exit_grace_end=exit_grace_end,
                give_up_at=give_up_at,
            )
            if cancel is not None:
                wait = min(wait, 0.1)
            if pidfd is None and not result.exited:
                wait = min(wait, 0.01)
            for key, _ in sel.select(max(wait, 0.0)):
                if key.data is None:
                    result.exited = True
                    sel.unregister(key.fd)
                    continue
                try:
                    chunk = os.read(key.fd, _READ)
                except BlockingIOError:
                    continue
                if chunk:
                    key.data.feed(chunk)
                else:
                    sel.unregister(key.fd)
                    open_pipes -= 1
    finally:
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
    result.ended_at = time.monotonic()
    return result


def _next_wake(
    now: float,
    *,
    deadline: float,
    stopped: str | None,
    kill_at: float | None,
    exit_grace_end: float | None,
    give_up_at: float | None,
) -> float:
    """Sleep until the earliest pending timer (the loop re-checks everything on waking)."""
    timers = [t for t in (kill_at, exit_grace_end, give_up_at) if t is not None]
    if stopped is None:
        timers.append(deadline)
    return min(timers) - now if timers else 0.1


def _pidfd(pid: int) -> int | None:
    """A pidfd turns readable when the process exits: no polling (Linux >= 5.3)."""
    if not hasattr(os, "pidfd_open"):
        return None
    try:
        return os.pidfd_open(pid)
    except OSError:
        return None


def _exited(pid: int) -> bool:
    """Has pid exited? WNOWAIT leaves the zombie in place so its pid (and pgid) stay reserved."""
    with contextlib.suppress(ChildProcessError):
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    return True
