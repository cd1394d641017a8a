"""Backups: the point-in-time restore drill end to end (scripts/restore-drill), and the
pieces it relies on checked on their own (rendering, `pgbackrest info` parsing, gauges).

The drill makes its own S3 server, clusters and API on free loopback ports and removes
them; the shared cluster on 5432 is never touched. It needs a direct session (it runs
PostgreSQL itself), so it is left out of the PgBouncer pass.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from koinonia.backups.config import BackupConfig, BackupConfigError
from koinonia.backups.metrics import ArchiverSnapshot, BackupMonitor
from koinonia.backups.pgbackrest import format_target, parse_info
from koinonia.cli.backup import _parse_target

ROOT = Path(__file__).resolve().parents[2]
DRILL_BUDGET_SECONDS = 120.0


@pytest.mark.nopgbouncer
@pytest.mark.timeout(300)
def test_restore_drill_restores_exactly_the_rows_up_to_t() -> None:
    process = subprocess.Popen(
        [str(ROOT / "scripts" / "restore-drill")],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=ROOT,
    )
    try:
        output, _ = process.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the drill cleans up on SIGTERM
        output, _ = process.communicate(timeout=60)
        pytest.fail(f"the drill did not finish within 240s:\n{output}")
    print(output)  # noqa: T201 - the measured RPO/RTO belong in the test log
    assert process.returncode == 0, output

    assert "rows after restore: {'A': 200, 'B': 100, 'C': 0}" in output
    rpo = re.search(r"RPO: ([\d.]+)s measured .* archive_timeout=(\d+)s", output)
    rto = re.search(r"RTO: ([\d.]+)s from `koinonia restore` to app healthy", output)
    took = re.search(r"drill took ([\d.]+)s; everything removed: True", output)
    assert rpo and rto and took, output
    # archive_timeout bounds the RPO of a quiet database (plus the push itself).
    assert float(rpo[1]) <= float(rpo[2]) + 10
    assert float(took[1]) <= DRILL_BUDGET_SECONDS
    workdir = re.search(r"working in (\S+)", output)
    assert workdir and not Path(workdir[1]).exists()


# --- the pieces -----------------------------------------------------------------------


def _config(**changes: object) -> BackupConfig:
    config = BackupConfig(
        stanza="koinonia",
        config_path=Path("/etc/pgbackrest/pgbackrest.conf"),
        pg_data=Path("/var/lib/postgresql/15/main"),
        pg_port=5432,
        pg_socket_dir=Path("/var/run/postgresql"),
        s3_endpoint="s3.eu-west-1.amazonaws.com",
        s3_bucket="church-backups",
        s3_region="eu-west-1",
        s3_key="AKIAEXAMPLE",
        s3_key_secret="very-secret-key-value",
        cipher_pass="x" * 40,
    )
    return config.with_changes(**changes)


def test_rendered_repository_is_s3_encrypted_and_kept_30_days_by_time() -> None:
    rendered = _config().render()
    for line in (
        "repo1-type=s3",
        "repo1-cipher-type=aes-256-cbc",
        "repo1-retention-full-type=time",
        "repo1-retention-full=30",
        "repo1-storage-verify-tls=y",
        "[koinonia]",
        "pg1-path=/var/lib/postgresql/15/main",
    ):
        assert line in rendered.splitlines()
    postgresql = _config().render_postgresql()
    assert "archive_mode = on" in postgresql
    assert "archive_timeout = 60" in postgresql
    assert "--stanza=koinonia archive-push %p" in postgresql
    assert "very-secret-key-value" not in _config().redacted(rendered)


@pytest.mark.parametrize(
    ("changes", "problem"),
    [
        ({"cipher_pass": ""}, "BACKUP_CIPHER_PASS"),
        ({"cipher_pass": "short"}, "BACKUP_CIPHER_PASS"),
        ({"s3_bucket": ""}, "BACKUP_S3_BUCKET"),
        ({"s3_key_secret": ""}, "BACKUP_S3_KEY"),
        ({"s3_bucket": "a\nrepo1-type=posix"}, "line breaks"),
    ],
)
def test_no_repository_without_encryption_or_credentials(
    changes: dict[str, object], problem: str
) -> None:
    with pytest.raises(BackupConfigError, match=problem):
        _config(**changes).render()


INFO = [
    {
        "name": "koinonia",
        "status": {"code": 0, "message": "ok"},
        "cipher": "aes-256-cbc",
        "archive": [
            {"id": "15-1", "min": "000000010000000000000003", "max": "00000001000000000000000A"}
        ],
        "backup": [
            {
                "label": "20261101-010000F",
                "type": "full",
                "timestamp": {"start": 1793500000, "stop": 1793500100},
                "archive": {
                    "start": "000000010000000000000003",
                    "stop": "000000010000000000000003",
                },
                "info": {"size": 1000, "repository": {"size": 400, "delta": 400}},
                "error": False,
            },
            {
                "label": "20261101-010000F_20261102-010000D",
                "type": "diff",
                "timestamp": {"start": 1793590000, "stop": 1793590050},
                "info": {"size": 1000, "repository": {"size": 100, "delta": 50}},
                "error": True,
            },
        ],
    }
]


def test_backup_gauges_come_from_the_last_good_backup() -> None:
    (stanza,) = parse_info(json.dumps(INFO))
    assert stanza.cipher == "aes-256-cbc"
    assert stanza.last_good is not None and stanza.last_good.type == "full"  # diff had errors
    monitor = BackupMonitor(_config(stanza="gauges"), None, info_enabled=False)
    now = stanza.last_good.stopped + timedelta(hours=2)
    monitor.apply_info(stanza, now=now)
    labels = {"stanza": "gauges"}
    assert REGISTRY.get_sample_value("koinonia_backup_last_success_age_seconds", labels) == 7200
    assert REGISTRY.get_sample_value("koinonia_backup_last_full_age_seconds", labels) == 7200
    assert REGISTRY.get_sample_value("koinonia_backup_repo_up", labels) == 1
    monitor.apply_info(None, now=now + timedelta(hours=1))  # repository unreadable
    assert REGISTRY.get_sample_value("koinonia_backup_repo_up", labels) == 0
    assert REGISTRY.get_sample_value("koinonia_backup_last_success_age_seconds", labels) == 10800


def test_wal_gauges_from_pg_stat_archiver() -> None:
    now = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    monitor = BackupMonitor(_config(stanza="wal"), None, info_enabled=False)
    monitor.apply_archiver(
        ArchiverSnapshot(
            archive_mode="on",
            last_archived_wal="0000000100000001000000FE",
            last_archived_time=now - timedelta(seconds=90),
            last_failed_time=now - timedelta(seconds=5),
            current_wal="000000010000000200000002",  # crosses a log file boundary
            now=now,
        )
    )
    labels = {"stanza": "wal"}
    assert REGISTRY.get_sample_value("koinonia_wal_archive_last_success_age_seconds", labels) == 90
    assert REGISTRY.get_sample_value("koinonia_wal_archive_pending_segments", labels) == 3
    assert REGISTRY.get_sample_value("koinonia_wal_archive_failing", labels) == 1


def test_restore_target_forms() -> None:
    assert _parse_target("/srv/restore:5544", None) == (Path("/srv/restore"), 5544)
    assert _parse_target("/srv/restore", 5544) == (Path("/srv/restore"), 5544)
    assert _parse_target("/srv/restore", None) == (Path("/srv/restore"), None)
    moment = datetime(2026, 11, 29, 10, 15, 0, 123456, tzinfo=UTC)
    assert format_target(moment) == "2026-11-29 10:15:00.123456+00"
    with pytest.raises(ValueError, match="time zone"):
        format_target(moment.replace(tzinfo=None))
