"""Reading, verifying, checkpointing and pruning the store's audit chains.

Appends go with the transitions they record (`producer.store.audit`). Verification checks each
chain's links under the audit key, its start (the genesis or a signed prune anchor), its head
row, and — given the witness's checkpoints — that it still reaches its last checkpoint.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, func, insert, select

from producer.audit.events import NO_COMMAND_HASH, AuditEvent, Outcome, Phase, Subject, make_event
from producer.audit.keys import AuditKeys
from producer.audit.verify import Anchor, Problem, Report, Verifier, link_kind
from producer.audit.witness import Checkpoint, Latest, now_iso, read_latest
from producer.store import audit as sql
from producer.store.audit import (
    anchors_t,
    event_from_row,
    events_t,
    heads_t,
    keys_of,
    legacy_t,
)

log = logging.getLogger("execq.audit")


def iter_events(
    conn: Connection,
    *,
    tenant: str | None = None,
    since_ns: int | None = None,
    command_id: str | None = None,
    in_chain_order: bool = False,
) -> Iterator[AuditEvent]:
    """Events in insertion order (or per chain by seq), streamed in batches."""
    query = select(events_t)
    if tenant is not None:
        query = query.where(events_t.c.chain == tenant)
    if since_ns is not None:
        query = query.where(events_t.c.exec_time_ns >= since_ns)
    if command_id is not None:
        query = query.where(events_t.c.command_id == command_id)
    order = (events_t.c.chain, events_t.c.seq) if in_chain_order else (events_t.c.id,)
    result = conn.execution_options(yield_per=2000).execute(query.order_by(*order))
    for row in result:
        yield event_from_row(row)


def anchor_record(chain: str, seq: int, prev_hash: str) -> dict[str, Any]:
    """What a prune anchor's signature covers."""
    return {"anchor": chain, "seq": seq, "prev_hash": prev_hash}


def anchors(conn: Connection, keys: AuditKeys) -> dict[str, Anchor]:
    """Each pruned chain's latest anchor (the first kept event's seq and prev_hash), checked."""
    latest: dict[str, Anchor] = {}
    for row in conn.execute(select(anchors_t).order_by(anchors_t.c.chain, anchors_t.c.seq)):
        signed = None
        if row.mac is not None:
            record = {**anchor_record(row.chain, row.seq, row.prev_hash), "mac": row.mac}
            signed = keys.signed(record)
        latest[row.chain] = Anchor(row.seq, row.prev_hash, signed)
    return latest


def heads(conn: Connection) -> dict[str, tuple[int, str]]:
    """Each chain's head: (seq, hash) of its last event."""
    return {r.chain: (r.seq, r.hash) for r in conn.execute(select(heads_t))}


def unkeyed_upto(conn: Connection) -> dict[str, int]:
    """Per chain, the last seq written before chains were keyed (chains of an upgraded store)."""
    return {r.chain: r.seq for r in conn.execute(select(legacy_t))}


def verify(
    conn: Connection,
    *,
    tenant: str | None = None,
    checkpoints: Mapping[str, Checkpoint] | None = None,
) -> Report:
    """Verify every chain in the store (or one tenant's) against its anchor, its head and its
    last checkpoint (from the witness)."""
    keys = keys_of(conn)
    known_heads = heads(conn)
    pins = {c: cp.position() for c, cp in (checkpoints or {}).items() if tenant in (None, c)}
    starts = anchors(conn, keys)
    unkeyed = unkeyed_upto(conn)
    verifier = Verifier("store", keys=keys, unkeyed=unkeyed, anchors=starts, pins=pins)
    for chain, cp in sorted((checkpoints or {}).items()):
        if tenant in (None, chain):
            _check_against(verifier, cp, starts.get(chain), unkeyed.get(chain, 0))
    last: AuditEvent | None = None
    for one in iter_events(conn, tenant=tenant, in_chain_order=True):
        if last is not None and last.chain != one.chain:
            _check_head(verifier, last, known_heads)
        if not verifier.feed(one, "store"):
            return verifier.report
        last = one
    if last is not None:
        _check_head(verifier, last, known_heads)
    for chain, (seq, _) in sorted(known_heads.items()):
        if seq > 0 and chain not in verifier.report.chains and tenant in (None, chain):
            verifier.fail(
                Problem("store", f"head is at seq {seq} but the chain has no events left", chain)
            )
    report = verifier.finish(None if tenant is None else {tenant})
    if checkpoints is not None:
        missing = sorted(c for c in report.chains if c not in checkpoints)
        if missing:
            report.warnings.append(
                f"no checkpoint in the witness for chain(s) {', '.join(missing)}: events "
                "removed at their end would go unnoticed (run `execq audit checkpoint`)"
            )
    return report


def _check_against(verifier: Verifier, cp: Checkpoint, anchor: Anchor | None, unkeyed: int) -> None:
    """What a checkpoint says of a chain's start: its unkeyed part and an unsigned anchor."""
    if cp.unkeyed != unkeyed:
        verifier.fail(
            Problem(
                "store",
                f"the chain's unkeyed part ends at seq {unkeyed} (audit_legacy) but its "
                f"checkpoint says seq {cp.unkeyed}: the record was altered",
                cp.chain,
            )
        )
    elif anchor is not None and anchor.signed is None and anchor.seq > cp.start:
        verifier.fail(
            Problem(
                "store",
                f"the chain starts at an unsigned anchor (seq {anchor.seq}) made after its "
                f"checkpoint, which starts it at seq {cp.start}: the anchor was forged",
                cp.chain,
                anchor.seq,
            )
        )


def _check_head(verifier: Verifier, last: AuditEvent, known: Mapping[str, tuple[int, str]]) -> None:
    assert last.chain is not None
    head = known.get(last.chain)
    if head is None:
        verifier.fail(
            Problem("store", "chain has no head row", last.chain, last.seq, last.event_id)
        )
    elif head != (last.seq, last.hash):
        verifier.fail(
            Problem(
                "store",
                f"last event of the chain is not its head (seq {head[0]}): events at the end "
                "were deleted, or appended behind the store's back",
                last.chain,
                last.seq,
                last.event_id,
            )
        )


@dataclass(frozen=True)
class HeadNow:
    """A chain's head as a checkpoint records it."""

    chain: str
    seq: int
    hash: str
    start: int
    unkeyed: int


def heads_now(conn: Connection, chains: Collection[str] | None) -> list[HeadNow]:
    """The heads of `chains` (None: all) whose last event is where the head says and verifies.

    A head that does not (its last event altered or missing) is left out: a checkpoint must
    never vouch for what the key did not write; verify names the problem.
    """
    keys = keys_of(conn)
    anchor_seq = (
        select(func.max(anchors_t.c.seq))
        .where(anchors_t.c.chain == heads_t.c.chain)
        .scalar_subquery()
    )
    query = (
        select(
            heads_t.c.seq.label("head_seq"),
            heads_t.c.hash.label("head_hash"),
            anchor_seq.label("anchor_seq"),
            legacy_t.c.seq.label("unkeyed"),
            events_t,
        )
        .join(events_t, (events_t.c.chain == heads_t.c.chain) & (events_t.c.seq == heads_t.c.seq))
        .outerjoin(legacy_t, legacy_t.c.chain == heads_t.c.chain)
        .where(heads_t.c.seq > 0)
    )
    if chains is not None:
        query = query.where(heads_t.c.chain.in_(list(chains)))
    found = []
    for row in conn.execute(query):
        last = event_from_row(row)
        unkeyed = row.unkeyed or 0
        kind = link_kind(last, keys)
        if last.hash != row.head_hash or kind is None or (not kind and row.head_seq > unkeyed):
            log.warning(
                "audit chain %r not checkpointed: its head event (seq %d) does not verify; "
                "run `execq audit verify`",
                row.chain,
                row.head_seq,
            )
            continue
        start = row.anchor_seq or 1
        found.append(HeadNow(row.chain, row.head_seq, row.head_hash, start, unkeyed))
    return found


def prune_plan(
    conn: Connection, before_ns: int, *, tenant: str | None
) -> dict[str, tuple[int, int]]:
    """Per chain, (last seq, how many) of the events older than `before_ns`."""
    query = (
        select(events_t.c.chain, func.max(events_t.c.seq), func.count())
        .where(events_t.c.exec_time_ns < before_ns)
        .group_by(events_t.c.chain)
    )
    if tenant is not None:
        query = query.where(events_t.c.chain == tenant)
    return {chain: (int(seq), int(n)) for chain, seq, n in conn.execute(query)}


def prune_chain(conn: Connection, chain: str, upto_seq: int, *, actor: str, at: datetime) -> int:
    """Anchor the chain after `upto_seq` (signed), then delete events up to it; how many."""
    kept_from = conn.execute(
        select(events_t.c.hash).where(events_t.c.chain == chain, events_t.c.seq == upto_seq)
    ).scalar_one()
    count = conn.execute(
        select(func.count())
        .select_from(events_t)
        .where(events_t.c.chain == chain, events_t.c.seq <= upto_seq)
    ).scalar_one()
    mac = keys_of(conn).sign(anchor_record(chain, upto_seq + 1, kept_from))
    conn.execute(
        insert(anchors_t),
        {
            "chain": chain,
            "seq": upto_seq + 1,
            "prev_hash": kept_from,
            "pruned_at": at,
            "pruned_events": count,
            "actor": actor,
            "mac": mac,
        },
    )
    conn.execute(events_t.delete().where(events_t.c.chain == chain, events_t.c.seq <= upto_seq))
    return int(count)


def _ns(when: datetime) -> int:
    # Epoch nanoseconds fit a signed 64-bit column until 2262; later cut-offs mean "all".
    return min(int(when.timestamp() * 1_000_000_000), 2**63 - 1)


class AuditLog:
    """The audit side of the store: `Store.audit`."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._auto = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._pg = engine.dialect.name == "postgresql"
        # How checkpoints in the witness name this store.
        self.source = sql.source_of(engine.url)
        sql.bind(engine)

    def keys(self) -> AuditKeys:
        """The audit keys this store's chains are linked and checked with."""
        with self._auto.connect() as conn:
            return keys_of(conn)

    def events(
        self,
        *,
        tenant: str | None = None,
        since_ns: int | None = None,
        command_id: str | None = None,
    ) -> Iterator[AuditEvent]:
        """Stored audit events in the order they were appended."""
        with self._snapshot() as conn:
            yield from iter_events(conn, tenant=tenant, since_ns=since_ns, command_id=command_id)

    def page(
        self, chain: str, *, before_seq: int | None = None, limit: int = 50
    ) -> list[AuditEvent]:
        """One chain's events, newest first: `limit` of them before `before_seq` (keyset)."""
        query = select(events_t).where(events_t.c.chain == chain)
        if before_seq is not None:
            query = query.where(events_t.c.seq < before_seq)
        query = query.order_by(events_t.c.seq.desc()).limit(limit)
        with self._auto.connect() as conn:
            return [event_from_row(row) for row in conn.execute(query)]

    def verify(
        self, *, tenant: str | None = None, checkpoints: Mapping[str, Checkpoint] | None = None
    ) -> Report:
        """Verify the store's chains (every tenant's, or one) in one consistent snapshot.

        `checkpoints`: the last checkpoint of each chain (`witnessed`); without, the chains
        are checked as far as the store alone can tell (not for events cut off their end).
        """
        with self._snapshot() as conn:
            return verify(conn, tenant=tenant, checkpoints=checkpoints)

    def witnessed(self, witness: Path) -> Latest:
        """The last checkpoint of each of this store's chains in the witness file `witness`."""
        keys = self.keys()
        return read_latest(
            witness, keys, lambda cp: cp.kind == "store" and cp.source == self.source
        )

    def checkpoints(self, chains: Collection[str] | None, *, by: str) -> list[Checkpoint]:
        """Checkpoints of the heads of `chains` (None: every chain) as they are now."""
        with self._auto.connect() as conn:
            found = heads_now(conn, chains)
        ts = now_iso()
        return [
            Checkpoint(
                kind="store",
                source=self.source,
                chain=h.chain,
                seq=h.seq,
                hash=h.hash,
                ts=ts,
                by=by,
                start=h.start,
                unkeyed=h.unkeyed,
            )
            for h in found
        ]

    def prune_plan(self, *, before: datetime, tenant: str | None = None) -> dict[str, int]:
        """How many events `prune` would remove from each chain."""
        with self._auto.connect() as conn:
            plan = prune_plan(conn, _ns(before), tenant=tenant)
        return {chain: count for chain, (_, count) in plan.items()}

    def prune(self, *, before: datetime, actor: str, tenant: str | None = None) -> dict[str, int]:
        """Delete events older than `before`, chain by chain, keeping each chain verifiable.

        Each chain gets a signed anchor (where it now starts) and a `prune` event saying who
        removed how much, in the same transaction as the deletion.
        """
        with self._auto.connect() as conn:
            plan = prune_plan(conn, _ns(before), tenant=tenant)
        done: dict[str, int] = {}
        for chain, (upto, _) in sorted(plan.items()):
            with self.engine.begin() as conn:
                count = prune_chain(conn, chain, upto, actor=actor, at=datetime.now(UTC))
                subject = Subject("", chain, actor, NO_COMMAND_HASH, None)
                event = make_event(
                    subject,
                    Phase.PRUNE,
                    Outcome.OK,
                    actor=actor,
                    operator=actor,
                    reason=f"events before {before.isoformat()} removed",
                    detail={"pruned_events": count, "anchor_seq": upto + 1},
                )
                sql.append_linked(conn, chain, [event])
            done[chain] = count
        return done

    @contextmanager
    def _snapshot(self) -> Iterator[Connection]:
        """A read-only view that concurrent appends do not change while it is read."""
        if self._pg:
            options = {"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
            with self.engine.execution_options(**options).connect() as conn:
                yield conn
                conn.rollback()
        else:
            with self._auto.connect() as conn:
                # A deferred BEGIN is a read snapshot in WAL mode and takes no write lock.
                conn.exec_driver_sql("BEGIN")
                try:
                    yield conn
                finally:
                    conn.exec_driver_sql("COMMIT")
