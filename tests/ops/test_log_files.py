"""`LOG_FILE` is safe with several processes: rotation only in per-process files."""

from __future__ import annotations

import logging
import logging.handlers
import os
import tomllib
from pathlib import Path

from koinonia.logging import file_handler

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_a_pid_placeholder_gives_each_process_its_own_rotated_file(tmp_path: Path) -> None:
    handler = file_handler(str(tmp_path / "koinonia-{pid}.log"), backup_count=7)
    try:
        assert isinstance(handler, logging.handlers.TimedRotatingFileHandler)
        assert handler.baseFilename == str(tmp_path / f"koinonia-{os.getpid()}.log")
        assert handler.backupCount == 7
    finally:
        handler.close()


def test_a_shared_file_is_never_rotated_by_the_processes(tmp_path: Path) -> None:
    handler = file_handler(str(tmp_path / "koinonia.log"), backup_count=7)
    try:
        # Appends whole lines and reopens the file when logrotate has moved it.
        assert type(handler) is logging.handlers.WatchedFileHandler
    finally:
        handler.close()


def test_the_shipper_config_reads_the_journal_and_parses_json() -> None:
    config = tomllib.loads((DEPLOY / "vector" / "vector.toml").read_text())
    source = config["sources"]["koinonia_journal"]
    assert source["type"] == "journald"
    assert set(source["include_units"]) == {"koinonia-api.service", "koinonia-worker.service"}
    parse = config["transforms"]["koinonia_parse"]
    assert parse["type"] == "remap" and "parse_json" in parse["source"]
    assert any("koinonia_parse" in sink["inputs"] for sink in config["sinks"].values())
