"""compensation, snapshots, retries with backoff and batches (sagas)

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-21
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

_COMMAND_COLUMNS = [
    sa.Column("compensate_limits", sa.JSON(), nullable=True),
    sa.Column("snapshot_paths", sa.JSON(), nullable=True),
    sa.Column("max_retries", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("retry_at", sa.DateTime(timezone=True), nullable=True),
    sa.Column("compensation", sa.JSON(), nullable=True),
    sa.Column("revert_count", sa.Integer(), nullable=False, server_default="0"),
    sa.Column("needs_attention", sa.Boolean(), nullable=False, server_default=sa.false()),
    sa.Column("batch_id", sa.String(36), nullable=True),
    sa.Column("batch_step", sa.Integer(), nullable=True),
    sa.Column("held", sa.Boolean(), nullable=False, server_default=sa.false()),
]


def upgrade() -> None:
    # Plain ADD COLUMN on both databases: SQLite's batch mode would copy the table and drop
    # its history and version-guard triggers (migration 0001) on the way.
    for column in _COMMAND_COLUMNS:
        op.add_column("commands", column)
    op.create_index("ix_commands_attention", "commands", ["needs_attention", "tenant"])
    op.create_index("ix_commands_batch", "commands", ["batch_id", "batch_step"])
    op.create_table(
        "snapshots",
        sa.Column("command_id", sa.String(36), sa.ForeignKey("commands.id"), primary_key=True),
        sa.Column("tenant", sa.String(40), nullable=False),
        sa.Column("host", sa.String(200), nullable=False),
        sa.Column("archive", sa.LargeBinary(), nullable=False),
        sa.Column("files", sa.Integer(), nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_table(
        "batches",
        sa.Column("id", sa.String(36), primary_key=True),
        sa.Column("tenant", sa.String(40), nullable=False),
        sa.Column("idempotency_key", sa.String(200), nullable=True),
        sa.Column("spec_hash", sa.String(64), nullable=False),
        sa.Column("principal", sa.String(200), nullable=True),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("steps", sa.Integer(), nullable=False),
        sa.Column("failed_step", sa.Integer(), nullable=True),
        sa.Column("compensate_on_revoke", sa.Boolean(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("last_actor", sa.String(200), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.UniqueConstraint("tenant", "idempotency_key", name="uq_batches_tenant_key"),
    )
    op.create_index("ix_batches_tenant_state", "batches", ["tenant", "state"])


def downgrade() -> None:
    op.drop_index("ix_batches_tenant_state", table_name="batches")
    op.drop_table("batches")
    op.drop_table("snapshots")
    op.drop_index("ix_commands_batch", table_name="commands")
    op.drop_index("ix_commands_attention", table_name="commands")
    for column in reversed(_COMMAND_COLUMNS):
        # Native DROP COLUMN (SQLite >= 3.35) keeps the triggers, unlike batch mode.
        op.execute(f"ALTER TABLE commands DROP COLUMN {column.name}")
