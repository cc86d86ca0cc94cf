"""The store's audit sink: keyed appends that cannot fork a chain (reads, verification,
checkpoints and pruning are in `producer.store.audit_log`).

Each tenant has its own chain, whose last link is a row of `audit_heads`. An append locks
that row, links its events after it and moves it forward, in the same transaction as the
state change the events record:

- PostgreSQL: one statement. The command's INSERT/UPDATE, the head's `SELECT … FOR UPDATE`,
  the HMAC-SHA256 links (computed by the server from the canonical content Python sends, as
  two SHA-256 calls over the chain key's pads, which are bound to the statement by an engine
  hook, never written into its text), the event rows and the head update are data-modifying
  CTEs: one round trip, and no events are written when the command's conditional UPDATE
  matched nothing.
- SQLite: one `BEGIN IMMEDIATE` transaction (which already serialises every writer), linking
  in Python.

Chains are per tenant so that tenants never queue behind each other's appends, and so that a
tenant's trail can be exported, verified and pruned on its own. The audit keys of a store are
looked up by its URL: `bind` (when a Store is made) forgets any earlier ones, and the first
append or verification loads them (`producer.audit.keys.load`).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

from sqlalchemy import (
    URL,
    BindParameter,
    Connection,
    Engine,
    LargeBinary,
    String,
    Table,
    Text,
    TextClause,
    bindparam,
    insert,
    select,
    text,
    update,
)
from sqlalchemy import event as sa_event
from sqlalchemy.dialects.postgresql import insert as pg_insert

from producer.audit import keys as audit_keys
from producer.audit.events import CONTENT_FIELDS, GENESIS, AuditEvent, canonical_json
from producer.audit.keys import AuditKeys
from producer.errors import StoreError
from producer.store.models import (
    BY_ID_ONLY_STATE_SQL,
    AuditAnchor,
    AuditEventRow,
    AuditHead,
    AuditLegacy,
    Command,
)

events_t = cast(Table, AuditEventRow.__table__)
heads_t = cast(Table, AuditHead.__table__)
anchors_t = cast(Table, AuditAnchor.__table__)
legacy_t = cast(Table, AuditLegacy.__table__)
commands_t = cast(Table, Command.__table__)

# --- the audit keys of each store -------------------------------------------------------------

_keys: dict[URL, AuditKeys] = {}
_keys_lock = threading.Lock()


def _new_lock_after_fork() -> None:
    global _keys_lock  # noqa: PLW0603 (a lock held in the parent at fork stays held)
    _keys_lock = threading.Lock()


os.register_at_fork(after_in_child=_new_lock_after_fork)
# Marks the append statement, whose chain key pads the engine hook binds.
_KEYED = "execq_audit_keyed"


def bind(engine: Engine) -> None:
    """Use the audit keys the settings name now for `engine`'s store (forget earlier ones)."""
    with _keys_lock:
        _keys.pop(engine.url, None)
    if engine.dialect.name == "postgresql" and not sa_event.contains(
        engine, "before_execute", _bind_pads
    ):
        sa_event.listen(engine, "before_execute", _bind_pads, retval=True)


def keys_of(conn: Connection) -> AuditKeys:
    """The audit keys of the store `conn` is connected to (loaded on first use)."""
    url = conn.engine.url
    found = _keys.get(url)
    if found is None:
        with _keys_lock:
            found = _keys.get(url)
            if found is None:
                found = _keys[url] = audit_keys.load(url.render_as_string(hide_password=False))
    return found


def _bind_pads(
    conn: Connection,
    clause: Any,
    multiparams: list[dict[str, Any]],
    params: dict[str, Any],
    execution_options: Mapping[str, Any],
) -> tuple[Any, list[dict[str, Any]], dict[str, Any]]:
    """Bind the chain key's pads to an append statement: parameters, never statement text."""
    if execution_options.get(_KEYED):
        ipad, opad = keys_of(conn).sql_pads
        pads = {"a_ipad": ipad, "a_opad": opad}
        if multiparams:
            multiparams = [{**p, **pads} for p in multiparams]
        else:
            params = {**params, **pads}
    return clause, multiparams, params


def source_of(url: URL) -> str:
    """How checkpoints name a store: its SQLite file, or its PostgreSQL database's name."""
    if url.get_backend_name() == "sqlite":
        return f"sqlite:{Path(url.database or ':memory:').resolve()}"
    return f"{url.get_backend_name()}:{url.database}"


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
# HMAC-SHA256(k, m) = SHA-256((k ^ opad) || SHA-256((k ^ ipad) || m)): no extension needed.
_LINK = (
    "encode(sha256(:a_opad || sha256(:a_ipad || convert_to(concat(:a_chain, chr(10), "
    "{prev}.seq + 1, chr(10), {prev}.hash, chr(10), ev.content), 'UTF8'))), 'hex')"
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
    `a_chain` and `a_events` (from `pg_params`), and the chain key's pads (bound by the hook
    `bind` installs). Returns one row: `lead_rows` (0: nothing
    happened), `appended`, `moved`.
    """
    binds: list[BindParameter[Any]] = [
        bindparam("a_chain", type_=String),
        bindparam("a_events", type_=Text),
        bindparam("a_ipad", type_=LargeBinary),
        bindparam("a_opad", type_=LargeBinary),
    ]
    if lead is None:
        sql = "WITH RECURSIVE " + _APPEND.format(lead_cond="", lead_rows="1")
        return text(sql).bindparams(*binds).execution_options(**{_KEYED: True})
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
    statement = text(f"WITH RECURSIVE lead AS ({sql}),{append}").bindparams(*binds)
    return statement.execution_options(**{_KEYED: True})


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
    keys = keys_of(conn)
    rows = []
    for one in events:
        seq += 1
        linked = one.linked(chain, seq, prev, keys)
        prev = linked.hash or ""
        rows.append(
            {
                **row_values(one),
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
