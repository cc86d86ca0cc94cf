"""The producer's half of the transactional outbox.

The command row is committed before its message is published. Here: publish now, or keep the
message (with its secrets, which only this process holds) and retry until Redis is back; and
record successful publishes in the store in batches, off the submit path. A process that
dies with marks or messages pending loses nothing: the workers' reaper publishes rows the
store still shows as unpublished (a duplicate message is a no-op claim).
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping, Sequence

from producer.broker import Publisher
from producer.errors import BrokerUnavailable
from producer.store.repository import Store

log = logging.getLogger("execq.outbox")
# (command id, tenant, secret values, trace headers): everything a message needs.
Message = tuple[str, str, dict[str, str], dict[str, str]]


class Outbox:
    """Publishes commands for one Producer; one background thread, started on first use."""

    def __init__(self, store: Store, publisher: Publisher, *, mark_every_s: float = 0.05) -> None:
        self.store = store
        self.publisher = publisher
        self.mark_every_s = mark_every_s
        self._reset()

    def _reset(self) -> None:
        # Also called in a forked child: locks and threads do not survive fork().
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._marks: list[str] = []
        self._backlog: dict[str, tuple[str, dict[str, str], dict[str, str]]] = {}
        self._wake = threading.Event()
        self._closed = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread: threading.Thread | None = None

    def send(
        self,
        command_id: str,
        tenant: str,
        secrets: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> bool:
        """Publish now (True), or keep it for the background retry (False)."""
        if os.getpid() != self._pid:
            self._reset()
        try:
            self.publisher.publish(command_id, tenant, secrets=secrets, headers=headers)
        except BrokerUnavailable as exc:
            log.warning("broker unavailable, command %s kept for publishing: %s", command_id, exc)
            return self._keep([(command_id, tenant, dict(secrets), dict(headers))])
        return self._sent([command_id])

    def send_many(self, messages: Sequence[Message]) -> bool:
        """Publish (command id, tenant, secrets, headers) in one pipelined round trip (True),
        or keep them all for the background retry (False): a resend is a no-op claim."""
        if os.getpid() != self._pid:
            self._reset()
        if not messages:
            return True
        try:
            with self.publisher.batched():
                for command_id, tenant, secrets, headers in messages:
                    self.publisher.publish(command_id, tenant, secrets=secrets, headers=headers)
        except BrokerUnavailable as exc:
            kept = len(messages)
            log.warning("broker unavailable, %d commands kept for publishing: %s", kept, exc)
            return self._keep(messages)
        return self._sent([m[0] for m in messages])

    def _keep(self, messages: Sequence[Message]) -> bool:
        """Hold messages Redis did not take for the background retry; False."""
        with self._lock:
            for command_id, tenant, secrets, headers in messages:
                self._backlog[command_id] = (tenant, dict(secrets), dict(headers))
            self._idle.clear()
        self._ensure_thread()
        self._wake.set()
        return False

    def _sent(self, command_ids: Sequence[str]) -> bool:
        """Queue the published ids for recording in the store (in batches); True."""
        with self._lock:
            self._marks.extend(command_ids)
            self._idle.clear()
        self._ensure_thread()
        return True

    def pending(self) -> int:
        """Messages not yet accepted by Redis."""
        with self._lock:
            return len(self._backlog)

    def flush(self, timeout: float) -> int:
        """Wait until everything is published and recorded; returns the messages still kept."""
        self._wake.set()
        self._idle.wait(timeout)
        return self.pending()

    def close(self, timeout: float = 2.0) -> None:
        """Record what was published, stop retrying (kept messages go to the reaper)."""
        if os.getpid() != self._pid:
            return
        self.flush(timeout)
        self._closed.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def _ensure_thread(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._loop, name="execq-outbox", daemon=True)
                self._thread.start()

    def _loop(self) -> None:
        delay = 0.5
        while not self._closed.is_set():
            self._wake.wait(self.mark_every_s if not self.pending() else delay)
            self._wake.clear()
            self._record_marks()
            delay = 0.5 if self._retry_backlog() else min(delay * 2, 5.0)
            with self._lock:
                if not self._marks and not self._backlog:
                    self._idle.set()
        self._record_marks()

    def _record_marks(self) -> None:
        with self._lock:
            marks, self._marks = self._marks, []
        if not marks:
            return
        try:
            self.store.mark_published(marks)
        except Exception as exc:
            # Unrecorded marks only mean the reaper may publish these again: a no-op claim.
            log.warning("could not record %d publish(es): %s", len(marks), exc)

    def _retry_backlog(self) -> bool:
        """Try each kept message once; True when all of them went out."""
        with self._lock:
            kept = list(self._backlog.items())
        for command_id, (tenant, secrets, headers) in kept:
            try:
                self.publisher.publish(command_id, tenant, secrets=secrets, headers=headers)
            except BrokerUnavailable:
                return False
            with self._lock:
                self._backlog.pop(command_id, None)
                self._marks.append(command_id)
        self._record_marks()
        return True
