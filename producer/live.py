"""Live output, the reader's side: a command's state changes and output as resumable events.

State comes from the store (the source of truth), polled every `poll_s`; output from the Redis
stream that workers fill while the command runs (workers/live.py, already redacted); `end`
carries the final record once the command is terminal and its stream is drained. When there
is no stream (it expired, or Redis was down while the command ran), the stored stdout and
stderr come instead, one event each, just before `end`.

An event's id is a cursor, `<version>-<stream entry id>` (`-end` added on the end event).
Given back as `after` (an SSE client's Last-Event-ID), it resumes right after that event:
nothing lost, nothing repeated. After an `end`, a resume yields nothing until the command
changes again (an operator retries it, say).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import redis

from producer.errors import BrokerUnavailable, InvalidEventId
from producer.record import CommandRecord
from producer.redisconn import async_redis_client, redis_client, shown_url
from producer.states import State, is_terminal

if TYPE_CHECKING:
    from producer.client import Producer

EVENTS = ("state", "stdout", "stderr", "end")
_BATCH = 500  # stream entries per read
# Stored output's own entry ids: below any entry a worker writes, so a cursor covers both.
_STORED = (("stdout", "0-1"), ("stderr", "0-2"))
_CURSOR = re.compile(r"(\d{1,18})-(\d{1,20})-(\d{1,20})(-end)?", re.ASCII)


@dataclass(frozen=True)
class LiveEvent:
    """One event: `data` is JSON text (state: `{"state", "version"}`; stdout and stderr:
    `{"text"}`; end: the record as `execq status --json` prints it)."""

    id: str
    event: str
    data: str

    def to_json(self) -> dict[str, Any]:
        """The event as one JSON object (what `execq logs --json` prints per line)."""
        return {"id": self.id, "event": self.event, "data": json.loads(self.data)}


@dataclass(frozen=True)
class Cursor:
    """How far a reader got: the last state version and stream entry it saw, and whether it
    saw the end."""

    version: int = 0
    entry: str = "0-0"
    ended: bool = False

    def __str__(self) -> str:
        return f"{self.version}-{self.entry}" + ("-end" if self.ended else "")

    @classmethod
    def parse(cls, text: str) -> Cursor:
        """A cursor from an event id; InvalidEventId when it is not one."""
        match = _CURSOR.fullmatch(text.strip())
        if match is None:
            raise InvalidEventId(f"not a live-output event id: {text[:80]!r}")
        version, ms, seq, ended = match.groups()
        return cls(int(version), f"{int(ms)}-{int(seq)}", ended is not None)


def _entry_key(entry: str) -> tuple[int, int]:
    ms, _, seq = entry.partition("-")
    return int(ms), int(seq or 0)


def _text(value: object) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class _Events:
    """Turns what the store and the stream say into events, moving the cursor along."""

    def __init__(self, producer: Producer, after: str | None) -> None:
        self.producer = producer
        self.cursor = Cursor.parse(after) if after else Cursor()
        self.key = ""
        self.running = False  # the last state given is `running`

    def first(self, rec: CommandRecord) -> CommandRecord:
        """The command's record when following starts: its stream is named after its id."""
        self.key = self.producer.settings.key("live", rec.id)
        return rec

    def _event(self, event: str, data: Any) -> LiveEvent:
        return LiveEvent(str(self.cursor), event, json.dumps(data, default=str))

    def settled(self, rec: CommandRecord) -> bool:
        """Resumed after the end event, and the command has not changed since."""
        return self.cursor.ended and rec.version <= self.cursor.version

    def state(self, rec: CommandRecord) -> list[LiveEvent]:
        if rec.version <= self.cursor.version:
            return []
        self.running = rec.state is State.RUNNING
        self.cursor = Cursor(rec.version, self.cursor.entry)
        return [self._event("state", {"state": rec.state.value, "version": rec.version})]

    def need_start(self, reply: Any) -> bool:
        """Output came before the state poll saw the command start: read the record again."""
        return bool(reply) and not self.running

    def started(self, rec: CommandRecord) -> list[LiveEvent]:
        """`running` before that output, if it runs (an end waits until the output is read)."""
        return self.state(rec) if rec.state is State.RUNNING else []

    def entries(self, reply: Any) -> list[LiveEvent]:
        """Events of an XREAD reply (either protocol's shape)."""
        out: list[LiveEvent] = []
        streams = reply.items() if isinstance(reply, dict) else (reply or [])
        for _, entries in streams:
            for entry_id, fields in entries:
                self.cursor = Cursor(self.cursor.version, _text(entry_id))
                stream, text = fields.get(b"stream"), fields.get(b"text")
                if stream in (b"stdout", b"stderr") and text is not None:
                    out.append(self._event(stream.decode(), {"text": _text(text)}))
        return out

    def end(self, rec: CommandRecord, stream_exists: bool) -> list[LiveEvent]:
        """The stored output (when no stream ever had any), then `end` with the record."""
        out: list[LiveEvent] = []
        if not stream_exists and _entry_key(self.cursor.entry) <= _entry_key(_STORED[-1][1]):
            for name, entry in _STORED:
                text = getattr(rec, name)
                if _entry_key(entry) > _entry_key(self.cursor.entry):
                    self.cursor = Cursor(self.cursor.version, entry)
                    if text:
                        out.append(self._event(name, {"text": text}))
        self.cursor = Cursor(max(rec.version, self.cursor.version), self.cursor.entry, True)
        out.append(LiveEvent(str(self.cursor), "end", json.dumps(rec.to_json(), default=str)))
        return out


def _unavailable(url: str, exc: Exception) -> BrokerUnavailable:
    return BrokerUnavailable(f"live output needs Redis at {shown_url(url)}: {exc}")


def follow(
    producer: Producer,
    command_id: str,
    *,
    after: str | None = None,
    follow: bool = True,
    poll_s: float = 0.5,
) -> Iterator[LiveEvent]:
    """A command's events from the start (or right after the event id `after`); with
    `follow`, until its `end`, else only what is there now. Raises NotFound at once for an
    unknown id, InvalidEventId for a bad `after`; BrokerUnavailable while iterating when
    Redis cannot be reached."""
    events = _Events(producer, after)
    first = events.first(producer.get(command_id))
    return _follow(producer, first.id, events, first, follow=follow, poll_s=poll_s)


def _follow(
    producer: Producer,
    command_id: str,
    events: _Events,
    rec: CommandRecord,
    *,
    follow: bool,
    poll_s: float,
) -> Iterator[LiveEvent]:
    timeout_s = producer.settings.publish_timeout_s
    client = redis_client(
        producer.broker_url, socket_connect_timeout=timeout_s, socket_timeout=poll_s + timeout_s
    )
    try:
        while not events.settled(rec):
            if is_terminal(rec.state):
                # Workers write the last output before they record the end: read it all.
                yield from _drain(client, events)
                final = producer.get(command_id, with_transitions=True)
                yield from events.state(final)
                if is_terminal(final.state):
                    yield from events.end(final, bool(client.exists(events.key)))
                    return
            else:
                yield from events.state(rec)
                if not follow:
                    yield from _drain(client, events)
                    return
                deadline = time.monotonic() + poll_s
                while (left := deadline - time.monotonic()) > 0:
                    reply = client.xread(
                        {events.key: events.cursor.entry},
                        count=_BATCH,
                        block=max(int(left * 1000), 1),
                    )
                    if events.need_start(reply):
                        yield from events.started(producer.get(command_id))
                    yield from events.entries(reply)
            rec = producer.get(command_id)
    except redis.RedisError as exc:
        raise _unavailable(producer.broker_url, exc) from None
    finally:
        client.close()


def _drain(client: redis.Redis, events: _Events) -> Iterator[LiveEvent]:
    while True:
        reply = client.xread({events.key: events.cursor.entry}, count=_BATCH)
        if not reply:
            return
        yield from events.entries(reply)


async def afollow(
    producer: Producer,
    command_id: str,
    *,
    after: str | None = None,
    poll_s: float = 0.5,
) -> AsyncIterator[LiveEvent]:
    """`follow` for asyncio (an SSE endpoint): waits without holding a thread, reads the
    store in one, and closes its Redis connection when the consumer stops (aclose or
    cancellation). NotFound comes at the first iteration."""
    events = _Events(producer, after)
    rec = events.first(await asyncio.to_thread(producer.get, command_id))
    command_id = rec.id
    timeout_s = producer.settings.publish_timeout_s
    client = async_redis_client(
        producer.broker_url,
        socket_connect_timeout=timeout_s,
        socket_timeout=poll_s + timeout_s,
        max_connections=1,
    )
    try:
        while not events.settled(rec):
            if is_terminal(rec.state):
                while reply := await client.xread({events.key: events.cursor.entry}, count=_BATCH):
                    for event in events.entries(reply):
                        yield event
                final = await asyncio.to_thread(producer.get, command_id, with_transitions=True)
                for event in events.state(final):
                    yield event
                if is_terminal(final.state):
                    exists = bool(await client.exists(events.key))
                    for event in events.end(final, exists):
                        yield event
                    return
            else:
                for event in events.state(rec):
                    yield event
                deadline = time.monotonic() + poll_s
                while (left := deadline - time.monotonic()) > 0:
                    reply = await client.xread(
                        {events.key: events.cursor.entry},
                        count=_BATCH,
                        block=max(int(left * 1000), 1),
                    )
                    if events.need_start(reply):
                        fresh = await asyncio.to_thread(producer.get, command_id)
                        for event in events.started(fresh):
                            yield event
                    for event in events.entries(reply):
                        yield event
            rec = await asyncio.to_thread(producer.get, command_id)
    except redis.RedisError as exc:
        raise _unavailable(producer.broker_url, exc) from None
    finally:
        await client.aclose()
