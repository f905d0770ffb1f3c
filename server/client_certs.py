"""Client certificates as identities (mutual TLS): a TOML map from a certificate's subject to a tenant and scopes.

    # client_cert_map: one [[client]] per certificate, named by its whole subject or by its common name
    [[client]]
    subject = "CN=billing,O=Acme"    # RFC 4514, as `openssl x509 -noout -subject -nameopt RFC2253` prints it
    tenant = "acme"
    scopes = ["classify", "policy:read"]

    [[client]]
    common_name = "ops-console"
    tenant = "default"
    scopes = ["admin"]

gRPC has already verified the certificate against `tls_client_ca` by the time a call arrives; the authenticator
only reads the subject gRPC puts in the call's auth context (`x509_subject`, `x509_common_name`) and looks it up, a
whole-subject entry first. A verified certificate that is not in the map is refused (UNAUTHENTICATED): a CA that
signs for several services must not make them all callers. The map is read once, at start.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import Unauthenticated
from server.identity import SCOPES, Identity
from server.settings import ServerSettings, ServerSettingsError

SUBJECT_KEY = "x509_subject"
COMMON_NAME_KEY = "x509_common_name"
_TENANT = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_ENTRY_KEYS = {"subject", "common_name", "tenant", "scopes"}
_RDN_SEPARATOR = re.compile(r"(?<!\\),")


@dataclass(frozen=True)
class Grant:
    tenant: str
    scopes: frozenset[str]


@dataclass(frozen=True)
class CertificateMap:
    by_subject: Mapping[str, Grant]
    by_common_name: Mapping[str, Grant]

    def lookup(self, subject: str | None, common_name: str | None) -> Grant | None:
        if subject is not None and (grant := self.by_subject.get(normal_subject(subject))) is not None:
            return grant
        return None if common_name is None else self.by_common_name.get(common_name)


def normal_subject(subject: str) -> str:
    """`cn=billing, O=Acme` and `CN=billing,O=Acme` are one subject: attribute types upper-cased, no spaces around
    the separators (an escaped comma stays part of its value)."""
    parts = []
    for rdn in _RDN_SEPARATOR.split(subject):
        kind, _, value = rdn.partition("=")
        parts.append(f"{kind.strip().upper()}={value.strip()}")
    return ",".join(parts)


def _grant(where: str, entry: Any) -> tuple[str, str, Grant]:
    if not isinstance(entry, dict):
        raise ServerSettingsError(f"{where}: expected a table with subject or common_name, tenant and scopes")
    if unknown := sorted(set(entry) - _ENTRY_KEYS):
        raise ServerSettingsError(f"{where}: unknown keys {', '.join(unknown)}; an entry has subject or "
                                  "common_name, tenant and scopes")
    named = [key for key in ("subject", "common_name") if key in entry]
    if len(named) != 1 or not isinstance(entry[named[0]], str) or not entry[named[0]].strip():
        raise ServerSettingsError(f"{where}: give exactly one of subject or common_name, a non-empty string")
    tenant = entry.get("tenant")
    if not isinstance(tenant, str) or not _TENANT.fullmatch(tenant):
        raise ServerSettingsError(f"{where}: tenant must be 1-64 letters, digits, '.', '_' or '-', starting with a "
                                  f"letter or digit; got {tenant!r}")
    scopes = entry.get("scopes")
    if not isinstance(scopes, list) or not scopes or not all(isinstance(s, str) for s in scopes):
        raise ServerSettingsError(f"{where}: scopes must be a non-empty list of scope names ({', '.join(SCOPES)})")
    if unknown := sorted(set(scopes) - set(SCOPES)):
        raise ServerSettingsError(f"{where}: unknown scopes {', '.join(unknown)}; the scopes are {', '.join(SCOPES)}")
    return named[0], entry[named[0]].strip(), Grant(tenant, frozenset(scopes))


def load_certificate_map(path: Path) -> CertificateMap:
    """Read and check a map file; ServerSettingsError names the file and what is wrong in it."""
    where = f"client_cert_map: {path}"
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ServerSettingsError(f"{where}: cannot read it: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ServerSettingsError(f"{where}: not valid TOML: {exc}") from None
    except RecursionError:
        raise ServerSettingsError(f"{where}: not valid TOML: nested too deeply") from None
    if unknown := sorted(set(document) - {"client"}):
        raise ServerSettingsError(f"{where}: unknown keys {', '.join(unknown)}; list certificates as [[client]] "
                                  "tables")
    entries = document.get("client", [])
    if not isinstance(entries, list):
        raise ServerSettingsError(f"{where}: 'client' must be an array of tables ([[client]])")
    tables: dict[str, dict[str, Grant]] = {"subject": {}, "common_name": {}}
    for i, entry in enumerate(entries):
        kind, name, grant = _grant(f"{where}: client {i + 1}", entry)
        name = normal_subject(name) if kind == "subject" else name
        if name in tables[kind]:
            raise ServerSettingsError(f"{where}: client {i + 1}: {kind} {name!r} is listed twice")
        tables[kind][name] = grant
    return CertificateMap(tables["subject"], tables["common_name"])


def _first(auth_context: Mapping[str, Sequence[bytes]], key: str) -> str | None:
    values = auth_context.get(key)
    return values[0].decode("utf-8", "replace") if values else None


class CertificateAuthenticator:
    """An `identity.Authenticator`: the verified client certificate's subject, looked up in the map."""

    def __init__(self, mapping: CertificateMap):
        self.mapping = mapping

    def __call__(self, metadata: Mapping[str, str], auth_context: Mapping[str, Sequence[bytes]]) -> Identity | None:
        subject, common_name = _first(auth_context, SUBJECT_KEY), _first(auth_context, COMMON_NAME_KEY)
        if subject is None and common_name is None:
            return None  # no client certificate on this connection
        grant = self.mapping.lookup(subject, common_name)
        shown = subject if subject is not None else f"CN={common_name}"
        if grant is None:
            raise Unauthenticated(f"the client certificate {shown!r} is not in this server's client certificate "
                                  "map; ask the operator to add it")
        return Identity(f"cert:{shown}", grant.tenant, grant.scopes)


def certificate_authenticator(settings: ServerSettings) -> CertificateAuthenticator | None:
    """The authenticator for the settings' map (None without one); a bad map file raises ServerSettingsError."""
    if not settings.client_cert_map:
        return None
    return CertificateAuthenticator(load_certificate_map(Path(settings.client_cert_map).expanduser()))
