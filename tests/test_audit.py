"""The audit log (server/audit.py) and `appliance audit` (server/audit_cli.py), on real SQLite files tampered with
through raw sqlite3 the way an insider with file access would."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from appliance.cli import ApplianceGroup
from server.audit import AuditLog, AuditRecord
from server.audit_cli import audit_group
from server.audit_file import COLUMNS, GENESIS_HASH, AuditError, record_hash
from server.audit_reader import AuditReader
from server.registry import DB_NAME, Registry


def record(i: int = 1, **changes: object) -> AuditRecord:
    fields: dict[str, object] = dict(
        request_id=f"req-{i}", policy_id="spam", policy_version="1.0.0", policy_sha256="ab" * 32,
        model_fingerprint="gpt-oss-safeguard-20b:deadbeef", violation=i % 2 == 1, category="spam" if i % 2 else None,
        rule_ids=("SP1", "SP2") if i % 2 else (), confidence="high", parse_status="ok",
        rationale=f"rationale {i}", content=f"buy cheap watches #{i} ✓", prompt_tokens=600 + i, cached_tokens=512,
        reasoning_tokens=40, output_tokens=9, latency_ms=12.5 + i)
    fields.update(changes)
    return AuditRecord(**fields)  # type: ignore[arg-type]


def open_log(path: Path, **options: object) -> AuditLog:
    settings: dict[str, object] = {"store_rationale": True, "store_content": True, **options}
    return AuditLog(path, **settings)  # type: ignore[arg-type]


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit.sqlite3"


@pytest.fixture
def five(path: Path) -> Path:
    """A closed log holding records 1..5."""
    with open_log(path) as log:
        assert [log.append(record(i)) for i in range(1, 6)] == [1, 2, 3, 4, 5]
    return path


def raw(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.row_factory = sqlite3.Row
    return conn


def rows(path: Path) -> list[dict[str, object]]:
    with raw(path) as conn:
        return [dict(row) for row in conn.execute("SELECT * FROM records ORDER BY seq")]


@pytest.fixture
def write_lock(path: Path) -> Iterator[sqlite3.Connection]:
    """Another connection holding the file's write lock, stalling the writer until the test rolls it back."""
    path.parent.mkdir(parents=True, exist_ok=True)
    AuditLog(path, store_rationale=False, store_content=False).close()
    conn = raw(path)
    conn.execute("BEGIN IMMEDIATE")
    yield conn
    if conn.in_transaction:
        conn.execute("ROLLBACK")
    conn.close()


def wait_until_running(future: object) -> None:
    deadline = time.monotonic() + 10
    while not future.running():  # type: ignore[attr-defined]
        assert time.monotonic() < deadline, "the writer never picked the record up"
        time.sleep(0.001)


# -- appending and the chain --------------------------------------------------------------------------------------


def test_records_chain_by_the_documented_recipe(five: Path):
    stored = rows(five)
    assert [r["seq"] for r in stored] == [1, 2, 3, 4, 5]
    prev = "0" * 64
    for row in stored:
        hashed = {name: value for name, value in row.items() if name != "record_hash"}
        canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert row["prev_hash"] == prev
        assert row["record_hash"] == hashlib.sha256(canonical.encode("utf-8")).hexdigest()
        prev = row["record_hash"]
    result = AuditReader(five).verify()
    assert result.ok and result.records_checked == 5 and result.head_hash == prev
    assert set(stored[0]) == set(COLUMNS)


def test_stored_fields_round_trip(five: Path):
    entry = AuditReader(five).tail(5)[0]
    original = record(1)
    assert (entry.seq, entry.request_id, entry.policy_id, entry.policy_version, entry.policy_sha256) == (
        1, "req-1", "spam", "1.0.0", "ab" * 32)
    assert (entry.violation, entry.category, entry.rule_ids, entry.confidence, entry.parse_status) == (
        True, "spam", ("SP1", "SP2"), "high", "ok")
    assert (entry.rationale, entry.content) == (original.rationale, original.content)
    assert entry.content_sha256 == hashlib.sha256(original.content.encode()).hexdigest()
    assert (entry.prompt_tokens, entry.cached_tokens, entry.reasoning_tokens, entry.output_tokens) == (601, 512, 40, 9)
    assert entry.latency_ms == 13.5
    assert entry.ts.endswith("Z") and datetime.fromisoformat(entry.ts).tzinfo == UTC  # stamped when made, in UTC
    assert AuditReader(five).tail(5)[1].violation is False


def test_empty_log_verifies(path: Path):
    open_log(path).close()
    result = AuditReader(path).verify()
    assert result.ok and result.records_checked == 0 and result.head_hash == GENESIS_HASH


def test_reopen_continues_the_chain(five: Path):
    head = AuditReader(five).verify().head_hash
    with open_log(five) as log:
        assert log.append(record(6)) == 6
    stored = rows(five)
    assert stored[5]["prev_hash"] == head
    assert AuditReader(five).verify().records_checked == 6


def test_null_verdict_and_integral_latency_rehash_the_same(path: Path):
    with open_log(path) as log:
        log.append(record(1, violation=None, category=None, confidence=None, rationale=None, latency_ms=7,
                          parse_status="malformed", ts="2026-01-02T03:04:05.678Z"))
        assert log.verify().ok
        entry = log.tail(1)[0]
    assert entry.violation is None and entry.latency_ms == 7.0 and entry.rationale is None
    assert entry.ts == "2026-01-02T03:04:05.678Z"


def test_content_and_rationale_are_stored_only_when_configured(path: Path):
    with open_log(path, store_content=False, store_rationale=False) as log:
        log.append(record(1))
    entry = AuditReader(path).tail(1)[0]
    assert entry.content is None and entry.rationale is None
    assert entry.content_sha256 == hashlib.sha256(record(1).content.encode("utf-8")).hexdigest()
    with raw(path) as conn:  # nowhere in the file, not only not in the API
        assert conn.execute("SELECT count(*) FROM records WHERE content IS NOT NULL OR rationale IS NOT NULL"
                            ).fetchone()[0] == 0
    assert AuditReader(path).verify().ok


def test_concurrent_appends_from_threads_keep_one_chain(path: Path):
    with open_log(path) as log, ThreadPoolExecutor(8) as pool:
        seqs = list(pool.map(lambda i: log.append(record(i)), range(400)))
    assert sorted(seqs) == list(range(1, 401))
    result = AuditReader(path).verify()
    assert result.ok and result.records_checked == 400
    by_seq = {row["seq"]: row["request_id"] for row in rows(path)}
    assert all(by_seq[seq] == f"req-{i}" for i, seq in enumerate(seqs))


def test_two_writers_on_one_file_keep_one_chain(path: Path):
    # Two AuditLog objects stand for two front-end processes: separate connections, one file.
    a, b = open_log(path), open_log(path)
    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit((a if i % 2 else b).append, record(i)) for i in range(200)]
        seqs = sorted(f.result() for f in futures)
    a.close()
    b.close()
    assert seqs == list(range(1, 201))
    assert AuditReader(path).verify().records_checked == 200


def test_append_async_does_not_need_the_caller_to_wait(path: Path):
    async def main() -> list[int]:
        with open_log(path) as log:
            return list(await asyncio.gather(*(log.append_async(record(i)) for i in range(50))))

    assert sorted(asyncio.run(main())) == list(range(1, 51))
    assert AuditReader(path).verify().records_checked == 50


def test_a_cancelled_awaiter_still_gets_its_record_written(path: Path, write_lock: sqlite3.Connection):
    log = open_log(path)
    first = log.submit(record(1))
    wait_until_running(first)  # the writer holds record 1 and waits for the lock

    async def cancel_second() -> None:
        task = asyncio.create_task(log.append_async(record(2)))
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_second())
    write_lock.execute("ROLLBACK")
    log.close()
    assert first.result() == 1
    assert [r["request_id"] for r in rows(path)] == ["req-1", "req-2"]
    assert AuditReader(path).verify().ok


def test_close_flushes_what_is_queued(path: Path):
    log = open_log(path)
    futures = [log.submit(record(i)) for i in range(300)]
    log.close()
    assert [f.result(timeout=0) for f in futures] == list(range(1, 301))
    log.close()  # idempotent
    with pytest.raises(AuditError, match="closed"):
        log.submit(record(301))


def test_a_failed_write_fails_its_callers_and_the_writer_carries_on(path: Path, write_lock: sqlite3.Connection):
    log = open_log(path, busy_timeout_s=0.05)
    with pytest.raises(AuditError, match="locked"):
        log.append(record(1))
    write_lock.execute("ROLLBACK")
    assert log.append(record(2)) == 1
    log.close()
    assert AuditReader(path).verify().ok


def test_a_full_backlog_refuses_instead_of_growing(path: Path, write_lock: sqlite3.Connection):
    log = open_log(path, max_pending=1)
    first = log.submit(record(1))
    wait_until_running(first)
    second = log.submit(record(2))  # fills the queue
    with pytest.raises(AuditError, match="waiting for the disk"):
        log.submit(record(3))
    write_lock.execute("ROLLBACK")
    log.close()
    assert (first.result(), second.result()) == (1, 2)


def test_bad_records_are_refused_at_submit_and_do_not_poison_others(path: Path):
    with open_log(path) as log:
        with pytest.raises(AuditError) as info:
            log.submit(record(1, prompt_tokens=-1, latency_ms=float("nan"), violation="yes", rule_ids="SP1"))
        assert len(info.value.problems) == 4
        assert all("req-1" in p for p in info.value.problems)
        with pytest.raises(AuditError, match="not valid Unicode"):
            log.submit(record(2, content="bad \udcff surrogate"))
        with pytest.raises(AuditError, match="request_id is empty"):
            log.submit(record(3, request_id=""))
        assert log.append(record(4)) == 1


def test_other_sqlite_files_are_refused(tmp_path: Path):
    registry = Registry(tmp_path)
    with pytest.raises(AuditError, match="not an audit log"):
        AuditLog(registry.path, store_rationale=False, store_content=False)
    with pytest.raises(AuditError, match="not an audit log"):
        AuditReader(tmp_path / DB_NAME).verify()


def test_reading_creates_nothing(tmp_path: Path):
    missing = tmp_path / "none.sqlite3"
    with pytest.raises(AuditError, match="no audit log"):
        AuditReader(missing).tail()
    assert not missing.exists()


# -- tampering ----------------------------------------------------------------------------------------------------


def changed(column: str, value: object) -> object:
    if column in ("content_sha256", "prev_hash", "record_hash"):
        return "f" * 64
    if column == "violation":
        return 1 - value  # type: ignore[operator]
    if column == "rule_ids":
        return '["SP9"]'
    if isinstance(value, int | float):
        return value + 1
    return f"{value}!"


@pytest.mark.parametrize("column", [c for c in COLUMNS if c != "seq"])
def test_changing_any_field_names_that_record(five: Path, column: str):
    with raw(five) as conn:
        value = conn.execute(f"SELECT {column} FROM records WHERE seq = 3").fetchone()[0]
        assert value is not None  # every column of record 3 is filled, so every one can be tampered with
        conn.execute(f"UPDATE records SET {column} = ? WHERE seq = 3", (changed(column, value),))
    result = AuditReader(five).verify()
    assert not result.ok
    request_id = "req-3!" if column == "request_id" else "req-3"  # the record is named as it now reads
    assert (result.first_broken_seq, result.first_broken_request_id, result.records_checked) == (3, request_id, 2)
    expected = "chain link broken" if column == "prev_hash" else "a field was changed"
    assert expected in result.reason


def test_a_verdict_flipped_and_rehashed_breaks_the_next_link(five: Path):
    with raw(five) as conn:
        conn.execute("UPDATE records SET violation = 0 WHERE seq = 3")
    forged = rows(five)[2]
    with raw(five) as conn:
        conn.execute("UPDATE records SET record_hash = ? WHERE seq = 3", (record_hash(forged),))
    result = AuditReader(five).verify()
    assert (result.first_broken_seq, result.first_broken_request_id) == (4, "req-4")
    assert "prev_hash does not match record 3's hash" in result.reason


@pytest.mark.parametrize(("deleted", "broken", "reason"), [
    ((3,), 4, "record 3 missing"),
    ((1,), 2, "record 1 missing"),
    ((2, 3), 4, "records 2 to 3 missing"),
])
def test_a_deleted_record_is_named(five: Path, deleted: tuple[int, ...], broken: int, reason: str):
    with raw(five) as conn:
        conn.executemany("DELETE FROM records WHERE seq = ?", [(seq,) for seq in deleted])
    result = AuditReader(five).verify()
    assert (result.ok, result.first_broken_seq, result.first_broken_request_id) == (False, broken, f"req-{broken}")
    assert reason in result.reason and "deleted" in result.reason


def test_cutting_the_newest_record_shows_only_in_the_head_hash(five: Path):
    before = AuditReader(five).verify()
    with raw(five) as conn:
        conn.execute("DELETE FROM records WHERE seq = 5")
    after = AuditReader(five).verify()
    assert after.ok and after.records_checked == 4  # the documented limit of an unanchored chain
    assert after.head_hash != before.head_hash


def test_swapping_two_records_content_is_caught(five: Path):
    with raw(five) as conn:
        conn.execute("UPDATE records SET content = (SELECT content FROM records WHERE seq = 4) WHERE seq = 2")
        conn.execute("UPDATE records SET content = ? WHERE seq = 4", (record(2).content,))
    result = AuditReader(five).verify()
    assert (result.first_broken_seq, result.first_broken_request_id) == (2, "req-2")
    assert "a field was changed" in result.reason


def test_reordering_whole_records_is_caught(five: Path):
    # Swap every column but seq between records 2 and 4, hashes included: each row is intact but in the wrong place.
    others = [c for c in COLUMNS if c != "seq"]
    stored = {row["seq"]: row for row in rows(five)}
    with raw(five) as conn:
        for target, source in ((2, 4), (4, 2)):
            conn.execute(f"UPDATE records SET {', '.join(f'{c} = ?' for c in others)} WHERE seq = ?",
                         [*(stored[source][c] for c in others), target])
    result = AuditReader(five).verify()
    assert (result.first_broken_seq, result.first_broken_request_id) == (2, "req-4")
    assert "chain link broken" in result.reason


def test_an_inserted_record_is_caught_even_with_a_valid_hash_of_its_own(five: Path):
    stored = rows(five)
    with raw(five) as conn:
        for seq in (5, 4, 3):  # make room at seq 3, top down so the primary key never collides
            conn.execute("UPDATE records SET seq = seq + 1 WHERE seq = ?", (seq,))
        forged = {**stored[2], "seq": 3, "request_id": "forged", "prev_hash": stored[1]["record_hash"]}
        forged["record_hash"] = record_hash(forged)
        conn.execute(f"INSERT INTO records ({', '.join(forged)}) VALUES ({', '.join('?' * len(forged))})",
                     list(forged.values()))
    result = AuditReader(five).verify()
    assert (result.first_broken_seq, result.first_broken_request_id, result.records_checked) == (4, "req-3", 3)


# -- CLI ----------------------------------------------------------------------------------------------------------


def appliance_root() -> click.Group:
    """The audit group under the real root group class, so errors print as they will in `appliance`."""
    return ApplianceGroup("appliance", commands={"audit": audit_group},
                          context_settings={"auto_envvar_prefix": "APPLIANCE"})


def run_cli(*args: str, env: dict[str, str] | None = None):
    return CliRunner(env=env).invoke(appliance_root(), ["audit", *args])


def test_cli_verify_ok_and_broken(five: Path):
    result = run_cli("verify", "--path", str(five))
    assert result.exit_code == 0, result.output
    assert "ok, 5 records" in result.output and AuditReader(five).verify().head_hash in result.output
    with raw(five) as conn:
        conn.execute("UPDATE records SET violation = 0 WHERE seq = 3")
    result = run_cli("verify", "--path", str(five))
    assert result.exit_code == 1
    assert "record 3 (request req-3) is broken" in result.output
    assert "a field was changed" in result.output and "the 2 records before it verified" in result.output
    assert "Traceback" not in result.output


def test_cli_tail_show_and_env_path(five: Path):
    result = run_cli("tail", "-n", "2", env={"APPLIANCE_AUDIT_PATH": str(five)})
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split()[:3] == ["SEQ", "TIME", "REQUEST"]
    assert [line.split()[0] for line in lines[1:]] == ["4", "5"]
    assert "spam@1.0.0" in lines[2]

    result = run_cli("tail", "--path", str(five), "-n", "1", "--json")
    assert json.loads(result.output)["request_id"] == "req-5"

    result = run_cli("show", "--path", str(five), "3")
    assert result.exit_code == 0, result.output
    assert "request_id:" in result.output and "req-3" in result.output and "SP1, SP2" in result.output

    result = run_cli("show", "--path", str(five), "--request-id", "req-2", "--json")
    assert [json.loads(line)["seq"] for line in result.output.splitlines()] == [2]


def test_cli_show_errors(five: Path, tmp_path: Path):
    assert "no record 9" in run_cli("show", "--path", str(five), "9").output
    assert "no record of request 'nope'" in run_cli("show", "--path", str(five), "--request-id", "nope").output
    assert run_cli("show", "--path", str(five)).exit_code == 2
    missing = run_cli("verify", "--path", str(tmp_path / "missing.sqlite3"))
    assert missing.exit_code == 1 and "no audit log at" in missing.output


def test_cli_show_marks_what_was_not_stored(path: Path):
    with open_log(path, store_content=False, store_rationale=False) as log:
        log.append(record(1))
    output = run_cli("show", "--path", str(path), "1").output
    assert "content:" in output and "(not stored)" in output


def test_verify_sees_one_snapshot_while_a_writer_appends(path: Path):
    stop = threading.Event()
    with open_log(path) as log:
        log.append(record(0))

        def keep_writing() -> None:
            i = 1
            while not stop.is_set():
                log.append(record(i))
                i += 1

        writer = threading.Thread(target=keep_writing)
        writer.start()
        try:
            results = [AuditReader(path).verify() for _ in range(5)]
        finally:
            stop.set()
            writer.join()
    assert all(r.ok for r in results)
    assert AuditReader(path).verify().records_checked >= results[-1].records_checked
