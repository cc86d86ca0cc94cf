"""a command's action and its parameters

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # Nullable, no default: adding them rewrites nothing, and a raw-argv command keeps NULLs.
    # Plain ALTER TABLE, not batch mode, which on SQLite copies the table without its triggers.
    op.add_column("commands", sa.Column("action", sa.String(64), nullable=True))
    op.add_column("commands", sa.Column("params", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    for column in ("params", "action"):
        # Native DROP COLUMN (SQLite >= 3.35) keeps the triggers, unlike batch mode.
        op.execute(f"ALTER TABLE commands DROP COLUMN {column}")
