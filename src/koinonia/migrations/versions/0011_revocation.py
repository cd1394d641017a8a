"""Revocation on the next request: `users.auth_version`.

Every change that must end a user's access tokens at once (delete, deactivate, role or
password change) raises it; access tokens carry the version they were issued with and
Redis caches the current one (accounts/revocation.py). API keys of users who were
already inactive are revoked, as deactivating a user now does.

Revision ID: 0011_revocation
Revises: 0010_input
Create Date: 2026-12-01 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_revocation"
down_revision: str | Sequence[str] | None = "0010_input"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "users",
        sa.Column("auth_version", sa.BigInteger(), server_default="0", nullable=False),
    )
    op.execute(
        "UPDATE api_keys SET revoked_at = now() FROM users "
        "WHERE api_keys.created_by = users.id AND NOT users.is_active "
        "AND api_keys.revoked_at IS NULL"
    )


def downgrade() -> None:
    op.drop_column("users", "auth_version")
