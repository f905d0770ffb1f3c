"""Tenants in storage: the registry keyed by tenant (and its migration from schema 1), a foreign tenant's policy
answering exactly like a missing one, `appliance policy --tenant`, and the audit log's caller columns (and their
migration, with the hash chain verifying across old and new rows)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from click.testing import CliRunner

from appliance.cli import main
from classification.library import bundled_policy
from classification.policy import load_policy, parse_policy
from server import audit_file, registry_file
from server.audit import AuditLog, AuditRecord
from server.audit_reader import AuditReader
from server.identity import DEFAULT_TENANT
from server.registry import DB_NAME, Registry
from server.registry_errors import RegistryError

SMOKE = load_policy(bundled_policy("smoke"))


def _policy(policy_id: str, version: str = "1") -> str:
    return (f'+++\nid = "{policy_id}"\nversion = "{version}"\ntitle = "T"\n\n[output]\nformat = "binary"\n+++\n'
            f"Answer 1 when the content is about {policy_id} (v{version}), else 0.\n")


def _v1_registry(state: Path) -> None:
    """A registry file as schema 1 wrote it (plain SQL): one policy with two versions, activated, rolled back."""
    state.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(state / DB_NAME, isolation_level=None)
    for statement in registry_file.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute("PRAGMA user_version = 1")
    conn.execute("PRAGMA foreign_keys = ON")
    for seq, text in enumerate((_policy("legacy", "1"), _policy("legacy", "2")), start=1):
        p = parse_policy(text)
        if seq == 1:
            conn.execute("INSERT INTO policies VALUES ('legacy', '2026-01-01T00:00:00.000Z')")
        conn.execute("INSERT INTO versions VALUES ('legacy', ?, ?, ?, ?, ?, '2026-01-01T00:00:00.000Z')",
                     (seq, p.version, p.sha256, p.title, p.text))
    conn.execute("INSERT INTO activations VALUES (1, 'legacy', 1, 'activate', 'alice', 'x', NULL)")
    conn.execute("INSERT INTO activations VALUES (2, 'legacy', 2, 'activate', 'alice', 'y', 1)")
    conn.execute("INSERT INTO activations VALUES (3, 'legacy', 1, 'rollback', 'bob', 'z', NULL)")
    conn.close()


def test_a_schema_1_registry_migrates_into_the_default_tenant(tmp_path):
    _v1_registry(tmp_path)
    registry = Registry(tmp_path)
    assert registry.check() == []
    assert [s.policy_id for s in registry.list()] == ["legacy"]
    assert registry.list(tenant="acme") == []
    history = registry.history("legacy")
    assert [(e.action, e.version, e.actor) for e in history.activations] == [
        ("activate", "1", "alice"), ("activate", "2", "alice"), ("rollback", "1", "bob")]
    assert history.active.version == "1" and len(history.versions) == 2
    registry.activate("legacy", "2")  # the undo chain survived: activate, then roll back to 1 again
    assert registry.rollback("legacy").active.version == "1"
    conn = sqlite3.connect(tmp_path / DB_NAME)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == registry_file.SCHEMA_VERSION == 2
    assert {r[0] for r in conn.execute("SELECT name FROM sqlite_schema WHERE type = 'table'")} == {
        "policies", "versions", "activations"}
    conn.close()


def test_tenants_hold_the_same_policy_id_and_the_same_text_independently(tmp_path):
    registry = Registry(tmp_path)
    a = registry.add(SMOKE, activate=True, tenant="acme")
    b = registry.add(SMOKE, activate=True, tenant="globex")
    assert a.created and b.created and a.activated and b.activated  # neither saw the other's copy
    registry.add(parse_policy(_policy("smoke-extra")), tenant="globex")
    assert [s.policy_id for s in registry.list(tenant="acme")] == ["smoke"]
    assert [s.policy_id for s in registry.list(tenant="globex")] == ["smoke", "smoke-extra"]
    assert registry.list() == [] and registry.tenants() == ["acme", "globex"]
    assert registry.check() == []


def _refusal(call, policy_id: str) -> tuple[type, str]:
    with pytest.raises(RegistryError) as caught:
        call(policy_id)
    return type(caught.value), str(caught.value)


@pytest.mark.parametrize("known_to_caller", [False, True])
def test_a_foreign_tenants_policy_answers_exactly_like_a_missing_one(tmp_path, known_to_caller):
    registry = Registry(tmp_path)
    registry.add(parse_policy(_policy("secret-plan")), activate=True, tenant="globex")
    registry.add(parse_policy(_policy("secret-plan", "2")), activate=True, tenant="globex")
    if known_to_caller:
        registry.add(parse_policy(_policy("acme-rules")), activate=True, tenant="acme")
    calls = {
        "get": lambda pid: registry.get(pid, tenant="acme"),
        "get pinned": lambda pid: registry.get(pid, "1", tenant="acme"),
        "activate": lambda pid: registry.activate(pid, "1", tenant="acme"),
        "rollback": lambda pid: registry.rollback(pid, tenant="acme"),
        "history": lambda pid: registry.history(pid, tenant="acme"),
    }
    for name, call in calls.items():
        foreign_kind, foreign = _refusal(call, "secret-plan")
        missing_kind, missing = _refusal(call, "never-made!")
        assert foreign_kind is missing_kind, name
        assert foreign.replace("secret-plan", "ID") == missing.replace("never-made!", "ID"), name
        assert "globex" not in foreign
    assert ("acme-rules" in foreign) is known_to_caller  # "known policies" names only the caller's own
    assert registry.get("secret-plan", tenant="globex").info.version == "2"  # untouched


def test_policy_cli_takes_a_tenant_and_records_the_os_user(tmp_path, monkeypatch):
    monkeypatch.setattr("server.registry.getpass.getuser", lambda: "operator-jo")
    path = tmp_path / "p.md"
    path.write_text(_policy("acme-rules"))

    def cli(*args: str):
        return CliRunner().invoke(main, ["policy", "--state-dir", str(tmp_path / "state"), *args])

    added = cli("--tenant", "acme", "add", str(path), "--activate")
    assert added.exit_code == 0, added.output
    assert "acme-rules" in cli("--tenant", "acme", "list").output
    assert "no policies registered" in cli("list").output
    missing = cli("show", "acme-rules")
    assert missing.exit_code == 1 and "no policies are registered yet" in missing.output
    assert "operator-jo" in cli("--tenant", "acme", "history", "acme-rules").output
    bad = cli("--tenant", "Not A Tenant", "list")
    assert bad.exit_code == 1 and "not a valid name" in bad.output


def _record(request_id: str, **fields) -> AuditRecord:
    return AuditRecord(request_id, "smoke", "1.0.0", SMOKE.sha256, "fp", False, "ok", "hello", **fields)


def test_a_schema_1_audit_log_migrates_and_its_chain_verifies_across_old_and_new_rows(tmp_path):
    path = tmp_path / "audit.sqlite3"
    conn = sqlite3.connect(path, isolation_level=None)  # the file as schema 1 wrote it
    for statement in audit_file.MIGRATIONS[0]:
        conn.execute(statement)
    conn.execute(f"PRAGMA application_id = {audit_file.APPLICATION_ID}")
    conn.execute("PRAGMA user_version = 1")
    conn.close()
    conn = sqlite3.connect(path, isolation_level=None)
    prev = audit_file.GENESIS_HASH
    v1_columns = [c for c in audit_file.COLUMNS if c not in ("tenant", "principal")]
    for seq in (1, 2):
        row = {"seq": seq, "ts": "2026-01-01T00:00:00.000Z", "request_id": f"old-{seq}", "policy_id": "smoke",
               "policy_version": "1.0.0", "policy_sha256": SMOKE.sha256, "model_fingerprint": "fp", "violation": 0,
               "category": None, "rule_ids": "[]", "confidence": None, "parse_status": "ok", "rationale": None,
               "content_sha256": "0" * 64, "content": None, "prompt_tokens": 1, "cached_tokens": 0,
               "reasoning_tokens": 0, "output_tokens": 1, "latency_ms": 1.0, "prev_hash": prev}
        row["record_hash"] = prev = audit_file.record_hash(row)
        conn.execute(f"INSERT INTO records ({', '.join(v1_columns)}) VALUES ({', '.join('?' * len(v1_columns))})",
                     [row[c] for c in v1_columns])
    conn.close()
    assert AuditReader(path).verify().ok  # the reader reads a schema 1 file as it is (evidence is not migrated)
    assert AuditReader(path).tail(1)[0].tenant is None

    with AuditLog(path, store_rationale=True, store_content=False) as log:
        log.append(_record("new-1", tenant="acme", principal="key:0123456789ab"))
        log.append(_record("new-2"))
    result = AuditReader(path).verify()
    assert result.ok and result.records_checked == 4
    entries = AuditReader(path).tail(4)
    assert [(e.request_id, e.tenant, e.principal) for e in entries] == [
        ("old-1", None, None), ("old-2", None, None), ("new-1", "acme", "key:0123456789ab"),
        ("new-2", DEFAULT_TENANT, "anonymous")]

    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("UPDATE records SET principal = 'key:someone-else' WHERE request_id = 'new-1'")
    conn.close()
    broken = AuditReader(path).verify()
    assert not broken.ok and broken.first_broken_request_id == "new-1"  # the caller columns are hashed
