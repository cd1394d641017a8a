"""Imports every feature's tables so `Base.metadata` is complete (Alembic, tests)."""

from __future__ import annotations

import importlib

# Each feature that owns tables lists its `tables` module here.
TABLE_MODULES: list[str] = [
    "koinonia.audit.tables",
    "koinonia.accounts.tables",
    "koinonia.inbox.tables",
    "koinonia.deadletters.tables",
    "koinonia.members.tables",
    "koinonia.groups.tables",
    "koinonia.templates.tables",
    "koinonia.billing.tables",
    "koinonia.messaging.tables",
    "koinonia.conversations.tables",
    "koinonia.messaging.suppression_tables",
]


def import_all_tables() -> None:
    for module in TABLE_MODULES:
        importlib.import_module(module)
