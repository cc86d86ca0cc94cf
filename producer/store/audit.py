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
    String,
    Table,
    Text,
    TextClause,
    bindparam,
    func,
    insert,
    select,
    text,
    update,
)
from sqlalchemy.dialects.postgresql import insert as pg_insert

from producer.audit.events import CONTENT_FIELDS, GENESIS, AuditEvent, canonical_json
from producer.audit.verify import Problem, Report, Verifier
from producer.errors import StoreError
from producer.store.models import (
    BY_ID_ONLY_STATE_SQL,
    AuditAnchor,
    AuditEventRow,
    AuditHead,
    Command,
)

events_t = cast(Table, AuditEventRow.__table__)
heads_t = cast(Table, AuditHead.__table__)
anchors_t = cast(Table, AuditAnchor.__table__)
commands_t = cast(Table, Command.__table__)

# Every content field is a column of its own (detail as canonical JSON text).
_CONTENT_COLUMNS = CONTENT_FIELDS


def row_values(event: AuditEvent) -> dict[str, Any]:
    """The content columns of an event row."""
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

# Types of the content columns as `json_to_recordset` declares them.
_PG_TYPES = {"attempt": "int", "exec_time_ns": "bigint", "duration_ns": "bigint"}
_RECORD = ", ".join(
    ["k int", "content text"] + [f"{c} {_PG_TYPES.get(c, 'text')}" for c in CONTENT_FIELDS]
)
_LINK = (
    "encode(sha256(convert_to(concat(:a_chain, chr(10), {prev}.seq + 1, chr(10), {prev}.hash, "
    "chr(10), ev.content), 'UTF8')), 'hex')"
)
# The events travel as one JSON parameter and the chain is linked by a recursive CTE, so the
# statement's text is the same for any number of events: short enough for the driver's parse
# cache, and one cache entry per lead shape. Only constant column names are interpolated.
_APPEND = f"""
ev AS (SELECT * FROM json_to_recordset(CAST(:a_events AS json)) AS r({_RECORD})),
h0 AS (SELECT seq, hash FROM audit_heads WHERE chain = :a_chain{{lead_cond}} FOR UPDATE),
links AS (
  SELECT ev.k, h0.seq + 1 AS seq, CAST(h0.hash AS text) AS prev_hash,
    {_LINK.format(prev="h0")} AS hash
  FROM h0 JOIN ev ON ev.k = 1
  UNION ALL
  SELECT ev.k, l.seq + 1, l.hash, {_LINK.format(prev="l")}
  FROM links l JOIN ev ON ev.k = l.k + 1
),
ins AS (
  INSERT INTO audit_events (chain, seq, prev_hash, hash, {", ".join(CONTENT_FIELDS)})
  SELECT :a_chain, l.seq, l.prev_hash, l.hash, {", ".join(f"ev.{c}" for c in CONTENT_FIELDS)}
  FROM links l JOIN ev ON ev.k = l.k
  RETURNING seq
),
moved AS (
  UPDATE audit_heads SET seq = m.seq, hash = m.hash
  FROM (SELECT seq, hash FROM links ORDER BY seq DESC LIMIT 1) m
  WHERE audit_heads.chain = :a_chain AND m.seq > audit_heads.seq
  RETURNING audit_heads.seq
)
SELECT {{lead_rows}} AS lead_rows, (SELECT count(*) FROM ins) AS appended,
  (SELECT count(*) FROM moved) AS moved
"""


@lru_cache(maxsize=128)
def pg_chained(lead: tuple[str, tuple[str, ...]] | None) -> TextClause:
    """One statement: a command INSERT/UPDATE (`lead`, or None) and the append of events.

    `lead` is ("insert", columns) — ON CONFLICT DO NOTHING, a repeated key appends nothing —
    or ("update", columns) — the conditional UPDATE on (id, state, version); either way no
    events are written when it changed no row. Parameters: the lead's `v_*`/`w_*`,
    `a_chain` and `a_events` (from `pg_params`). Returns one row: `lead_rows` (0: nothing
    happened), `appended`, `moved`.
    """
    binds = [bindparam("a_chain", type_=String), bindparam("a_events", type_=Text)]
    if lead is None:
        return text("WITH RECURSIVE " + _APPEND.format(lead_cond="", lead_rows="1")).bindparams(
            *binds
        )
    kind, names = lead
    if kind == "insert":
        sql = (
            f"INSERT INTO commands ({', '.join(names)}) "
            f"VALUES ({', '.join(f':v_{n}' for n in names)}) ON CONFLICT DO NOTHING RETURNING id"
        )
    else:
        sql = (
            f"UPDATE commands SET {', '.join(f'{n} = :v_{n}' for n in names)} "
            f"WHERE id = :w_id AND {BY_ID_ONLY_STATE_SQL} = :w_state AND version = :w_version "
            "RETURNING id"
        )
        binds += [bindparam(n, type_=commands_t.c[n[2:]].type) for n in ("w_id", "w_state")]
        binds.append(bindparam("w_version", type_=commands_t.c.version.type))
    binds += [bindparam(f"v_{n}", type_=commands_t.c[n].type) for n in names]
    append = _APPEND.format(
        lead_cond=" AND EXISTS (SELECT 1 FROM lead)", lead_rows="(SELECT count(*) FROM lead)"
    )
    return text(f"WITH RECURSIVE lead AS ({sql}),{append}").bindparams(*binds)


def pg_params(chain: str, events: Sequence[AuditEvent]) -> dict[str, Any]:
    """The `a_*` parameters of `pg_chained` for these events."""
    rows = [
        {"k": k, "content": event.canonical(), **row_values(event)}
        for k, event in enumerate(events, 1)
    ]
    return {"a_chain": chain, "a_events": json.dumps(rows, ensure_ascii=False)}


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
                **row_values(event),
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
