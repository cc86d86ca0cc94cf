"""Where audit events go besides the store: a small protocol, in-memory and JSON-lines sinks.

The store is the primary sink and is written in the same transaction as the state change it
records (see `producer.store.audit`). Other sinks receive the same events after that commit;
each links them into its own chain. The JSON-lines file sink lives in `producer.audit.jsonl`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Protocol

from producer.audit.events import GENESIS, AuditEvent
from producer.audit.jsonl import FILE_CHAIN, JsonlSink, series, verify_file
from producer.audit.keys import AuditKeys

__all__ = ["FILE_CHAIN", "AuditSink", "JsonlSink", "MemorySink", "series", "verify_file"]


class AuditSink(Protocol):
    """Something that appends audit events to a chain of its own."""

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link and append `events` in order; raises OSError when they could not be kept
        (the JSON-lines sink keeps events its file cannot take yet, and appends them later)."""
        ...


class MemorySink:
    """An in-memory sink with one chain per tenant, for unit tests."""

    def __init__(self, keys: AuditKeys | None = None) -> None:
        self.keys = keys
        self.events: list[AuditEvent] = []
        self._heads: dict[str, tuple[int, str]] = {}
        self._lock = threading.Lock()

    def append(self, events: Sequence[AuditEvent]) -> None:
        """Link each event into its tenant's chain."""
        with self._lock:
            for event in events:
                seq, prev = self._heads.get(event.tenant, (0, GENESIS))
                linked = event.linked(event.tenant, seq + 1, prev, self.keys)
                self._heads[event.tenant] = (seq + 1, linked.hash or "")
                self.events.append(linked)
