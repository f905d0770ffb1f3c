"""The audit log: every decision the appliance makes, appended to SQLite and chained by hash.

One row per (request, policy) decision: when, which policy version (id, label, sha256), which model (fingerprint),
the verdict (violation, category, rule ids, confidence, parse status), the rationale when configured, the sha256 of
the classified content (the content itself only when configured), token usage and latency.

Each record is chained to the one before it by hash: `server/audit_file.py` defines the hash and the file,
`server/audit_reader.py` reads the log back and verifies the chain; this module writes.

Durability: WAL with `synchronous=FULL`: a decision whose append has returned is on disk and survives a power
cut, which is what a compliance record needs (NORMAL would lose the last acknowledged decisions on power loss).
The fsync is paid by one writer thread, off the event loop: `submit` queues a record and returns a future,
`append_async` awaits it, `append` blocks on it. The writer commits whatever has queued meanwhile in one
`BEGIN IMMEDIATE` transaction (group commit), so under load many decisions share one fsync. Each transaction reads
the chain head inside its write lock, so several processes may append to one file and a reopened log continues
its chain. Records are validated when submitted, so one bad record cannot fail the others in its group.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import queue
import sqlite3
import threading
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.audit_file import (
    APPLICATION_ID,
    COLUMNS,
    DEFAULT_BUSY_TIMEOUT_S,
    GENESIS_HASH,
    SCHEMA_VERSION,
    AuditError,
    connect,
    migrate,
    record_hash,
)
from server.audit_reader import AuditEntry, AuditReader, VerifyResult
from server.identity import ANONYMOUS, DEFAULT_TENANT
from server.sqlite_wal import enable_wal

# Most records one transaction commits; bounds the time a single group holds the write lock.
MAX_GROUP = 512
# Records queued but not yet committed; past this `submit` refuses rather than let memory grow without bound
# while the disk stalls (the caller can fail the request: a decision must not go unaudited).
DEFAULT_MAX_PENDING = 10_000

_INSERT = f"INSERT INTO records ({', '.join(COLUMNS)}) VALUES ({', '.join(':' + c for c in COLUMNS)})"
_TEXT_FIELDS = ("ts", "request_id", "policy_id", "policy_version", "policy_sha256", "model_fingerprint",
                "parse_status", "tenant", "principal")
_OPTIONAL_TEXT_FIELDS = ("category", "confidence", "rationale")
_TOKEN_FIELDS = ("prompt_tokens", "cached_tokens", "reasoning_tokens", "output_tokens")


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class AuditRecord:
    """One decision as the front end hands it over. `content` is the text the model classified (the user message
    as rendered); the log keeps its sha256 always and the text itself only when configured."""

    request_id: str
    policy_id: str
    policy_version: str
    policy_sha256: str
    model_fingerprint: str
    violation: bool | None
    parse_status: str
    content: str
    category: str | None = None
    rule_ids: tuple[str, ...] = ()
    confidence: str | None = None
    rationale: str | None = None
    prompt_tokens: int = 0
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    output_tokens: int = 0
    latency_ms: float = 0.0
    ts: str = field(default_factory=utc_now)  # when the decision was made, not when the writer got to it
    tenant: str = DEFAULT_TENANT  # whose policy decided
    principal: str = ANONYMOUS.principal  # who asked: "key:<id>", "cert:<subject>" or "anonymous"


def _problems(record: AuditRecord) -> list[str]:
    problems = [f"{name} must be a string" for name in _TEXT_FIELDS if not isinstance(getattr(record, name), str)]
    problems += [f"{name} must be a string or None" for name in _OPTIONAL_TEXT_FIELDS
                 if not isinstance(getattr(record, name), str | None)]
    problems += [f"{name} must be a non-negative integer" for name in _TOKEN_FIELDS
                 if type(getattr(record, name)) is not int or getattr(record, name) < 0]
    if not record.request_id:
        problems.append("request_id is empty")
    if not isinstance(record.content, str):
        problems.append("content must be a string")
    if not isinstance(record.violation, bool | None):
        problems.append("violation must be True, False or None")
    if isinstance(record.rule_ids, str) or not all(isinstance(r, str) for r in record.rule_ids):
        problems.append("rule_ids must be a sequence of strings")
    latency = record.latency_ms
    if isinstance(latency, bool) or not isinstance(latency, int | float) or not math.isfinite(latency) or latency < 0:
        problems.append("latency_ms must be a finite number >= 0")
    return problems


def _row(record: AuditRecord, *, store_rationale: bool, store_content: bool) -> dict[str, Any]:
    """The stored columns of a record, less seq and the two hashes; raises AuditError naming every bad field."""
    problems = _problems(record)
    if problems:
        raise AuditError([f"audit record for request {record.request_id!r}: {p}" for p in problems])
    try:
        content_sha256 = hashlib.sha256(record.content.encode("utf-8")).hexdigest()
        for text in (*(getattr(record, name) for name in _TEXT_FIELDS + _OPTIONAL_TEXT_FIELDS), *record.rule_ids):
            if text is not None:
                text.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates: SQLite could not store them, nor sha256 hash them
        raise AuditError(f"audit record for request {record.request_id!r}: text is not valid Unicode ({exc.reason})"
                         ) from None
    return {
        "ts": record.ts, "request_id": record.request_id, "policy_id": record.policy_id,
        "policy_version": record.policy_version, "policy_sha256": record.policy_sha256,
        "model_fingerprint": record.model_fingerprint,
        "violation": None if record.violation is None else int(record.violation),
        "category": record.category, "rule_ids": json.dumps(list(record.rule_ids), separators=(",", ":")),
        "confidence": record.confidence, "parse_status": record.parse_status,
        "rationale": record.rationale if store_rationale else None,
        "content_sha256": content_sha256, "content": record.content if store_content else None,
        "prompt_tokens": record.prompt_tokens, "cached_tokens": record.cached_tokens,
        "reasoning_tokens": record.reasoning_tokens, "output_tokens": record.output_tokens,
        "latency_ms": float(record.latency_ms), "tenant": record.tenant, "principal": record.principal,
    }


@dataclass(frozen=True)
class _Pending:
    row: dict[str, Any]
    future: Future[int]


_STOP = object()


class AuditLog:
    """Appends decisions to the audit log at `path`, creating or migrating the file on open.

    Thread-safe, and safe to call from an event loop (`submit` and `append_async` never wait on the disk).
    Close it (or use it as a context manager) to flush: records still queued are committed before `close` returns.
    A record whose awaiting task is cancelled is still written: the decision was made either way.
    """

    def __init__(self, path: str | Path, *, store_rationale: bool, store_content: bool,
                 max_pending: int = DEFAULT_MAX_PENDING, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self.path = Path(path)
        self.store_rationale = store_rationale
        self.store_content = store_content
        self.busy_timeout_s = busy_timeout_s
        if max_pending < 1:  # queue.Queue would read 0 as "unbounded"
            raise AuditError(f"audit log {self.path}: max_pending must be at least 1 (got {max_pending})")
        self._prepare()
        self._queue: queue.Queue[_Pending | object] = queue.Queue(maxsize=max_pending)
        self._lock = threading.Lock()
        self._closed = False
        # A daemon so a process that forgets close() can still exit; what it never acknowledged is all it loses.
        self._writer = threading.Thread(target=self._run, name=f"audit-writer:{self.path.name}", daemon=True)
        self._writer.start()

    # -- appending ----------------------------------------------------------------------------------------------

    def submit(self, record: AuditRecord) -> Future[int]:
        """Queue a record; the future gives its seq once it is durable, or the AuditError that stopped it."""
        pending = _Pending(_row(record, store_rationale=self.store_rationale, store_content=self.store_content),
                           Future())
        with self._lock:  # so no record can land behind the stop marker that close() queues
            if self._closed:
                raise AuditError(f"audit log {self.path} is closed")
            try:
                self._queue.put_nowait(pending)
            except queue.Full:
                raise AuditError(f"audit log {self.path}: {self._queue.maxsize} records are waiting for the disk; "
                                 "refusing more until it catches up") from None
        return pending.future

    def append(self, record: AuditRecord) -> int:
        """Append and wait until the record is on disk; its seq."""
        return self.submit(record).result()

    async def append_async(self, record: AuditRecord) -> int:
        """Append without blocking the event loop; its seq once the record is on disk."""
        return await asyncio.wrap_future(self.submit(record))

    def close(self) -> None:
        """Commit everything queued, then stop the writer. Idempotent."""
        with self._lock:
            if not self._closed:
                self._closed = True
                self._queue.put(_STOP)
        self._writer.join()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- reading ------------------------------------------------------------------------------------------------

    def verify(self) -> VerifyResult:
        return AuditReader(self.path, busy_timeout_s=self.busy_timeout_s).verify()

    def tail(self, n: int = 20) -> list[AuditEntry]:
        return AuditReader(self.path, busy_timeout_s=self.busy_timeout_s).tail(n)

    # -- the writer thread --------------------------------------------------------------------------------------

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        stop = False
        while not stop:
            group, stop = self._next_group()
            if group:
                conn = self._commit(conn, group)
        if conn is not None:
            conn.close()

    def _next_group(self) -> tuple[list[_Pending], bool]:
        """Wait for one record, then take whatever else queued meanwhile (up to MAX_GROUP); True at the stop mark."""
        item = self._queue.get()
        group: list[_Pending] = []
        while isinstance(item, _Pending):
            group.append(item)
            if len(group) >= MAX_GROUP:
                return group, False
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return group, False
        return group, True

    def _commit(self, conn: sqlite3.Connection | None, group: list[_Pending]) -> sqlite3.Connection | None:
        """Write one group in one transaction and settle its futures; returns the connection to reuse (None after
        a failure, so the next group reconnects)."""
        # Once running a future cannot be cancelled; one already cancelled still gets its record written.
        live = [p.future.set_running_or_notify_cancel() for p in group]
        try:
            conn = conn or connect(self.path, read_only=False, busy_timeout_s=self.busy_timeout_s)
            seqs = _insert(conn, [p.row for p in group])
        except Exception as exc:  # the writer must outlive any one failure; its callers get the error instead
            error = AuditError(f"audit log {self.path}: {exc}")
            for pending, waiting in zip(group, live, strict=True):
                if waiting:
                    pending.future.set_exception(error)
            if conn is not None:
                conn.close()
            return None
        for pending, waiting, seq in zip(group, live, seqs, strict=True):
            if waiting:
                pending.future.set_result(seq)
        return conn

    # -- opening ------------------------------------------------------------------------------------------------

    def _prepare(self) -> None:
        """Create the file if needed, switch it to WAL (a persistent setting) and bring the schema up to date."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise AuditError(f"cannot create directory {self.path.parent}: {exc.strerror or exc}") from None
        try:
            conn = connect(self.path, read_only=False, busy_timeout_s=self.busy_timeout_s)
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._enable_wal(conn)
                current = (conn.execute("PRAGMA application_id").fetchone()[0],
                           conn.execute("PRAGMA user_version").fetchone()[0])
                if current != (APPLICATION_ID, SCHEMA_VERSION):  # only then wait for the write lock
                    migrate(conn, self.path)
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise AuditError(f"audit log {self.path}: {exc}") from exc

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        mode = enable_wal(conn, self.busy_timeout_s)
        if mode != "wal":
            raise AuditError(f"audit log {self.path}: cannot use write-ahead logging (journal mode stays {mode!r}); "
                             "put it on a local filesystem")


def _insert(conn: sqlite3.Connection, rows: Sequence[dict[str, Any]]) -> list[int]:
    """Chain rows onto the stored head and insert them in one transaction; their seqs, in order."""
    conn.execute("BEGIN IMMEDIATE")  # the head is read under the write lock, so other writers cannot fork the chain
    try:
        head = conn.execute("SELECT seq, record_hash FROM records ORDER BY seq DESC LIMIT 1").fetchone()
        seq, prev = head or (0, GENESIS_HASH)
        chained = []
        for row in rows:
            seq += 1
            full = {**row, "seq": seq, "prev_hash": prev}
            prev = full["record_hash"] = record_hash(full)
            chained.append(full)
        conn.executemany(_INSERT, chained)
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    return [row["seq"] for row in chained]
