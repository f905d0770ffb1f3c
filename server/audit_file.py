"""The audit log's SQLite file: its schema and migrations, the hash that chains its records, and connections.

Chain: each record stores `prev_hash` (the previous record's `record_hash`; 64 zeros for the first) and
`record_hash` = sha256 over the UTF-8 bytes of the canonical JSON of every other column of the row, `seq` and
`prev_hash` included: `json.dumps(row, sort_keys=True, separators=(",", ":"), ensure_ascii=False)`, with the values
exactly as SQLite returns them (`violation` 0/1/null, `rule_ids` the stored JSON text, `latency_ms` a float). An
auditor can recompute it with any sqlite client and a JSON library.

Schema 2 added `tenant` and `principal` (who asked). Rows written before it hold NULL there, and a NULL in those two
columns is left out of the hashed JSON, so the old rows keep their hashes and the chain verifies across the
upgrade; every newer row holds both, and both are hashed.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any

from classification.errors import ApplianceError
from server.sqlite_wal import make_private

AUDIT_DB_NAME = "audit.sqlite3"
GENESIS_HASH = "0" * 64
# Marks the file as an audit log (`PRAGMA application_id`), so neither side mistakes it for another SQLite file.
APPLICATION_ID = int.from_bytes(b"SGAL", "big")
DEFAULT_BUSY_TIMEOUT_S = 30.0

# One tuple of statements per schema version, as in server/registry_file.py.
_SCHEMA_V1 = (
    # STRICT: a value keeps the exact type it was hashed with, so a stored record always re-hashes the same.
    """CREATE TABLE records (
        seq INTEGER PRIMARY KEY CHECK (seq > 0),
        ts TEXT NOT NULL,
        request_id TEXT NOT NULL,
        policy_id TEXT NOT NULL,
        policy_version TEXT NOT NULL,
        policy_sha256 TEXT NOT NULL,
        model_fingerprint TEXT NOT NULL,
        violation INTEGER CHECK (violation IN (0, 1)),
        category TEXT,
        rule_ids TEXT NOT NULL,
        confidence TEXT,
        parse_status TEXT NOT NULL,
        rationale TEXT,
        content_sha256 TEXT NOT NULL CHECK (length(content_sha256) = 64),
        content TEXT,
        prompt_tokens INTEGER NOT NULL CHECK (prompt_tokens >= 0),
        cached_tokens INTEGER NOT NULL CHECK (cached_tokens >= 0),
        reasoning_tokens INTEGER NOT NULL CHECK (reasoning_tokens >= 0),
        output_tokens INTEGER NOT NULL CHECK (output_tokens >= 0),
        latency_ms REAL NOT NULL CHECK (latency_ms >= 0),
        prev_hash TEXT NOT NULL CHECK (length(prev_hash) = 64),
        record_hash TEXT NOT NULL CHECK (length(record_hash) = 64)
    ) STRICT""",
    # A multi-policy request fans out to one record per policy, all under one request id.
    "CREATE INDEX records_by_request ON records(request_id)",
)
_CALLER_V2 = (
    "ALTER TABLE records ADD COLUMN tenant TEXT",
    "ALTER TABLE records ADD COLUMN principal TEXT",
)
MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1, _CALLER_V2)
# Columns added after schema 1: hashed only when set (see the module docstring).
_LATER_COLUMNS = ("tenant", "principal")
SCHEMA_VERSION = len(MIGRATIONS)

COLUMNS = ("seq", "ts", "request_id", "policy_id", "policy_version", "policy_sha256", "model_fingerprint",
           "violation", "category", "rule_ids", "confidence", "parse_status", "rationale", "content_sha256",
           "content", "prompt_tokens", "cached_tokens", "reasoning_tokens", "output_tokens", "latency_ms",
           "prev_hash", "record_hash", "tenant", "principal")
SELECT = f"SELECT {', '.join(COLUMNS)} FROM records"
SELECT_V1 = f"SELECT {', '.join(c if c not in _LATER_COLUMNS else 'NULL' for c in COLUMNS)} FROM records"


class AuditError(ApplianceError):
    """The audit log cannot be opened, read or written, or a record cannot be stored as given."""


def record_hash(row: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of a row's columns other than record_hash (see the module docstring)."""
    hashed = {name: value for name, value in row.items()
              if name != "record_hash" and not (name in _LATER_COLUMNS and value is None)}
    canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def connect(path: Path, *, read_only: bool, busy_timeout_s: float) -> sqlite3.Connection:
    # isolation_level=None: we BEGIN and COMMIT ourselves, as in server/registry_file.py.
    target, uri = (f"{path.resolve().as_uri()}?mode=ro", True) if read_only else (str(path), False)
    if not read_only:
        make_private(path)
    conn = sqlite3.connect(target, uri=uri, timeout=busy_timeout_s, isolation_level=None)
    try:
        if not read_only:
            conn.execute("PRAGMA synchronous = FULL")
    except BaseException:
        conn.close()
        raise
    return conn


def migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Mark the file as an audit log and bring its schema to SCHEMA_VERSION, refusing any other SQLite file."""
    conn.execute("BEGIN IMMEDIATE")  # re-read under the write lock: another process may have migrated meanwhile
    try:
        found = conn.execute("PRAGMA user_version").fetchone()[0]
        if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
            if found or conn.execute("SELECT count(*) FROM sqlite_schema").fetchone()[0]:
                raise AuditError(f"{path} is some other SQLite file, not an audit log; refusing to write into it")
            conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        if found > SCHEMA_VERSION:
            raise AuditError(f"audit log {path} has schema version {found}, newer than this appliance understands "
                             f"({SCHEMA_VERSION}); upgrade the appliance")
        for migration in MIGRATIONS[found:]:
            for statement in migration:
                conn.execute(statement)
        if found < SCHEMA_VERSION:
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
