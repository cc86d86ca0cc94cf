"""The results store's tables, as typed SQLAlchemy 2.0 models (the migrations mirror them)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
    literal_column,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.sql.elements import ColumnElement

# Predicates of the partial indexes, spelled as the store's queries spell them.
# A statement about one command (by id) must never be able to prove one of them: see
# by_id_only() below.
_LIVE_LEASES = "state IN ('running', 'reverting')"
_OUTBOX = "state IN ('pending', 'reverting')"
_ROLLBACK_DUE = "state = 'failed' AND rollback_on_failure IS true AND compensation IS NULL"
_ATTENTION = "needs_attention IS true"
_BATCHED = "batch_id IS NOT NULL"


class Base(DeclarativeBase):
    """Declarative base of the execq schema."""


class Command(Base):
    """One command: its spec (never its secret values), state, result and lease."""

    __tablename__ = "commands"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_commands_tenant_key"),
        Index("ix_commands_tenant_state_created", "tenant", "state", "created_at"),
        Index("ix_commands_created", "created_at"),
        # Partial: only the live rows the reaper scans (migration 0004 says why).
        Index(
            "ix_commands_live_leases",
            "tenant",
            "lease_expires_at",
            postgresql_where=text(_LIVE_LEASES),
            sqlite_where=text(_LIVE_LEASES),
        ),
        Index(
            "ix_commands_outbox_due",
            "tenant",
            "created_at",
            postgresql_where=text(_OUTBOX),
            sqlite_where=text(_OUTBOX),
        ),
        Index(
            "ix_commands_rollback_due",
            "tenant",
            "updated_at",
            postgresql_where=text(_ROLLBACK_DUE),
            sqlite_where=text(_ROLLBACK_DUE),
        ),
        # Partial: operators' queries only, no entry for the commands they never ask about
        # (migration 0008).
        Index(
            "ix_commands_attention",
            "tenant",
            postgresql_where=text(_ATTENTION),
            sqlite_where=text(_ATTENTION),
        ),
        Index(
            "ix_commands_batch",
            "batch_id",
            "batch_step",
            postgresql_where=text(_BATCHED),
            sqlite_where=text(_BATCHED),
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    spec_hash: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str | None] = mapped_column(String(200))
    argv: Mapped[list[str]] = mapped_column(JSON)
    # An action's name and the parameters it was filled with (secret ones never); argv is
    # then the resolved template.
    action: Mapped[str | None] = mapped_column(String(64))
    params: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    env: Mapped[dict[str, str]] = mapped_column(JSON)
    secret_names: Mapped[list[str]] = mapped_column(JSON)
    has_secrets: Mapped[bool] = mapped_column(Boolean, default=False)
    timeout_s: Mapped[float | None] = mapped_column(Float)
    cpu_s: Mapped[int | None] = mapped_column(Integer)
    memory_mb: Mapped[int | None] = mapped_column(Integer)
    compensate: Mapped[list[str] | None] = mapped_column(JSON)
    rollback_on_failure: Mapped[bool] = mapped_column(Boolean, default=False)
    retry_safe: Mapped[bool] = mapped_column(Boolean, default=False)
    # none_as_null: a None must be SQL NULL, not JSON `null`, for `IS NULL` queries to see it.
    compensate_limits: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    snapshot_paths: Mapped[list[str] | None] = mapped_column(JSON(none_as_null=True))
    max_retries: Mapped[int] = mapped_column(Integer, default=0)
    # When the next automatic retry of a retry-safe command is due (backoff), for display.
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The latest compensation's own result; the command's exit code and output stay as they
    # were, so a reverted command still shows why it was reverted.
    compensation: Mapped[dict[str, Any] | None] = mapped_column(JSON(none_as_null=True))
    revert_count: Mapped[int] = mapped_column(Integer, default=0)
    # Set when a compensation fails: a person must look (`execq list --needs-attention`).
    needs_attention: Mapped[bool] = mapped_column(Boolean, default=False)
    batch_id: Mapped[str | None] = mapped_column(String(36))
    batch_step: Mapped[int | None] = mapped_column(Integer)
    # A later step of a batch waits, pending but held, until the step before it succeeds.
    held: Mapped[bool] = mapped_column(Boolean, default=False)

    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer, default=1)
    attempts: Mapped[int] = mapped_column(Integer, default=1)

    exit_code: Mapped[int | None] = mapped_column(Integer)
    signal: Mapped[int | None] = mapped_column(Integer)
    stdout: Mapped[str | None] = mapped_column(Text)
    stderr: Mapped[str | None] = mapped_column(Text)
    stdout_bytes: Mapped[int | None] = mapped_column(Integer)
    stderr_bytes: Mapped[int | None] = mapped_column(Integer)
    output_truncated: Mapped[bool] = mapped_column(Boolean, default=False)
    # Whether a secret value (or an encoding of one) was scrubbed from output or error text.
    redacted: Mapped[bool] = mapped_column(Boolean, default=False)
    failure_reason: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    enforced: Mapped[dict[str, Any] | None] = mapped_column(JSON)

    worker: Mapped[str | None] = mapped_column(String(200))
    lease_owner: Mapped[str | None] = mapped_column(String(200))
    lease_pid: Mapped[int | None] = mapped_column(Integer)
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)

    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    publish_count: Mapped[int] = mapped_column(Integer, default=0)

    trace_id: Mapped[str | None] = mapped_column(String(32))
    # Who made the latest change and why: the store's trigger copies them into `transitions`.
    last_actor: Mapped[str] = mapped_column(String(200))
    last_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Transition(Base):
    """One change of state: every bump of a command's version writes exactly one row.

    Rows are written by triggers in the database (see migration 0001), not by execq code, so
    no code path can change a command without its history, and each change is one statement.
    """

    __tablename__ = "transitions"
    __table_args__ = (Index("ix_transitions_command", "command_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    command_id: Mapped[str] = mapped_column(String(36), ForeignKey("commands.id"))
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    actor: Mapped[str] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)


class AuditEventRow(Base):
    """One audit event in its tenant's chain; rows are only ever inserted (and pruned).

    Triggers refuse any UPDATE, and any DELETE that is not below a prune anchor.
    """

    __tablename__ = "audit_events"
    __table_args__ = (
        UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),
        # No unique index on event_id since migration 0008 (SQLite keeps its constraint):
        # nothing looks events up by id, and (chain, seq) is what makes the chain whole.
        Index("ix_audit_command", "command_id"),
        # BRIN on PostgreSQL: time-range exports and prunes, next to no cost per insert.
        Index("ix_audit_time", "exec_time_ns", postgresql_using="brin"),
    )

    # Insertion order across chains (exports follow it); within a chain it equals seq order.
    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    chain: Mapped[str] = mapped_column(String(40))
    seq: Mapped[int] = mapped_column(BigInteger)
    event_id: Mapped[str] = mapped_column(String(36))
    ts: Mapped[str] = mapped_column(String(40))
    command_id: Mapped[str] = mapped_column(String(36))
    tenant: Mapped[str] = mapped_column(String(40))
    principal: Mapped[str] = mapped_column(String(200))
    actor: Mapped[str] = mapped_column(String(200))
    phase: Mapped[str] = mapped_column(String(16))
    outcome: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer)
    cmd_hash: Mapped[str] = mapped_column(String(64))
    exec_time_ns: Mapped[int] = mapped_column(BigInteger)
    duration_ns: Mapped[int] = mapped_column(BigInteger)
    trace_id: Mapped[str | None] = mapped_column(String(32))
    operator: Mapped[str | None] = mapped_column(String(200))
    ticket: Mapped[str | None] = mapped_column(String(200))
    reason: Mapped[str | None] = mapped_column(Text)
    # Canonical JSON text, exactly as hashed (a JSON column could reorder keys).
    detail: Mapped[str] = mapped_column(Text)
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))


class AuditHead(Base):
    """The last link of each chain: appends lock this row, so concurrent writers queue."""

    __tablename__ = "audit_heads"

    chain: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditAnchor(Base):
    """Where a chain starts after `execq audit prune`: the first kept event's prev_hash."""

    __tablename__ = "audit_anchors"

    chain: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    prev_hash: Mapped[str] = mapped_column(String(64))
    pruned_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    pruned_events: Mapped[int] = mapped_column(BigInteger)
    actor: Mapped[str] = mapped_column(String(200))
    # HMAC-SHA256 under the audit seal key; NULL for an anchor written before they were signed.
    mac: Mapped[str | None] = mapped_column(String(64))


class AuditLegacy(Base):
    """How far a chain holds links written before chains were keyed (filled once, on upgrade).

    Verify accepts a plain SHA-256 link only up to this seq: in a chain that has no row, every
    link must be keyed. Triggers refuse any change after the upgrade that filled it.
    """

    __tablename__ = "audit_legacy"

    chain: Mapped[str] = mapped_column(String(40), primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)


class Snapshot(Base):
    """The archive of a command's `snapshot_paths`, taken before it ran, for its rollback."""

    __tablename__ = "snapshots"

    command_id: Mapped[str] = mapped_column(String(36), ForeignKey("commands.id"), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40))
    # The paths are local to the host that archived them: only that host restores them.
    host: Mapped[str] = mapped_column(String(200))
    archive: Mapped[bytes] = mapped_column(LargeBinary)
    files: Mapped[int] = mapped_column(Integer)
    bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))


class Batch(Base):
    """A saga: steps (ordinary commands, linked by batch_id) run in order, undone in reverse."""

    __tablename__ = "batches"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_key"),
        Index("ix_batches_tenant_state", "tenant", "state"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40))
    idempotency_key: Mapped[str | None] = mapped_column(String(200))
    spec_hash: Mapped[str] = mapped_column(String(64))
    principal: Mapped[str | None] = mapped_column(String(200))
    trace_id: Mapped[str | None] = mapped_column(String(32))
    state: Mapped[str] = mapped_column(String(16))
    version: Mapped[int] = mapped_column(Integer)
    steps: Mapped[int] = mapped_column(Integer)
    failed_step: Mapped[int | None] = mapped_column(Integer)
    compensate_on_revoke: Mapped[bool] = mapped_column(Boolean)
    error: Mapped[str | None] = mapped_column(Text)
    last_actor: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Token(Base):
    """An API token of the HTTP gateway: only the SHA-256 of the token is kept, never the token."""

    __tablename__ = "tokens"
    __table_args__ = (
        # Every request looks its token up by hash; the index is also what makes it unique.
        UniqueConstraint("token_hash", name="uq_tokens_hash"),
        # A name is an audit principal: within a tenant it names one token, revoked ones too.
        UniqueConstraint("tenant", "name", name="uq_tokens_tenant_name"),
    )

    id: Mapped[str] = mapped_column(String(16), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(40))
    name: Mapped[str] = mapped_column(String(200))
    token_hash: Mapped[str] = mapped_column(String(64))
    scopes: Mapped[list[str]] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


# A statement about one command names it by id, and the primary key must be the only index
# it can be planned with. Every other condition goes through `|| ''`, a no-op on the value
# that the planner cannot see through. Otherwise, with statistics gathered while few commands
# were live (a quiet night, then a burst) or none at all (a new store), any index with a
# usable condition looks as good as the primary key for "at most one row": the tenant leads
# four of them, and `state = 'pending'` proves a partial index's predicate (above). A claim
# planned that way read every pending command of its tenant, O(backlog) per claim under a
# backlog: 1.9 ms at 3000 pending instead of 0.02.
def by_id_only(column: ColumnElement[str]) -> ColumnElement[str]:
    """`column || ''`, for each condition but the id in a statement about one command."""
    return column.op("||")(literal_column("''"))


# The same for statements written as SQL text.
BY_ID_ONLY_STATE_SQL = "(state || '')"
