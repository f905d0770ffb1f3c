"""Throwaway certificates for the TLS tests, made with the `openssl` binary in a test's temporary directory.

A `TestCA` signs server certificates (SANs for 127.0.0.1 and localhost) and client certificates (any subject);
each certificate gets a distinct serial. P-256 keys: they take milliseconds to generate. Tests that need these call
`require_openssl()` first, which skips them with the reason when the binary is missing.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
[dn]
[ca]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1, DNS:localhost
[client]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = clientAuth
"""
_serials = itertools.count(1000)


def require_openssl() -> str:
    found = shutil.which("openssl")
    if found is None:
        pytest.skip("the openssl binary is not installed: the TLS tests make their certificates with it")
    return found


@dataclass(frozen=True)
class CertFiles:
    cert: Path
    key: Path
    serial: int

    @property
    def pem(self) -> bytes:
        return self.cert.read_bytes()


def _openssl(*args: str | Path) -> None:
    subprocess.run([require_openssl(), *map(str, args)], check=True, capture_output=True)


class TestCA:
    __test__ = False  # not a pytest test class

    def __init__(self, directory: Path, name: str = "Test CA"):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.config = directory / "openssl.cnf"
        self.config.write_text(_CONFIG)
        self.cert, self.key = directory / "ca.pem", directory / "ca.key"
        _openssl("req", "-x509", "-new", "-config", self.config, "-extensions", "ca", "-newkey", "ec",
                 "-pkeyopt", "ec_paramgen_curve:prime256v1", "-noenc", "-keyout", self.key, "-out", self.cert,
                 "-days", "2", "-subj", f"/O=Safeguard tests/CN={name}", "-set_serial", str(next(_serials)))

    def issue(self, stem: str, subject: str, kind: str) -> CertFiles:
        """A certificate for `subject` ("/O=.../CN=..."), `kind` "server" or "client", as STEM.pem and STEM.key."""
        cert, key, csr = (self.directory / f"{stem}{ext}" for ext in (".pem", ".key", ".csr"))
        serial = next(_serials)
        _openssl("req", "-new", "-config", self.config, "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                 "-noenc", "-keyout", key, "-out", csr, "-subj", subject)
        _openssl("x509", "-req", "-in", csr, "-CA", self.cert, "-CAkey", self.key, "-set_serial", str(serial),
                 "-days", "2", "-extfile", self.config, "-extensions", kind, "-out", cert)
        csr.unlink()
        return CertFiles(cert, key, serial)

    def server(self, stem: str = "server", cn: str = "localhost") -> CertFiles:
        return self.issue(stem, f"/O=Safeguard tests/CN={cn}", "server")

    def client(self, stem: str, cn: str, org: str = "Safeguard tests") -> CertFiles:
        return self.issue(stem, f"/O={org}/CN={cn}", "client")
