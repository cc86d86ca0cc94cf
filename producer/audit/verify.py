"""Checking audit chains: the first event that does not fit is named, with what is wrong.

A link verifies when it is the HMAC of its message under the audit chain key, or — only where a
chain may still hold links written before keyed chains — its plain SHA-256. A chain starts at
the genesis or at a signed prune anchor, and reaches at least its last checkpoint, with the
checkpointed hash at the checkpointed seq.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from producer.audit.events import GENESIS, AuditEvent, link_message
from producer.audit.keys import AuditKeys


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
    unkeyed: int = 0  # links written before chains were keyed
    checkpoint: int | None = None  # seq of the last checkpoint checked against the chain


@dataclass(frozen=True)
class Anchor:
    """Where a pruned chain may start: its first kept event's seq and prev_hash.

    `signed`: True when its signature verifies under the seal key, False when it carries one
    that does not (forged, or another key), None when it has none (a prune made before anchors
    were signed).
    """

    seq: int
    prev_hash: str
    signed: bool | None


@dataclass
class Report:
    """The result of a verification: counts per chain, and the first problem if any."""

    source: str
    events: int = 0
    chains: dict[str, ChainSummary] = field(default_factory=dict)
    problem: Problem | None = None
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

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
                    "unkeyed_events": c.unkeyed,
                    "checkpoint_seq": c.checkpoint,
                }
                for name, c in sorted(self.chains.items())
            },
            "warnings": self.warnings,
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


def link_kind(e: AuditEvent, keys: AuditKeys | None) -> bool | None:
    """True: a keyed link; False: an unkeyed one; None: neither (the event was altered)."""
    assert e.chain is not None and e.seq is not None and e.prev_hash is not None
    message = link_message(e.chain, e.seq, e.prev_hash, e.canonical())
    if keys is not None and keys.link(message) == e.hash:
        return True
    if hashlib.sha256(message).hexdigest() == e.hash:
        return False
    return None


class Verifier:
    """Feeds events in stored order and stops at the first that breaks its chain.

    `keys`: the audit keys (None: only unkeyed links verify). `unkeyed`: per chain, the last
    seq that may hold an unkeyed link (None: any, up to the chain's first keyed link).
    `anchors`: where a pruned chain starts. `allow_anchor`: any chain may start mid-way (a
    rotated-away or partial export). `pins`: per chain, the (seq, hash) of its last checkpoint.
    """

    def __init__(
        self,
        source: str,
        *,
        keys: AuditKeys | None = None,
        unkeyed: Mapping[str, int] | None = None,
        anchors: Mapping[str, Anchor] | None = None,
        allow_anchor: bool = False,
        pins: Mapping[str, tuple[int, str]] | None = None,
    ) -> None:
        self.report = Report(source)
        self.keys = keys
        self._unkeyed = unkeyed
        self._anchors = dict(anchors or {})
        self._allow_anchor = allow_anchor
        self._pins = dict(pins or {})
        self._keyed_seen: set[str] = set()

    def feed(self, event: AuditEvent, where: str, *, anchor: Anchor | None = None) -> bool:
        """Check one event; False once a problem was found (the report names it).

        `anchor`: where this event's chain may start, if it is the chain's first event (a
        JSON-lines file's head); it takes the place of `anchors` for that chain.
        """
        if self.report.problem is not None:
            return False
        if anchor is not None:
            self._anchors[event.chain or ""] = anchor
        keyed, problem = self._check(event, where)
        if problem is not None:
            self.report.problem = problem
            return False
        assert event.chain is not None and event.seq is not None and event.hash is not None
        self.report.events += 1
        summary = self.report.chains.get(event.chain)
        if summary is None:
            anchor_hash = None if event.prev_hash == GENESIS else event.prev_hash
            summary = ChainSummary(
                event.chain, event.seq, event.seq, event.hash, anchor=anchor_hash
            )
            self.report.chains[event.chain] = summary
        summary.last_seq = event.seq
        summary.last_hash = event.hash
        summary.events += 1
        if keyed:
            self._keyed_seen.add(event.chain)
        else:
            summary.unkeyed += 1
        return True

    def pin(self, chain: str, seq: int, hash_: str) -> None:
        """`chain` must reach `seq`, with this hash there (its last checkpoint)."""
        self._pins[chain] = (seq, hash_)

    def require_keyed(self, chain: str) -> None:
        """From now on, every link of `chain` must be keyed (a signed file head was read)."""
        self._keyed_seen.add(chain)

    def last(self, chain: str) -> ChainSummary | None:
        """What has been verified of `chain` so far."""
        return self.report.chains.get(chain)

    def fail(self, problem: Problem) -> None:
        """Record a problem found outside the events themselves (heads, unreadable lines)."""
        if self.report.problem is None:
            self.report.problem = problem

    def finish(self, chains: Iterable[str] | None = None) -> Report:
        """Check each pinned chain (or those of `chains`) reaches its checkpoint; the report."""
        for chain, (seq, _) in sorted(self._pins.items()):
            if chains is not None and chain not in chains:
                continue
            summary = self.report.chains.get(chain)
            if summary is None:
                self.fail(
                    Problem(
                        self.report.source,
                        f"the chain was checkpointed at seq {seq} but has no events: "
                        "they were deleted",
                        chain,
                    )
                )
            elif summary.last_seq < seq:
                self.fail(
                    Problem(
                        self.report.source,
                        f"the chain ends at seq {summary.last_seq} but was checkpointed at seq "
                        f"{seq}: events {summary.last_seq + 1}..{seq} were deleted (the tail "
                        "was truncated)",
                        chain,
                        summary.last_seq,
                    )
                )
            else:
                summary.checkpoint = seq
        return self.report

    def _check(self, e: AuditEvent, where: str) -> tuple[bool, Problem | None]:
        def bad(message: str) -> tuple[bool, Problem]:
            return False, Problem(where, message, e.chain, e.seq, e.event_id)

        if not isinstance(e.chain, str) or not isinstance(e.seq, int) or e.seq < 1:
            return bad("has no valid chain/seq link fields")
        if not isinstance(e.prev_hash, str) or not isinstance(e.hash, str):
            return bad("has no prev_hash/hash")
        try:
            keyed = link_kind(e, self.keys)
        except (TypeError, ValueError) as exc:
            return bad(f"content cannot be serialised ({exc})")
        if keyed is None:
            other = "" if self.keys is not None else " (or it is keyed: verify with the audit key)"
            return bad(
                "hash does not match the event's content: the event was altered, or linked "
                f"under another audit key{other}"
            )
        if not keyed:
            limit = None if self._unkeyed is None else self._unkeyed.get(e.chain, 0)
            if e.chain in self._keyed_seen or (limit is not None and e.seq > limit):
                return bad(
                    "link is plain SHA-256 where the chain is keyed: the chain was rewritten "
                    "(or this event inserted) without the audit key"
                )
        last = self.report.chains.get(e.chain)
        pin = self._pins.get(e.chain)
        if pin is not None and pin[0] == e.seq and pin[1] != e.hash:
            return bad(
                f"hash differs from the checkpoint of seq {e.seq}: the chain was rewritten "
                "after it was checkpointed"
            )
        if last is None:
            wrong = self._wrong_start(e, keyed)
            return (keyed, None) if wrong is None else bad(wrong)
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
        return keyed, None

    def _wrong_start(self, e: AuditEvent, keyed: bool) -> str | None:
        """Why the chain may not start at this event (the genesis, or a valid anchor), if so."""
        assert e.chain is not None and e.seq is not None
        anchor = self._anchors.get(e.chain)
        if e.seq == 1 and anchor is None:
            if e.prev_hash != GENESIS:
                return "first event of the chain does not start from the genesis hash"
            return None
        if anchor is None:
            if self._allow_anchor:
                return None
            return f"chain starts at seq {e.seq} with no anchor: events 1..{e.seq - 1} were deleted"
        if (anchor.seq, anchor.prev_hash) != (e.seq, e.prev_hash):
            return (
                f"chain starts at seq {e.seq} but its anchor is at seq {anchor.seq}: events "
                "were deleted or the anchor was altered"
            )
        if anchor.signed is False:
            return (
                f"the anchor at seq {anchor.seq} is not signed with the audit key: it was "
                f"forged, and events 1..{e.seq - 1} deleted"
            )
        if anchor.signed is None and keyed:
            return (
                f"the anchor at seq {anchor.seq} is unsigned but the chain is keyed there: it "
                f"was forged, and events 1..{e.seq - 1} deleted"
            )
        return None


def verify_events(
    events: Iterable[tuple[AuditEvent, str]],
    source: str,
    *,
    keys: AuditKeys | None = None,
    anchors: Mapping[str, Anchor] | None = None,
    allow_anchor: bool = False,
) -> Report:
    """Verify (event, where) pairs in order; stops at the first problem."""
    verifier = Verifier(source, keys=keys, anchors=anchors, allow_anchor=allow_anchor)
    for event, where in events:
        if not verifier.feed(event, where):
            break
    return verifier.finish()
