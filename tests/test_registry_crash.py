"""Crash safety of the policy registry: SIGKILL a writer at random moments and check that nothing it acknowledged
is lost and the file stays sound.

The writer (a child process) adds versions, activates and rolls back in a loop. Before each operation it prints
`TRY <policy> <candidate>` (the version that may become active, `?` when it cannot know, `-` when none will) and,
right after the call returns, `ACK <policy> <added sha or -> <active sha or ->`. Every ACK printed before the kill is
a promise the registry made; the parent holds it to all of them. One state directory serves every trial, so later
kills land in a bigger file, and some kills land while the writer is still opening (or creating) it.
"""

from __future__ import annotations

import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

from test_crash_trials import crash_trials

from server.registry import DB_NAME

RegistryPromises, check_registry = crash_trials.RegistryPromises, crash_trials.check_registry

REPO = Path(__file__).resolve().parents[1]
TRIALS = 60
SEED = 20_261_128
POLICIES = ("p0", "p1", "p2")

WRITER = r'''
import random, sys
from classification.policy import parse_policy
from server.registry import Registry
from server.registry_errors import RegistryError

state_dir, trial = sys.argv[1], int(sys.argv[2])
rng = random.Random(trial)
registry = Registry(state_dir)
print("READY", flush=True)
for i in range(1_000_000):
    known = {s.policy_id: s for s in registry.list()}
    policy_id = rng.choice(("p0", "p1", "p2"))
    op = rng.random() if policy_id in known else 0.0
    if op < 0.6:
        text = (f'+++\nid = "{policy_id}"\nversion = "t{trial}-{i}"\ntitle = "P"\n[output]\nformat = "binary"\n'
                f'+++\nFlag anything about {trial} {i}.\n' + "Padding line.\n" * rng.randrange(50))
        policy, activate = parse_policy(text), rng.random() < 0.5
        print(f"TRY {policy_id} {policy.sha256 if activate else '-'}", flush=True)
        info = registry.add(policy, activate=activate).info
        print(f"ACK {policy_id} {info.sha256} {info.sha256 if activate else '-'}", flush=True)
    elif op < 0.8:
        print(f"TRY {policy_id} ?", flush=True)
        try:
            active = registry.rollback(policy_id).active.sha256
        except RegistryError:  # nothing to roll back to: a normal answer, state unchanged
            active = "-"
        print(f"ACK {policy_id} - {active}", flush=True)
    else:
        target = rng.choice(registry.history(policy_id).versions)
        print(f"TRY {policy_id} {target.sha256}", flush=True)
        active = registry.activate(policy_id, target.sha256[:12]).active.sha256
        print(f"ACK {policy_id} - {active}", flush=True)
'''


def _pump(stream, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _consume(promises: RegistryPromises, lines: queue.Queue[str | None], until_acks: int, deadline: float) -> bool:
    """Record lines until `until_acks` acknowledgements in all; False if the writer's output ended first."""
    while promises.acks < until_acks:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            return False
        kind, *words = line.split()
        if line.endswith("\n") and kind in ("TRY", "ACK"):  # a line cut short by the kill promised nothing
            promises.record(kind, words)
    return True


def _run_trial(state_dir: Path, trial: int, rng: random.Random, promises: RegistryPromises, stderr_path: Path) -> None:
    with stderr_path.open("w") as stderr:
        writer = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir), str(trial)], cwd=REPO,
                                  env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE,
                                  stderr=stderr, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(writer.stdout, lines), daemon=True)
    reader.start()
    try:
        if rng.random() < 0.15:  # kill during start-up: opening, maybe creating or migrating the file
            time.sleep(rng.uniform(0.0, 0.25))
        else:
            alive = _consume(promises, lines, promises.acks + rng.randint(0, 25), time.monotonic() + 30)
            assert alive, f"writer ended on its own: {stderr_path.read_text()}"
            time.sleep(rng.uniform(0.0, 0.004))
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        assert writer.returncode == -signal.SIGKILL, f"writer exited {writer.returncode}: {stderr_path.read_text()}"
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        reader.join(timeout=30)
        writer.stdout.close()
    # Lines already in the pipe when the kill landed were acknowledged too.
    _consume(promises, lines, sys.maxsize, time.monotonic() + 5)


def _verify(state_dir: Path, promises: RegistryPromises, trial: int) -> None:
    conn = sqlite3.connect(state_dir / DB_NAME)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)], f"trial {trial}"
    finally:
        conn.close()
    # The same promises the long crash trials hold the registry to (scripts/crash_trials.py).
    assert check_registry(state_dir, promises) == [], f"trial {trial}"


def test_acknowledged_writes_survive_sigkill(tmp_path: Path):
    rng = random.Random(SEED)
    promises = RegistryPromises()
    state_dir = tmp_path / "state"
    for trial in range(TRIALS):
        _run_trial(state_dir, trial, rng, promises, tmp_path / "writer.stderr")
        if (state_dir / DB_NAME).exists():
            _verify(state_dir, promises, trial)
    assert promises.acks > TRIALS * 5, "the writer should have got some work done between kills"
    assert set(promises.active) == set(POLICIES)
