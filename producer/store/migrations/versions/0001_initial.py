"""commands and transitions

Revision ID: 0001
Revises:
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TS = sa.DateTime(timezone=True)

# The history is written by the database: one row when a command is created and one for every
# version bump, from the command's own `last_actor`/`last_reason`. A state change without a
# version bump of exactly one is refused, so "every change of state is one row and bumps
# version" holds whoever writes to the table.
_HISTORY_COLUMNS = "command_id, from_state, to_state, version, at, actor, reason"

PG_TRIGGERS = [
    f"""
    CREATE FUNCTION execq_history() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      IF TG_OP = 'INSERT' THEN
        INSERT INTO transitions ({_HISTORY_COLUMNS}) VALUES
          (NEW.id, NULL, NEW.state, NEW.version, NEW.updated_at, NEW.last_actor,
           NEW.last_reason);
      ELSE
        INSERT INTO transitions ({_HISTORY_COLUMNS}) VALUES
          (NEW.id, OLD.state, NEW.state, NEW.version, NEW.updated_at, NEW.last_actor,
           NEW.last_reason);
      END IF;
      RETURN NULL;
    END $$
    """,
    """
    CREATE FUNCTION execq_version_guard() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'execq: command % changed state without bumping its version by one',
        OLD.id;
    END $$
    """,
    "CREATE TRIGGER commands_created AFTER INSERT ON commands "
    "FOR EACH ROW EXECUTE FUNCTION execq_history()",
    "CREATE TRIGGER commands_changed AFTER UPDATE ON commands "
    "FOR EACH ROW WHEN (OLD.version IS DISTINCT FROM NEW.version) EXECUTE FUNCTION execq_history()",
    "CREATE TRIGGER commands_version_guard BEFORE UPDATE ON commands FOR EACH ROW "
    "WHEN ((OLD.state IS DISTINCT FROM NEW.state OR OLD.version IS DISTINCT FROM NEW.version) "
    "AND NEW.version IS DISTINCT FROM OLD.version + 1) EXECUTE FUNCTION execq_version_guard()",
]
PG_DROP = [
    "DROP TRIGGER IF EXISTS commands_version_guard ON commands",
    "DROP TRIGGER IF EXISTS commands_changed ON commands",
    "DROP TRIGGER IF EXISTS commands_created ON commands",
    "DROP FUNCTION IF EXISTS execq_version_guard()",
    "DROP FUNCTION IF EXISTS execq_history()",
]
SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER commands_created AFTER INSERT ON commands BEGIN
      INSERT INTO transitions ({_HISTORY_COLUMNS}) VALUES
        (NEW.id, NULL, NEW.state, NEW.version, NEW.updated_at, NEW.last_actor, NEW.last_reason);
    END
    """,
    f"""
    CREATE TRIGGER commands_changed AFTER UPDATE ON commands
    WHEN OLD.version IS NOT NEW.version BEGIN
      INSERT INTO transitions ({_HISTORY_COLUMNS}) VALUES
        (NEW.id, OLD.state, NEW.state, NEW.version, NEW.updated_at, NEW.last_actor,
         NEW.last_reason);
    END
    """,
    """
    CREATE TRIGGER commands_version_guard BEFORE UPDATE ON commands
    WHEN (OLD.state IS NOT NEW.state OR OLD.version IS NOT NEW.version)
      AND NEW.version IS NOT OLD.version + 1 BEGIN
      SELECT RAISE(ABORT, 'execq: a command changed state without bumping its version by one');
    END
    """,
]
SQLITE_DROP = [
    "DROP TRIGGER IF EXISTS commands_version_guard",
    "DROP TRIGGER IF EXISTS commands_changed",
    "DROP TRIGGER IF EXISTS commands_created",
]


def upgrade() -> None:
    op.create_table(
        "commands",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(200), nullable=True),
        sa.Column("argv", sa.JSON(), nullable=False),
        sa.Column("env", sa.JSON(), nullable=False),
        sa.Column("secret_names", sa.JSON(), nullable=False),
        sa.Column("has_secrets", sa.Boolean(), nullable=False),
        sa.Column("timeout_s", sa.Float(), nullable=True),
        sa.Column("cpu_s", sa.Integer(), nullable=True),
        sa.Column("memory_mb", sa.Integer(), nullable=True),
        sa.Column("compensate", sa.JSON(), nullable=True),
        sa.Column("rollback_on_failure", sa.Boolean(), nullable=False),
        sa.Column("retry_safe", sa.Boolean(), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("exit_code", sa.Integer(), nullable=True),
        sa.Column("signal", sa.Integer(), nullable=True),
        sa.Column("stdout", sa.Text(), nullable=True),
        sa.Column("stderr", sa.Text(), nullable=True),
        sa.Column("stdout_bytes", sa.Integer(), nullable=True),
        sa.Column("stderr_bytes", sa.Integer(), nullable=True),
        sa.Column("output_truncated", sa.Boolean(), nullable=False),
        sa.Column("redacted", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("failure_reason", sa.String(64), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("enforced", sa.JSON(), nullable=True),
        sa.Column("worker", sa.String(200), nullable=True),
        sa.Column("lease_owner", sa.String(200), nullable=True),
        sa.Column("lease_pid", sa.Integer(), nullable=True),
        sa.Column("lease_expires_at", TS, nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("published_at", TS, nullable=True),
        sa.Column("publish_count", sa.Integer(), nullable=False),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("last_actor", sa.String(200), nullable=False),
        sa.Column("last_reason", sa.Text(), nullable=True),
        sa.Column("created_at", TS, nullable=False),
        sa.Column("updated_at", TS, nullable=False),
        sa.Column("started_at", TS, nullable=True),
        sa.Column("finished_at", TS, nullable=True),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_commands_tenant_key"),
    )
    op.create_index("ix_commands_tenant_state", "commands", ["tenant", "state"])
    op.create_index("ix_commands_state_lease", "commands", ["state", "lease_expires_at"])
    op.create_index("ix_commands_outbox", "commands", ["state", "published_at"])
    op.create_index("ix_commands_created", "commands", ["created_at"])
    op.create_table(
        "transitions",
        sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
        sa.Column("command_id", sa.String(36), sa.ForeignKey("commands.id"), nullable=False),
        sa.Column("from_state", sa.String(16), nullable=True),
        sa.Column("to_state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("at", TS, nullable=False),
        sa.Column("actor", sa.String(200), nullable=False),
        sa.Column("reason", sa.Text(), nullable=True),
    )
    op.create_index("ix_transitions_command", "transitions", ["command_id", "id"])
    bind = op.get_bind()
    for statement in PG_TRIGGERS if bind.dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in PG_DROP if bind.dialect.name == "postgresql" else SQLITE_DROP:
        op.execute(statement)
    op.drop_index("ix_transitions_command", "transitions")
    op.drop_table("transitions")
    op.drop_index("ix_commands_created", "commands")
    op.drop_index("ix_commands_outbox", "commands")
    op.drop_index("ix_commands_state_lease", "commands")
    op.drop_index("ix_commands_tenant_state", "commands")
    op.drop_table("commands")
