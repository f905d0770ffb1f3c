"""TLS and mutual TLS on the gRPC API and /metrics, with throwaway certificates (tests/tls_certs.py, made with the
openssl binary) and a real front end over the canned Triton model on loopback.

Covered: a TLS front end answers a TLS client (grpc.aio and the sync `SafeguardClient`) and refuses plaintext;
mutual TLS refuses a client without a certificate and one signed by another CA; the certificate authenticator
maps the auth context of a real mutual-TLS call to the configured tenant and scopes and refuses an unknown subject;
replacing the certificate files while serving changes what a new connection is shown (gRPC and /metrics), while a
bad replacement keeps the previous certificate; start-up refuses bad files and plaintext on non-loopback addresses
(0.0.0.0:0 is refused before any socket opens, so nothing is exposed).
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import socket
import ssl
import subprocess
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from click.testing import CliRunner
from frontend_api import SMOKE, classify_request, frontend_settings
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from test_triton_client import start_canned_triton
from tls_certs import CertFiles, TestCA, require_openssl

from server import tls
from server.client import SafeguardClient
from server.client_certs import CertificateAuthenticator, certificate_authenticator, load_certificate_map
from server.client_cli import classify_command
from server.errors import Unauthenticated
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.identity import CLASSIFY, POLICY_READ, Identity
from server.registry import Registry
from server.serve_cli import serve_command
from server.servicer import Frontend, build_server
from server.settings import ServerSettings, ServerSettingsError
from server.triton.launcher import TritonServer

CERT_MAP = """\
[[client]]
subject = "CN=billing, O=Safeguard tests"
tenant = "acme"
scopes = ["classify", "policy:read"]

[[client]]
common_name = "ops"
tenant = "default"
scopes = ["admin"]
"""


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    other_ca: TestCA  # signs certificates the server must not accept
    server: CertFiles
    billing: CertFiles  # a client in the map by subject
    stranger: CertFiles  # a client the CA signed but the map does not name
    forged: CertFiles  # "billing" again, signed by the other CA
    cert_map: Path

    def credentials(self, client: CertFiles | None = None, ca: TestCA | None = None) -> grpc.ChannelCredentials:
        return grpc.ssl_channel_credentials((ca or self.ca).cert.read_bytes(), client.key.read_bytes() if client
                                            else None, client.pem if client else None)


@pytest.fixture(scope="module")
def triton(tmp_path_factory) -> Iterator[TritonServer]:
    require_openssl()
    server, _ = start_canned_triton(tmp_path_factory.mktemp("tls-triton"))
    yield server
    server.stop()


@pytest.fixture
def pki(tmp_path) -> Pki:
    require_openssl()
    ca, other = TestCA(tmp_path / "ca"), TestCA(tmp_path / "other-ca", name="Other CA")
    cert_map = tmp_path / "clients.toml"
    cert_map.write_text(CERT_MAP)
    return Pki(ca, other, ca.server(), ca.client("billing", "billing"), ca.client("stranger", "stranger"),
               other.client("forged", "billing"), cert_map)


def tls_settings(pki: Pki, **changes) -> dict:
    return dict(tls_cert=str(pki.server.cert), tls_key=str(pki.server.key), **changes)


@contextmanager
def serving(triton: TritonServer, state: Path, **changes) -> Iterator[tuple[asyncio.Runner, Frontend]]:
    Registry(state).add(SMOKE, activate=True)
    Registry(state).add(SMOKE, activate=True, tenant="acme")  # the billing certificate's tenant (CERT_MAP)
    runner = asyncio.Runner()
    frontend = build_server_in(runner, frontend_settings(triton.grpc_url, state, **changes))
    runner.run(frontend.start())
    try:
        yield runner, frontend
    finally:
        runner.run(frontend.stop(grace=0))
        runner.close()


def build_server_in(runner: asyncio.Runner, settings: ServerSettings) -> Frontend:
    async def build() -> Frontend:
        return build_server(settings)

    return runner.run(build())


async def classify(address: str, credentials: grpc.ChannelCredentials | None) -> pb.ClassifyResponse:
    channel = (grpc.aio.insecure_channel(address) if credentials is None
               else grpc.aio.secure_channel(address, credentials))
    async with channel:
        return await pb_grpc.SafeguardStub(channel).Classify(classify_request(), timeout=10)


def refused(runner: asyncio.Runner, address: str, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        runner.run(classify(address, credentials))
    return caught.value.code()


def presented(port: int) -> bytes:
    """The certificate (DER) the server shows a new connection, read without verifying it."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as secure:
        return secure.getpeercert(binary_form=True)


def der(files: CertFiles) -> bytes:
    return ssl.PEM_cert_to_DER_cert(files.pem.decode())


def scrape(url: str, context: ssl.SSLContext | None = None) -> str:
    handlers = [urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)]
    with urllib.request.build_opener(*handlers).open(url, timeout=5) as response:
        return response.read().decode()


def test_tls_front_end_answers_tls_clients_and_refuses_plaintext(triton, pki, tmp_path):
    with serving(triton, tmp_path / "state", **tls_settings(pki)) as (runner, frontend):
        response = runner.run(classify(frontend.address, pki.credentials()))
        assert response.verdict.parse_status == pb.PARSE_STATUS_OK
        assert refused(runner, frontend.address, None) == grpc.StatusCode.UNAVAILABLE
        assert refused(runner, frontend.address, pki.credentials(ca=pki.other_ca)) == grpc.StatusCode.UNAVAILABLE

        def sync_client() -> bool:
            with SafeguardClient(frontend.address, tls_ca=pki.ca.cert, timeout=10) as client:
                return client.classify("smoke", "hello over TLS").verdict.violation

        assert runner.run(asyncio.to_thread(sync_client)) is False
        command = ["--target", frontend.address, "--policy", "smoke", "--text", "hello from the CLI"]
        cli = runner.run(asyncio.to_thread(CliRunner().invoke, classify_command, command,
                                           env={"APPLIANCE_TLS_CA": str(pki.ca.cert)}))
        assert cli.exit_code == 0 and cli.output.startswith("no violation"), cli.output
        cli = runner.run(asyncio.to_thread(CliRunner().invoke, classify_command, [*command, "--timeout", "2"]))
        assert cli.exit_code != 0 and "UNAVAILABLE" in str(cli.exception)

        port = frontend.metrics_server.port
        assert frontend.metrics_server.https
        text = scrape(f"https://127.0.0.1:{port}/metrics", ssl.create_default_context(cafile=pki.ca.cert))
        assert 'safeguard_requests_total{outcome="ok",policy="smoke"}' in text
        with pytest.raises((OSError, http.client.HTTPException)):
            scrape(f"http://127.0.0.1:{port}/metrics")


def test_mutual_tls_refuses_clients_without_a_certificate_of_its_ca(triton, pki, tmp_path):
    client_ca = tmp_path / "clients-ca.pem"
    client_ca.write_bytes(pki.ca.cert.read_bytes())
    settings = tls_settings(pki, tls_client_ca=str(client_ca), client_cert_map=str(pki.cert_map))
    with serving(triton, tmp_path / "state", **settings) as (runner, frontend):
        assert runner.run(classify(frontend.address, pki.credentials(pki.billing))).verdict.HasField("violation")
        assert refused(runner, frontend.address, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
        assert refused(runner, frontend.address, pki.credentials(pki.forged)) == grpc.StatusCode.UNAVAILABLE
        assert refused(runner, frontend.address, None) == grpc.StatusCode.UNAVAILABLE
        assert isinstance(frontend.certificate_authenticator, CertificateAuthenticator)

        partial = tmp_path / "clients-ca.partial"  # the client CA reloads too: now the other CA's clients get in
        partial.write_bytes(pki.other_ca.cert.read_bytes())
        os.replace(partial, client_ca)
        assert runner.run(classify(frontend.address, pki.credentials(pki.forged))).verdict.HasField("violation")
        assert refused(runner, frontend.address, pki.credentials(pki.billing)) == grpc.StatusCode.UNAVAILABLE


class _Recorder(health.aio.HealthServicer):
    """A health service that keeps the auth context of the last call."""

    seen: dict[str, list[bytes]] | None = None

    async def Check(self, request, context):
        self.seen = dict(context.auth_context())
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _auth_contexts(pki: Pki, settings: ServerSettings,
                   clients: list[CertFiles | None]) -> tuple[list[dict], dict]:
    """Auth contexts of real calls: one per client over the settings' mutual TLS, then one over plaintext."""

    async def run() -> tuple[list[dict], dict]:
        recorder, server = _Recorder(), grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(recorder, server)
        secure = server.add_secure_port("127.0.0.1:0", tls.server_credentials(tls.load_certificates(settings)))
        plain = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            seen = []
            for client in clients:
                async with grpc.aio.secure_channel(f"127.0.0.1:{secure}", pki.credentials(client)) as channel:
                    await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
                seen.append(recorder.seen)
            async with grpc.aio.insecure_channel(f"127.0.0.1:{plain}") as channel:
                await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            return seen, recorder.seen
        finally:
            await server.stop(0)

    return asyncio.run(run())


def test_the_certificate_authenticator_maps_a_real_peer_to_its_tenant_and_scopes(pki):
    ops = pki.ca.client("ops", "ops", org="Operations")
    settings = ServerSettings(**tls_settings(pki, tls_client_ca=str(pki.ca.cert), client_cert_map=str(pki.cert_map)))
    (billing, stranger, by_name), plaintext = _auth_contexts(pki, settings, [pki.billing, pki.stranger, ops])
    # What this grpcio puts in the auth context of a mutual-TLS call (the authenticator reads the first two).
    assert billing["x509_subject"] == [b"CN=billing,O=Safeguard tests"]
    assert billing["x509_common_name"] == [b"billing"]
    assert billing["x509_pem_cert"] == [pki.billing.pem]
    assert billing["transport_security_type"] == [b"ssl"]

    authenticate = certificate_authenticator(settings)
    assert authenticate({}, billing) == Identity("cert:CN=billing,O=Safeguard tests", "acme",
                                                 frozenset({CLASSIFY, POLICY_READ}))
    assert authenticate({}, by_name) == Identity("cert:CN=ops,O=Operations", "default", frozenset({"admin"}))
    with pytest.raises(Unauthenticated, match="'CN=stranger,O=Safeguard tests' is not in this server's client"):
        authenticate({}, stranger)
    assert "x509_subject" not in plaintext and authenticate({}, plaintext) is None


def _replace(target: CertFiles, source: CertFiles) -> None:
    """Put `source`'s key and certificate in `target`'s place the way a renewal tool does (write, then rename)."""
    for src, dst in ((source.key, target.key), (source.cert, target.cert)):
        partial = dst.with_suffix(".partial")
        partial.write_bytes(src.read_bytes())
        partial.chmod(0o600)
        os.replace(partial, dst)


def test_certificates_reload_without_a_restart(triton, pki, tmp_path, caplog):
    live = tmp_path / "live"
    live.mkdir()
    served = CertFiles(live / "server.pem", live / "server.key", pki.server.serial)
    _replace(served, pki.server)
    renewed = pki.other_ca.server("renewed", cn="renewed.localhost")
    settings = dict(tls_cert=str(served.cert), tls_key=str(served.key))
    with serving(triton, tmp_path / "state", **settings) as (runner, frontend):
        port, metrics_port = frontend.port, frontend.metrics_server.port
        assert presented(port) == presented(metrics_port) == der(pki.server)
        kept = grpc.aio.secure_channel(frontend.address, pki.credentials())
        stub = pb_grpc.SafeguardStub(kept)

        async def on_the_kept_connection() -> None:
            await stub.Classify(classify_request(), timeout=10)

        runner.run(on_the_kept_connection())

        _replace(served, renewed)
        assert presented(port) == presented(metrics_port) == der(renewed)
        assert runner.run(classify(frontend.address, pki.credentials(ca=pki.other_ca))).verdict.HasField("violation")
        assert refused(runner, frontend.address, pki.credentials()) == grpc.StatusCode.UNAVAILABLE
        runner.run(on_the_kept_connection())  # an open connection keeps the certificate it was opened with
        runner.run(kept.close())

        caplog.set_level(logging.WARNING, logger="safeguard.tls")
        served.key.write_bytes(pki.billing.key.read_bytes())  # the key of another certificate
        assert presented(port) == presented(metrics_port) == der(renewed)
        assert any("still serving the previous certificate" in r.getMessage() and
                   "is not the private key of the certificate" in r.fields["error"] for r in caplog.records)

        _replace(served, pki.server)
        assert presented(port) == der(pki.server)
        assert runner.run(classify(frontend.address, pki.credentials())).verdict.HasField("violation")


def _start_error(settings: ServerSettings) -> str:
    async def build() -> None:
        build_server(settings)

    with pytest.raises(ServerSettingsError) as caught:
        asyncio.run(build())
    return str(caught.value)


def test_bad_certificate_files_stop_the_start_naming_the_file(pki, tmp_path):
    def settings(**changes) -> ServerSettings:
        return frontend_settings("127.0.0.1:9", tmp_path / "state", **(tls_settings(pki) | changes))

    missing = tmp_path / "missing.pem"
    assert (f"tls_cert: cannot read {missing}: No such file or directory"
            in _start_error(settings(tls_cert=str(missing))))
    assert (f"tls_key: {pki.billing.key} is not the private key of the certificate in {pki.server.cert}"
            in _start_error(settings(tls_key=str(pki.billing.key))))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    assert f"tls_cert: {garbage} holds no PEM certificate" in _start_error(settings(tls_cert=str(garbage)))
    assert f"tls_key: {garbage} holds no PEM private key" in _start_error(settings(tls_key=str(garbage)))
    locked = tmp_path / "locked.key"
    subprocess.run([require_openssl(), "pkey", "-in", str(pki.server.key), "-aes256", "-passout", "pass:secret",
                    "-out", str(locked)], check=True, capture_output=True)
    assert f"tls_key: {locked} is encrypted" in _start_error(settings(tls_key=str(locked)))
    assert (f"tls_client_ca: {pki.billing.cert} holds no CA certificate"
            in _start_error(settings(tls_client_ca=str(pki.billing.cert))))
    assert f"tls_client_ca: {garbage} holds no PEM CA certificate" in _start_error(settings(tls_client_ca=str(garbage)))


@pytest.mark.parametrize(("text", "message"), [
    ("[[client]\n", "not valid TOML"),
    ("[[client]]\ncommon_name = 'a'\ntenant = 'acme'\nscopes = ['classify', 'root']\n", "unknown scopes root"),
    ("[[client]]\ncommon_name = 'a'\ntenant = 'acme'\nscopes = []\n", "scopes must be a non-empty list"),
    ("[[client]]\ncommon_name = 'a'\nsubject = 'CN=a'\ntenant = 'acme'\nscopes = ['admin']\n",
     "client 1: give exactly one of subject or common_name"),
    ("[[client]]\ncommon_name = 'a'\ntenant = 'a b'\nscopes = ['admin']\n", "tenant must be 1-64 letters"),
    ("[[client]]\ncn = 'a'\ntenant = 'acme'\nscopes = ['admin']\n", "unknown keys cn"),
    ("[[client]]\nsubject = 'CN=a,O=b'\ntenant = 'x'\nscopes = ['admin']\n"
     "[[client]]\nsubject = 'cn=a, o=b'\ntenant = 'y'\nscopes = ['admin']\n",
     "client 2: subject 'CN=a,O=b' is listed twice"),
    ("[clients]\n", "unknown keys clients"),
    ("x = " + "[" * 5000 + "]" * 5000 + "\n", "not valid TOML"),
])
def test_a_bad_client_certificate_map_stops_the_start(tmp_path, text, message):
    path = tmp_path / "clients.toml"
    path.write_text(text)
    with pytest.raises(ServerSettingsError, match=rf"client_cert_map: {path}: .*{message}"):
        load_certificate_map(path)


def test_transport_settings_are_checked_together():
    with pytest.raises(ServerSettingsError) as bad:
        ServerSettings(tls_cert="c.pem", client_cert_map="m.toml").validate()
    assert bad.value.problems == ["tls_key: tls_cert and tls_key go together: set both",
                                  "client_cert_map: client certificates are only asked for under mutual TLS: set "
                                  "tls_client_ca too"]
    with pytest.raises(ServerSettingsError, match="tls_client_ca: mutual TLS needs TLS"):
        ServerSettings(tls_client_ca="ca.pem").validate()


def test_plaintext_on_a_non_loopback_address_refuses_to_start(tmp_path):
    settings = frontend_settings("127.0.0.1:9", tmp_path / "state", listen="0.0.0.0:0")
    message = _start_error(settings)
    assert "listen: 0.0.0.0 is not a loopback address and TLS is off" in message
    assert "set tls_cert and tls_key" in message.lower() and "allow_insecure_listen" in message
    metrics = _start_error(frontend_settings("127.0.0.1:9", tmp_path / "state", metrics_address="0.0.0.0"))
    assert "metrics_address: 0.0.0.0 is not a loopback address and TLS is off" in metrics
    for host in ("[::]:0", "192.0.2.1:0", "example.com:0"):
        with pytest.raises(ServerSettingsError, match="is not a loopback address"):
            ServerSettings(listen=host).validate()
    for host in ("127.0.0.1:0", "127.1.2.3:0", "[::1]:0", "localhost:0"):
        ServerSettings(listen=host).validate()
    # Validation only from here on: nothing binds a non-loopback address.
    ServerSettings(listen="0.0.0.0:0", metrics_address="0.0.0.0", allow_insecure_listen=True).validate()
    ServerSettings(listen="0.0.0.0:0", metrics_address="::", tls_cert="c.pem", tls_key="k.pem").validate()

    result = CliRunner().invoke(serve_command, ["--listen", "0.0.0.0:0", "--state-dir", str(tmp_path / "cli")])
    assert result.exit_code != 0 and "is not a loopback address and TLS is off" in str(result.exception)
