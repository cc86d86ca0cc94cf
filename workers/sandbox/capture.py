"""Bounded output capture: keep the head and tail of each stream, count the rest.

A selector loop over both pipes (and a pidfd for the exit) instead of communicate(), which
buffers everything (416 MiB RSS for 200 MB of output) and waits for every pipe holder.

Within `scrubbing(secrets)`, each stream's secrets are replaced before it is cut: scrubbing the
cut text afterwards would miss a secret the cut splits, whose first bytes end the head (or last
bytes start the tail) and no longer match.

Within `tapping(tap)`, every chunk read is also handed to the tap as it arrives (live output):
the tap must return at once, whatever it does with the chunk.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import threading
import time
from collections.abc import Callable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Protocol

_READ = 1 << 20
_PIPE_SIZE = 1 << 20  # fewer wake-ups for a flood; the kernel caps it (pipe-max-size)

Span = tuple[int, int, bytes]  # start, end, and the mark that replaces those bytes


class Secrets(Protocol):
    """What capture needs to scrub secrets (producer.redaction.Redactor is one)."""

    @property
    def longest_form(self) -> int:
        """Bytes of the longest form a secret can take in output."""
        ...

    def secret_spans(self, data: bytes) -> list[Span]:
        """Where secrets are in `data`, in order and not overlapping."""
        ...


@dataclass
class Scrub:
    """Secrets to take out of captured output before it is cut, and whether any were."""

    secrets: Secrets
    redacted: bool = False


class Tap(Protocol):
    """Sees each chunk of a command's output as it is read (workers.live.LiveTap is one)."""

    def feed(self, stream: str, data: bytes) -> None:
        """`data` was read from `stream` ("stdout" or "stderr"); must not block or raise."""
        ...


_SCRUB: ContextVar[Scrub | None] = ContextVar("capture_scrub", default=None)
_TAP: ContextVar[Tap | None] = ContextVar("capture_tap", default=None)


@contextlib.contextmanager
def scrubbing(secrets: Secrets) -> Iterator[Scrub]:
    """Captures in this block (this thread or task) scrub `secrets` from each stream.

    A redactor is no plain value for ExecRequest to carry; the caller scopes it around
    Sandbox.run instead, and reads `redacted` afterwards.
    """
    scrub = Scrub(secrets)
    token = _SCRUB.set(scrub)
    try:
        yield scrub
    finally:
        _SCRUB.reset(token)


@contextlib.contextmanager
def tapping(tap: Tap) -> Iterator[Tap]:
    """Captures in this block (this thread or task) hand every chunk they read to `tap`."""
    token = _TAP.set(tap)
    try:
        yield tap
    finally:
        _TAP.reset(token)


class HeadTail:
    """The first and last `cap` bytes of a stream plus its total length.

    With `scrub`, `margin` more bytes are kept beyond each cut (the longest form of a secret),
    so that `text()` sees whole every secret the cuts split, and replaces it with its mark.
    """

    __slots__ = ("cap", "head", "keep", "margin", "scrub", "tail", "total")

    def __init__(self, cap: int, scrub: Scrub | None = None) -> None:
        self.cap = max(cap, 0)
        self.scrub = scrub
        self.margin = scrub.secrets.longest_form if scrub is not None and self.cap else 0
        self.keep = self.cap + self.margin  # bytes held at each end
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        """Account for `data`; memory stays below ~3x (cap + margin) whatever the stream's size."""
        self.total += len(data)
        if self.cap == 0:
            return
        keep = self.keep
        view = memoryview(data)
        room = keep - len(self.head)
        if room > 0:
            self.head += view[:room]
            view = view[room:]
        if len(view) >= keep:
            self.tail[:] = view[-keep:]  # the chunk alone outlives the old tail
        elif view:
            self.tail += view
            if len(self.tail) > 2 * keep:
                del self.tail[: len(self.tail) - keep]

    @property
    def _head_end(self) -> int:
        return min(self.cap, self.total)

    @property
    def _tail_start(self) -> int:
        return max(self._head_end, self.total - self.cap)

    def _bytes(self, start: int, end: int) -> bytes:
        """Stream bytes [start, end): callers ask only for what head and tail still hold."""
        if end <= len(self.head):
            return bytes(self.head[start:end])
        tail_from = self.total - len(self.tail)
        if start >= tail_from:
            return bytes(self.tail[start - tail_from : end - tail_from])
        assert tail_from == len(self.head)  # nothing was dropped between them
        return bytes(self.head[start:]) + bytes(self.tail[: end - tail_from])

    @property
    def kept_tail(self) -> bytes:
        return self._bytes(self._tail_start, self.total)

    @property
    def omitted(self) -> int:
        """Bytes dropped between head and tail."""
        return self._tail_start - self._head_end

    @property
    def truncated(self) -> bool:
        return self.omitted > 0

    def text(self) -> str:
        """UTF-8 (invalid bytes replaced), with a marker where bytes were dropped."""
        if self.margin:
            head_bytes, tail_bytes = self._scrubbed()
        else:
            head_bytes, tail_bytes = bytes(self.head[: self._head_end]), self.kept_tail
        head = head_bytes.decode("utf-8", errors="replace")
        tail = tail_bytes.decode("utf-8", errors="replace")
        if self.omitted:
            return f"{head}\n…[{self.omitted} bytes omitted]…\n{tail}"
        return head + tail

    def _scrubbed(self) -> tuple[bytes, bytes]:
        """Head and tail with every secret that reaches into them replaced whole by its mark."""
        assert self.scrub is not None
        spans_in = self.scrub.secrets.secret_spans
        head_end, tail_start, total = self._head_end, self._tail_start, self.total
        if tail_start == head_end:
            # One text, cut in two only to decode as before: a secret across the cut is the
            # head's, and the tail resumes after it.
            whole = self._bytes(0, total)
            spans = spans_in(whole)
            head, resume, n_head = _replaced(whole, 0, spans, 0, head_end)
            tail, _, n_tail = _replaced(whole, 0, spans, resume, total)
        else:
            # Each window reaches `margin` past its cut: a secret the cut splits is in it whole.
            window = bytes(self.head)
            head, _, n_head = _replaced(window, 0, spans_in(window), 0, head_end)
            at = max(tail_start - self.margin, 0)
            window = self._bytes(at, total)
            tail, _, n_tail = _replaced(window, at, spans_in(window), tail_start, total)
        if n_head or n_tail:
            self.scrub.redacted = True
        return head, tail


def _replaced(
    window: bytes, at: int, spans: list[Span], start: int, end: int
) -> tuple[bytes, int, int]:
    """Stream bytes [start, end) from `window` (which begins at stream offset `at`), each span
    reaching into them replaced whole by its mark; where the last one ends (at least `end`),
    and how many there were."""
    out = bytearray()
    pos, count = start, 0
    for span_start, span_end, mark in spans:
        s, e = span_start + at, span_end + at
        if e <= pos:
            continue
        if s >= end:
            break
        out += window[pos - at : s - at]  # empty for a span that started before `start`
        out += mark
        pos, count = e, count + 1
    out += window[pos - at : end - at]
    return bytes(out), max(pos, end), count


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
    scrub: Scrub | None = None,
    tap: Tap | None = None,
    term_grace_s: float = 0.5,
    exit_grace_s: float = 0.5,
    drain_s: float = 2.0,
) -> Captured:
    """Read both pipes until the command exits and they close, or stop it.

    On `deadline` or `cancel`: terminate(), keep reading for term_grace_s, then kill(). After
    the command exits, a descendant holding a pipe gets exit_grace_s before kill(). Pipes are
    not closed here (their owner does that); the command is not reaped (only detected).
    `scrub`: secrets to take out before cutting; by default those of `scrubbing`, if any.
    `tap`: sees every chunk as it is read; by default that of `tapping`, if any.
    """
    scrub = scrub or _SCRUB.get()
    tap = tap or _TAP.get()
    names = {stdout_fd: "stdout", stderr_fd: "stderr"}
    out, err = HeadTail(cap_bytes, scrub), HeadTail(cap_bytes, scrub)
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
                    if tap is not None:
                        tap.feed(names[key.fd], chunk)
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
