"""Members flagged for review by `koinonia members renormalize-phones`.

`members.review_reason`: why a person must look at the member (today only
`duplicate_phone`: once its phone was re-normalised to E.164 it is the same phone as
another member of the church). `members.duplicate_of`: that other member.

Revision ID: 0010_input
Revises: 0009_suppressions
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0010_input"
down_revision: str | Sequence[str] | None = "0009_suppressions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("members", sa.Column("review_reason", sa.Text(), nullable=True))
    op.add_column(
        "members", sa.Column("duplicate_of", postgresql.UUID(as_uuid=True), nullable=True)
    )
    op.create_foreign_key(
        op.f("fk_members_duplicate_of_members"),
        "members",
        "members",
        ["duplicate_of"],
        ["id"],
        ondelete="SET NULL",
    )
    op.create_index(
        "ix_members_review",
        "members",
        ["church_id"],
        postgresql_where=sa.text("review_reason IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_members_review", table_name="members")
    op.drop_constraint(op.f("fk_members_duplicate_of_members"), "members", type_="foreignkey")
    op.drop_column("members", "duplicate_of")
    op.drop_column("members", "review_reason")
