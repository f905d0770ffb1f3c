"""API keys: who may call the front end, for which tenant, with which scopes.

Keys live in `<state_dir>/keys.sqlite3`, shared by `appliance keys` (which creates and revokes them) and every front
end (which reads them). A key is `sgk_<id>_<secret>`: the id names the row, so a presented key is checked against one
stored hash, never by scanning; the secret (32 random bytes) is shown once, at creation, and stored only as a salted
scrypt hash (per-key random salt), compared in constant time.

`KeyAuthenticator` reads the key from `authorization: Bearer <key>` or `x-api-key` metadata. It re-reads the table
every `refresh_s` seconds, so a key revoked from the CLI stops working within that time without a restart. scrypt is
deliberately slow (tens of milliseconds), so a verified key is remembered by the sha256 of what was presented; a
refresh drops every remembered key that is no longer live.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import secrets
import sqlite3
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from classification.errors import ApplianceError
from server.errors import Unauthenticated, Unavailable
from server.identity import SCOPES, Identity
from server.sqlite_wal import enable_wal, make_private

KEYS_DB_NAME = "keys.sqlite3"
KEY_PREFIX = "sgk_"
DEFAULT_REFRESH_S = 5.0
SEND_KEY_HINT = "send an API key as 'authorization: Bearer sgk_...' (or 'x-api-key') metadata"
# scrypt cost: 16 MiB and about 40 ms per verification; the secrets are random, so this guards a stolen file only.
_SCRYPT = {"n": 2 ** 14, "r": 8, "p": 1, "dklen": 32}
_ID_BYTES = 6
_KEY_SHAPE = re.compile(r"^sgk_([0-9a-f]{12})_([A-Za-z0-9_-]{20,128})$")
_TENANT_SHAPE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")  # as server/client_certs.py accepts
# Tokens that failed verification, remembered so a client retrying a wrong key does not cost scrypt every time.
_FAILED_REMEMBERED = 1024
_SCHEMA = """CREATE TABLE IF NOT EXISTS keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    tenant TEXT NOT NULL,
    scopes TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    created_at TEXT NOT NULL,
    revoked_at TEXT
)"""


class KeyStoreError(ApplianceError):
    """A key request that cannot be carried out (bad tenant or scope, unknown id, unreadable file)."""


@dataclass(frozen=True)
class KeyInfo:
    """What may be shown about a key: never its secret nor its hash."""

    key_id: str
    name: str
    tenant: str
    scopes: tuple[str, ...]
    created_at: str
    revoked_at: str | None

    @property
    def identity(self) -> Identity:
        return Identity(f"key:{self.key_id}", self.tenant, frozenset(self.scopes))


@dataclass(frozen=True)
class NewKey:
    info: KeyInfo
    secret: str  # the whole key, `sgk_<id>_<secret>`: shown once, stored nowhere


@dataclass(frozen=True)
class _Stored:
    info: KeyInfo
    salt: bytes
    hash: bytes


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _hash(secret: str, salt: bytes) -> bytes:
    return hashlib.scrypt(secret.encode(), salt=salt, maxmem=64 * 1024 * 1024, **_SCRYPT)


def check_tenant(tenant: str) -> str:
    if not _TENANT_SHAPE.match(tenant):
        raise KeyStoreError(f"tenant {tenant!r} is not a valid name: 1 to 64 letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit")
    return tenant


def check_scopes(scopes: Sequence[str]) -> tuple[str, ...]:
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise KeyStoreError(f"unknown scope{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))}; "
                        f"scopes are {', '.join(SCOPES)}")
    if not scopes:
        raise KeyStoreError(f"give at least one scope ({', '.join(SCOPES)})")
    return tuple(dict.fromkeys(scopes))


class KeyStore:
    """The key table in `path`, created on first use."""

    def __init__(self, path: str | Path, *, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.busy_timeout_s = busy_timeout_s
        try:
            make_private(self.path)  # secrets' hashes: the service user's alone
            with self._connect() as conn:
                if conn.execute("PRAGMA journal_mode").fetchone()[0] != "wal":
                    enable_wal(conn, busy_timeout_s)
                conn.execute(_SCHEMA)
        except (OSError, sqlite3.Error) as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from None

    @contextlib.contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(self.path, timeout=self.busy_timeout_s, isolation_level=None)
        try:
            conn.execute("PRAGMA synchronous = FULL")
            yield conn
        finally:
            conn.close()

    def _query(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple]:
        try:
            with self._connect() as conn:
                return conn.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise KeyStoreError(f"key store {self.path}: {exc}") from None

    def create(self, tenant: str, scopes: Sequence[str], name: str = "") -> NewKey:
        """A new key; its secret is in the result and nowhere else."""
        info = KeyInfo(secrets.token_hex(_ID_BYTES), name, check_tenant(tenant), check_scopes(scopes), _now(), None)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        self._query("INSERT INTO keys (id, name, tenant, scopes, salt, hash, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (info.key_id, name, info.tenant, " ".join(info.scopes), salt, _hash(secret, salt),
                     info.created_at))
        return NewKey(info, f"{KEY_PREFIX}{info.key_id}_{secret}")

    def revoke(self, key_id: str) -> KeyInfo:
        found = self.get(key_id)
        if found.revoked_at is None:
            self._query("UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL", (_now(), key_id))
        return self.get(key_id)

    def get(self, key_id: str) -> KeyInfo:
        found = [s.info for s in self._stored("WHERE id = ?", (key_id,))]
        if not found:
            known = ", ".join(k.key_id for k in self.list()) or "none exist yet"
            raise KeyStoreError(f"no key {key_id!r}; keys: {known}")
        return found[0]

    def list(self) -> list[KeyInfo]:
        return [s.info for s in self._stored("ORDER BY created_at, id")]

    def any_keys(self) -> bool:
        """True once any key was ever created (revoked ones count: revoking the last key must not open the API)."""
        return bool(self._query("SELECT 1 FROM keys LIMIT 1"))

    def live(self) -> dict[str, _Stored]:
        return {s.info.key_id: s for s in self._stored("WHERE revoked_at IS NULL")}

    def _stored(self, where: str, params: tuple[object, ...] = ()) -> list[_Stored]:
        rows = self._query(f"SELECT id, name, tenant, scopes, created_at, revoked_at, salt, hash FROM keys {where}",
                           params)
        return [_Stored(KeyInfo(r[0], r[1], r[2], tuple(r[3].split()), r[4], r[5]), r[6], r[7]) for r in rows]


def _digest(presented: str) -> bytes:
    return hashlib.sha256(presented.encode("utf-8", "replace")).digest()


def presented_key(metadata: Mapping[str, str]) -> str | None:
    """The key a call carries, if any: `authorization: Bearer <key>` or `x-api-key: <key>`."""
    auth = metadata.get("authorization", "")
    scheme, _, value = auth.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return metadata.get("x-api-key", "").strip() or None


class KeyAuthenticator:
    """`server.identity.Authenticator` over a KeyStore: the identity of the key a call presents."""

    def __init__(self, store: KeyStore, refresh_s: float = DEFAULT_REFRESH_S,
                 clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.refresh_s = refresh_s
        self._clock = clock
        self._lock = threading.Lock()
        self._live: dict[str, _Stored] = {}
        self._any = False
        self._loaded_at = float("-inf")
        self._verified: dict[bytes, Identity] = {}  # sha256 of a presented key -> its identity
        self._failed: OrderedDict[bytes, None] = OrderedDict()

    def enforced(self) -> bool:
        """Whether any key exists, as of the last refresh (what `auth = auto` turns on by)."""
        self._refresh()
        return self._any

    def is_cheap(self, metadata: Mapping[str, str]) -> bool:
        """Whether answering this call costs no scrypt (no key, or one already verified or refused), so the caller
        may answer it on the event loop; otherwise it should call from a worker thread."""
        presented = presented_key(metadata)
        if presented is None:
            return True
        digest = _digest(presented)
        return digest in self._verified or digest in self._failed

    def __call__(self, metadata: Mapping[str, str], auth_context: Mapping[str, Sequence[bytes]]) -> Identity | None:
        presented = presented_key(metadata)
        if presented is None:
            return None
        self._refresh()
        digest = _digest(presented)
        found = self._verified.get(digest)
        if found is not None:
            return found
        if digest in self._failed:
            raise Unauthenticated("the API key is not valid (unknown, revoked or mistyped)")
        identity = self._verify(presented)
        if identity is None:
            self._failed[digest] = None
            while len(self._failed) > _FAILED_REMEMBERED:
                self._failed.popitem(last=False)
            raise Unauthenticated("the API key is not valid (unknown, revoked or mistyped)")
        self._verified[digest] = identity
        return identity

    def _verify(self, presented: str) -> Identity | None:
        shape = _KEY_SHAPE.match(presented)
        stored = self._live.get(shape.group(1)) if shape else None
        if shape is None or stored is None:
            return None
        if not hmac.compare_digest(_hash(shape.group(2), stored.salt), stored.hash):
            return None
        return stored.info.identity

    def _refresh(self) -> None:
        if self._clock() - self._loaded_at < self.refresh_s:
            return
        with self._lock:
            if self._clock() - self._loaded_at < self.refresh_s:
                return
            try:
                live = self.store.live()
                any_keys = bool(live) or self.store.any_keys()
            except KeyStoreError as exc:
                raise Unavailable(f"the API keys cannot be read: {exc}") from None
            live_ids = {f"key:{key_id}" for key_id in live}
            self._verified = {d: i for d, i in self._verified.items() if i.principal in live_ids}
            self._failed.clear()  # a key created since may now be valid
            self._live, self._any, self._loaded_at = live, any_keys, self._clock()
