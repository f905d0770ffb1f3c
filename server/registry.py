"""The policy registry: every policy version ever added, which one is active, and who switched it when.

State lives in one SQLite file, `<state_dir>/policies.sqlite3`, shared by every appliance process on the host (the
CLI, the front ends). A version is immutable and named by the sha256 of its normalised text (`Policy.sha256`), so
adding the same words twice is a no-op and a version label can never quietly change meaning. Activations are an
append-only log: the active version of a policy is the one its latest activation names, and `rollback` undoes
activations one at a time, like an undo stack.

The file itself (schema, WAL, transactions) is `server/registry_file.py`; what the registry refuses, by kind, is
`server/registry_errors.py`.
"""

from __future__ import annotations

import contextlib
import difflib
import getpass
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

from classification.errors import ApplianceError
from classification.policy import Policy, PolicyError, normalise, parse_policy
from server.identity import DEFAULT_TENANT
from server.registry_errors import (
    NoActiveVersion,
    NothingToRollBack,
    PolicyNotFound,
    PolicyRejected,
    RegistryDamaged,
    RegistryError,
    VersionConflict,
    VersionNotFound,
)
from server.registry_file import DEFAULT_BUSY_TIMEOUT_S, RegistryFile

DB_NAME = "policies.sqlite3"
MIN_SHA_PREFIX = 8
# How many versions an error message names before it summarises the rest.
_LISTED_IN_ERRORS = 10
_HEX = re.compile(r"^[0-9a-f]+$")

_VERSION_COLUMNS = "policy_id, seq, version, sha256, title, created_at"


@dataclass(frozen=True)
class VersionInfo:
    """One stored, immutable policy version (its text is fetched with `Registry.get`)."""

    policy_id: str
    seq: int  # 1, 2, 3... per policy, in the order versions were added
    version: str  # the label from the front matter
    sha256: str
    title: str
    created_at: str  # ISO 8601 UTC with milliseconds, as `_now` writes it

    @property
    def short_sha(self) -> str:
        return self.sha256[:12]

    @property
    def created_unix_ms(self) -> int:
        return int(datetime.fromisoformat(self.created_at.replace("Z", "+00:00")).timestamp() * 1000)


@dataclass(frozen=True)
class StoredPolicy:
    info: VersionInfo
    policy: Policy
    active: bool


@dataclass(frozen=True)
class AddResult:
    info: VersionInfo
    created: bool  # False: this exact text was already stored, nothing changed
    activated: bool  # True: this call made it the active version


@dataclass(frozen=True)
class ActivationResult:
    active: VersionInfo
    previous: VersionInfo | None
    changed: bool  # False: it was already the active version


@dataclass(frozen=True)
class ActivationEvent:
    id: int
    policy_id: str
    action: Literal["activate", "rollback"]
    version: str
    sha256: str
    actor: str
    at: str


@dataclass(frozen=True)
class PolicyHistory:
    policy_id: str
    versions: list[VersionInfo]  # oldest first
    activations: list[ActivationEvent]  # oldest first
    active: VersionInfo | None


@dataclass(frozen=True)
class PolicySummary:
    policy_id: str
    version_count: int
    latest: VersionInfo
    active: VersionInfo | None


@dataclass(frozen=True)
class ImportOutcome:
    path: Path
    status: Literal["added", "unchanged", "skipped", "failed"]
    info: VersionInfo | None = None
    activated: bool = False
    message: str = ""


@dataclass(frozen=True)
class _Event:
    id: int
    version_seq: int
    undo_to: int | None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def default_actor() -> str:
    """The login name recorded with an activation; containers often run as a uid with no passwd entry."""
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def _info(row: sqlite3.Row) -> VersionInfo:
    return VersionInfo(row["policy_id"], row["seq"], row["version"], row["sha256"], row["title"], row["created_at"])


class _Conn:
    """A connection seen through one tenant: every query below is confined to the tenant's rows, so nothing one
    tenant asks can name, list or count another's policies."""

    def __init__(self, conn: sqlite3.Connection, tenant: str):
        self.conn = conn
        self.tenant = tenant

    def execute(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Cursor:
        # Every statement's first parameter is the tenant: `tenant = ?` leads each WHERE and each VALUES.
        return self.conn.execute(sql, (self.tenant, *params))


def _versions(conn: _Conn, policy_id: str) -> list[VersionInfo]:
    rows = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE tenant = ? AND policy_id = ? ORDER BY seq",
                        (policy_id,))
    return [_info(row) for row in rows]


def _version_where(conn: _Conn, where: str, params: tuple[object, ...]) -> VersionInfo | None:
    row = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE tenant = ? AND {where}", params).fetchone()
    return None if row is None else _info(row)


def _known_policies(conn: _Conn) -> list[str]:
    return [row[0] for row in conn.execute("SELECT id FROM policies WHERE tenant = ? ORDER BY id")]


def _require_policy(conn: _Conn, policy_id: str) -> None:
    if conn.execute("SELECT 1 FROM policies WHERE tenant = ? AND id = ?", (policy_id,)).fetchone():
        return
    known = _known_policies(conn)
    if not known:
        raise PolicyNotFound(f"unknown policy {policy_id!r}: no policies are registered yet")
    raise PolicyNotFound(f"unknown policy {policy_id!r}; known policies: {', '.join(known)}")


def _describe(versions: list[VersionInfo]) -> str:
    shown = [f"{v.version} (sha {v.sha256[:MIN_SHA_PREFIX]})" for v in versions[-_LISTED_IN_ERRORS:]]
    hidden = len(versions) - len(shown)
    return (f"{hidden} older, " if hidden else "") + ", ".join(shown)


def _resolve(conn: _Conn, policy_id: str, ref: str) -> VersionInfo:
    """A version by label, else by full sha256 or a unique prefix of at least MIN_SHA_PREFIX hex digits."""
    _require_policy(conn, policy_id)
    found = _version_where(conn, "policy_id = ? AND version = ?", (policy_id, ref))
    if found is not None:
        return found
    prefix = ref.lower()
    if _HEX.match(prefix) and len(prefix) >= MIN_SHA_PREFIX:
        rows = conn.execute(f"SELECT {_VERSION_COLUMNS} FROM versions WHERE tenant = ? AND policy_id = ?"
                            " AND substr(sha256, 1, ?) = ?"
                            " ORDER BY seq", (policy_id, len(prefix), prefix)).fetchall()
        if len(rows) == 1:
            return _info(rows[0])
        if rows:
            raise VersionNotFound(f"sha prefix {ref} is ambiguous for policy {policy_id}: it matches "
                                  f"{_describe([_info(r) for r in rows])}; give more characters")
    raise VersionNotFound(f"policy {policy_id} has no version {ref!r}; versions: "
                          f"{_describe(_versions(conn, policy_id))} (name one by label, full sha256 or a sha prefix "
                          f"of at least {MIN_SHA_PREFIX} characters)")


def _latest_event(conn: _Conn, policy_id: str) -> _Event | None:
    row = conn.execute("SELECT id, version_seq, undo_to FROM activations WHERE tenant = ? AND policy_id = ?"
                       " ORDER BY id DESC LIMIT 1", (policy_id,)).fetchone()
    return None if row is None else _Event(row["id"], row["version_seq"], row["undo_to"])


def _event(conn: _Conn, event_id: int) -> _Event:
    row = conn.execute("SELECT id, version_seq, undo_to FROM activations WHERE tenant = ? AND id = ?",
                       (event_id,)).fetchone()
    return _Event(row["id"], row["version_seq"], row["undo_to"])


def _by_seq(conn: _Conn, policy_id: str, seq: int) -> VersionInfo:
    found = _version_where(conn, "policy_id = ? AND seq = ?", (policy_id, seq))
    if found is None:  # the foreign key makes this unreachable unless the file was edited by hand
        raise RegistryDamaged(f"policy {policy_id}: activation names missing version #{seq}; "
                              "the file was changed outside the appliance (`appliance policy check` lists the damage)")
    return found


def _active(conn: _Conn, policy_id: str) -> VersionInfo | None:
    event = _latest_event(conn, policy_id)
    return None if event is None else _by_seq(conn, policy_id, event.version_seq)


def _record_activation(conn: _Conn, target: VersionInfo, action: str, actor: str | None,
                       undo_to: int | None) -> None:
    conn.execute("INSERT INTO activations (tenant, policy_id, version_seq, action, actor, at, undo_to)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?)",
                 (target.policy_id, target.seq, action, actor or default_actor(), _now(), undo_to))


def _activate(conn: _Conn, target: VersionInfo, actor: str | None) -> ActivationResult:
    current = _latest_event(conn, target.policy_id)
    previous = None if current is None else _by_seq(conn, target.policy_id, current.version_seq)
    if previous is not None and previous.seq == target.seq:
        return ActivationResult(target, previous, changed=False)
    _record_activation(conn, target, "activate", actor, None if current is None else current.id)
    return ActivationResult(target, previous, changed=True)


def _summary(conn: _Conn, policy_id: str) -> PolicySummary:
    versions = _versions(conn, policy_id)
    return PolicySummary(policy_id, len(versions), versions[-1], _active(conn, policy_id))


def _insert_version(conn: _Conn, policy: Policy) -> VersionInfo:
    clash = _version_where(conn, "policy_id = ? AND version = ?", (policy.id, policy.version))
    if clash is not None:
        raise VersionConflict(f"policy {policy.id} version {policy.version} already exists with different "
                              f"content (stored sha {clash.short_sha}, this text sha {policy.sha256[:12]}); "
                              "bump the version label")
    now = _now()
    conn.execute("INSERT OR IGNORE INTO policies (tenant, id, created_at) VALUES (?, ?, ?)", (policy.id, now))
    # Safe under concurrency: BEGIN IMMEDIATE holds the write lock from before this read until commit.
    seq = conn.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM versions WHERE tenant = ? AND policy_id = ?",
                       (policy.id,)).fetchone()[0]
    conn.execute("INSERT INTO versions (tenant, policy_id, seq, version, sha256, title, text, created_at)"
                 " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (policy.id, seq, policy.version, policy.sha256, policy.title, policy.text, now))
    return VersionInfo(policy.id, seq, policy.version, policy.sha256, policy.title, now)


def _store(conn: _Conn, policy: Policy) -> tuple[VersionInfo, bool]:
    """The stored version with this text, inserting it if new; True when it was inserted."""
    existing = _version_where(conn, "sha256 = ?", (policy.sha256,))
    return (existing, False) if existing is not None else (_insert_version(conn, policy), True)


def _stored_text_problem(row: sqlite3.Row) -> str | None:
    tenant = "" if row["tenant"] == DEFAULT_TENANT else f"tenant {row['tenant']} "
    where = f"{tenant}policy {row['policy_id']} version {row['version']}"
    try:
        policy = parse_policy(row["text"], source=where)
    except PolicyError as exc:
        return f"{where}: stored text no longer parses ({'; '.join(exc.problems)})"
    return None if policy.sha256 == row["sha256"] else f"{where}: stored text does not match its sha256"


def _check_consistent(policy: Policy) -> None:
    """Refuse a Policy whose fields disagree with its text: the text is what is stored and served back."""
    try:
        consistent = parse_policy(policy.text, source=policy.id) == policy
    except PolicyError:
        consistent = False
    if not consistent:
        raise PolicyRejected(f"policy {policy.id}: its fields do not match its text; build it with "
                             "classification.policy.parse_policy or load_policy")


class Registry:
    """The policy registry in `<state_dir>/policies.sqlite3`, created (or migrated) on first use."""

    def __init__(self, state_dir: str | Path, *, busy_timeout_s: float = DEFAULT_BUSY_TIMEOUT_S):
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / DB_NAME
        self._file = RegistryFile(self.path, busy_timeout_s)

    @contextlib.contextmanager
    def _write(self, tenant: str) -> Iterator[_Conn]:
        with self._file.write() as conn:
            yield _Conn(conn, tenant)

    @contextlib.contextmanager
    def _read(self, tenant: str) -> Iterator[_Conn]:
        with self._file.read() as conn:
            yield _Conn(conn, tenant)

    # -- changes ------------------------------------------------------------------------------------------------

    def add(self, policy: Policy, *, activate: bool = False, actor: str | None = None,
            tenant: str = DEFAULT_TENANT) -> AddResult:
        """Store a version (idempotent on its sha256); with `activate`, also make it the active one."""
        _check_consistent(policy)
        with self._write(tenant) as conn:
            info, created = _store(conn, policy)
            activated = activate and _activate(conn, info, actor).changed
        return AddResult(info, created, activated)

    def activate(self, policy_id: str, ref: str, *, actor: str | None = None,
                 tenant: str = DEFAULT_TENANT) -> ActivationResult:
        """Make a version (label, sha256 or sha prefix) the active one; a no-op if it already is."""
        with self._write(tenant) as conn:
            return _activate(conn, _resolve(conn, policy_id, ref), actor)

    def rollback(self, policy_id: str, *, actor: str | None = None,
                 tenant: str = DEFAULT_TENANT) -> ActivationResult:
        """Undo the latest activation (or rollback) still in effect, restoring the version active before it."""
        with self._write(tenant) as conn:
            _require_policy(conn, policy_id)
            current = _latest_event(conn, policy_id)
            if current is None:
                raise NothingToRollBack(f"policy {policy_id} has never been activated; nothing to roll back")
            previous = _by_seq(conn, policy_id, current.version_seq)
            if current.undo_to is None:
                raise NothingToRollBack(f"policy {policy_id}: nothing to roll back to; version {previous.version} "
                                        f"(sha {previous.short_sha}) is active and no earlier activation remains")
            restored = _event(conn, current.undo_to)
            target = _by_seq(conn, policy_id, restored.version_seq)
            # The new event inherits the restored one's undo pointer, so the next rollback steps further back.
            _record_activation(conn, target, "rollback", actor, restored.undo_to)
        return ActivationResult(target, previous, changed=True)

    def import_dir(self, directory: str | Path, *, actor: str | None = None,
                   tenant: str = DEFAULT_TENANT) -> list[ImportOutcome]:
        """Add every `*.md` policy file in a directory (files without front matter, like a README, are skipped);
        a policy that has no active version yet gets the imported one activated. One outcome per file."""
        directory = Path(directory)
        if not directory.is_dir():
            raise RegistryError(f"{directory} is not a directory")
        return [self._import_file(path, actor, tenant) for path in sorted(directory.glob("*.md")) if path.is_file()]

    def _import_file(self, path: Path, actor: str | None, tenant: str) -> ImportOutcome:
        try:
            text = normalise(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as exc:
            return ImportOutcome(path, "failed", message=f"cannot read: {exc}")
        if not text.startswith("+++\n"):
            return ImportOutcome(path, "skipped", message="no '+++' front matter; not a policy")
        try:
            policy = parse_policy(text, source=path.name)
            with self._write(tenant) as conn:
                info, created = _store(conn, policy)
                activated = _latest_event(conn, policy.id) is None and _activate(conn, info, actor).changed
        except ApplianceError as exc:
            return ImportOutcome(path, "failed", message="; ".join(exc.problems))
        return ImportOutcome(path, "added" if created else "unchanged", info, activated)

    # -- queries ------------------------------------------------------------------------------------------------

    def get(self, policy_id: str, ref: str | None = None, *, tenant: str = DEFAULT_TENANT) -> StoredPolicy:
        """The active version of a policy, or the version `ref` names, parsed back from its stored text."""
        with self._read(tenant) as conn:
            _require_policy(conn, policy_id)
            active = _active(conn, policy_id)
            if ref is not None:
                info = _resolve(conn, policy_id, ref)
            elif active is not None:
                info = active
            else:
                raise NoActiveVersion(f"policy {policy_id} has no active version; activate one of: "
                                      f"{_describe(_versions(conn, policy_id))}")
            text = conn.execute("SELECT text FROM versions WHERE tenant = ? AND sha256 = ?",
                                (info.sha256,)).fetchone()[0]
        return StoredPolicy(info, parse_policy(text, source=f"{policy_id}@{info.version}"),
                            active=active is not None and active.seq == info.seq)

    def history(self, policy_id: str, *, tenant: str = DEFAULT_TENANT) -> PolicyHistory:
        """All versions of a policy and every activation and rollback, oldest first."""
        with self._read(tenant) as conn:
            _require_policy(conn, policy_id)
            rows = conn.execute("SELECT a.id, a.action, v.version, v.sha256, a.actor, a.at FROM activations a"
                                " JOIN versions v ON v.tenant = a.tenant AND v.policy_id = a.policy_id"
                                " AND v.seq = a.version_seq WHERE a.tenant = ? AND a.policy_id = ? ORDER BY a.id",
                                (policy_id,)).fetchall()
            events = [ActivationEvent(r["id"], policy_id, r["action"], r["version"], r["sha256"], r["actor"], r["at"])
                      for r in rows]
            return PolicyHistory(policy_id, _versions(conn, policy_id), events, _active(conn, policy_id))

    def diff(self, policy_id: str, a: str, b: str, *, tenant: str = DEFAULT_TENANT) -> str:
        """A unified diff from version `a` to version `b` of a policy's file text; empty when they are equal."""
        old, new = self.get(policy_id, a, tenant=tenant), self.get(policy_id, b, tenant=tenant)
        lines = difflib.unified_diff(old.policy.text.splitlines(keepends=True),
                                     new.policy.text.splitlines(keepends=True),
                                     fromfile=f"{policy_id}@{old.info.version} ({old.info.short_sha})",
                                     tofile=f"{policy_id}@{new.info.version} ({new.info.short_sha})")
        return "".join(lines)

    def check(self) -> list[str]:
        """Problems found in the file (SQLite's integrity and foreign-key checks, stored text against its sha256);
        an empty list means the registry is sound."""
        with self._file.read() as conn:
            problems = [row[0] for row in conn.execute("PRAGMA integrity_check") if row[0] != "ok"]
            problems += [f"foreign key violation in {row[0]} row {row[1]} (refers to {row[2]})"
                         for row in conn.execute("PRAGMA foreign_key_check")]
            rows = conn.execute("SELECT tenant, policy_id, version, sha256, text FROM versions").fetchall()
        return problems + [problem for row in rows if (problem := _stored_text_problem(row))]

    def tenants(self) -> list[str]:
        """Every tenant that holds a policy (the server warms each one's active versions)."""
        with self._file.read() as conn:
            return [row[0] for row in conn.execute("SELECT DISTINCT tenant FROM policies ORDER BY tenant")]

    # Last in the class on purpose: below this name, `list` in annotations would mean the method, not the builtin.
    def list(self, *, tenant: str = DEFAULT_TENANT) -> list[PolicySummary]:
        """Every policy of a tenant, by id, with its active version (None when none was ever activated)."""
        with self._read(tenant) as conn:
            return [_summary(conn, policy_id) for policy_id in _known_policies(conn)]
