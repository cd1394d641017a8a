"""Backups: pgBackRest with continuous WAL archiving to S3-compatible storage.

- `config`: the pgBackRest configuration and the primary's archiving settings, rendered
  from `Settings` (`koinonia backup config`) — one source for the drill and production.
- `pgbackrest`: the commands (`koinonia backup run|list|check`, `koinonia restore`).
- `metrics`: the age of the last good backup and of the last archived WAL, on `/metrics`.
- `drill`: the point-in-time restore drill (`scripts/restore-drill`).

See docs/backups.md and docs/disaster-recovery.md.
"""
