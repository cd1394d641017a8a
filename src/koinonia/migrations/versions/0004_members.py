"""Members (encrypted contacts, blind indexes), groups, templates and member imports.

Revision ID: 0004_members
Revises: 0003w_inbox
Create Date: 2026-11-25 04:28:34.535444
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0004_members"
down_revision: str | Sequence[str] | None = "0003w_inbox"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "groups",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("description", sa.String(length=500), server_default="", nullable=False),
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
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_groups_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_groups")),
    )
    op.create_index(op.f("ix_groups_church_id"), "groups", ["church_id"], unique=False)
    op.create_index(
        "uq_groups_church_name",
        "groups",
        ["church_id", sa.literal_column("lower(name)")],
        unique=True,
    )
    op.create_table(
        "member_imports",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("created_by", sa.UUID(), nullable=True),
        sa.Column("filename", sa.String(length=255), server_default="", nullable=False),
        sa.Column("size_bytes", sa.BigInteger(), server_default="0", nullable=False),
        sa.Column("on_duplicate", sa.String(length=6), server_default="update", nullable=False),
        sa.Column("group_id", sa.UUID(), nullable=True),
        sa.Column(
            "column_map",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default="{}",
            nullable=False,
        ),
        sa.Column("status", sa.String(length=10), server_default="pending", nullable=False),
        sa.Column("processed", sa.Integer(), server_default="0", nullable=False),
        sa.Column("created", sa.Integer(), server_default="0", nullable=False),
        sa.Column("updated", sa.Integer(), server_default="0", nullable=False),
        sa.Column("skipped", sa.Integer(), server_default="0", nullable=False),
        sa.Column("error_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column(
            "errors", postgresql.JSONB(astext_type=sa.Text()), server_default="[]", nullable=False
        ),
        sa.Column("failure", sa.Text(), nullable=True),
        sa.Column(
            "created_at",
            sa.DateTime(timezone=True),
            server_default=sa.text("now()"),
            nullable=False,
        ),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "on_duplicate IN ('update', 'skip')", name=op.f("ck_member_imports_on_duplicate")
        ),
        sa.CheckConstraint(
            "status IN ('pending', 'running', 'completed', 'failed')",
            name=op.f("ck_member_imports_status"),
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_member_imports_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_member_imports")),
    )
    op.create_index(
        op.f("ix_member_imports_church_id"), "member_imports", ["church_id"], unique=False
    )
    op.create_table(
        "members",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("first_name", sa.String(length=100), server_default="", nullable=False),
        sa.Column("last_name", sa.String(length=100), server_default="", nullable=False),
        sa.Column("phone_ct", sa.LargeBinary(), nullable=False),
        sa.Column("phone_hash", sa.LargeBinary(), nullable=False),
        sa.Column("email_ct", sa.LargeBinary(), nullable=True),
        sa.Column("email_hash", sa.LargeBinary(), nullable=True),
        sa.Column("opted_out", sa.Boolean(), server_default="false", nullable=False),
        sa.Column("opted_out_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("opted_out_source", sa.String(length=10), nullable=True),
        sa.Column("is_unknown", sa.Boolean(), server_default="false", nullable=False),
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
        sa.Column("deleted_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "opted_out_source IS NULL OR opted_out_source IN "
            "('keyword', 'api', 'import', 'provider')",
            name=op.f("ck_members_opted_out_source"),
        ),
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_members_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_members")),
        sa.UniqueConstraint(
            "church_id", "phone_hash", name=op.f("uq_members_church_id_phone_hash")
        ),
    )
    op.create_index(
        "ix_members_church_created", "members", ["church_id", "created_at", "id"], unique=False
    )
    op.create_index(
        "ix_members_church_email_hash",
        "members",
        ["church_id", "email_hash"],
        unique=False,
        postgresql_where=sa.text("email_hash IS NOT NULL"),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.UUID(), server_default=sa.text("gen_random_uuid()"), nullable=False),
        sa.Column("church_id", sa.UUID(), nullable=False),
        sa.Column("name", sa.String(length=100), nullable=False),
        sa.Column("body", sa.String(length=1600), nullable=False),
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
        sa.ForeignKeyConstraint(
            ["church_id"],
            ["churches.id"],
            name=op.f("fk_templates_church_id_churches"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
    )
    op.create_index(op.f("ix_templates_church_id"), "templates", ["church_id"], unique=False)
    op.create_index(
        "uq_templates_church_name",
        "templates",
        ["church_id", sa.literal_column("lower(name)")],
        unique=True,
    )
    op.create_table(
        "group_members",
        sa.Column("group_id", sa.UUID(), nullable=False),
        sa.Column("member_id", sa.UUID(), nullable=False),
        sa.Column(
            "added_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.ForeignKeyConstraint(
            ["group_id"],
            ["groups.id"],
            name=op.f("fk_group_members_group_id_groups"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["member_id"],
            ["members.id"],
            name=op.f("fk_group_members_member_id_members"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("group_id", "member_id", name=op.f("pk_group_members")),
    )
    op.create_index("ix_group_members_member", "group_members", ["member_id"], unique=False)
    op.create_table(
        "member_import_files",
        sa.Column("import_id", sa.UUID(), nullable=False),
        sa.Column("content", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["import_id"],
            ["member_imports.id"],
            name=op.f("fk_member_import_files_import_id_member_imports"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("import_id", name=op.f("pk_member_import_files")),
    )


def downgrade() -> None:
    op.drop_table("member_import_files")
    op.drop_index("ix_group_members_member", table_name="group_members")
    op.drop_table("group_members")
    op.drop_index("uq_templates_church_name", table_name="templates")
    op.drop_index(op.f("ix_templates_church_id"), table_name="templates")
    op.drop_table("templates")
    op.drop_index("ix_members_church_email_hash", table_name="members")
    op.drop_index("ix_members_church_created", table_name="members")
    op.drop_table("members")
    op.drop_index(op.f("ix_member_imports_church_id"), table_name="member_imports")
    op.drop_table("member_imports")
    op.drop_index("uq_groups_church_name", table_name="groups")
    op.drop_index(op.f("ix_groups_church_id"), table_name="groups")
    op.drop_table("groups")
