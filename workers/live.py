"""Live output, the worker's side: a running command's output published to a Redis stream.

Capture hands each chunk to the command's LiveTap, which only appends it under a lock: the
command never waits for Redis. One thread per pool process writes what came, every
FLUSH_EVERY_S while a command runs, to the stream `<namespace>.live.<command id>` (XADD with
MAXLEN; the key expires TTL_S after its last write); what is left when the command ends is
written at once, before its end is recorded. producer/live.py reads it.

What is published is scrubbed as the stored output is: bytes that more output could turn
into a secret form are held back until the next chunk (or the end), a partial line waits up
to LINE_HOLD_S for its end (pattern masks see whole lines), and UTF-8 is decoded
incrementally. Each stream publishes at most `cap` bytes, then one marker. When Redis is down
or slow, live output is dropped; the store keeps the final output as always.
"""

from __future__ import annotations

import codecs
import contextlib
import logging
import threading
import time
from collections.abc import Iterator

import redis

from producer.redaction import Redactor
from producer.redisconn import redis_client
from producer.settings import Settings
from workers.sandbox.capture import tapping

log = logging.getLogger("execq.live")

STREAMS = ("stdout", "stderr")
FLUSH_EVERY_S = 0.05  # at most twenty writes a second per command
LINE_HOLD_S = 0.5  # how long a partial line waits for its end
LINE_HOLD_BYTES = 8192  # ... or until it is this long
MAXLEN = 10_000  # entries kept per stream (approximate trim); the byte cap comes first
TTL_S = 3600  # a stream expires this long after its last write
CLOSE_WAIT_S = 2.0  # the most a command's end waits for a write in progress
DOWN_FOR_S = 5.0  # after a failed write, live output is dropped this long
CONNECT_TIMEOUT_S = 1.0
WRITE_TIMEOUT_S = 2.0

Span = tuple[int, int, bytes]


def cut_marker(cap: int) -> str:
    """The text published once where a stream reaches its cap."""
    return f"\n…[live output stops after {cap} bytes; the command's record keeps the tail]…\n"


class LiveOutput:
    """A pool process's publisher of live output: one Redis client and one writing thread
    (started on first use, in the process that runs the commands) for all its commands."""

    def __init__(self, redis_url: str, settings: Settings) -> None:
        self.redis_url = redis_url
        self.settings = settings
        self._client: redis.Redis | None = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self._taps: set[LiveTap] = set()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._idle = False  # the thread waits for a command to publish (not for a timer)
        self._closed = False

    def client(self) -> redis.Redis | None:
        """The client to write with; None while Redis is presumed down."""
        if time.monotonic() < self._down_until:
            return None
        with self._lock:
            if self._client is None:
                self._client = redis_client(
                    self.redis_url,
                    socket_connect_timeout=CONNECT_TIMEOUT_S,
                    socket_timeout=WRITE_TIMEOUT_S,
                )
            return self._client

    def failed(self, exc: Exception) -> None:
        """A write failed: drop live output for a while rather than wait for Redis each time."""
        log.warning("live output dropped for %g s: Redis did not take it (%s)", DOWN_FOR_S, exc)
        self._down_until = time.monotonic() + DOWN_FOR_S

    @contextlib.contextmanager
    def publishing(self, command_id: str, redactor: Redactor, cap: int) -> Iterator[LiveTap]:
        """Captures in this block publish their output; on leaving, what is held goes out."""
        tap = LiveTap(self, self.settings.key("live", command_id), redactor, cap)
        self._watch(tap)
        try:
            with tapping(tap):
                yield tap
        finally:
            with self._changed:
                self._taps.discard(tap)
            tap.close()

    def _watch(self, tap: LiveTap) -> None:
        with self._changed:
            self._taps.add(tap)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="execq-live", daemon=True)
                try:
                    self._thread.start()
                except RuntimeError:  # no thread to be had: the end of each run writes all
                    self._thread = None
            if self._idle:
                self._changed.notify()

    def _run(self) -> None:
        while True:
            with self._changed:
                while not self._taps and not self._closed:
                    self._idle = True
                    self._changed.wait()
                self._idle = False
                if self._closed:
                    return
                # What comes meanwhile goes out in one write.
                self._changed.wait(FLUSH_EVERY_S)
                taps = list(self._taps)
            for tap in taps:
                tap.flush()

    def close(self) -> None:
        """Stop the writing thread and release the Redis connections (at pool-process
        shutdown)."""
        with self._changed:
            self._closed = True
            self._changed.notify()
        if self._thread is not None:
            self._thread.join(CLOSE_WAIT_S + WRITE_TIMEOUT_S)
        with self._lock:
            if self._client is not None:
                self._client.close()
                self._client = None


class _Stream:
    """One output stream of a tap: bytes received (shared) and bytes held back (flusher's)."""

    __slots__ = ("accepted", "decoder", "done", "full", "held", "incoming", "name", "partial_since")

    def __init__(self, name: str) -> None:
        self.name = name
        self.incoming = bytearray()  # guarded by the tap's lock
        self.accepted = 0  # bytes taken in, at most the cap
        self.full = False  # more than the cap came: nothing more is taken
        self.held = bytearray()  # not yet safe to publish
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.partial_since: float | None = None  # when the held partial line began waiting
        self.done = False

    def take(self, redactor: Redactor, now: float, *, last: bool, cut: bool) -> str:
        """The held text that is safe to publish now, redacted. `last`: nothing more comes;
        `cut`: nor did the rest of the stream, so what could begin a secret is dropped."""
        data = self.held
        spans = redactor.secret_spans(bytes(data)) if redactor.longest_form else []
        if last and not cut:
            end = len(data)
        else:
            end = _outside(spans, redactor.unfinished_at(data))
            if not last:
                end = self._whole_lines(data, spans, end, now)
        out = _replaced(data, spans, end)
        del data[:end]
        if last:
            data.clear()
        text = self.decoder.decode(out, final=last)
        return redactor.scrub(text)[0] or ""

    def _whole_lines(self, data: bytearray, spans: list[Span], end: int, now: float) -> int:
        """`end`, or the end of its last whole line while a partial line may still wait."""
        newline = data.rfind(b"\n", 0, end)
        if newline + 1 == end:
            self.partial_since = None
            return end
        if newline >= 0 or self.partial_since is None:
            self.partial_since = now  # a new partial line begins waiting
        if now - self.partial_since < LINE_HOLD_S and end - newline - 1 < LINE_HOLD_BYTES:
            return _outside(spans, newline + 1)
        self.partial_since = None
        return end


def _outside(spans: list[Span], at: int) -> int:
    """`at`, or the start of the secret it falls inside (a secret goes out whole or not yet)."""
    for start, end, _ in spans:
        if start < at < end:
            return start
        if start >= at:
            break
    return at


def _replaced(data: bytearray, spans: list[Span], end: int) -> bytes:
    """data[:end] with each secret in it replaced by its mark."""
    out = bytearray()
    pos = 0
    for start, stop, mark in spans:
        if start >= end:
            break
        out += data[pos:start]
        out += mark
        pos = stop
    out += data[pos:end]
    return bytes(out)


class LiveTap:
    """Publishes one command's output as it comes (see the module docstring)."""

    def __init__(self, output: LiveOutput, key: str, redactor: Redactor, cap: int) -> None:
        self.key = key
        self.redactor = redactor
        self.cap = max(cap, 0)
        self._output = output
        self._streams = {name: _Stream(name) for name in STREAMS}
        self._lock = threading.Lock()  # what capture hands over
        self._writing = threading.Lock()  # one write at a time, in order
        self._closing = False
        self._finished = False
        self._dropped = False

    def feed(self, stream: str, data: bytes) -> None:
        """Capture read `data` from `stream`: keep it for the next write (up to the cap)."""
        if self._dropped:
            return
        s = self._streams[stream]
        with self._lock:
            if s.full or self._closing:
                return
            room = self.cap - s.accepted
            if len(data) > room:
                data = data[:room]
                s.full = True
            s.accepted += len(data)
            s.incoming += data

    def flush(self) -> None:
        """Write what is safe to publish now (the writing thread, while the command runs)."""
        try:
            with self._writing:
                if not self._finished:
                    self._publish(last=False)
        except Exception:
            # Never the command's failure: its output is in the store all the same.
            log.exception("live output of %s stopped", self.key)
            self._drop()

    def close(self) -> None:
        """The command's output ended: what is held goes out now. Waits CLOSE_WAIT_S at most
        for a write in progress (then drops the rest), and a Redis that does not answer
        costs one timeout before it is left alone for DOWN_FOR_S."""
        with self._lock:
            self._closing = True
        if not self._writing.acquire(timeout=CLOSE_WAIT_S):
            self._drop()
            return
        try:
            if not self._finished:
                self._finished = True
                self._publish(last=True)
        except Exception:
            log.exception("live output of %s stopped", self.key)
            self._drop()
        finally:
            self._writing.release()

    def _publish(self, *, last: bool) -> None:
        now = time.monotonic()
        entries: list[tuple[str, str]] = []
        for s in self._streams.values():
            if s.done or self._dropped:
                continue
            with self._lock:
                s.held += s.incoming
                s.incoming.clear()
                cut = s.full
            if s.held or last or cut:
                text = s.take(self.redactor, now, last=last or cut, cut=cut)
                if text:
                    entries.append((s.name, text))
            if cut:
                entries.append((s.name, cut_marker(self.cap)))
            s.done = last or cut
        if entries:
            self._send(entries)

    def _send(self, entries: list[tuple[str, str]]) -> None:
        client = None if self._dropped else self._output.client()
        if client is None:
            self._drop()
            return
        try:
            pipe = client.pipeline(transaction=False)
            for name, text in entries:
                pipe.xadd(self.key, {"stream": name, "text": text}, maxlen=MAXLEN, approximate=True)
            pipe.expire(self.key, TTL_S)
            pipe.execute()
        except redis.RedisError as exc:
            self._output.failed(exc)
            self._drop()

    def _drop(self) -> None:
        """Publish nothing more for this command (and hold nothing for it)."""
        self._dropped = True
        with self._lock:
            for s in self._streams.values():
                s.incoming.clear()
                s.held.clear()
