"""Server-sent events of one command: its state changes and output, then its final record."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator

from producer.client import Producer
from producer.live import LiveEvent, afollow

# A comment line this often keeps proxies and load balancers from closing a quiet stream.
KEEPALIVE_S = 15.0


def frame(event: LiveEvent) -> bytes:
    """One event in the text/event-stream format (data is JSON: one line, no newline)."""
    return f"id: {event.id}\nevent: {event.event}\ndata: {event.data}\n\n".encode()


async def event_stream(
    producer: Producer,
    command_id: str,
    *,
    after: str | None = None,
    keepalive_s: float = KEEPALIVE_S,
) -> AsyncIterator[bytes]:
    """The command's events as SSE frames, with keep-alive comments while it is quiet.

    When the client goes away Starlette cancels this generator: the pending read is
    cancelled and the follower closed, so no task or Redis connection outlives the stream.
    """
    events = afollow(producer, command_id, after=after)
    pending: asyncio.Task[LiveEvent] | None = None
    # Tell the browser how long to wait before reconnecting (with Last-Event-ID).
    yield b"retry: 1000\n\n"
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(anext(events))
            done, _ = await asyncio.wait({pending}, timeout=keepalive_s)
            if not done:
                yield b": keep-alive\n\n"
                continue
            try:
                event = pending.result()
            except StopAsyncIteration:
                return
            finally:
                pending = None
            yield frame(event)
            if event.event == "end":
                return
    finally:
        if pending is not None:
            pending.cancel()
            with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                await pending
        if isinstance(events, AsyncGenerator):
            await events.aclose()
