"""The `koinonia` command line (Typer)."""

from koinonia.cli.main import app

__all__ = ["app"]
