"""TLS for the gRPC API and /metrics: the certificate files, loaded at start and re-read when they change.

`load_certificates(settings)` reads `tls_cert`, `tls_key` and (for mutual TLS) `tls_client_ca` and checks that they
belong together, so a missing, unreadable or mismatched file stops the start with a message naming it. The
returned `ReloadingCertificates` then watches the files: `refresh()` compares their stat signatures (cheap enough
to run on every new connection, which is when gRPC asks) and, when they changed, loads them again. A renewed
certificate thus takes effect on the next connection without a restart; a bad one (half written, key of another
certificate) is logged and the previous one keeps serving, and it is tried again when the files change again.
Connections already open keep the certificate they were opened with.

The files are validated with Python's `ssl` (the key must match the certificate; the CA file must hold at least
one certificate), which also builds the context /metrics serves HTTPS with. gRPC gets the same PEM bytes.
"""

from __future__ import annotations

import hashlib
import logging
import re
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import grpc

from server import log as slog
from server.settings import ServerSettings, ServerSettingsError

log = logging.getLogger("safeguard.tls")

_ATTEMPTS = 3  # reads of a file pair that keeps changing under us before giving up
_FIRST_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----")


@dataclass(frozen=True)
class CertificateFiles:
    cert: Path
    key: Path
    client_ca: Path | None  # set: clients must present a certificate signed by one of these CAs

    @property
    def named(self) -> tuple[tuple[str, Path], ...]:
        """(setting, path) of each file."""
        pairs = (("tls_cert", self.cert), ("tls_key", self.key))
        return pairs if self.client_ca is None else (*pairs, ("tls_client_ca", self.client_ca))


@dataclass(frozen=True)
class Certificates:
    """One consistent load of the files."""

    cert_chain: bytes
    key: bytes
    client_ca: bytes | None
    fingerprint: str  # sha256 (hex) of the leaf certificate's DER: `openssl x509 -fingerprint -sha256`, lower case
    digest: str  # of every file's bytes: a touched file with the same content is no change
    https: ssl.SSLContext  # server side, for /metrics (no client certificate asked for)


def certificate_files(settings: ServerSettings) -> CertificateFiles | None:
    if not settings.tls_cert:
        return None
    ca = Path(settings.tls_client_ca).expanduser() if settings.tls_client_ca else None
    return CertificateFiles(Path(settings.tls_cert).expanduser(), Path(settings.tls_key).expanduser(), ca)


def load_certificates(settings: ServerSettings) -> ReloadingCertificates | None:
    """The certificates the settings name (None when TLS is off); ServerSettingsError names a bad file."""
    files = certificate_files(settings)
    return None if files is None else ReloadingCertificates(files)


def _signature(files: CertificateFiles) -> tuple[tuple[int, ...] | None, ...]:
    signature = []
    for _, path in files.named:
        try:
            st = path.stat()  # follows symlinks: a Kubernetes secret update swaps the link's target
            signature.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        except OSError:
            signature.append(None)
    return tuple(signature)


def _read(setting: str, path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ServerSettingsError(f"{setting}: cannot read {path}: {exc.strerror or exc}") from None


def _read_all(files: CertificateFiles) -> list[bytes]:
    return [_read(setting, path) for setting, path in files.named]


def _encrypted_key(files: CertificateFiles) -> Callable[[], bytes]:
    def refuse() -> bytes:
        raise ServerSettingsError(f"tls_key: {files.key} is encrypted; the server cannot ask for a passphrase, "
                                  "so give it an unencrypted key file readable only by its user (mode 0600)")
    return refuse


def _https_context(files: CertificateFiles) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(files.cert, files.key, password=_encrypted_key(files))
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise ServerSettingsError(f"tls_key: {files.key} is not the private key of the certificate in "
                                      f"{files.cert}") from None
        raise ServerSettingsError(f"tls_cert/tls_key: {files.cert} or {files.key} is not a PEM certificate chain "
                                  f"and its private key ({exc.reason or exc})") from None
    except OSError as exc:  # vanished since we read it
        raise ServerSettingsError(f"tls_cert/tls_key: cannot read {exc.filename}: {exc.strerror}") from None
    return context


def _check_client_ca(path: Path, pem: bytes) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=pem.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise ServerSettingsError(f"tls_client_ca: {path} holds no PEM CA certificate ({exc})") from None
    if not context.get_ca_certs():
        raise ServerSettingsError(f"tls_client_ca: {path} holds no CA certificate (a client certificate verifies "
                                  "against CA certificates, basicConstraints CA:TRUE)")


def _load_once(files: CertificateFiles) -> Certificates:
    contents = _read_all(files)
    if _FIRST_CERTIFICATE.search(contents[0]) is None:
        raise ServerSettingsError(f"tls_cert: {files.cert} holds no PEM certificate")
    if b"PRIVATE KEY-----" not in contents[1]:
        raise ServerSettingsError(f"tls_key: {files.key} holds no PEM private key")
    https = _https_context(files)  # reads the files once more: the re-read below catches a change in between
    if files.client_ca is not None:
        _check_client_ca(files.client_ca, contents[2])
    if _read_all(files) != contents:
        raise _Changing(f"{', '.join(str(path) for _, path in files.named)} changed while being read")
    leaf = ssl.PEM_cert_to_DER_cert(_FIRST_CERTIFICATE.search(contents[0]).group().decode("ascii"))
    digest = hashlib.sha256(b"".join(hashlib.sha256(c).digest() for c in contents)).hexdigest()
    return Certificates(contents[0], contents[1], contents[2] if files.client_ca else None,
                        hashlib.sha256(leaf).hexdigest(), digest, https)


class _Changing(ServerSettingsError):
    """The files changed between two reads of one load (someone is writing them)."""


def load_files(files: CertificateFiles) -> Certificates:
    """Read and check the files; ServerSettingsError names the one that is wrong."""
    for _ in range(_ATTEMPTS - 1):
        try:
            return _load_once(files)
        except _Changing:
            continue
    return _load_once(files)


def _warn_if_readable_by_others(key: Path) -> None:
    try:
        mode = key.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        slog.event(log, logging.WARNING, "the TLS private key is readable by other users; chmod 600 it",
                   key=str(key), mode=oct(mode & 0o777))


class ReloadingCertificates:
    """The current certificates, reloaded from the files when they change (thread-safe)."""

    def __init__(self, files: CertificateFiles):
        self.files = files
        signature = _signature(files)
        self._current = load_files(files)
        self._signature = signature  # taken before the load: a change during it is seen next time
        self._refused: tuple | None = None  # signature of files that failed to load (logged once)
        self._lock = threading.Lock()
        slog.event(log, logging.INFO, "TLS certificate loaded", cert=str(files.cert),
                   fingerprint=self._current.fingerprint, mutual_tls=self.mutual)
        _warn_if_readable_by_others(files.key)

    @property
    def current(self) -> Certificates:
        return self._current

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def refresh(self) -> Certificates | None:
        """Reload if the files changed since the last look; the new certificates, or None for no change."""
        signature = _signature(self.files)
        if signature in (self._signature, self._refused):
            return None
        with self._lock:
            if signature in (self._signature, self._refused):
                return None
            try:
                fresh = load_files(self.files)
            except ServerSettingsError as exc:
                self._refused = signature
                slog.event(log, logging.WARNING, "new TLS files refused; still serving the previous certificate",
                           error=str(exc), fingerprint=self._current.fingerprint)
                return None
            self._signature, self._refused = signature, None
            if fresh.digest == self._current.digest:
                return None
            slog.event(log, logging.INFO, "TLS certificate reloaded", previous=self._current.fingerprint,
                       fingerprint=fresh.fingerprint, cert=str(self.files.cert))
            self._current = fresh
            _warn_if_readable_by_others(self.files.key)
            return fresh

    def https_context(self) -> ssl.SSLContext:
        """The context a new HTTPS connection should use (after a look at the files)."""
        self.refresh()
        return self._current.https


def _configuration(certificates: Certificates) -> grpc.ServerCertificateConfiguration:
    return grpc.ssl_server_certificate_configuration([(certificates.key, certificates.cert_chain)],
                                                     certificates.client_ca)


def server_credentials(certificates: ReloadingCertificates) -> grpc.ServerCredentials:
    """gRPC credentials serving the current certificates; gRPC asks for changes before every new connection's
    handshake. With a client CA, a client without a certificate signed by it is refused at the handshake."""

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        try:
            fresh = certificates.refresh()
        except Exception:  # never let a surprise here reach gRPC's C core: keep serving what we have
            log.exception("checking the TLS files failed; still serving the previous certificate")
            return None
        return None if fresh is None else _configuration(fresh)

    return grpc.dynamic_ssl_server_credentials(_configuration(certificates.current), fetch,
                                               require_client_authentication=certificates.mutual)
