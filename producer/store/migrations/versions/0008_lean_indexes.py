"""fewer index entries per command: operator-only indexes where they cost nothing per write

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# A command row is written three times (insert, claim, finish) and none of these is a HOT
# update (its state is indexed), so every full index of `commands` gains three entries per
# command, and every index of `audit_events` one per event (five per command). These only
# serve operators' queries, which all name what the partial predicate says:
_ATTENTION = "needs_attention IS true"  # attention_counts, list --needs-attention
_BATCHED = "batch_id IS NOT NULL"  # a batch's steps (batch_id = ...)


def upgrade() -> None:
    # Plain CREATE/DROP INDEX on both databases: SQLite's batch mode would copy the table and
    # drop the history and version-guard triggers (migration 0001) on the way.
    op.drop_index("ix_commands_attention", table_name="commands")
    op.create_index(
        "ix_commands_attention",
        "commands",
        ["tenant"],
        postgresql_where=sa.text(_ATTENTION),
        sqlite_where=sa.text(_ATTENTION),
    )
    op.drop_index("ix_commands_batch", table_name="commands")
    op.create_index(
        "ix_commands_batch",
        "commands",
        ["batch_id", "batch_step"],
        postgresql_where=sa.text(_BATCHED),
        sqlite_where=sa.text(_BATCHED),
    )
    # Nothing looks an event up by its id: ids are random UUIDs, and the chain's own
    # (chain, seq) uniqueness and hashes are what make a trail whole. The unique index was a
    # random-key B-tree insert per event, the costliest kind for the write-ahead log.
    if op.get_bind().dialect.name == "sqlite":
        # SQLite cannot drop a table constraint without copying the table (and its
        # triggers): there it stays.
        return
    op.drop_constraint("uq_audit_event_id", "audit_events", type_="unique")
    # Exports and prunes ask for a time range, and events are appended in about the order of
    # their times: a BRIN index serves that for a few pages per million events and is
    # updated only when a new block range begins, not on every insert.
    op.drop_index("ix_audit_time", table_name="audit_events")
    op.create_index("ix_audit_time", "audit_events", ["exec_time_ns"], postgresql_using="brin")


def downgrade() -> None:
    if op.get_bind().dialect.name != "sqlite":
        op.drop_index("ix_audit_time", table_name="audit_events")
        op.create_index("ix_audit_time", "audit_events", ["exec_time_ns"])
        op.create_unique_constraint("uq_audit_event_id", "audit_events", ["event_id"])
    op.drop_index("ix_commands_batch", table_name="commands")
    op.create_index("ix_commands_batch", "commands", ["batch_id", "batch_step"])
    op.drop_index("ix_commands_attention", table_name="commands")
    op.create_index("ix_commands_attention", "commands", ["needs_attention", "tenant"])
