"""Collecting a command's phase events as they happen, and copying committed events to sinks.

The store writes events in the same transaction as the state change they record; once that
commits, `Trail.copy` hands the same events to the process's other sinks (the JSON-lines
file), and, in a worker that `watch`es its store, checkpoints the chains it appended to. A
failed copy or checkpoint is logged, never raised: the store's chain is the record of truth.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any, Protocol

from producer.audit import keys as audit_keys
from producer.audit.events import AuditEvent, Outcome, Phase, Subject, make_event, now_ns
from producer.audit.sinks import AuditSink, JsonlSink
from producer.audit.witness import Checkpoint, Checkpointer, Heads, Witness
from producer.keys import load_audit_keys
from producer.redaction import Redactor
from producer.settings import Settings
from producer.spec import cmd_hash

log = logging.getLogger("execq.audit")


class Trail:
    """The sinks besides the store that this process copies committed events to."""

    def __init__(
        self,
        sinks: Sequence[AuditSink] = (),
        *,
        witness: Witness | None = None,
        checkpoint_s: float = 5.0,
    ) -> None:
        self.sinks = list(sinks)
        self.witness = witness
        self.checkpoint_s = checkpoint_s
        self._checkpointer: Checkpointer | None = None
        self._dropped_seen = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Trail:
        """The JSON-lines file of `EXECQ_AUDIT_LOG` (none when it is `off`), keyed, and the
        witness of `EXECQ_AUDIT_WITNESS`."""
        audit = load_audit_keys()
        keys = audit_keys.load(settings.database_url)
        witness = Witness(audit.audit_witness, keys)
        sinks: list[AuditSink] = []
        if settings.audit_log is not None:
            sinks.append(
                JsonlSink(
                    settings.audit_log,
                    max_bytes=int(settings.audit_log_max_mb * (1 << 20)),
                    keep=settings.audit_log_keep,
                    keys=keys,
                    witness=witness,
                )
            )
        return cls(sinks, witness=witness, checkpoint_s=audit.audit_checkpoint_s)

    def watch(self, heads: Heads) -> None:
        """Checkpoint the store chains this trail's copies go with (a worker's store).

        After a copy, each chain it touched whose last checkpoint from this process is older
        than `checkpoint_s` is checkpointed. Nothing happens without a witness.
        """
        if self.witness is not None:
            self._checkpointer = Checkpointer(heads, self.witness, self.checkpoint_s)

    def checkpoint_moved(self, chains: Sequence[str]) -> None:
        """Checkpoint each of `chains` whose head moved since this process last did (a
        periodic pass calls this, so that a chain's last events do not wait for more)."""
        if self._checkpointer is not None:
            self._checkpointer.moved(chains)

    def checkpoint_files(self) -> list[Checkpoint]:
        """Checkpoint the end of each JSON-lines sink's chain now; the checkpoints written."""
        written = []
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                cp = sink.checkpoint()
                if cp is not None:
                    written.append(cp)
        return written

    def flush(self, *, final: bool = False) -> int:
        """Append the events a JSON-lines sink held while its file could not be written (a
        full disk); how many are still held. An append writes them first anyway; reaper
        passes call this, and a process that shuts down (`final`: what is still held then is
        lost to the file, and logged).
        """
        held = 0
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):
                left = sink.flush()
                if left and final:
                    log.error(
                        "audit file %s: %d event(s) were never written to it, the disk "
                        "still full (the store has them; `execq audit export` writes them out)",
                        sink.path,
                        left,
                    )
                held += left
        return held

    def backlog(self) -> tuple[int, int]:
        """(events held now, events dropped since the last call) by this process's JSON-lines
        sinks while their files could not be written: for the metrics."""
        files = [sink for sink in self.sinks if isinstance(sink, JsonlSink)]
        dropped = sum(sink.dropped_total for sink in files)
        new, self._dropped_seen = dropped - self._dropped_seen, dropped
        return sum(sink.held for sink in files), new

    def copy(self, events: Sequence[AuditEvent]) -> None:
        """Append committed events to every sink; a sink that fails is logged and skipped."""
        if not events:
            return
        for sink in self.sinks:
            try:
                sink.append(events)
            except OSError as exc:
                log.error(
                    "audit sink %s could not take %d events (the store has them): %s",
                    getattr(sink, "path", type(sink).__name__),
                    len(events),
                    exc,
                )
        if self._checkpointer is not None:
            self._checkpointer.appended({event.tenant for event in events})


class Claim(Protocol):
    """What a record or a worker's claim tells about its command."""

    @property
    def id(self) -> str: ...
    @property
    def tenant(self) -> str: ...
    @property
    def principal(self) -> str | None: ...
    @property
    def argv(self) -> list[str]: ...
    @property
    def trace_id(self) -> str | None: ...
    @property
    def attempts(self) -> int: ...


def subject_of(rec: Claim) -> Subject:
    """The audit subject of a command, from its record or a claim (its current attempt)."""
    return Subject(
        rec.id,
        rec.tenant,
        rec.principal or "unknown",
        cmd_hash(rec.argv),
        rec.trace_id,
        rec.attempts,
    )


class Attempt:
    """One attempt's events, in phase order; every text passes through the redactor."""

    def __init__(self, subject: Subject, *, actor: str, redactor: Redactor | None = None) -> None:
        self.subject = subject
        self.actor = actor
        self.redactor = redactor or Redactor({})
        self.events: list[AuditEvent] = []
        self.started_ns = now_ns()

    def add(
        self,
        phase: Phase,
        outcome: Outcome,
        *,
        started_ns: int | None = None,
        reason: str | None = None,
        operator: str | None = None,
        ticket: str | None = None,
        **detail: Any,
    ) -> AuditEvent:
        """Record a phase that began at `started_ns` (default: when the last one ended)."""
        if started_ns is None:
            started_ns = (
                self.events[-1].exec_time_ns + self.events[-1].duration_ns
                if (self.events)
                else self.started_ns
            )
        clean_reason, changed = self.redactor.scrub(reason)
        clean, detail_changed = self.redactor.scrub_value(dict(detail))
        clean_detail = dict(clean) if isinstance(clean, dict) else {}
        if changed or detail_changed:
            clean_detail["redacted"] = True
        event = make_event(
            self.subject,
            phase,
            outcome,
            actor=self.actor,
            started_ns=started_ns,
            operator=operator,
            ticket=ticket,
            reason=clean_reason,
            detail=clean_detail,
        )
        self.events.append(event)
        return event
