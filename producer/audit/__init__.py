"""The audit trail: hash-chained events for every phase and operator action, and its sinks."""

from __future__ import annotations

from producer.audit.events import AuditEvent, Outcome, Phase, Subject, make_event

__all__ = ["AuditEvent", "Outcome", "Phase", "Subject", "make_event"]
