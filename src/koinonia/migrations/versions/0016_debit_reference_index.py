"""The refund cap's debit sum as an index range: `(church_id, reference text_pattern_ops)`
over debits, for `reference = '<debit>' OR reference LIKE '<debit>:replay:%'`. Without it
every refund read all of the church's ledger rows, of every period (the ledger is
append-only); the unique `(church_id, kind, reference)` index answers the equality but not
a prefix `LIKE` unless the database's collation is `C`.

Built `CONCURRENTLY` (outside the migration's transaction): debits are written on every
send and a plain `CREATE INDEX` would hold them for the whole build. A build that fails
leaves an INVALID index: drop it (`DROP INDEX CONCURRENTLY ix_usage_ledger_debit_reference`)
and migrate again.

Revision ID: 0016_debit_reference_index
Revises: 0015_mfa
Create Date: 2026-11-29 06:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_debit_reference_index"
down_revision: str | Sequence[str] | None = "0015_mfa"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            "ix_usage_ledger_debit_reference",
            "usage_ledger",
            ["church_id", "reference"],
            postgresql_ops={"reference": "text_pattern_ops"},
            postgresql_where=sa.text("kind = 'debit'"),
            postgresql_concurrently=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            "ix_usage_ledger_debit_reference",
            table_name="usage_ledger",
            postgresql_concurrently=True,
        )
