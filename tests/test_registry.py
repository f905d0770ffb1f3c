"""The policy registry (server/registry.py) and its CLI (server/policy_cli.py), on real SQLite files."""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing
import queue
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.cli import ApplianceGroup
from classification.policy import Policy, parse_policy
from server.policy_cli import policy_group
from server.registry import DB_NAME, Registry
from server.registry_errors import RegistryError
from server.registry_file import SCHEMA_VERSION


def policy_text(policy_id: str = "spam", version: str = "1", body: str = "Flag spam.") -> str:
    return (f'+++\nid = "{policy_id}"\nversion = "{version}"\ntitle = "{policy_id.title()}"\n'
            f'[output]\nformat = "binary"\n+++\n{body}\n')


def make(policy_id: str = "spam", version: str = "1", body: str = "Flag spam.") -> Policy:
    return parse_policy(policy_text(policy_id, version, body))


@pytest.fixture
def registry(tmp_path: Path) -> Registry:
    return Registry(tmp_path / "state")


def colliding_labels(prefix_len: int = 8) -> tuple[str, str]:
    """Two version labels whose policy texts share the first `prefix_len` hex digits of their sha256."""
    seen: dict[str, str] = {}
    for i in range(10_000_000):
        label = f"v{i}"
        prefix = hashlib.sha256(policy_text(version=label).encode()).hexdigest()[:prefix_len]
        if prefix in seen:
            return seen[prefix], label
        seen[prefix] = label
    raise AssertionError("no collision found")


# -- versions ---------------------------------------------------------------------------------------------------


def test_add_is_idempotent_on_the_text(registry: Registry):
    first = registry.add(make())
    again = registry.add(make())
    assert first.created and not again.created
    assert again.info == first.info
    assert first.info.seq == 1 and first.info.sha256 == make().sha256
    assert [s.version_count for s in registry.list()] == [1]


def test_same_label_with_different_text_is_refused(registry: Registry):
    registry.add(make(body="Flag spam."))
    with pytest.raises(RegistryError, match=r"policy spam version 1 already exists with different content "
                                            r"\(stored sha [0-9a-f]{12}, this text sha [0-9a-f]{12}\); bump the "
                                            r"version label"):
        registry.add(make(body="Flag spam and scams."))


def test_sequence_numbers_count_per_policy(registry: Registry):
    seqs = [registry.add(make(pid, v, f"{pid} {v}")).info.seq for pid, v in [("a", "1"), ("a", "2"), ("b", "1")]]
    assert seqs == [1, 2, 1]


def test_a_policy_whose_fields_disagree_with_its_text_is_refused(registry: Registry):
    with pytest.raises(RegistryError, match="do not match its text"):
        registry.add(dataclasses.replace(make(), title="Something else"))


def test_get_returns_the_active_or_the_named_version_parsed(registry: Registry):
    registry.add(make(version="1", body="one"), activate=True)
    registry.add(make(version="2", body="two"))
    active = registry.get("spam")
    assert active.active and active.info.version == "1" and active.policy == make(version="1", body="one")
    named = registry.get("spam", "2")
    assert not named.active and named.policy.body == "two"


def test_get_without_an_active_version_says_which_exist(registry: Registry):
    registry.add(make())
    with pytest.raises(RegistryError, match=r"policy spam has no active version; activate one of: 1 \(sha"):
        registry.get("spam")


def test_unknown_policy_names_the_known_ones(registry: Registry):
    with pytest.raises(RegistryError, match="no policies are registered yet"):
        registry.get("spam")
    registry.add(make("alpha"))
    registry.add(make("beta"))
    with pytest.raises(RegistryError, match="unknown policy 'spam'; known policies: alpha, beta"):
        registry.history("spam")


# -- activation and rollback ------------------------------------------------------------------------------------


def test_activate_by_label_full_sha_and_prefix(registry: Registry):
    one = registry.add(make(version="1", body="one")).info
    two = registry.add(make(version="2", body="two")).info
    assert registry.activate("spam", "1").active == one
    assert registry.activate("spam", two.sha256).active == two
    result = registry.activate("spam", one.sha256[:8].upper())
    assert result.active == one and result.previous == two and result.changed
    assert not registry.activate("spam", "1").changed


def test_unknown_version_and_too_short_prefix(registry: Registry):
    info = registry.add(make()).info
    for ref in ("7", info.sha256[:7]):
        with pytest.raises(RegistryError, match=rf"policy spam has no version '{ref}'; versions: 1 \(sha .*at least 8"):
            registry.activate("spam", ref)


def test_ambiguous_sha_prefix_lists_the_candidates(registry: Registry):
    first, second = colliding_labels()
    a = registry.add(make(version=first)).info
    b = registry.add(make(version=second)).info
    assert a.sha256[:8] == b.sha256[:8] and a.sha256 != b.sha256
    with pytest.raises(RegistryError, match=rf"sha prefix {a.sha256[:8]} is ambiguous for policy spam: it matches "
                                            rf"{first} \(sha .*\), {second} \(sha .*\); give more characters"):
        registry.activate("spam", a.sha256[:8])
    common = next(i for i in range(8, 64) if a.sha256[i] != b.sha256[i])
    assert registry.activate("spam", b.sha256[:common + 1]).active == b


def test_rollback_walks_back_one_activation_at_a_time(registry: Registry):
    for v in "123":
        registry.add(make(version=v, body=v), activate=True)
    assert registry.rollback("spam").active.version == "2"
    assert registry.rollback("spam").active.version == "1"
    with pytest.raises(RegistryError, match=r"policy spam: nothing to roll back to; version 1 .* is active"):
        registry.rollback("spam")
    registry.activate("spam", "3")
    result = registry.rollback("spam")
    assert (result.active.version, result.previous.version) == ("1", "3")
    assert registry.get("spam").info.version == "1"


def test_rollback_of_a_policy_never_activated(registry: Registry):
    registry.add(make())
    with pytest.raises(RegistryError, match="policy spam has never been activated; nothing to roll back"):
        registry.rollback("spam")


def test_history_records_versions_and_who_switched_what(registry: Registry):
    registry.add(make(version="1", body="one"), activate=True, actor="alice")
    registry.add(make(version="2", body="two"))
    registry.activate("spam", "2", actor="bob")
    registry.rollback("spam", actor="carol")
    history = registry.history("spam")
    assert [v.version for v in history.versions] == ["1", "2"]
    assert [(e.action, e.version, e.actor) for e in history.activations] == [
        ("activate", "1", "alice"), ("activate", "2", "bob"), ("rollback", "1", "carol")]
    assert history.active is not None and history.active.version == "1"
    assert all(e.at.endswith("Z") for e in history.activations)


def test_list_shows_each_policy_with_its_active_version(registry: Registry):
    registry.add(make("beta", "1", "b1"))
    registry.add(make("alpha", "1", "a1"), activate=True)
    registry.add(make("alpha", "2", "a2"))
    summaries = registry.list()
    assert [(s.policy_id, s.version_count, s.latest.version) for s in summaries] == [
        ("alpha", 2, "2"), ("beta", 1, "1")]
    assert summaries[0].active is not None and summaries[0].active.version == "1"
    assert summaries[1].active is None


def test_diff_of_two_versions(registry: Registry):
    registry.add(make(version="1", body="Flag spam."))
    registry.add(make(version="2", body="Flag spam and scams."))
    diff = registry.diff("spam", "1", "2")
    assert diff.startswith("--- spam@1 (")
    assert "\n+++ spam@2 (" in diff
    assert "-Flag spam.\n+Flag spam and scams.\n" in diff
    assert registry.diff("spam", "1", "1") == ""


# -- import -----------------------------------------------------------------------------------------------------


def test_import_dir_skips_non_policies_and_activates_only_new_policies(registry: Registry, tmp_path: Path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "README.md").write_text("# Example policies\n")
    (folder / "a.md").write_text(policy_text("alpha", "1", "a1"))
    (folder / "a2.md").write_text(policy_text("alpha", "2", "a2"))
    (folder / "b.md").write_text(policy_text("beta", "1", "b1"))
    (folder / "bad.md").write_text("+++\nid = \"bad\"\n+++\nbody\n")
    (folder / "notes.txt").write_text(policy_text("gamma"))
    registry.add(make("beta", "0", "b0"), activate=True)

    outcomes = {o.path.name: o for o in registry.import_dir(folder)}
    assert sorted(outcomes) == ["README.md", "a.md", "a2.md", "b.md", "bad.md"]
    assert outcomes["README.md"].status == "skipped"
    assert outcomes["bad.md"].status == "failed" and "front matter needs version" in outcomes["bad.md"].message
    assert [(outcomes[n].status, outcomes[n].activated) for n in ("a.md", "a2.md", "b.md")] == [
        ("added", True), ("added", False), ("added", False)]
    assert registry.get("alpha").info.version == "1" and registry.get("beta").info.version == "0"

    again = {o.path.name: o.status for o in registry.import_dir(folder)}
    assert again["a.md"] == again["a2.md"] == again["b.md"] == "unchanged"


def test_import_of_the_shipped_policies(registry: Registry):
    outcomes = registry.import_dir(Path(__file__).resolve().parents[1] / "policies")
    assert outcomes and not [o for o in outcomes if o.status == "failed"]
    assert all(s.active is not None for s in registry.list())


# -- the file ---------------------------------------------------------------------------------------------------


def test_state_survives_reopening_with_wal_and_a_versioned_schema(tmp_path: Path):
    Registry(tmp_path).add(make(), activate=True)
    assert Registry(tmp_path).get("spam").info.version == "1"
    with sqlite3.connect(tmp_path / DB_NAME) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_a_newer_schema_is_refused(tmp_path: Path):
    Registry(tmp_path)
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(RegistryError, match="newer than this appliance understands"):
        Registry(tmp_path)


def test_check_finds_text_that_no_longer_matches_its_sha(registry: Registry):
    registry.add(make())
    assert registry.check() == []
    conn = sqlite3.connect(registry.path)
    conn.execute("UPDATE versions SET text = replace(text, 'Flag spam.', 'Allow spam.')")
    conn.commit()
    conn.close()
    assert registry.check() == ["policy spam version 1: stored text does not match its sha256"]


def test_a_file_that_is_not_a_database_is_a_clear_error(tmp_path: Path):
    (tmp_path / DB_NAME).write_bytes(b"not sqlite at all" * 100)
    with pytest.raises(RegistryError, match=rf"policy registry .*{DB_NAME}: file is not a database"):
        Registry(tmp_path)


# -- concurrency ------------------------------------------------------------------------------------------------


def test_threads_share_one_registry(registry: Registry):
    def work(i: int) -> str:
        registry.list()
        return registry.add(make(f"p{i % 3}", f"t{i}", f"body {i}"), activate=True).info.sha256

    with ThreadPoolExecutor(8) as pool:
        shas = list(pool.map(work, range(40)))
    stored = {v.sha256 for pid in ("p0", "p1", "p2") for v in registry.history(pid).versions}
    assert stored == set(shas)


WRITERS, READERS, ADDS_PER_WRITER = 4, 2, 15


def _writer(state_dir: str, worker: int, barrier, results) -> None:
    try:
        barrier.wait()
        registry = Registry(state_dir)  # every process opens the brand-new file at once
        shas = [registry.add(make(f"p{i % 3}", f"w{worker}-{i}", f"body {worker} {i}"), activate=i % 2 == 0)
                .info.sha256 for i in range(ADDS_PER_WRITER)]
        results.put(("writer", shas, None))
    except Exception as exc:
        results.put(("writer", [], f"{type(exc).__name__}: {exc}"))


def _reader(state_dir: str, barrier, stop, results) -> None:
    try:
        barrier.wait()
        registry = Registry(state_dir)
        reads = 0
        while not stop.is_set() or reads == 0:
            for summary in registry.list():
                if summary.active is not None:
                    stored = registry.get(summary.policy_id)
                    assert stored.policy.sha256 == stored.info.sha256
            reads += 1
        results.put(("reader", reads, None))
    except Exception as exc:
        results.put(("reader", 0, f"{type(exc).__name__}: {exc}"))


def test_processes_write_and_read_at_once_without_losing_anything(tmp_path: Path):
    ctx = multiprocessing.get_context("spawn")
    barrier, stop, results = ctx.Barrier(WRITERS + READERS), ctx.Event(), ctx.Queue()
    state_dir = str(tmp_path / "state")
    writers = [ctx.Process(target=_writer, args=(state_dir, w, barrier, results)) for w in range(WRITERS)]
    readers = [ctx.Process(target=_reader, args=(state_dir, barrier, stop, results)) for _ in range(READERS)]
    try:
        for process in writers + readers:
            process.start()
        reports = [results.get(timeout=120) for _ in writers]
        stop.set()
        reports += [results.get(timeout=60) for _ in readers]
    except queue.Empty:
        pytest.fail("a worker process did not report in time")
    finally:
        stop.set()
        for process in writers + readers:
            process.join(timeout=30)
            if process.is_alive():
                process.kill()
                process.join()
    assert [error for _, _, error in reports if error] == []
    acked = {sha for kind, shas, _ in reports if kind == "writer" for sha in shas}
    assert len(acked) == WRITERS * ADDS_PER_WRITER
    registry = Registry(state_dir)
    histories = [registry.history(f"p{i}") for i in range(3)]
    assert {v.sha256 for h in histories for v in h.versions} == acked
    for history in histories:  # no gaps and no duplicates: every sequence number was handed out once
        assert [v.seq for v in history.versions] == list(range(1, len(history.versions) + 1))
    assert registry.check() == []


# -- CLI --------------------------------------------------------------------------------------------------------


def appliance_root() -> click.Group:
    """The policy group under the real root group class, so errors print as they will in `appliance`."""
    return ApplianceGroup("appliance", commands={"policy": policy_group},
                          context_settings={"auto_envvar_prefix": "APPLIANCE"})


def run_cli(state_dir: Path, *args: str):
    return CliRunner().invoke(appliance_root(), ["policy", "--state-dir", str(state_dir), *args])


def test_cli_add_list_show_activate_rollback_history_diff(tmp_path: Path):
    state = tmp_path / "state"
    v1, v2 = tmp_path / "v1.md", tmp_path / "v2.md"
    v1.write_text(policy_text(version="1.0.0", body="Flag spam."))
    v2.write_text(policy_text(version="1.1.0", body="Flag spam and scams."))

    added = run_cli(state, "add", str(v1), "--activate")
    assert added.exit_code == 0, added.output
    sha1 = parse_policy(v1.read_text()).sha256
    assert f"added spam 1.0.0 (sha {sha1[:12]}), version #1, 3 policy tokens" in added.stdout
    assert "activated spam 1.0.0" in added.stdout
    assert "warning: policy is 3 tokens; gpt-oss-safeguard does best with 400 to 600" in added.stderr
    assert "unchanged, already stored: spam 1.0.0" in run_cli(state, "add", str(v1)).stdout
    assert run_cli(state, "add", str(v2)).exit_code == 0

    listing = run_cli(state, "list").stdout.splitlines()
    assert listing[0].split() == ["ID", "ACTIVE", "SHA", "VERSIONS", "TITLE"]
    assert listing[1].split() == ["spam", "1.0.0", sha1[:12], "2", "Spam"]

    shown = run_cli(state, "show", "spam@1.1.0").stdout
    assert "version:  1.1.0 (#2)" in shown and "output:   binary" in shown and "tokens:   5" in shown
    assert run_cli(state, "show", f"spam@{sha1[:10]}", "--text").stdout == v1.read_text()

    assert "activated spam 1.1.0" in run_cli(state, "activate", "spam", "1.1.0").stdout
    assert "rolled back to spam 1.0.0" in run_cli(state, "rollback", "spam").stdout
    history = run_cli(state, "history", "spam").stdout
    assert [line.split()[1] for line in history.splitlines() if "T" in line.split()[0]] == [
        "activate", "activate", "rollback"]
    diff = run_cli(state, "diff", "spam", "1.0.0", "1.1.0").stdout
    assert "-Flag spam.\n+Flag spam and scams.\n" in diff
    assert run_cli(state, "check").stdout.endswith(": ok\n")


def test_cli_errors_are_one_clear_line_and_exit_1(tmp_path: Path):
    state = tmp_path / "state"
    policy = tmp_path / "spam.md"
    policy.write_text(policy_text())
    run_cli(state, "add", str(policy))
    result = run_cli(state, "activate", "spam", "9")
    assert result.exit_code == 1
    assert result.stderr.startswith("error: policy spam has no version '9'; versions: 1 (sha ")
    assert "Traceback" not in result.output
    unknown = run_cli(state, "rollback", "ham")
    assert (unknown.exit_code, unknown.stderr) == (1, "error: unknown policy 'ham'; known policies: spam\n")


def test_cli_import_reports_each_file_and_fails_on_a_bad_one(tmp_path: Path):
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "README.md").write_text("About these policies.\n")
    (folder / "spam.md").write_text(policy_text())
    (folder / "broken.md").write_text("+++\nid = \"broken\"\n")
    result = run_cli(tmp_path / "state", "import", str(folder))
    assert result.exit_code == 1
    lines = {line.split()[1]: line.split()[0] for line in result.stdout.splitlines()}
    assert lines == {"README.md": "skipped", "spam.md": "added", "broken.md": "failed"}
    assert "error: 1 of 3 files not imported (the rest were)" in result.stderr


def test_cli_state_dir_comes_from_the_environment(tmp_path: Path):
    policy = tmp_path / "spam.md"
    policy.write_text(policy_text())
    state = tmp_path / "from-env"
    result = CliRunner(env={"APPLIANCE_STATE_DIR": str(state)}).invoke(appliance_root(), ["policy", "add", str(policy)])
    assert result.exit_code == 0, result.output
    assert (state / DB_NAME).is_file()
