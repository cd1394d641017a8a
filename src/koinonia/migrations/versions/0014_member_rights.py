"""Member data rights: the consent history and erased members.

`member_consent_events`: every change of a member's opt-out state (time, source, the new
state, the staff user or API key when it was one). Members opted out today get one
event each, from their `opted_out_at` and `opted_out_source`.
`members.erased_at`: set by `POST /members/{id}/erase`; the row is then a tombstone.

Revision ID: 0014_member_rights
Revises: 0013_query_indexes
Create Date: 2026-12-14 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_member_rights"
down_revision: str | Sequence[str] | None = "0013_query_indexes"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("members", sa.Column("erased_at", sa.DateTime(timezone=True), nullable=True))
    op.create_table(
        "member_consent_events",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("member_id", sa.UUID(), nullable=False),
        sa.Column("opted_out", sa.Boolean(), nullable=False),
        sa.Column("source", sa.String(length=12), nullable=False),
        sa.Column("actor_id", sa.UUID(), nullable=True),
        sa.Column(
            "at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.CheckConstraint(
            "source IN ('keyword', 'api', 'import', 'provider', 'renormalize', 'erase')",
            name=op.f("ck_member_consent_events_source"),
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_member_consent_events_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_member_consent_events_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_member_consent_events")),
    )
    op.create_index(
        "ix_member_consent_events_member", "member_consent_events", ["member_id", "at", "id"]
    )
    op.execute(
        "INSERT INTO member_consent_events (church_id, member_id, opted_out, source, at) "
        "SELECT church_id, id, true, coalesce(opted_out_source, 'api'), "
        "coalesce(opted_out_at, updated_at) FROM members WHERE opted_out"
    )


def downgrade() -> None:
    op.drop_index("ix_member_consent_events_member", table_name="member_consent_events")
    op.drop_table("member_consent_events")
    op.drop_column("members", "erased_at")
