"""Helpers shared by CLI commands."""

from __future__ import annotations

import sys

import typer

from koinonia.settings import Settings, SettingsError, load_settings


def settings_or_exit() -> Settings:
    try:
        return load_settings()
    except SettingsError as error:
        print(str(error), file=sys.stderr)
        raise typer.Exit(code=2) from None
