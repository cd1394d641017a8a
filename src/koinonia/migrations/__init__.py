"""Alembic migrations (run with `koinonia migrate`)."""
