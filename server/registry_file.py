"""The policy registry's SQLite file: its schema and migrations, write-ahead logging, connections and transactions.

Durability: write-ahead log with `synchronous=FULL`, so a call that returned has reached the disk and survives a
crash or SIGKILL; each mutation is one `BEGIN IMMEDIATE` transaction, so a crash leaves it whole or absent. Every
call opens its own connection (sqlite3 connections may not cross threads), so one file object serves any number of
threads, and the busy timeout lets several processes share the file. Whatever SQLite raises leaves here as
`RegistryUnavailable` naming the file.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

from server.identity import DEFAULT_TENANT
from server.registry_errors import RegistryUnavailable
from server.sqlite_wal import enable_wal, make_private

DEFAULT_BUSY_TIMEOUT_S = 30.0

# One tuple of statements per schema version; MIGRATIONS[n] takes a database from user_version n to n + 1. The
# statements run one by one inside the migration's transaction (executescript would commit before running them).
_SCHEMA_V1 = (
    """CREATE TABLE policies (
        id TEXT PRIMARY KEY,
        created_at TEXT NOT NULL
    )""",
    """CREATE TABLE versions (
        policy_id TEXT NOT NULL REFERENCES policies(id),
        seq INTEGER NOT NULL CHECK (seq > 0),
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL UNIQUE CHECK (length(sha256) = 64),
        title TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (policy_id, seq),
        UNIQUE (policy_id, version)
    )""",
    # undo_to: the activation whose state a rollback of this one restores (NULL: nothing to roll back to).
    """CREATE TABLE activations (
        id INTEGER PRIMARY KEY,
        policy_id TEXT NOT NULL REFERENCES policies(id),
        version_seq INTEGER NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('activate', 'rollback')),
        actor TEXT NOT NULL,
        at TEXT NOT NULL,
        undo_to INTEGER REFERENCES activations(id),
        FOREIGN KEY (policy_id, version_seq) REFERENCES versions(policy_id, seq)
    )""",
    "CREATE INDEX activations_by_policy ON activations(policy_id, id)",
)
# Version 2: policies belong to a tenant. Every key gains the tenant, and a sha256 is unique per tenant (two tenants
# may hold the same text without either learning of the other). Policies stored before go to the default tenant.
# SQLite cannot change a table's keys in place: the old tables are renamed aside, copied and dropped, all in the
# migration's one transaction, so a crash leaves the file wholly at version 1 or wholly at version 2.
_TENANTS_V2 = (
    "DROP INDEX activations_by_policy",
    "ALTER TABLE activations RENAME TO activations_v1",
    "ALTER TABLE versions RENAME TO versions_v1",
    "ALTER TABLE policies RENAME TO policies_v1",
    """CREATE TABLE policies (
        tenant TEXT NOT NULL,
        id TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant, id)
    )""",
    """CREATE TABLE versions (
        tenant TEXT NOT NULL,
        policy_id TEXT NOT NULL,
        seq INTEGER NOT NULL CHECK (seq > 0),
        version TEXT NOT NULL,
        sha256 TEXT NOT NULL CHECK (length(sha256) = 64),
        title TEXT NOT NULL,
        text TEXT NOT NULL,
        created_at TEXT NOT NULL,
        PRIMARY KEY (tenant, policy_id, seq),
        UNIQUE (tenant, policy_id, version),
        UNIQUE (tenant, sha256),
        FOREIGN KEY (tenant, policy_id) REFERENCES policies(tenant, id)
    )""",
    """CREATE TABLE activations (
        id INTEGER PRIMARY KEY,
        tenant TEXT NOT NULL,
        policy_id TEXT NOT NULL,
        version_seq INTEGER NOT NULL,
        action TEXT NOT NULL CHECK (action IN ('activate', 'rollback')),
        actor TEXT NOT NULL,
        at TEXT NOT NULL,
        undo_to INTEGER REFERENCES activations(id),
        FOREIGN KEY (tenant, policy_id, version_seq) REFERENCES versions(tenant, policy_id, seq)
    )""",
    f"INSERT INTO policies (tenant, id, created_at) SELECT '{DEFAULT_TENANT}', id, created_at FROM policies_v1",
    f"""INSERT INTO versions (tenant, policy_id, seq, version, sha256, title, text, created_at)
        SELECT '{DEFAULT_TENANT}', policy_id, seq, version, sha256, title, text, created_at FROM versions_v1""",
    f"""INSERT INTO activations (id, tenant, policy_id, version_seq, action, actor, at, undo_to)
        SELECT id, '{DEFAULT_TENANT}', policy_id, version_seq, action, actor, at, undo_to FROM activations_v1
        ORDER BY id""",
    "DROP TABLE activations_v1",
    "DROP TABLE versions_v1",
    "DROP TABLE policies_v1",
    "CREATE INDEX activations_by_policy ON activations(tenant, policy_id, id)",
)
MIGRATIONS: tuple[tuple[str, ...], ...] = (_SCHEMA_V1, _TENANTS_V2)
SCHEMA_VERSION = len(MIGRATIONS)


class RegistryFile:
    """The SQLite file at `path`, switched to WAL and brought to SCHEMA_VERSION when opened."""

    def __init__(self, path: Path, busy_timeout_s: float):
        self.path = path
        self.busy_timeout_s = busy_timeout_s
        try:
            make_private(path)
        except OSError as exc:
            raise RegistryUnavailable(f"cannot create state directory {path.parent}: {exc.strerror or exc}"
                                      ) from None
        self._prepare()

    def read(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # A read transaction gives every query in it the same snapshot, even while another process writes.
        return self._transaction("DEFERRED")

    def write(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        # IMMEDIATE takes the write lock up front (waiting out the busy timeout); a deferred transaction that
        # upgrades from read to write in WAL mode fails at once with SQLITE_BUSY instead of waiting.
        return self._transaction("IMMEDIATE")

    def _connect(self) -> sqlite3.Connection:
        # isolation_level=None: the module must not open transactions behind our back; we BEGIN ourselves.
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA foreign_keys = ON")
            conn.execute("PRAGMA synchronous = FULL")
        except BaseException:
            conn.close()
            raise
        return conn

    @contextlib.contextmanager
    def _transaction(self, mode: Literal["DEFERRED", "IMMEDIATE"]) -> Iterator[sqlite3.Connection]:
        """One transaction on a fresh connection."""
        try:
            conn = self._connect()
            try:
                conn.execute(f"BEGIN {mode}")
                try:
                    yield conn
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"policy registry {self.path}: {exc}") from exc

    def _prepare(self) -> None:
        """Switch to WAL (a persistent setting of the file) and bring the schema to SCHEMA_VERSION."""
        try:
            conn = self._connect()
            try:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    self._enable_wal(conn)
                found = conn.execute("PRAGMA user_version").fetchone()[0]
            finally:
                conn.close()
        except sqlite3.Error as exc:
            raise RegistryUnavailable(f"policy registry {self.path}: {exc}") from exc
        if found != SCHEMA_VERSION:
            self._migrate()

    def _enable_wal(self, conn: sqlite3.Connection) -> None:
        mode = enable_wal(conn, self.busy_timeout_s)
        if mode != "wal":
            raise RegistryUnavailable(f"policy registry {self.path}: cannot use write-ahead logging (journal mode "
                                      f"stays {mode!r}); put the state directory on a local filesystem")

    def _migrate(self) -> None:
        with self.write() as conn:
            # Re-read under the write lock: another process may have migrated since we looked.
            found = conn.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise RegistryUnavailable(f"policy registry {self.path} has schema version {found}, newer than this "
                                          f"appliance understands ({SCHEMA_VERSION}); upgrade the appliance")
            for migration in MIGRATIONS[found:]:
                for statement in migration:
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
