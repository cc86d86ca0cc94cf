"""indexes for the hot queries at a million commands

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

# The reaper's scans only ever look at a few thousand live rows of a table that grows by the
# day: partial indexes hold just those rows. Their predicates are written exactly as the
# store's queries spell them (states as literals, see sweeps.py), so that the planner can
# prove a query implies the predicate, also in a prepared statement's generic plan.
_LIVE_LEASES = "state IN ('running', 'reverting')"
_OUTBOX = "state IN ('pending', 'reverting')"
_ROLLBACK_DUE = "state = 'failed' AND rollback_on_failure IS true AND compensation IS NULL"

# name -> (columns, partial predicate or None)
_NEW: dict[str, tuple[list[str], str | None]] = {
    # list --tenant --state (newest first), the max_concurrent count of running commands, and
    # list --tenant of a tenant small enough that the newest rows of all hold few of its own.
    "ix_commands_tenant_state_created": (["tenant", "state", "created_at"], None),
    "ix_commands_live_leases": (["tenant", "lease_expires_at"], _LIVE_LEASES),
    "ix_commands_outbox_due": (["tenant", "created_at"], _OUTBOX),
    "ix_commands_rollback_due": (["tenant", "updated_at"], _ROLLBACK_DUE),
}
# Replaced by the ones above, which serve every query these did: one full index fewer to
# update on each write than before, and the partial ones hold live rows only.
_OLD: dict[str, list[str]] = {
    "ix_commands_tenant_state": ["tenant", "state"],
    "ix_commands_state_lease": ["state", "lease_expires_at"],
    "ix_commands_outbox": ["state", "published_at"],
}


def upgrade() -> None:
    # Plain CREATE/DROP INDEX on both databases: SQLite's batch mode would copy the table and
    # drop the history and version-guard triggers (migration 0001) on the way.
    for name, (columns, where) in _NEW.items():
        predicate = sa.text(where) if where else None
        op.create_index(
            name, "commands", columns, postgresql_where=predicate, sqlite_where=predicate
        )
    for name in _OLD:
        op.drop_index(name, table_name="commands")


def downgrade() -> None:
    for name, columns in _OLD.items():
        op.create_index(name, "commands", columns)
    for name in reversed(_NEW):
        op.drop_index(name, table_name="commands")
