"""keyed audit chains: signed prune anchors, and how far each chain was written unkeyed

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

# Every event written before this revision has a plain SHA-256 link; from now on links are
# keyed. `audit_legacy` records, once, where each existing chain's unkeyed links end, so that
# verify accepts an unkeyed link there and nowhere else. Nobody changes it afterwards.
PG_TRIGGERS = [
    """
    CREATE FUNCTION execq_audit_legacy_frozen() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'execq: audit_legacy is written once, on upgrade (% refused)', TG_OP;
    END $$
    """,
    "CREATE TRIGGER audit_legacy_frozen BEFORE INSERT OR UPDATE OR DELETE ON audit_legacy "
    "FOR EACH ROW EXECUTE FUNCTION execq_audit_legacy_frozen()",
]
PG_DROP = [
    "DROP TRIGGER IF EXISTS audit_legacy_frozen ON audit_legacy",
    "DROP FUNCTION IF EXISTS execq_audit_legacy_frozen()",
]
SQLITE_TRIGGERS = [
    f"""
    CREATE TRIGGER audit_legacy_no_{op_name.lower()} BEFORE {op_name} ON audit_legacy BEGIN
      SELECT RAISE(ABORT, 'execq: audit_legacy is written once, on upgrade ({op_name} refused)');
    END
    """
    for op_name in ("INSERT", "UPDATE", "DELETE")
]
SQLITE_DROP = [
    f"DROP TRIGGER IF EXISTS audit_legacy_no_{op_name.lower()}"
    for op_name in ("INSERT", "UPDATE", "DELETE")
]


def upgrade() -> None:
    op.add_column("audit_anchors", sa.Column("mac", sa.String(64), nullable=True))
    op.create_table(
        "audit_legacy",
        sa.Column("chain", sa.String(40), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False),
    )
    op.execute(
        "INSERT INTO audit_legacy (chain, seq) SELECT chain, seq FROM audit_heads WHERE seq > 0"
    )
    bind = op.get_bind()
    for statement in PG_TRIGGERS if bind.dialect.name == "postgresql" else SQLITE_TRIGGERS:
        op.execute(statement)


def downgrade() -> None:
    bind = op.get_bind()
    for statement in PG_DROP if bind.dialect.name == "postgresql" else SQLITE_DROP:
        op.execute(statement)
    op.drop_table("audit_legacy")
    # Native DROP COLUMN (SQLite >= 3.35): batch mode would copy and rename the table, which
    # the triggers on audit_events that name audit_anchors refuse.
    op.execute("ALTER TABLE audit_anchors DROP COLUMN mac")
