"""Job queue: procrastinate's schema, and the audit log.

Revision ID: 0001_jobs
Revises:
Create Date: 2026-11-25
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from procrastinate.schema import SchemaManager
from sqlalchemy.dialects import postgresql

revision: str = "0001_jobs"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# procrastinate ships its schema as SQL. Later procrastinate upgrades add their own
# migration files (procrastinate/sql/migrations); each gets an Alembic revision here.
_PROCRASTINATE_OBJECTS = """
DROP TABLE IF EXISTS procrastinate_events, procrastinate_periodic_defers,
    procrastinate_jobs, procrastinate_workers CASCADE;
DROP TYPE IF EXISTS procrastinate_job_status, procrastinate_job_event_type CASCADE;
"""


def upgrade() -> None:
    # Feeds GET /admin/slow-queries; needs shared_preload_libraries (scripts/services.sh).
    op.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    op.get_bind().exec_driver_sql(SchemaManager.get_schema().replace("%", "%%"))
    op.create_table(
        "audit_log",
        sa.Column("id", sa.BigInteger, sa.Identity(), primary_key=True),
        sa.Column("church_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("actor_id", postgresql.UUID(as_uuid=True), nullable=True),
        sa.Column("actor_kind", sa.String(20), nullable=False),
        sa.Column("action", sa.String(64), nullable=False),
        sa.Column("target_type", sa.String(40), nullable=True),
        sa.Column("target_id", sa.String(64), nullable=True),
        sa.Column("details", postgresql.JSONB, nullable=False, server_default="{}"),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column(
            "created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.func.now()
        ),
    )
    op.create_index("ix_audit_log_church_id_created_at", "audit_log", ["church_id", "created_at"])


def downgrade() -> None:
    op.execute("DROP EXTENSION IF EXISTS pg_stat_statements")
    op.drop_table("audit_log")
    op.execute(_PROCRASTINATE_OBJECTS)
    op.execute("""
        DO $$ DECLARE f record; BEGIN
          FOR f IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
                   JOIN pg_namespace n ON n.oid = p.pronamespace
                   WHERE n.nspname = 'public' AND p.proname LIKE 'procrastinate%' LOOP
            EXECUTE 'DROP FUNCTION IF EXISTS ' || f.sig || ' CASCADE';
          END LOOP;
          FOR f IN SELECT t.typname FROM pg_type t
                   JOIN pg_namespace n ON n.oid = t.typnamespace
                   WHERE n.nspname = 'public' AND t.typname LIKE 'procrastinate%'
                     AND t.typtype IN ('c', 'e', 'd') LOOP
            EXECUTE 'DROP TYPE IF EXISTS ' || quote_ident(f.typname) || ' CASCADE';
          END LOOP;
        END $$;
    """)
