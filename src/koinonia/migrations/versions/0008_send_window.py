"""Sending window: `churches.quiet_hours_*` renamed `send_window_*` (they always held the
local hours in which broadcasts may go out, not the quiet ones). Defaults stay 08:00-20:00.

Revision ID: 0008_send_window
Revises: 0007_sending
Create Date: 2026-12-01 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0008_send_window"
down_revision: str | Sequence[str] | None = "0007_sending"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_RENAMES = (
    ("quiet_hours_start", "send_window_start"),
    ("quiet_hours_end", "send_window_end"),
)


def upgrade() -> None:
    for old, new in _RENAMES:
        op.alter_column("churches", old, new_column_name=new)


def downgrade() -> None:
    for old, new in _RENAMES:
        op.alter_column("churches", new, new_column_name=old)
