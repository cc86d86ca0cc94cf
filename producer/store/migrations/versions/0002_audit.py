"""audit events, chain heads and prune anchors

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

# Audit events are append-only for everyone who writes to the database, not just for execq:
# an UPDATE is always refused, a DELETE only below a prune anchor (which `audit prune` writes
# first, and records as an event of its own). A head never moves backwards.
PG_TRIGGERS = [
    """
    CREATE FUNCTION execq_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'DELETE' AND OLD.seq < COALESCE(
          (SELECT max(a.seq) FROM audit_anchors a WHERE a.chain = OLD.chain), 0) THEN
        RETURN OLD;
      END IF;
      RAISE EXCEPTION 'execq: audit events are append-only (% refused)', TG_OP;
    END $$
    """,
    "CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
    "FOR EACH ROW EXECUTE FUNCTION execq_audit_append_only()",
    "CREATE TRIGGER audit_events_no_truncate BEFORE TRUNCATE ON audit_events "
    "FOR EACH STATEMENT EXECUTE FUNCTION execq_audit_append_only()",
    """
    CREATE FUNCTION execq_audit_head_forward() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'execq: an audit chain head only moves forward';
    END $$
    """,
    "CREATE TRIGGER audit_heads_forward BEFORE UPDATE ON audit_heads FOR EACH ROW "
    "WHEN (NEW.seq <= OLD.seq) EXECUTE FUNCTION execq_audit_head_forward()",
]
PG_DROP = [
    "DROP TRIGGER IF EXISTS audit_heads_forward ON audit_heads",
    "DROP TRIGGER IF EXISTS audit_events_no_truncate ON audit_events",
    "DROP TRIGGER IF EXISTS audit_events_append_only ON audit_events",
    "DROP FUNCTION IF EXISTS execq_audit_head_forward()",
    "DROP FUNCTION IF EXISTS execq_audit_append_only()",
]
SQLITE_TRIGGERS = [
    """
    CREATE TRIGGER audit_events_no_update BEFORE UPDATE ON audit_events BEGIN
      SELECT RAISE(ABORT, 'execq: audit events are append-only (UPDATE refused)');
    END
    """,
    """
    CREATE TRIGGER audit_events_no_delete BEFORE DELETE ON audit_events
    WHEN OLD.seq >= COALESCE(
      (SELECT max(a.seq) FROM audit_anchors a WHERE a.chain = OLD.chain), 0) BEGIN
      SELECT RAISE(ABORT, 'execq: audit events are append-only (DELETE refused)');
    END
    """,
    """
    CREATE TRIGGER audit_heads_forward BEFORE UPDATE ON audit_heads
    WHEN NEW.seq <= OLD.seq BEGIN
      SELECT RAISE(ABORT, 'execq: an audit chain head only moves forward');
    END
    """,
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS audit_heads_forward",
    "DROP TRIGGER IF EXISTS audit_events_no_delete",
    "DROP TRIGGER IF EXISTS audit_events_no_update",
]


def upgrade() -> None:
    big = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    op.create_table(
        "audit_events",
        sa.Column("id", big, primary_key=True, autoincrement=True),
        sa.Column("chain", sa.String(40), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("event_id", sa.String(36), nullable=False),
        sa.Column("ts", sa.String(40), nullable=False),
        sa.Column("command_id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(40), nullable=False),
        sa.Column("principal", sa.String(200), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("phase", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("cmd_hash", sa.String(64), nullable=False),
        sa.Column("exec_time_ns", sa.BigInteger(), nullable=False),
        sa.Column("duration_ns", sa.BigInteger(), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("operator", sa.String(200), nullable=True),
        sa.Column("ticket", sa.String(200), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("detail", sa.Text(), nullable=False),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
        sa.UniqueConstraint("chain", "seq", name="uq_audit_chain_seq"),
        sa.UniqueConstraint("event_id", name="uq_audit_event_id"),
    )
    op.create_index("ix_audit_command", "audit_events", ["command_id"])
    op.create_index("ix_audit_time", "audit_events", ["exec_time_ns"])
    op.create_table(
        "audit_heads",
        sa.Column("chain", sa.String(40), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(64), nullable=False),
    )
    op.create_table(
        "audit_anchors",
        sa.Column("chain", sa.String(40), primary_key=True),
        sa.Column("seq", sa.BigInteger(), primary_key=True),
        sa.Column("prev_hash", sa.String(64), nullable=False),
        sa.Column("pruned_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("pruned_events", sa.BigInteger(), nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
    )
    bind = op.get_bind()
    for statement in PG_TRIGGERS if bind.dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in PG_DROP if bind.dialect.name == "postgresql" else SQLITE_DROP:
        op.execute(statement)
    op.drop_table("audit_anchors")
    op.drop_table("audit_heads")
    op.drop_index("ix_audit_time", "audit_events")
    op.drop_index("ix_audit_command", "audit_events")
    op.drop_table("audit_events")
