"""The store's audit sink: appends that cannot fork a chain, reads, verification and pruning.

Each tenant has its own chain, whose last link is a row of `audit_heads`. An append locks
that row, links its events after it and moves it forward, in the same transaction as the
state change the events record:

- PostgreSQL: one statement. The command's INSERT/UPDATE, the head's `SELECT … FOR UPDATE`,
  the SHA-256 links (computed by the server from the canonical content Python sends), the
  event rows and the head update are data-modifying CTEs: one round trip, and no events are
  written when the command's conditional UPDATE matched nothing.
- SQLite: one `BEGIN IMMEDIATE` transaction (which already serialises every writer), linking
  in Python.

Chains are per tenant so that tenants never queue behind each other's appends, and so that a
tenant's trail can be exported, verified and pruned on its own.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    Connection,
    Insert,
    Select,
    String,
    Table,
    Text,
    Update,
    bindparam,
    exists,
    func,
    insert,
    literal,
    select,
    union_all,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from producer.audit.events import CONTENT_FIELDS, GENESIS, AuditEvent, canonical_json
from producer.audit.verify import Problem, Report, Verifier
from producer.errors import StoreError
from producer.store.models import AuditAnchor, AuditEventRow, AuditHead, Command

events_t = cast(Table, AuditEventRow.__table__)
heads_t = cast(Table, AuditHead.__table__)
anchors_t = cast(Table, AuditAnchor.__table__)
commands_t = cast(Table, Command.__table__)

# Every content field is a column of its own (detail as canonical JSON text).
_CONTENT_COLUMNS = CONTENT_FIELDS


def _content_values(event: AuditEvent) -> dict[str, Any]:
    values = {name: getattr(event, name) for name in _CONTENT_COLUMNS}
    values["detail"] = canonical_json(dict(event.detail))
    return values


def event_from_row(row: Any) -> AuditEvent:
    """An AuditEvent from an `audit_events` row."""
    m = row._mapping
    values = {name: m[name] for name in _CONTENT_COLUMNS}
    values["detail"] = json.loads(m["detail"])
    return AuditEvent(
        **values, chain=m["chain"], seq=m["seq"], prev_hash=m["prev_hash"], hash=m["hash"]
    )


# --- PostgreSQL: one statement --------------------------------------------------------------


@lru_cache(maxsize=128)
def pg_chained(lead: Insert | Update | None, n: int) -> Select[Any]:
    """`lead` (a command INSERT/UPDATE, or None) plus the append of `n` events, as one query.

    Parameters: the lead's own, `a_chain`, and `a_<column>_<k>` / `a_content_<k>` per event.
    Returns one row: `lead_rows` (0 means the lead matched nothing and nothing was appended)
    and `appended`.
    """
    chain = bindparam("a_chain", type_=String)
    where = [heads_t.c.chain == chain]
    lead_cte = None
    if lead is not None:
        lead_cte = lead.returning(commands_t.c.id).cte("lead")
        where.append(exists(select(lead_cte.c.id)))
    prev = select(heads_t.c.seq, heads_t.c.hash).where(*where).with_for_update().cte("h0")
    links = []
    for k in range(n):
        seq = prev.c.seq + 1
        text = func.concat(
            chain, "\n", seq, "\n", prev.c.hash, "\n", bindparam(f"a_content_{k}", type_=Text)
        )
        digest = func.encode(func.sha256(func.convert_to(text, literal("UTF8"))), literal("hex"))
        prev = select(seq.label("seq"), prev.c.hash.label("prev_hash"), digest.label("hash")).cte(
            f"e{k}"
        )
        links.append(prev)
    rows = [
        select(
            chain,
            link.c.seq,
            link.c.prev_hash,
            link.c.hash,
            *(bindparam(f"a_{name}_{k}", type_=events_t.c[name].type) for name in _CONTENT_COLUMNS),
        )
        for k, link in enumerate(links)
    ]
    ins = (
        insert(events_t)
        .from_select(
            ["chain", "seq", "prev_hash", "hash", *_CONTENT_COLUMNS],
            union_all(*rows) if n > 1 else rows[0],
        )
        .returning(events_t.c.seq)
        .cte("ins")
    )
    last = links[-1]
    moved = (
        update(heads_t)
        # Also the join condition: the head only moves forward.
        .where(heads_t.c.chain == chain, last.c.seq > heads_t.c.seq)
        .values(seq=last.c.seq, hash=last.c.hash)
        .returning(heads_t.c.seq)
        .cte("moved")
    )
    lead_rows = (
        select(func.count()).select_from(lead_cte).scalar_subquery()
        if lead_cte is not None
        else literal(1)
    )
    return select(
        lead_rows.label("lead_rows"),
        select(func.count()).select_from(ins).scalar_subquery().label("appended"),
        select(func.count()).select_from(moved).scalar_subquery().label("moved"),
    )


def pg_params(chain: str, events: Sequence[AuditEvent]) -> dict[str, Any]:
    """The `a_*` parameters of `pg_chained` for these events."""
    params: dict[str, Any] = {"a_chain": chain}
    for k, event in enumerate(events):
        values = _content_values(event)
        for name, value in values.items():
            params[f"a_{name}_{k}"] = value
        params[f"a_content_{k}"] = event.canonical()
    return params


# --- SQLite (and any backend): linking in Python inside the caller's transaction -------------


def append_linked(conn: Connection, chain: str, events: Sequence[AuditEvent]) -> None:
    """Link and insert `events` after the chain's head; the caller's transaction serialises."""
    head = conn.execute(
        select(heads_t.c.seq, heads_t.c.hash).where(heads_t.c.chain == chain).with_for_update()
    ).one_or_none()
    if head is None:
        conn.execute(insert(heads_t), {"chain": chain, "seq": 0, "hash": GENESIS})
        seq, prev = 0, GENESIS
    else:
        seq, prev = head.seq, head.hash
    rows = []
    for event in events:
        seq += 1
        linked = event.linked(chain, seq, prev)
        prev = linked.hash or ""
        rows.append(
            {
                **_content_values(event),
                "chain": chain,
                "seq": seq,
                "prev_hash": linked.prev_hash,
                "hash": prev,
            }
        )
    conn.execute(insert(events_t), rows)
    conn.execute(update(heads_t).where(heads_t.c.chain == chain).values(seq=seq, hash=prev))


def ensure_head(conn: Connection, chain: str) -> None:
    """Create the chain's head row if it does not exist yet (PostgreSQL path)."""
    conn.execute(
        pg_insert(heads_t)
        .values(chain=chain, seq=0, hash=GENESIS)
        .on_conflict_do_nothing(index_elements=["chain"])
    )


def check_appended(row: Any, n: int, chain: str) -> bool:
    """Whether the lead matched; raises StoreError if it did but the events were not written."""
    if row.lead_rows == 0:
        return False
    if row.appended != n or row.moved != 1:
        raise StoreError(f"audit chain {chain!r} has no head row; events were not appended")
    return True


# --- reading, verifying, pruning ------------------------------------------------------------


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


def anchors(conn: Connection) -> dict[str, tuple[int, str]]:
    """Each pruned chain's latest anchor: (seq of the first kept event, its prev_hash)."""
    latest: dict[str, tuple[int, str]] = {}
    for row in conn.execute(select(anchors_t).order_by(anchors_t.c.chain, anchors_t.c.seq)):
        latest[row.chain] = (row.seq, row.prev_hash)
    return latest


def heads(conn: Connection) -> dict[str, tuple[int, str]]:
    """Each chain's head: (seq, hash) of its last event."""
    return {r.chain: (r.seq, r.hash) for r in conn.execute(select(heads_t))}


def verify(conn: Connection, *, tenant: str | None = None) -> Report:
    """Verify every chain in the store (or one tenant's) against its anchor and its head."""
    known_heads = heads(conn)
    verifier = Verifier("store", anchors=anchors(conn))
    last: AuditEvent | None = None
    for event in iter_events(conn, tenant=tenant, in_chain_order=True):
        if last is not None and last.chain != event.chain:
            _check_head(verifier, last, known_heads)
        if not verifier.feed(event, "store"):
            return verifier.report
        last = event
    if last is not None:
        _check_head(verifier, last, known_heads)
    for chain, (seq, _) in sorted(known_heads.items()):
        if seq > 0 and chain not in verifier.report.chains and tenant in (None, chain):
            verifier.fail(
                Problem("store", f"head is at seq {seq} but the chain has no events left", chain)
            )
    return verifier.report


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


def prune_plan(conn: Connection, before_ns: int, *, tenant: str | None) -> dict[str, int]:
    """Per chain, the last seq of events older than `before_ns` (what prune would remove)."""
    query = (
        select(events_t.c.chain, func.max(events_t.c.seq))
        .where(events_t.c.exec_time_ns < before_ns)
        .group_by(events_t.c.chain)
    )
    if tenant is not None:
        query = query.where(events_t.c.chain == tenant)
    return {chain: int(seq) for chain, seq in conn.execute(query)}


def prune_counts(conn: Connection, before_ns: int, *, tenant: str | None) -> dict[str, int]:
    """Per chain, how many events are older than `before_ns`."""
    query = (
        select(events_t.c.chain, func.count())
        .where(events_t.c.exec_time_ns < before_ns)
        .group_by(events_t.c.chain)
    )
    if tenant is not None:
        query = query.where(events_t.c.chain == tenant)
    return {chain: int(n) for chain, n in conn.execute(query)}


def prune_chain(conn: Connection, chain: str, upto_seq: int, *, actor: str, at: datetime) -> int:
    """Anchor the chain after `upto_seq`, then delete events up to it; returns how many."""
    kept_from = conn.execute(
        select(events_t.c.hash).where(events_t.c.chain == chain, events_t.c.seq == upto_seq)
    ).scalar_one()
    count = conn.execute(
        select(func.count())
        .select_from(events_t)
        .where(events_t.c.chain == chain, events_t.c.seq <= upto_seq)
    ).scalar_one()
    conn.execute(
        insert(anchors_t),
        {
            "chain": chain,
            "seq": upto_seq + 1,
            "prev_hash": kept_from,
            "pruned_at": at,
            "pruned_events": count,
            "actor": actor,
        },
    )
    conn.execute(events_t.delete().where(events_t.c.chain == chain, events_t.c.seq <= upto_seq))
    return int(count)
