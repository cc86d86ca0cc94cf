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
    with op.batch_alter_table("commands") as batch:
        batch.add_column(sa.Column("action", sa.String(64), nullable=True))
        batch.add_column(sa.Column("params", sa.JSON(none_as_null=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("commands") as batch:
        batch.drop_column("params")
        batch.drop_column("action")
