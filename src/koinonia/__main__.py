"""`python -m koinonia` runs the CLI."""

from koinonia.cli import app

app()
