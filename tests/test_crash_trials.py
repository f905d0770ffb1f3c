"""scripts/crash_trials.py at CI size: a writer driving the real registry and audit log as the front end does is
SIGKILLed at random moments, with and without `audit_wait`; nothing it acknowledged may be lost (in the default
mode, only answered decisions whose fsync had not returned may lack a record). The script runs 200 trials per mode;
docs/durability.md has its figures."""

from __future__ import annotations

import importlib.util
import random
import sqlite3
import sys
from pathlib import Path

import pytest

from server.state import audit_path

REPO = Path(__file__).resolve().parents[1]
TRIALS = 10
SEED = 20_261_204


def _load_script():
    spec = importlib.util.spec_from_file_location("crash_trials", REPO / "scripts" / "crash_trials.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


crash_trials = _load_script()
SETTINGS = crash_trials.Settings(clients=8, model_ms=2.0, run_ms=300.0)


@pytest.mark.parametrize("mode", crash_trials.MODES)
def test_acknowledged_writes_survive_sigkill(tmp_path: Path, mode: str):
    result = crash_trials.run_mode(mode, TRIALS, SEED, tmp_path, SETTINGS)
    assert result.failures == []
    assert result.trials == TRIALS
    assert result.answered > TRIALS * 10, "the writer should have answered decisions between kills"
    assert result.registry_acks > TRIALS, "the writer should have changed the registry between kills"
    if mode == "wait":
        assert sum(result.lost) == 0
    else:
        # Only what was answered and not yet fsynced can go missing.
        assert sum(result.lost) <= result.at_risk
        assert len(result.ack_to_durable_ms) > 0
    text = crash_trials.report(result)
    assert f"{TRIALS} trials" in text and "0 failures" in text


def _one_killed_trial(tmp_path: Path, wait: bool):
    promises = crash_trials.RegistryPromises()
    state, rng = tmp_path / "state", random.Random(7)
    for trial in range(20):  # until a kill lands after the writer has answered something
        answers, kill_ns = crash_trials.run_trial(state, wait, trial, rng, SETTINGS, promises, tmp_path / "stderr")
        if answers.decided and promises.acks:
            return state, trial, answers, kill_ns, promises
    raise AssertionError("no kill in 20 landed after the writer had answered")


def test_the_checks_catch_a_lost_record_and_a_lost_version(tmp_path: Path):
    """The checks can fail: a decision answered under audit_wait whose record is gone, a record that vanished from
    the end of the log, and an acknowledged policy version that is not in the registry are each reported."""
    state, trial, answers, kill_ns, promises = _one_killed_trial(tmp_path, wait=True)
    result = crash_trials.check_audit(state, trial, answers, kill_ns, True, 0)
    assert result.problems == [] and result.lost_ages_ms == []

    answers.decided[f"t{trial}-c0-999999"] = kill_ns  # an answer the log never saw
    result = crash_trials.check_audit(state, trial, answers, kill_ns, True, result.records)
    assert any("answered decisions have no record" in p for p in result.problems)
    assert len(result.lost_ages_ms) == 1

    conn = sqlite3.connect(audit_path(state))
    conn.execute("DELETE FROM records WHERE seq = (SELECT max(seq) FROM records)")
    conn.commit()
    conn.close()
    before = result.records
    result = crash_trials.check_audit(state, trial, answers, kill_ns, True, before)
    assert any("lost 1 records stored by earlier trials" in p for p in result.problems)

    assert crash_trials.check_registry(state, promises) == []
    promises.shas.add("f" * 64)
    assert any("acknowledged versions lost" in p for p in crash_trials.check_registry(state, promises))


def test_default_mode_checks_catch_a_lost_durable_record_and_an_out_of_order_loss(tmp_path: Path):
    state, trial, answers, kill_ns, _ = _one_killed_trial(tmp_path, wait=False)
    result = crash_trials.check_audit(state, trial, answers, kill_ns, False, 0)
    assert result.problems == []
    fake = f"t{trial}-c0-999999"
    answers.decided[fake] = answers.durable[fake] = kill_ns
    result = crash_trials.check_audit(state, trial, answers, kill_ns, False, 0)
    assert any("whose fsync had returned are missing" in p for p in result.problems)

    # A lost record answered before the ones that were kept: the writer never commits out of order.
    del answers.decided[fake], answers.durable[fake]
    answers.decided = {fake: kill_ns, **answers.decided}
    result = crash_trials.check_audit(state, trial, answers, kill_ns, False, 0)
    assert any("survived although one submitted before it was lost" in p for p in result.problems)
