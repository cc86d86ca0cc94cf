"""Audit events: one per lifecycle phase or operator action, hash-linked into chains.

An event's *content* (everything but its link fields) is canonical JSON; its `hash` covers the
chain name, its position, the previous event's hash and that content, so editing, deleting,
inserting or reordering an event breaks every link after it. Each sink keeps its own chains
(the store: one per tenant; a JSON-lines file: one per file series): the content of an event
is the same everywhere, its `chain`, `seq`, `prev_hash` and `hash` are the sink's.

The hash is HMAC-SHA256 under the audit chain key (`producer.audit.keys`), so only a holder of
the key can write a link that verifies. Chains written before links were keyed hold plain
SHA-256 links over the same message; verification tells the two apart by recomputing both.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from producer.spec import cmd_hash

if TYPE_CHECKING:
    from producer.audit.keys import AuditKeys

GENESIS = "0" * 64
# The cmd_hash of events that have no command to hash (a malformed message).
NO_COMMAND_HASH = cmd_hash([])


class Phase(StrEnum):
    """What an event records: a lifecycle phase of one attempt, or an action on a command."""

    PARSE = "parse"
    AUTHZ = "authz"
    BIND = "bind"
    EXECUTE = "execute"
    ARCHIVE = "archive"
    ABORT = "abort"
    RETRY = "retry"
    REVOKE = "revoke"
    ROLLBACK = "rollback"
    OVERRIDE = "override"
    # A forced override waits for a second person: asked for, then approved (or refused).
    OVERRIDE_REQUEST = "override_request"
    APPROVE = "approve"
    COMPENSATE = "compensate"
    PRUNE = "prune"
    # An API token made or revoked: the event's command_id is the token's id, never the token.
    TOKEN_CREATE = "token_create"  # noqa: S105 (a phase's name, not a secret)
    TOKEN_REVOKE = "token_revoke"  # noqa: S105


LIFECYCLE = (Phase.PARSE, Phase.AUTHZ, Phase.BIND, Phase.EXECUTE, Phase.ARCHIVE)


class Outcome(StrEnum):
    """How the phase ended."""

    OK = "ok"
    REFUSED = "refused"
    FAILED = "failed"


# Content fields, in the order exports print them (hashing sorts keys anyway).
CONTENT_FIELDS = (
    "event_id",
    "ts",
    "command_id",
    "tenant",
    "principal",
    "actor",
    "phase",
    "outcome",
    "attempt",
    "cmd_hash",
    "exec_time_ns",
    "duration_ns",
    "trace_id",
    "operator",
    "ticket",
    "reason",
    "detail",
)
LINK_FIELDS = ("chain", "seq", "prev_hash", "hash")


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no spaces, UTF-8 kept as is."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def link_message(chain: str, seq: int, prev_hash: str, content: str) -> bytes:
    """What a link hashes: the event's place in its chain and its content (SQL builds the same)."""
    return f"{chain}\n{seq}\n{prev_hash}\n{content}".encode()


def link_hash(chain: str, seq: int, prev_hash: str, content: str) -> str:
    """An unkeyed link: plain SHA-256 of the link message (chains written before keyed links)."""
    return hashlib.sha256(link_message(chain, seq, prev_hash, content)).hexdigest()


def iso_ns(ns: int) -> str:
    """ISO 8601 UTC with microseconds for an epoch-nanoseconds time."""
    return datetime.fromtimestamp(ns / 1e9, UTC).isoformat(timespec="microseconds")


@dataclass(frozen=True)
class AuditEvent:
    """One audit event; link fields are empty until a sink places it in a chain."""

    event_id: str
    ts: str
    command_id: str
    tenant: str
    principal: str
    actor: str
    phase: str
    outcome: str
    attempt: int
    cmd_hash: str
    exec_time_ns: int
    duration_ns: int
    trace_id: str | None = None
    operator: str | None = None
    ticket: str | None = None
    reason: str | None = None
    detail: Mapping[str, Any] = field(default_factory=dict)
    chain: str | None = None
    seq: int | None = None
    prev_hash: str | None = None
    hash: str | None = None

    def content(self) -> dict[str, Any]:
        """The hashed fields."""
        return {name: getattr(self, name) for name in CONTENT_FIELDS} | {
            "detail": dict(self.detail)
        }

    def canonical(self) -> str:
        """The content as the exact string that is hashed."""
        return canonical_json(self.content())

    def linked(
        self, chain: str, seq: int, prev_hash: str, keys: AuditKeys | None = None
    ) -> AuditEvent:
        """This event placed at `seq` of `chain` after an event whose hash is `prev_hash`.

        The link is keyed with `keys`; without, it is an unkeyed link (as before keyed chains),
        which only verifies where a chain may still be unkeyed.
        """
        message = link_message(chain, seq, prev_hash, self.canonical())
        return replace(
            self,
            chain=chain,
            seq=seq,
            prev_hash=prev_hash,
            hash=keys.link(message) if keys is not None else hashlib.sha256(message).hexdigest(),
        )

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict: content plus link fields (one line of a JSON-lines sink)."""
        out = self.content()
        out.update(chain=self.chain, seq=self.seq, prev_hash=self.prev_hash, hash=self.hash)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditEvent:
        """An event from a JSON-lines record; raises ValueError naming a missing field."""
        missing = [n for n in (*CONTENT_FIELDS, *LINK_FIELDS) if n not in data]
        if missing:
            raise ValueError(f"missing fields {missing}")
        detail = data["detail"]
        if not isinstance(detail, dict):
            raise ValueError("detail is not an object")
        return cls(**{n: data[n] for n in (*CONTENT_FIELDS, *LINK_FIELDS)})


@dataclass(frozen=True)
class Subject:
    """Who and what a command's events are about; fixed for all of its phases."""

    command_id: str
    tenant: str
    principal: str
    cmd_hash: str
    trace_id: str | None
    attempt: int = 1


def now_ns() -> int:
    """Wall-clock epoch nanoseconds (what `exec_time_ns` records)."""
    return time.time_ns()


def make_event(
    subject: Subject,
    phase: Phase,
    outcome: Outcome,
    *,
    actor: str,
    started_ns: int | None = None,
    ended_ns: int | None = None,
    operator: str | None = None,
    ticket: str | None = None,
    reason: str | None = None,
    detail: Mapping[str, Any] | None = None,
) -> AuditEvent:
    """An event for `subject`: `exec_time_ns` is when the phase began, `duration_ns` its length.

    Callers pass text that may hold secrets (reasons, details) through the redactor first.
    """
    end = ended_ns if ended_ns is not None else now_ns()
    start = started_ns if started_ns is not None else end
    return AuditEvent(
        event_id=str(uuid.uuid4()),
        ts=iso_ns(start),
        command_id=subject.command_id,
        tenant=subject.tenant,
        principal=subject.principal,
        actor=actor,
        phase=phase.value,
        outcome=outcome.value,
        attempt=subject.attempt,
        cmd_hash=subject.cmd_hash,
        exec_time_ns=start,
        duration_ns=max(0, end - start),
        trace_id=subject.trace_id,
        operator=operator,
        ticket=ticket,
        reason=reason,
        detail=dict(detail or {}),
    )
