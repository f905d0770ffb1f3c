"""Write-ahead logging for the appliance's SQLite files (policy registry, audit log)."""

from __future__ import annotations

import sqlite3
import time


def enable_wal(conn: sqlite3.Connection, busy_timeout_s: float) -> str:
    """Switch to WAL and return the journal mode SQLite ended up in ("wal" unless the filesystem refuses it).

    The switch takes an exclusive lock without consulting the busy handler, so processes that open a brand-new
    file at the same moment get SQLITE_BUSY at once; they wait for each other here instead.
    """
    deadline = time.monotonic() + busy_timeout_s
    while True:
        try:
            return conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF != sqlite3.SQLITE_BUSY or time.monotonic() > deadline:
                raise
            time.sleep(0.01)
