"""Reading an audit log back, and verifying its chain (the hash is defined in `server/audit_file.py`).

`verify` walks the rows in `seq` order and names the first one whose seq skips (a deleted record), whose `prev_hash`
is not its predecessor's hash (a record inserted, reordered or re-hashed before it) or whose fields no longer hash
to its `record_hash` (a changed field). An unkeyed chain cannot catch an edit that rewrites every later hash too,
nor a cut of the newest records: for that, copy the head hash that `verify` prints somewhere the appliance cannot
write (a ticket, a second host) now and then.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.audit_file import (
    APPLICATION_ID,
    COLUMNS,
    DEFAULT_BUSY_TIMEOUT_S,
    GENESIS_HASH,
    SCHEMA_VERSION,
    SELECT,
    SELECT_V1,
    AuditError,
    connect,
    record_hash,
)


@dataclass(frozen=True)
class AuditEntry:
    """One stored record, as read back."""

    seq: int
    ts: str
    request_id: str
    policy_id: str
    policy_version: str
    policy_sha256: str
    model_fingerprint: str
    violation: bool | None
    category: str | None
    rule_ids: tuple[str, ...]
    confidence: str | None
    parse_status: str
    rationale: str | None
    content_sha256: str
    content: str | None
    prompt_tokens: int
    cached_tokens: int
    reasoning_tokens: int
    output_tokens: int
    latency_ms: float
    prev_hash: str
    record_hash: str
    tenant: str | None  # None in records written before schema 2
    principal: str | None


@dataclass(frozen=True)
class VerifyResult:
    ok: bool
    records_checked: int  # records that verified, in seq order, before the first broken one (all of them if ok)
    first_broken_seq: int | None = None
    first_broken_request_id: str | None = None
    reason: str = ""
    head_hash: str = GENESIS_HASH  # record_hash of the last verified record; keep a copy to detect later cuts


def _entry(row: sqlite3.Row) -> AuditEntry:
    values = dict(zip(COLUMNS, row, strict=True))
    violation = values["violation"]
    values["violation"] = None if violation is None else bool(violation)
    values["rule_ids"] = tuple(json.loads(values["rule_ids"]))
    return AuditEntry(**values)


def _break_reason(row: dict[str, Any], prev_seq: int, prev_hash: str) -> str | None:
    """Why this row does not continue the chain from (prev_seq, prev_hash); None when it does."""
    seq = row["seq"]
    if seq != prev_seq + 1:
        missing = f"record {prev_seq + 1}" if seq == prev_seq + 2 else f"records {prev_seq + 1} to {seq - 1}"
        return f"{missing} missing (seq jumps from {prev_seq} to {seq}): deleted"
    if row["prev_hash"] != prev_hash:
        before = "the genesis hash" if prev_seq == 0 else f"record {prev_seq}'s hash"
        return (f"chain link broken: prev_hash does not match {before} (a record before it was changed, "
                "inserted or reordered)")
    if record_hash(row) != row["record_hash"]:
        return "fields do not match the record hash: a field was changed"
    return None


class AuditReader:
    """Read-only access to an audit log file; creates and changes nothing, so it is safe on evidence."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        self._select = SELECT

    @contextlib.contextmanager
    def _snapshot(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every query in it sees one state of the file, even while a writer appends."""
        if not self.path.is_file():
            raise AuditError(f"no audit log at {self.path}")
        try:
            conn = connect(self.path, read_only=True, busy_timeout_s=self.busy_timeout_s)
            try:
                conn.execute("BEGIN")
                if conn.execute("PRAGMA application_id").fetchone()[0] != APPLICATION_ID:
                    raise AuditError(f"{self.path} is not an audit log (some other SQLite file)")
                found = conn.execute("PRAGMA user_version").fetchone()[0]
                if not 1 <= found <= SCHEMA_VERSION:
                    raise AuditError(f"audit log {self.path} has schema version {found}; this appliance reads "
                                     f"versions 1 to {SCHEMA_VERSION}")
                # A read-only reader cannot migrate evidence: a version-1 file reads with NULL callers.
                self._select = SELECT if found == SCHEMA_VERSION else SELECT_V1
                yield conn
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {self.path}: {exc}") from exc

    def verify(self) -> VerifyResult:
        """Walk the chain from the first record; stop at the first broken one (see the module docstring)."""
        prev_seq, prev_hash, checked = 0, GENESIS_HASH, 0
        with self._snapshot() as conn:
            for raw in conn.execute(f"{self._select} ORDER BY seq"):  # streamed: a long log is never all in memory
                row = dict(zip(COLUMNS, raw, strict=True))
                reason = _break_reason(row, prev_seq, prev_hash)
                if reason is not None:
                    return VerifyResult(False, checked, row["seq"], row["request_id"], reason, prev_hash)
                prev_seq, prev_hash, checked = row["seq"], row["record_hash"], checked + 1
        return VerifyResult(True, checked, head_hash=prev_hash)

    def tail(self, n: int = 20) -> list[AuditEntry]:
        """The newest `n` records, oldest first."""
        with self._snapshot() as conn:
            rows = conn.execute(f"{self._select} ORDER BY seq DESC LIMIT ?", (max(n, 0),)).fetchall()
        return [_entry(row) for row in reversed(rows)]

    def get(self, seq: int) -> AuditEntry:
        with self._snapshot() as conn:
            row = conn.execute(f"{self._select} WHERE seq = ?", (seq,)).fetchone()
        if row is None:
            raise AuditError(f"audit log {self.path} has no record {seq}")
        return _entry(row)

    def by_request(self, request_id: str) -> list[AuditEntry]:
        """Every record of one request (one per policy it was classified against), in seq order."""
        with self._snapshot() as conn:
            rows = conn.execute(f"{self._select} WHERE request_id = ? ORDER BY seq", (request_id,)).fetchall()
        return [_entry(row) for row in rows]
