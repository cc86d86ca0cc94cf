"""Checking audit chains: the first event that does not fit is named, with what is wrong."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.audit.events import GENESIS, AuditEvent, link_hash


@dataclass(frozen=True)
class Problem:
    """The first event (or place) where a chain stops being intact."""

    where: str
    message: str
    chain: str | None = None
    seq: int | None = None
    event_id: str | None = None

    def __str__(self) -> str:
        at = f"event {self.event_id} " if self.event_id else ""
        pos = f"(chain {self.chain!r}, seq {self.seq}, {self.where})" if self.chain else self.where
        return f"{at}{pos}: {self.message}"


@dataclass
class ChainSummary:
    """What one intact chain holds."""

    chain: str
    first_seq: int
    last_seq: int
    last_hash: str
    events: int = 0
    anchor: str | None = None  # prev_hash of the first event when it is not the genesis


@dataclass
class Report:
    """The result of a verification: counts per chain, and the first problem if any."""

    source: str
    events: int = 0
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    problem: Problem | None = None
    files: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every chain is intact."""
        return self.problem is None

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary for `execq audit verify --json`."""
        return {
            "ok": self.ok,
            "source": self.source,
            "files": self.files,
            "events": self.events,
            "chains": {
                name: {
                    "first_seq": c.first_seq,
                    "last_seq": c.last_seq,
                    "events": c.events,
                    "last_hash": c.last_hash,
                    "anchor": c.anchor,
                }
                for name, c in sorted(self.chains.items())
            },
            "problem": None
            if self.problem is None
            else {
                "event_id": self.problem.event_id,
                "chain": self.problem.chain,
                "seq": self.problem.seq,
                "where": self.problem.where,
                "message": self.problem.message,
            },
        }


class Verifier:
    """Feeds events in stored order and stops at the first that breaks its chain.

    `anchors` maps a chain to the (seq, prev_hash) it may start at (a prune's anchor); with
    `allow_anchor`, any chain may start mid-way (a rotated-away or partial export).
    """

    def __init__(
        self,
        source: str,
        *,
        anchors: Mapping[str, tuple[int, str]] | None = None,
        allow_anchor: bool = False,
    ) -> None:
        self.report = Report(source)
        self._anchors = dict(anchors or {})
        self._allow_anchor = allow_anchor

    def feed(self, event: AuditEvent, where: str) -> bool:
        """Check one event; False once a problem was found (the report names it)."""
        if self.report.problem is not None:
            return False
        problem = self._check(event, where)
        if problem is not None:
            self.report.problem = problem
            return False
        assert event.chain is not None and event.seq is not None and event.hash is not None
        self.report.events += 1
        summary = self.report.chains.get(event.chain)
        if summary is None:
            anchor = None if event.prev_hash == GENESIS else event.prev_hash
            summary = ChainSummary(event.chain, event.seq, event.seq, event.hash, anchor=anchor)
            self.report.chains[event.chain] = summary
        summary.last_seq = event.seq
        summary.last_hash = event.hash
        summary.events += 1
        return True

    def fail(self, problem: Problem) -> None:
        """Record a problem found outside the events themselves (heads, unreadable lines)."""
        if self.report.problem is None:
            self.report.problem = problem

    def _check(self, e: AuditEvent, where: str) -> Problem | None:
        def bad(message: str) -> Problem:
            return Problem(where, message, e.chain, e.seq, e.event_id)

        if not isinstance(e.chain, str) or not isinstance(e.seq, int) or e.seq < 1:
            return bad("has no valid chain/seq link fields")
        if not isinstance(e.prev_hash, str) or not isinstance(e.hash, str):
            return bad("has no prev_hash/hash")
        try:
            expected = link_hash(e.chain, e.seq, e.prev_hash, e.canonical())
        except (TypeError, ValueError) as exc:
            return bad(f"content cannot be serialised ({exc})")
        if expected != e.hash:
            return bad("hash does not match the event's content: the event was altered")
        last = self.report.chains.get(e.chain)
        if last is None:
            if e.seq == 1:
                if e.prev_hash != GENESIS:
                    return bad("first event of the chain does not start from the genesis hash")
                return None
            anchor = self._anchors.get(e.chain)
            if anchor is not None:
                if anchor != (e.seq, e.prev_hash):
                    return bad(
                        f"chain starts at seq {e.seq} but its prune anchor is at seq "
                        f"{anchor[0]}: events were deleted or the anchor was altered"
                    )
                return None
            if self._allow_anchor:
                return None
            return bad(
                f"chain starts at seq {e.seq} with no anchor: events 1..{e.seq - 1} were deleted"
            )
        if e.seq <= last.last_seq:
            return bad(
                f"seq {e.seq} comes after seq {last.last_seq}: events were reordered or duplicated"
            )
        if e.seq != last.last_seq + 1:
            return bad(f"events {last.last_seq + 1}..{e.seq - 1} of the chain are missing")
        if e.prev_hash != last.last_hash:
            return bad(
                "prev_hash is not the hash of the event before it: an event was deleted, "
                "inserted or replaced before this one"
            )
        return None


def verify_events(
    events: Iterable[tuple[AuditEvent, str]],
    source: str,
    *,
    anchors: Mapping[str, tuple[int, str]] | None = None,
    allow_anchor: bool = False,
) -> Report:
    """Verify (event, where) pairs in order; stops at the first problem."""
    verifier = Verifier(source, anchors=anchors, allow_anchor=allow_anchor)
    for event, where in events:
        if not verifier.feed(event, where):
            break
    return verifier.report
