"""The state directory is the owner's alone: the directory 0700, the policy registry and the audit log (and their
SQLite -wal and -shm files) 0600, whoever creates them, and files left too open are tightened when next opened.

A front end that is serving is checked in tests/test_killed_serve.py (a real `appliance serve` with an audit
record written, so the audit log's -wal and -shm files exist).
"""

from __future__ import annotations

import logging
import sqlite3
import stat
from pathlib import Path

from click.testing import CliRunner

from appliance.cli import main
from classification.library import bundled_policy, library_dir
from server import servicer
from server.audit_file import AUDIT_DB_NAME
from server.keys import KEYS_DB_NAME
from server.registry import DB_NAME
from server.settings import ServerSettings

DATABASES = (DB_NAME, AUDIT_DB_NAME, KEYS_DB_NAME)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def appliance(*args: str) -> str:
    result = CliRunner().invoke(main, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def assert_private(state: Path, *names: str) -> None:
    assert mode(state) == 0o700
    for name in names:
        assert mode(state / name) == 0o600, f"{name} is {mode(state / name):o}"


def hold_wal_open(database: Path) -> sqlite3.Connection:
    """A connection in the middle of a read, so SQLite keeps the -wal and -shm files while the test looks."""
    conn = sqlite3.connect(database, isolation_level=None)
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
    return conn


def test_the_cli_creates_a_private_state_directory(tmp_path: Path):
    state = tmp_path / "fresh" / "state"
    appliance("policy", "--state-dir", str(state), "import", str(library_dir()))
    assert_private(state, DB_NAME)
    conn = hold_wal_open(state / DB_NAME)
    try:
        appliance("policy", "--state-dir", str(state), "add", str(bundled_policy("smoke")), "--activate")
        assert_private(state, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
    finally:
        conn.close()


def test_the_key_store_is_private(tmp_path: Path):
    state = tmp_path / "fresh" / "state"
    appliance("keys", "--state-dir", str(state), "create", "--tenant", "acme", "--scope", "classify")
    conn = hold_wal_open(state / KEYS_DB_NAME)
    try:
        appliance("keys", "--state-dir", str(state), "list")
        assert_private(state, KEYS_DB_NAME, f"{KEYS_DB_NAME}-wal", f"{KEYS_DB_NAME}-shm")
    finally:
        conn.close()


def test_a_front_end_creates_its_state_private(tmp_path: Path, monkeypatch, caplog):
    """`appliance serve` through its real command up to the front end it builds (registry and audit log opened).
    A fresh directory is no news: nothing is logged."""
    built: list[Path] = []

    async def build_only(settings: ServerSettings) -> None:
        frontend = servicer.build_server(settings)
        built.append(frontend.audit.path)
        await frontend.server.stop(None)
        frontend.audit.close()

    monkeypatch.setattr(servicer, "serve", build_only)
    state = tmp_path / "state"
    with caplog.at_level(logging.INFO, logger="safeguard.state"):
        appliance("serve", "--state-dir", str(state), "--listen", "127.0.0.1:0", "--metrics-port", "0")
    assert built == [state / AUDIT_DB_NAME]
    assert_private(state, *DATABASES)
    assert [r.levelno for r in caplog.records if r.name == "safeguard.state"] in ([], [logging.INFO])


def test_files_left_open_to_others_are_tightened_and_the_change_logged(tmp_path: Path, caplog):
    state = tmp_path / "state"
    appliance("policy", "--state-dir", str(state), "import", str(library_dir()))
    conn = hold_wal_open(state / DB_NAME)  # so the -wal and -shm files exist to be loosened
    try:
        loosened = [state / DB_NAME, state / f"{DB_NAME}-wal", state / f"{DB_NAME}-shm"]
        state.chmod(0o755)
        for path in loosened:
            path.chmod(0o644)
        with caplog.at_level(logging.WARNING, logger="safeguard.state"):
            listed = appliance("policy", "--state-dir", str(state), "list")
        assert "smoke" in listed  # still the same registry, now private
        assert_private(state, DB_NAME, f"{DB_NAME}-wal", f"{DB_NAME}-shm")
        warned = {record.getMessage().split()[0] for record in caplog.records if record.levelno == logging.WARNING}
        assert warned == {str(path) for path in (state, *loosened)}
    finally:
        conn.close()


def test_private_files_are_left_alone_and_nothing_is_logged(tmp_path: Path, caplog):
    state = tmp_path / "state"
    appliance("policy", "--state-dir", str(state), "import", str(library_dir()))
    with caplog.at_level(logging.INFO, logger="safeguard.state"):
        appliance("policy", "--state-dir", str(state), "list")
    assert_private(state, DB_NAME)
    assert [r.getMessage() for r in caplog.records if r.name == "safeguard.state"] == []
