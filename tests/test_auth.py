"""Identity over real gRPC on loopback: API keys, scopes and tenants in front of a real tritonserver (the canned
model), a real key table, registry and audit log.

A server with keys configured serves nothing but health and reflection to a caller without a valid key; a key
reaches only its own tenant's policies, and another tenant's answer exactly as missing ones do; policy history
names the key that changed it; a revoked key stops working within `key_refresh_s`; a non-loopback listener without
authentication refuses to start; `admin_listen` moves the policy changes to their own listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import grpc
import pytest
from click.testing import CliRunner
from frontend_api import SMOKE, Api, classify_request, frontend_settings, open_frontend, poll
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_triton_client import start_canned_triton

from appliance.cli import main
from server.audit_reader import AuditReader
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.identity import ADMIN, CLASSIFY, POLICY_READ, POLICY_WRITE
from server.keys import KeyStore, NewKey
from server.registry import Registry
from server.servicer import build_server
from server.settings import ServerSettingsError
from server.state import audit_path, keys_path

STREAMING = {"ClassifyStream", "ClassifyBatch"}


def _policy(policy_id: str, version: str = "1") -> str:
    return (f'+++\nid = "{policy_id}"\nversion = "{version}"\ntitle = "T"\n\n[output]\nformat = "binary"\n+++\n'
            f"Answer 1 when the content is about {policy_id} (v{version}), else 0.\n")


class AuthApi(Api):
    keys: dict[str, NewKey]
    triton_url: str
    state: object

    def rpc(self, method: str, request, key: str | None = None, api: grpc.aio.Channel | None = None):
        """The response (a list for streaming methods), presenting `key` when given."""
        stub = pb_grpc.SafeguardStub(api) if api is not None else self.stub
        metadata = () if key is None else (("authorization", f"Bearer {key}"),)

        async def call():
            made = getattr(stub, method)(request, metadata=metadata, timeout=10)
            return [r async for r in made] if method in STREAMING else await made

        return self.run(call())

    def refused(self, method: str, request, key: str | None = None, **kwargs) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            self.rpc(method, request, key, **kwargs)
        return caught.value

    def secret(self, name: str) -> str:
        return self.keys[name].secret


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[AuthApi]:
    root = tmp_path_factory.mktemp("auth")
    state = root / "state"
    triton, model = start_canned_triton(root)
    registry = Registry(state)
    registry.add(SMOKE, activate=True, tenant="acme")
    store = KeyStore(keys_path(state))
    keys = {"acme": store.create("acme", [CLASSIFY, POLICY_READ, POLICY_WRITE], "acme editor"),
            "acme-classify": store.create("acme", [CLASSIFY], "acme bot"),
            "globex": store.create("globex", [ADMIN], "globex admin"),
            "doomed": store.create("acme", [CLASSIFY], "to be revoked")}
    runner = asyncio.Runner()
    frontend, channel = runner.run(open_frontend(frontend_settings(triton.grpc_url, state, key_refresh_s=0.2,
                                                                   audit_wait=True, max_in_flight=8)))
    handle = AuthApi(runner, frontend, pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel), channel,
                     model)
    handle.keys, handle.triton_url, handle.state = keys, triton.grpc_url, state
    yield handle
    runner.run(channel.close())
    runner.run(frontend.stop(grace=1))
    runner.close()
    triton.stop()


def _every_call(policy_id: str = "smoke") -> list[tuple[str, object]]:
    return [
        ("Classify", classify_request(ref=policy_id)),
        ("ClassifyStream", classify_request(ref=policy_id)),
        ("ClassifyBatch", pb.ClassifyBatchRequest(items=[pb.BatchItem(content=pb.Content(text="hi"))],
                                                  policies=[pb.PolicySelector(ref=policy_id)])),
        ("GetPolicy", pb.GetPolicyRequest(ref=policy_id)),
        ("ListPolicies", pb.ListPoliciesRequest()),
        ("PutPolicy", pb.PutPolicyRequest(text=_policy("intruder"), activate=True)),
        ("ActivatePolicy", pb.ActivatePolicyRequest(id=policy_id, ref="1.0.0")),
        ("RollbackPolicy", pb.RollbackPolicyRequest(id=policy_id)),
    ]


@pytest.mark.parametrize(("method", "request_"), _every_call(), ids=[m for m, _ in _every_call()])
def test_without_a_valid_key_nothing_is_served(api, method, request_):
    missing = api.refused(method, request_)
    assert missing.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "authorization: Bearer" in missing.details() and "appliance keys create" in missing.details()
    secret = api.secret("acme")
    for wrong in (secret[:-3] + ("xyz" if not secret.endswith("xyz") else "abc"), "sgk_garbage", "Bearer"):
        bad = api.refused(method, request_, wrong)
        assert bad.code() == grpc.StatusCode.UNAUTHENTICATED and "not valid" in bad.details()
    assert [s.policy_id for s in Registry(api.state).list(tenant="acme")] == ["smoke"]  # nothing was written
    assert Registry(api.state).list() == []


@pytest.mark.parametrize(("method", "request_"), _every_call()[3:], ids=[m for m, _ in _every_call()[3:]])
def test_a_key_without_the_scope_is_permission_denied(api, method, request_):
    denied = api.refused(method, request_, api.secret("acme-classify"))
    assert denied.code() == grpc.StatusCode.PERMISSION_DENIED
    needed = "policy:read" if method in ("GetPolicy", "ListPolicies") else "policy:write"
    assert f"lacks the {needed!r} scope" in denied.details()


def test_a_classify_key_classifies_by_ref_and_inline_and_the_audit_names_it(api):
    key = api.keys["acme-classify"]
    response = api.rpc("Classify", classify_request(request_id="acme-by-ref"), key.secret)
    assert response.policy.id == "smoke" and response.policy.sha256 == SMOKE.sha256
    inline = pb.ClassifyRequest(policy=pb.PolicySelector(inline_text=_policy("fruit")),
                                content=pb.Content(text="an apple"), request_id="acme-inline")
    assert api.rpc("Classify", inline, key.secret).policy.id == "fruit"
    records = AuditReader(audit_path(api.state)).by_request("acme-by-ref")
    assert [(r.tenant, r.principal) for r in records] == [("acme", f"key:{key.info.key_id}")]
    # Smoke exists only in acme's registry, so these answers show the streaming calls carry the key's tenant too.
    events = api.rpc("ClassifyStream", classify_request(), key.secret)
    assert events[-1].result.policy.id == "smoke"
    batch = api.rpc("ClassifyBatch", pb.ClassifyBatchRequest(items=[pb.BatchItem(content=pb.Content(text="hi"))],
                                                             policies=[pb.PolicySelector(ref="smoke")],
                                                             request_id="acme-batch"), key.secret)
    assert [b.result.policy.id for b in batch] == ["smoke"]
    assert [r.tenant for r in AuditReader(audit_path(api.state)).by_request("acme-batch/0")] == ["acme"]


def _same_answer(api: AuthApi, method: str, foreign_request, missing_request, key: str) -> None:
    foreign, missing = api.refused(method, foreign_request, key), api.refused(method, missing_request, key)
    assert foreign.code() == missing.code() and foreign.code() != grpc.StatusCode.INTERNAL, method
    assert foreign.details().replace("secret-plan", "ID") == missing.details().replace("never-made", "ID"), method
    assert "globex" not in foreign.details()


def test_a_tenant_cannot_tell_another_tenants_policies_exist(api):
    globex = api.secret("globex")
    api.rpc("PutPolicy", pb.PutPolicyRequest(text=_policy("secret-plan", "1"), activate=True), globex)
    api.rpc("PutPolicy", pb.PutPolicyRequest(text=_policy("secret-plan", "2"), activate=True), globex)
    # Globex's policy is now cached (active and pinned) in the front end; acme must still not reach it.
    assert api.rpc("Classify", classify_request(ref="secret-plan"), globex).policy.version == "2"
    assert api.rpc("Classify", classify_request(ref="secret-plan@1"), globex).policy.version == "1"

    acme = api.secret("acme")
    for foreign_id, missing_id in (("secret-plan", "never-made"), ("secret-plan@1", "never-made@1")):
        _same_answer(api, "Classify", classify_request(ref=foreign_id), classify_request(ref=missing_id), acme)
        _same_answer(api, "ClassifyStream", classify_request(ref=foreign_id), classify_request(ref=missing_id),
                     acme)
        _same_answer(api, "GetPolicy", pb.GetPolicyRequest(ref=foreign_id), pb.GetPolicyRequest(ref=missing_id),
                     acme)
    _same_answer(api, "ActivatePolicy", pb.ActivatePolicyRequest(id="secret-plan", ref="1"),
                 pb.ActivatePolicyRequest(id="never-made", ref="1"), acme)
    _same_answer(api, "RollbackPolicy", pb.RollbackPolicyRequest(id="secret-plan"),
                 pb.RollbackPolicyRequest(id="never-made"), acme)
    batch = {ref: api.rpc("ClassifyBatch", pb.ClassifyBatchRequest(
        items=[pb.BatchItem(item_id="a", content=pb.Content(text="hi"))], policies=[pb.PolicySelector(ref=ref)]),
        acme)[0].error for ref in ("secret-plan", "never-made")}
    assert batch["secret-plan"].code == batch["never-made"].code == "NOT_FOUND"
    assert batch["secret-plan"].message.replace("secret-plan", "ID") == batch["never-made"].message.replace(
        "never-made", "ID")
    assert [p.id for p in api.rpc("ListPolicies", pb.ListPoliciesRequest(), acme).policies] == ["smoke"]
    assert [p.id for p in api.rpc("ListPolicies", pb.ListPoliciesRequest(), globex).policies] == ["secret-plan"]

    # Acme may use the same id for its own policy: no clash tells it globex has one.
    mine = api.rpc("PutPolicy", pb.PutPolicyRequest(text=_policy("secret-plan", "1"), activate=True), acme)
    assert mine.version == "1" and mine.active
    assert api.rpc("GetPolicy", pb.GetPolicyRequest(ref="secret-plan"), globex).version.version == "2"


def test_history_records_the_principal_that_changed_a_policy(api):
    globex = api.keys["globex"]
    api.rpc("PutPolicy", pb.PutPolicyRequest(text=_policy("globex-rules", "1"), activate=True), globex.secret)
    api.rpc("PutPolicy", pb.PutPolicyRequest(text=_policy("globex-rules", "2"), activate=True), globex.secret)
    api.rpc("RollbackPolicy", pb.RollbackPolicyRequest(id="globex-rules"), globex.secret)
    history = Registry(api.state).history("globex-rules", tenant="globex")
    assert [(e.action, e.actor) for e in history.activations] == [
        ("activate", f"key:{globex.info.key_id}"), ("activate", f"key:{globex.info.key_id}"),
        ("rollback", f"key:{globex.info.key_id}")]


def test_a_revoked_key_stops_working_after_the_refresh(api):
    doomed = api.keys["doomed"]
    assert api.rpc("Classify", classify_request(), doomed.secret).policy.id == "smoke"
    result = CliRunner().invoke(main, ["keys", "--state-dir", str(api.state), "revoke", doomed.info.key_id])
    assert result.exit_code == 0, result.output

    async def refused() -> bool:
        try:
            await api.stub.Classify(classify_request(), metadata=(("x-api-key", doomed.secret),), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code() == grpc.StatusCode.UNAUTHENTICATED
        return False

    assert api.run(poll(refused, True, timeout=5.0))
    assert api.rpc("Classify", classify_request(), api.secret("acme")).policy.id == "smoke"  # others unaffected


def test_health_and_reflection_stay_open(api):
    status = api.run(api.health.Check(health_pb2.HealthCheckRequest(service="")))
    assert status.status == health_pb2.HealthCheckResponse.SERVING

    def services() -> list[str]:
        with grpc.insecure_channel(api.frontend.address) as channel:
            return ProtoReflectionDescriptorDatabase(channel).get_services()

    assert "safeguard.v1.Safeguard" in api.run(asyncio.to_thread(services))


@pytest.mark.parametrize("changes", [dict(listen="0.0.0.0:0"),
                                     dict(listen="127.0.0.1:0", admin_listen="0.0.0.0:0")])
def test_no_authentication_on_a_non_loopback_address_refuses_to_start(api, tmp_path, changes):
    fresh = tmp_path / "fresh"  # no keys: auth=auto would leave the API open

    async def build(state, **more):
        # Plaintext off loopback is refused on its own (test_tls.py); allowed here to reach the auth refusal.
        frontend = build_server(frontend_settings(api.triton_url, state, **changes, **more,
                                                  allow_insecure_listen=True))
        frontend.audit.close()
        return frontend

    with pytest.raises(ServerSettingsError, match="without authentication: auth is auto and no API key exists"):
        api.run(build(fresh))
    with pytest.raises(ServerSettingsError, match=r"auth: is off, but 0\.0\.0\.0:0 can be reached from other hosts"):
        api.run(build(fresh, auth="off"))
    assert api.run(build(fresh, allow_unauthenticated=True)).port > 0  # the operator said so
    assert api.run(build(api.state)).port > 0  # keys exist: authentication is on


def test_the_admin_listener_alone_serves_policy_changes(api):
    settings = frontend_settings(api.triton_url, api.state, admin_listen="127.0.0.1:0", key_refresh_s=0.2)
    frontend, main_channel = api.run(open_frontend(settings))
    admin_channel = grpc.aio.insecure_channel(frontend.admin_address)
    acme = api.secret("acme")
    try:
        put = pb.PutPolicyRequest(text=_policy("admin-only", "1"), activate=True)
        for method, request in (("PutPolicy", put), ("ActivatePolicy", pb.ActivatePolicyRequest(id="smoke",
                                                                                                ref="1.0.0")),
                                ("RollbackPolicy", pb.RollbackPolicyRequest(id="smoke"))):
            refused = api.refused(method, request, acme, api=main_channel)
            assert refused.code() == grpc.StatusCode.PERMISSION_DENIED and "admin listener" in refused.details()
        assert api.rpc("GetPolicy", pb.GetPolicyRequest(ref="smoke"), acme, api=main_channel).version.id == "smoke"
        assert api.rpc("Classify", classify_request(), acme, api=main_channel).policy.id == "smoke"
        assert api.rpc("PutPolicy", put, acme, api=admin_channel).id == "admin-only"
        unauthenticated = api.refused("PutPolicy", put, api=admin_channel)
        assert unauthenticated.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        api.run(admin_channel.close())
        api.run(main_channel.close())
        api.run(frontend.stop(grace=1))


def test_the_python_client_and_the_cli_send_the_api_key(api):
    from server.client import SafeguardClient

    def with_client(key: str | None) -> str:
        with SafeguardClient(api.frontend.address, api_key=key, timeout=10) as client:
            try:
                return client.classify("smoke", "hello").policy.id
            except grpc.RpcError as exc:
                return exc.code().name

    assert api.run(asyncio.to_thread(with_client, api.secret("acme-classify"))) == "smoke"
    assert api.run(asyncio.to_thread(with_client, None)) == "UNAUTHENTICATED"

    def with_cli(env: dict[str, str]):
        return CliRunner().invoke(main, ["classify", "--target", api.frontend.address, "--policy", "smoke",
                                         "--text", "hello", "--timeout", "10"], env=env)

    sent = api.run(asyncio.to_thread(with_cli, {"APPLIANCE_API_KEY": api.secret("acme-classify")}))
    assert sent.exit_code == 0 and "policy smoke@1.0.0" in sent.output, sent.output
    unsent = api.run(asyncio.to_thread(with_cli, {}))
    assert unsent.exit_code == 1 and "UNAUTHENTICATED" in unsent.output


def test_a_client_certificate_is_an_identity_with_its_tenant_and_scopes(api, tmp_path):
    from test_tls import CERT_MAP
    from tls_certs import TestCA, require_openssl

    require_openssl()
    ca = TestCA(tmp_path / "ca")
    server, billing, stranger = ca.server(), ca.client("billing", "billing"), ca.client("stranger", "stranger")
    (tmp_path / "clients.toml").write_text(CERT_MAP)  # billing: tenant acme, classify and policy:read
    settings = frontend_settings(api.triton_url, api.state, audit_wait=True, tls_cert=str(server.cert),
                                 tls_key=str(server.key), tls_client_ca=str(ca.cert),
                                 client_cert_map=str(tmp_path / "clients.toml"))
    frontend, plain = api.run(open_frontend(settings))
    api.run(plain.close())

    def channel(client) -> grpc.aio.Channel:
        return grpc.aio.secure_channel(frontend.address, grpc.ssl_channel_credentials(
            ca.cert.read_bytes(), client.key.read_bytes(), client.pem))

    as_billing, as_stranger = channel(billing), channel(stranger)
    try:
        answer = api.rpc("Classify", classify_request(request_id="by-cert"), api=as_billing)
        assert answer.policy.id == "smoke"  # smoke is registered only in acme's registry
        [record] = AuditReader(audit_path(api.state)).by_request("by-cert")
        assert record.tenant == "acme" and record.principal.startswith("cert:") and "billing" in record.principal
        denied = api.refused("PutPolicy", pb.PutPolicyRequest(text=_policy("by-cert")), api=as_billing)
        assert denied.code() == grpc.StatusCode.PERMISSION_DENIED and "policy:write" in denied.details()
        unmapped = api.refused("Classify", classify_request(), api=as_stranger)
        assert unmapped.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        api.run(as_billing.close())
        api.run(as_stranger.close())
        api.run(frontend.stop(grace=1))


def test_modes_and_method_scopes(tmp_path):
    from server.auth import Authentication, method_scope
    from server.errors import Unauthenticated
    from server.identity import ANONYMOUS
    from server.keys import KeyAuthenticator

    store = KeyStore(tmp_path / "keys.sqlite3")
    bad = {"x-api-key": "sgk_000000000000_" + "x" * 43}
    assert Authentication("auto", KeyAuthenticator(store)).identify({}, {}) is ANONYMOUS  # no keys yet: open
    with pytest.raises(Unauthenticated):
        Authentication("auto", KeyAuthenticator(store)).identify(bad, {})  # a wrong key is refused even so
    with pytest.raises(Unauthenticated, match="needs a credential"):
        Authentication("on", KeyAuthenticator(store)).identify({}, {})
    store.create("acme", [CLASSIFY])
    assert Authentication("off", KeyAuthenticator(store)).identify(bad, {}) is ANONYMOUS
    with pytest.raises(Unauthenticated, match="needs a credential"):
        Authentication("auto", KeyAuthenticator(store)).identify({}, {})

    assert method_scope("/safeguard.v1.Safeguard/ClassifyBatch") == CLASSIFY
    assert method_scope("/safeguard.v1.Safeguard/RollbackPolicy") == POLICY_WRITE
    assert method_scope("/safeguard.v1.Safeguard/SomethingNew") == ADMIN  # unlisted methods fail closed
    assert method_scope("/grpc.health.v1.Health/Watch") is None


def test_serve_refuses_an_unauthenticated_exposure_before_starting_triton(tmp_path):
    repository = tmp_path / "repository"  # empty: Triton would fail to load it, so a refusal must come first
    repository.mkdir()
    result = CliRunner().invoke(main, ["serve", "--repository", str(repository), "--listen", "0.0.0.0:0",
                                       "--allow-insecure-listen", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0
    assert "without authentication: auth is auto and no API key exists" in result.output
    assert "tritonserver" not in result.output
