"""Audit events as values: canonical content, links, and redaction of what they say."""

from __future__ import annotations

import json

from producer.audit.events import GENESIS, AuditEvent, Outcome, Phase, Subject, link_hash
from producer.audit.trail import Attempt
from producer.redaction import Redactor
from producer.spec import cmd_hash

SUBJECT = Subject("c-1", "alpha", "web:orders", cmd_hash(["/bin/echo", "hi"]), "ab" * 16, 2)


def test_an_event_survives_a_json_round_trip_with_the_same_hash() -> None:
    event = Attempt(SUBJECT, actor="w").add(Phase.EXECUTE, Outcome.FAILED, exit_code=3, ü="ß")
    linked = event.linked("alpha", 7, GENESIS)
    again = AuditEvent.from_json(json.loads(json.dumps(linked.to_json())))
    assert again == linked
    assert link_hash("alpha", 7, GENESIS, again.canonical()) == linked.hash


def test_the_hash_covers_chain_position_and_previous_hash() -> None:
    event = Attempt(SUBJECT, actor="w").add(Phase.BIND, Outcome.OK)
    base = event.linked("alpha", 1, GENESIS).hash
    assert event.linked("beta", 1, GENESIS).hash != base
    assert event.linked("alpha", 2, GENESIS).hash != base
    assert event.linked("alpha", 1, "f" * 64).hash != base


def test_phases_of_an_attempt_follow_each_other_in_time() -> None:
    attempt = Attempt(SUBJECT, actor="w")
    first = attempt.add(Phase.BIND, Outcome.OK)
    second = attempt.add(Phase.EXECUTE, Outcome.OK)
    assert second.exec_time_ns == first.exec_time_ns + first.duration_ns
    assert (first.attempt, first.principal, first.trace_id) == (2, "web:orders", "ab" * 16)
    assert len(first.cmd_hash) == 64 and first.ts.endswith("+00:00")


def test_reasons_and_details_are_redacted_and_say_so() -> None:
    attempt = Attempt(SUBJECT, actor="w", redactor=Redactor({"TOKEN": "s3cr3t-value-123"}))
    event = attempt.add(
        Phase.BIND,
        Outcome.REFUSED,
        reason="refused s3cr3t-value-123 for alice@example.com",
        nested={"dsn": "postgresql://app:hunter2@db/app"},
    )
    text = json.dumps(event.to_json())
    assert "s3cr3t-value-123" not in text and "hunter2" not in text
    assert "alice@example.com" not in text
    assert event.detail["redacted"] is True
    clean = attempt.add(Phase.EXECUTE, Outcome.OK, exit_code=0)
    assert "redacted" not in clean.detail
