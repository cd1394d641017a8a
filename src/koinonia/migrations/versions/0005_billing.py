"""Billing: subscriptions and the append-only segment ledger.

Revision ID: 0005_billing
Revises: 0004_members
Create Date: 2026-11-25 04:45:18.726741
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_billing"
down_revision: str | Sequence[str] | None = "0004_members"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


APPEND_ONLY = """
CREATE FUNCTION usage_ledger_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND NOT EXISTS (SELECT 1 FROM churches WHERE id = OLD.church_id) THEN
        RETURN OLD;
    END IF;
    RAISE EXCEPTION 'usage_ledger is append-only' USING ERRCODE = 'integrity_constraint_violation';
END $$;
CREATE TRIGGER usage_ledger_append_only BEFORE UPDATE OR DELETE ON usage_ledger
    FOR EACH ROW EXECUTE FUNCTION usage_ledger_append_only();
"""


def upgrade() -> None:
    op.create_table(
        "subscriptions",
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("plan", sa.String(length=40), server_default="trial", nullable=False),
        sa.Column("status", sa.String(length=30), server_default="trialing", nullable=False),
        sa.Column("stripe_customer_id", sa.String(length=64), nullable=True),
        sa.Column("stripe_subscription_id", sa.String(length=64), nullable=True),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("period_end", sa.DateTime(timezone=True), nullable=False),
        sa.Column("cancel_at_period_end", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("last_event_created", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_subscriptions_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("church_id", name=op.f("pk_subscriptions")),
        sa.UniqueConstraint("stripe_customer_id", name=op.f("uq_subscriptions_stripe_customer_id")),
        sa.UniqueConstraint(
            "stripe_subscription_id", name=op.f("uq_subscriptions_stripe_subscription_id")
        ),
    )
    op.create_table(
        "usage_ledger",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("kind", sa.String(length=10), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=False),
        sa.Column("reference", sa.String(length=120), nullable=False),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "kind IN ('grant', 'debit', 'credit')", name=op.f("ck_usage_ledger_kind")
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_usage_ledger_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_usage_ledger")),
        sa.UniqueConstraint(
            "church_id", "kind", "reference", name=op.f("uq_usage_ledger_church_id_kind_reference")
        ),
    )
    op.create_index(
        "ix_usage_ledger_church_period", "usage_ledger", ["church_id", "period_start"], unique=False
    )
    # Append-only: corrections are new rows. Deleting is allowed only as the cascade of a
    # deleted church (its row is already gone when the cascade runs).
    op.execute(APPEND_ONLY)


def downgrade() -> None:
    op.execute("DROP TRIGGER IF EXISTS usage_ledger_append_only ON usage_ledger")
    op.execute("DROP FUNCTION IF EXISTS usage_ledger_append_only()")
    op.drop_index("ix_usage_ledger_church_period", table_name="usage_ledger")
    op.drop_table("usage_ledger")
    op.drop_table("subscriptions")
