"""API keys: `appliance keys create|list|revoke` on a real SQLite key table, and the authenticator that reads it."""

from __future__ import annotations

import re

import pytest
from click.testing import CliRunner

import server.keys as keys_module
from appliance.cli import main
from server.errors import Unauthenticated, Unavailable
from server.identity import CLASSIFY, POLICY_READ
from server.keys import KEYS_DB_NAME, KeyAuthenticator, KeyStore, KeyStoreError, presented_key

KEY = re.compile(r"^sgk_([0-9a-f]{12})_\S+$")


def _cli(state, *args: str):
    return CliRunner().invoke(main, ["keys", "--state-dir", str(state), *args])


def test_create_list_revoke_through_the_cli_and_the_secret_is_never_stored(tmp_path):
    created = _cli(tmp_path, "create", "--tenant", "acme", "--scope", "classify", "--scope", "policy:read",
                   "--name", "moderation bot")
    assert created.exit_code == 0, created.output
    secret = created.stdout.strip()
    match = KEY.match(secret)
    assert match, created.stdout
    key_id = match.group(1)
    assert "only time the key is shown" in created.stderr

    listed = _cli(tmp_path, "list")
    assert listed.exit_code == 0
    assert key_id in listed.output and "acme" in listed.output and "classify,policy:read" in listed.output
    assert "moderation bot" in listed.output
    secret_part = secret.split("_", 2)[2]
    assert secret_part not in listed.output

    stored = b"".join(p.read_bytes() for p in tmp_path.glob(f"{KEYS_DB_NAME}*"))
    assert key_id.encode() in stored  # the id is stored in clear, the secret never
    assert secret_part.encode() not in stored and secret.encode() not in stored

    revoked = _cli(tmp_path, "revoke", key_id)
    assert revoked.exit_code == 0 and f"revoked key {key_id}" in revoked.output
    assert KeyStore(tmp_path / KEYS_DB_NAME).get(key_id).revoked_at is not None
    assert re.search(rf"{key_id}\s.*Z\s", _cli(tmp_path, "list").output)  # the revocation time is listed


@pytest.mark.parametrize(("args", "message"), [
    (["create", "--scope", "clasify"], "unknown scope 'clasify'; scopes are classify, policy:read, policy:write, "
                                       "admin"),
    (["create", "--tenant", "Acme Corp", "--scope", "classify"], "tenant 'Acme Corp' is not a valid name"),
    (["revoke", "0123456789ab"], "no key '0123456789ab'; keys: none exist yet"),
])
def test_cli_mistakes_get_plain_errors(tmp_path, args, message):
    result = _cli(tmp_path, *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output


def test_a_scope_is_required(tmp_path):
    result = _cli(tmp_path, "create", "--tenant", "acme")
    assert result.exit_code == 2 and "--scope" in result.output


def test_the_key_is_read_from_bearer_or_x_api_key_metadata():
    assert presented_key({"authorization": "Bearer sgk_abc"}) == "sgk_abc"
    assert presented_key({"authorization": "bearer  sgk_abc "}) == "sgk_abc"
    assert presented_key({"x-api-key": "sgk_def"}) == "sgk_def"
    assert presented_key({"authorization": "Basic dXNlcg=="}) is None
    assert presented_key({}) is None


class _Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_authenticator_identifies_verifies_once_and_sees_revocations_after_refresh(tmp_path, monkeypatch):
    store = KeyStore(tmp_path / KEYS_DB_NAME)
    new = store.create("acme", [CLASSIFY, POLICY_READ], "bot")
    clock = _Clock()
    authenticate = KeyAuthenticator(store, refresh_s=5.0, clock=clock)
    hashed: list[str] = []
    real_hash = keys_module._hash
    monkeypatch.setattr(keys_module, "_hash", lambda secret, salt: hashed.append(secret) or real_hash(secret, salt))

    for header in ({"authorization": f"Bearer {new.secret}"}, {"x-api-key": new.secret}):
        identity = authenticate(header, {})
        assert identity.principal == f"key:{new.info.key_id}" and identity.tenant == "acme"
        assert identity.scopes == frozenset({CLASSIFY, POLICY_READ})
    assert len(hashed) == 1  # scrypt ran once; the second call was served from the verified cache
    assert authenticate({}, {}) is None  # no key: nothing to say

    wrong = new.secret[:-4] + ("AAAA" if not new.secret.endswith("AAAA") else "BBBB")
    for bad in (wrong, "sgk_000000000000_" + "x" * 43, "not-a-key"):
        with pytest.raises(Unauthenticated, match="not valid"):
            authenticate({"x-api-key": bad}, {})

    store.revoke(new.info.key_id)
    assert authenticate({"x-api-key": new.secret}, {}).tenant == "acme"  # until the next refresh
    clock.now = 5.1
    with pytest.raises(Unauthenticated):
        authenticate({"x-api-key": new.secret}, {})


def test_auto_mode_stays_on_after_the_last_key_is_revoked(tmp_path):
    store = KeyStore(tmp_path / KEYS_DB_NAME)
    clock = _Clock()
    authenticate = KeyAuthenticator(store, refresh_s=1.0, clock=clock)
    assert not authenticate.enforced()
    new = store.create("default", [CLASSIFY])
    clock.now = 2
    assert authenticate.enforced()
    store.revoke(new.info.key_id)
    clock.now = 4
    assert authenticate.enforced()


def test_an_unreadable_key_table_is_unavailable_not_internal(tmp_path):
    store = KeyStore(tmp_path / KEYS_DB_NAME)
    store.create("default", [CLASSIFY])
    authenticate = KeyAuthenticator(store, refresh_s=1.0)
    (tmp_path / KEYS_DB_NAME).write_bytes(b"this is not a database" * 100)
    with pytest.raises(Unavailable, match="API keys cannot be read"):
        authenticate({"x-api-key": "sgk_000000000000_" + "x" * 43}, {})
    with pytest.raises(KeyStoreError):
        store.list()
