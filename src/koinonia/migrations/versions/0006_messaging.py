"""Messaging: broadcasts, recipients (partitioned), conversations (partitioned).

Revision ID: 0006_messaging
Revises: 0005_billing
Create Date: 2026-11-25 07:11:10.806454
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

from koinonia.partitions import PARTITIONED_TABLES, months_to_ensure, partition_ddl

revision: str = "0006_messaging"
down_revision: str | Sequence[str] | None = "0005_billing"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE conversation_messages_id_seq")
    op.execute("CREATE SEQUENCE message_recipients_id_seq")
    op.create_table(
        "conversation_messages",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('conversation_messages_id_seq')"),
            nullable=False,
        ),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("conversation_id", sa.UUID(), nullable=False),
        sa.Column("direction", sa.String(length=8), nullable=False),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("status", sa.String(length=11), nullable=False),
        sa.Column("kind", sa.String(length=10), server_default="reply", nullable=False),
        sa.Column("author_id", sa.UUID(), nullable=True),
        sa.Column("segments", sa.SmallInteger(), server_default="1", nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("provider_message_id", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=20), nullable=True),
        sa.Column("error_detail", sa.String(length=300), nullable=True),
        sa.Column("in_doubt_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "direction IN ('inbound', 'outbound')", name=op.f("ck_conversation_messages_direction")
        ),
        sa.PrimaryKeyConstraint("id", "created_at", name=op.f("pk_conversation_messages")),
        postgresql_partition_by="RANGE (created_at)",
    )
    op.create_index(
        "ix_conversation_messages_provider_id",
        "conversation_messages",
        ["provider_message_id"],
        unique=False,
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.create_index(
        "ix_conversation_messages_thread",
        "conversation_messages",
        ["conversation_id", "created_at", "id"],
        unique=False,
    )
    op.create_table(
        "message_recipients",
        sa.Column(
            "id",
            sa.BigInteger(),
            server_default=sa.text("nextval('message_recipients_id_seq')"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("message_id", sa.UUID(), nullable=False),
        sa.Column("member_id", sa.UUID(), nullable=False),
        sa.Column("batch_no", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=11), nullable=False),
        sa.Column("skip_reason", sa.String(length=20), nullable=True),
        sa.Column("segments", sa.SmallInteger(), nullable=False),
        sa.Column("attempts", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("claimed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("in_doubt_since", sa.DateTime(timezone=True), nullable=True),
        sa.Column("provider_message_id", sa.String(length=64), nullable=True),
        sa.Column("error_code", sa.String(length=20), nullable=True),
        sa.Column("error_detail", sa.String(length=300), nullable=True),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finalized_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "status IN ('queued', 'sending', 'sent', 'delivered', 'failed', 'undelivered', "
            "'skipped')",
            name=op.f("ck_message_recipients_status"),
        ),
        sa.PrimaryKeyConstraint("id", "created_at", name=op.f("pk_message_recipients")),
        postgresql_partition_by="RANGE (created_at)",
    )
    op.create_index(
        "ix_message_recipients_claim",
        "message_recipients",
        ["message_id", "batch_no", "status"],
        unique=False,
    )
    op.create_index(
        "ix_message_recipients_in_doubt",
        "message_recipients",
        ["claimed_at"],
        unique=False,
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.create_index(
        "ix_message_recipients_list",
        "message_recipients",
        ["message_id", "status", "id"],
        unique=False,
    )
    op.create_index(
        "ix_message_recipients_provider_id",
        "message_recipients",
        ["provider_message_id"],
        unique=False,
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.create_table(
        "messages",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("body", sa.Text(), nullable=False),
        sa.Column("template_id", sa.UUID(), nullable=True),
        sa.Column("encoding", sa.String(length=5), nullable=False),
        sa.Column("segments", sa.Integer(), nullable=False),
        sa.Column("characters", sa.Integer(), nullable=False),
        sa.Column(
            "audience", postgresql.JSONB(astext_type=sa.Text()), server_default="{}", nullable=False
        ),
        sa.Column("status", sa.String(length=10), nullable=False),
        sa.Column("recipients_total", sa.Integer(), server_default="0", nullable=False),
        sa.Column("queued_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("sent_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("delivered_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("failed_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("batches", sa.Integer(), server_default="0", nullable=False),
        sa.Column("segments_reserved", sa.Integer(), server_default="0", nullable=False),
        sa.Column("segments_refunded", sa.Integer(), server_default="0", nullable=False),
        sa.Column("idempotency_key", sa.String(length=255), nullable=True),
        sa.Column("request_hash", sa.LargeBinary(), nullable=True),
        sa.Column("first_response", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.Column("scheduled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("completed_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("cancelled_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('draft', 'scheduled', 'queued', 'sending', 'completed', 'cancelled', "
            "'failed')",
            name=op.f("ck_messages_status"),
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_messages_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_messages")),
        sa.UniqueConstraint(
            "church_id", "idempotency_key", name=op.f("uq_messages_church_id_idempotency_key")
        ),
    )
    op.create_index(
        "ix_messages_church_created", "messages", ["church_id", "created_at", "id"], unique=False
    )
    op.create_table(
        "conversations",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("member_id", sa.UUID(), nullable=False),
        sa.Column("status", sa.String(length=10), server_default="open", nullable=False),
        sa.Column("unread_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "last_message_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("last_message_preview", sa.String(length=160), nullable=True),
        sa.Column("last_message_direction", sa.String(length=8), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column(
            "updated_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.CheckConstraint(
            "status IN ('open', 'closed', 'archived')", name=op.f("ck_conversations_status")
        ),
        sa.CheckConstraint("unread_count >= 0", name=op.f("ck_conversations_unread_count")),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_conversations_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_conversations_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_conversations")),
        sa.UniqueConstraint(
            "church_id", "member_id", name=op.f("uq_conversations_church_id_member_id")
        ),
    )
    op.create_index(
        "ix_conversations_inbox",
        "conversations",
        ["church_id", "last_message_at", "id"],
        unique=False,
    )
    # This month and three ahead now; the periodic job keeps the window moving.
    for table in PARTITIONED_TABLES:
        for month in months_to_ensure(datetime.now(UTC).date(), 3):
            op.execute(partition_ddl(table, month))


def downgrade() -> None:
    op.drop_index("ix_conversations_inbox", table_name="conversations")
    op.drop_table("conversations")
    op.drop_index("ix_messages_church_created", table_name="messages")
    op.drop_table("messages")
    op.drop_index(
        "ix_message_recipients_provider_id",
        table_name="message_recipients",
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.drop_index("ix_message_recipients_list", table_name="message_recipients")
    op.drop_index(
        "ix_message_recipients_in_doubt",
        table_name="message_recipients",
        postgresql_where=sa.text("status = 'sending'"),
    )
    op.drop_index("ix_message_recipients_claim", table_name="message_recipients")
    op.drop_table("message_recipients")
    op.drop_index("ix_conversation_messages_thread", table_name="conversation_messages")
    op.drop_index(
        "ix_conversation_messages_provider_id",
        table_name="conversation_messages",
        postgresql_where=sa.text("provider_message_id IS NOT NULL"),
    )
    op.drop_table("conversation_messages")
    op.execute("DROP SEQUENCE message_recipients_id_seq")
    op.execute("DROP SEQUENCE conversation_messages_id_seq")
