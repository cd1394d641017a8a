"""Figures tests want shown at the end of the run (pytest_terminal_summary prints them)."""

from __future__ import annotations

REPORTS: list[str] = []
