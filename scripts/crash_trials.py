"""Crash trials: SIGKILL a process that writes the policy registry and the audit log as the front end does, then
reopen both and hold them to every answer it gave.

    python scripts/crash_trials.py [--trials 200] [--modes default wait] [--seed N]

Each trial starts a writer process that drives the real `Registry` and `AuditLog` the way the server does: on one
event loop, `--clients` concurrent clients each make a decision (a short sleep stands in for the model), hand its
record to the audit log exactly as `Classifier._record` does (`submit`, then await the fsync only with
`audit_wait`) and then answer; one admin client adds, activates and rolls back policy versions through
`asyncio.to_thread`, as `registry_call` does. An answer is a line on the writer's stdout (a pipe, so a line written
before the kill reaches the parent even though the writer dies), stamped with CLOCK_MONOTONIC:

    DEC <request id> <ns> <ns>     a Classify answer: its decision was answered (and when it was submitted)
    DUR <request id> <ns>          (default mode) the record's fsync returned: the writer thread settled its future
    TRY/ACK ...                    registry calls, as in tests/test_registry_crash.py

The parent SIGKILLs the writer at a random moment (one trial in ten while it is still opening the files), then
checks, before anything reopens a file for writing: the audit chain verifies (what `appliance audit verify` runs:
a read-only `AuditReader.verify`), no record stored by an earlier trial vanished, no record whose fsync returned is
missing, and with `audit_wait` no answered decision is missing; then the registry's integrity check passes and
every acknowledged version and activation is there. In the default mode an answered decision may lack its record:
the script counts those and how long before the kill they were answered (the loss window, docs/durability.md).

It prints per mode: trials run, failures, decisions answered, and the measured loss window. Exit status 1 when any
trial failed. tests/test_crash_trials.py runs the same code with a few trials per mode.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import queue
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file (`python scripts/crash_trials.py`), not as a module
    sys.path.insert(0, str(REPO))

from classification.policy import parse_policy  # noqa: E402
from server.audit import AuditLog, AuditRecord  # noqa: E402
from server.audit_reader import AuditReader  # noqa: E402
from server.registry import Registry  # noqa: E402
from server.registry_errors import RegistryError  # noqa: E402
from server.state import audit_path  # noqa: E402

MODES = ("default", "wait")  # audit_wait off (the default) and on
POLICIES = ("p0", "p1", "p2")
STARTUP_KILL_SHARE = 0.1
STARTUP_KILL_S = 0.3
READY_TIMEOUT_S = 60.0


# -- the writer (a child process) -----------------------------------------------------------------------------------

def _say(line: str) -> None:
    # One write(2) per line, below PIPE_BUF: atomic, so lines from the event loop and the audit writer thread
    # never interleave, and once it returns the line is the kernel's, whatever happens to this process.
    os.write(1, f"{line}\n".encode())


def _on_durable(request_id: str) -> Callable[[Future[int]], None]:
    def settled(future: Future[int]) -> None:  # runs on the audit writer thread, right after the fsync
        if future.exception() is None:
            _say(f"DUR {request_id} {time.monotonic_ns()}")
    return settled


async def _client(audit: AuditLog, wait: bool, trial: int, client: int, rng: random.Random, model_s: float) -> None:
    for i in itertools.count():
        await asyncio.sleep(rng.uniform(0.0, model_s))
        request_id = f"t{trial}-c{client}-{i}"
        record = AuditRecord(request_id, "p0", "v1", "0" * 64, "crash-trials", violation=i % 2 == 0,
                             parse_status="ok", content=f"message {i} from client {client}", latency_ms=1.0)
        submitted = time.monotonic_ns()
        future = audit.submit(record)  # as Classifier._record does
        if wait:
            await asyncio.wrap_future(future)
        else:
            future.add_done_callback(_on_durable(request_id))
        _say(f"DEC {request_id} {time.monotonic_ns()} {submitted}")


def _policy_text(policy_id: str, trial: int, i: int, padding: int) -> str:
    return (f'+++\nid = "{policy_id}"\nversion = "t{trial}-{i}"\ntitle = "P"\n[output]\nformat = "binary"\n'
            f'+++\nFlag anything about {trial} {i}.\n' + "Padding line.\n" * padding)


async def _admin(registry: Registry, trial: int, rng: random.Random) -> None:
    """Registry calls one at a time, so at most one is cut off by the kill (its outcome may go either way)."""
    for i in itertools.count():
        await asyncio.sleep(rng.uniform(0.0, 0.02))
        known = {s.policy_id for s in await asyncio.to_thread(registry.list)}
        policy_id = rng.choice(POLICIES)
        op = rng.random() if policy_id in known else 0.0
        if op < 0.6:
            policy, activate = parse_policy(_policy_text(policy_id, trial, i, rng.randrange(50))), rng.random() < 0.5
            _say(f"TRY {policy_id} {policy.sha256 if activate else '-'}")
            info = (await asyncio.to_thread(registry.add, policy, activate=activate)).info
            _say(f"ACK {policy_id} {info.sha256} {info.sha256 if activate else '-'}")
        elif op < 0.8:
            _say(f"TRY {policy_id} ?")
            try:
                active = (await asyncio.to_thread(registry.rollback, policy_id)).active.sha256
            except RegistryError:  # nothing to roll back to: a normal answer, state unchanged
                active = "-"
            _say(f"ACK {policy_id} - {active}")
        else:
            target = rng.choice((await asyncio.to_thread(registry.history, policy_id)).versions)
            _say(f"TRY {policy_id} {target.sha256}")
            active = (await asyncio.to_thread(registry.activate, policy_id, target.sha256[:12])).active.sha256
            _say(f"ACK {policy_id} - {active}")


async def _write(state_dir: Path, wait: bool, trial: int, clients: int, model_s: float) -> None:
    rng = random.Random(trial)
    registry = Registry(state_dir)
    audit = AuditLog(audit_path(state_dir), store_rationale=True, store_content=False)
    _say("READY")
    await asyncio.gather(_admin(registry, trial, random.Random(rng.random())),
                         *(_client(audit, wait, trial, c, random.Random(rng.random()), model_s)
                           for c in range(clients)))


# -- what the answers promised ----------------------------------------------------------------------------------------

@dataclass
class RegistryPromises:
    """What acknowledged registry calls promised, plus the one call that may have been cut off mid-way."""

    shas: set[str] = field(default_factory=set)
    active: dict[str, str] = field(default_factory=dict)
    pending: tuple[str, str] | None = None  # (policy, candidate) of a TRY without its ACK
    acks: int = 0

    def record(self, kind: str, words: list[str]) -> None:
        if kind == "TRY":
            self.pending = (words[0], words[1])
        else:
            policy_id, added, active = words
            if added != "-":
                self.shas.add(added)
            if active != "-":
                self.active[policy_id] = active
            self.pending = None
            self.acks += 1


@dataclass
class Answers:
    """One trial's answered decisions and settled fsyncs, by request id, in CLOCK_MONOTONIC ns."""

    decided: dict[str, int] = field(default_factory=dict)  # in the order answered (in the default mode, also
    # the order submitted: nothing awaits between `submit` and the answer)
    waited_ms: list[float] = field(default_factory=list)  # from submit to answer
    durable: dict[str, int] = field(default_factory=dict)
    ready: bool = False


def _read_lines(lines: list[str], answers: Answers, promises: RegistryPromises) -> None:
    for line in lines:
        if not line.endswith("\n"):  # a line cut short by the kill promised nothing
            continue
        kind, *words = line.split()
        if kind == "DEC":
            answers.decided[words[0]] = int(words[1])
            answers.waited_ms.append((int(words[1]) - int(words[2])) / 1e6)
        elif kind == "DUR":
            answers.durable[words[0]] = int(words[1])
        elif kind in ("TRY", "ACK"):
            promises.record(kind, words)
        elif kind == "READY":
            answers.ready = True


# -- checking the files after a kill ----------------------------------------------------------------------------------

@dataclass
class TrialResult:
    problems: list[str]
    answered: int  # decisions answered before the kill
    lost_ages_ms: list[float]  # per answered decision without a record: ms from its answer to the kill
    at_risk: int  # answered decisions whose fsync had not returned at the kill (default mode)
    waited_ms: list[float]  # per answered decision: from submit to answer
    ack_to_durable_ms: list[float]  # default mode: how long each answered record waited for its fsync
    records: int  # records in the audit log after the trial


def check_audit(state_dir: Path, trial: int, answers: Answers, kill_ns: int, wait: bool,
                previous_records: int) -> TrialResult:
    """Hold the audit log to one trial's answers (before anything reopens it for writing)."""
    problems: list[str] = []
    path = audit_path(state_dir)
    stored: set[str] = set()
    records = 0
    if path.exists():
        result = AuditReader(path).verify()
        if not result.ok:
            problems.append(f"audit chain broken at seq {result.first_broken_seq}: {result.reason}")
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            records = conn.execute("SELECT count(*) FROM records").fetchone()[0]
            stored = {row[0] for row in conn.execute("SELECT request_id FROM records WHERE request_id LIKE ?",
                                                     (f"t{trial}-%",))}
        finally:
            conn.close()
    if records < previous_records:
        problems.append(f"the audit log lost {previous_records - records} records stored by earlier trials")
    lost = [rid for rid in answers.decided if rid not in stored]
    lost_durable = [rid for rid in lost if rid in answers.durable]
    if lost_durable:
        problems.append(f"{len(lost_durable)} records whose fsync had returned are missing, e.g. {lost_durable[0]}")
    if wait and lost:
        problems.append(f"audit_wait: {len(lost)} answered decisions have no record, e.g. {lost[0]}")
    if not wait and lost and (kept_after := [rid for rid in list(answers.decided)[-len(lost):] if rid in stored]):
        # The writer commits in submission order, so a kill can only cut the newest records, never one between.
        problems.append(f"a record survived although one submitted before it was lost, e.g. {kept_after[0]}")
    durable_delays = [(answers.durable[rid] - ns) / 1e6 for rid, ns in answers.decided.items()
                      if rid in answers.durable]
    return TrialResult(problems, len(answers.decided), [(kill_ns - answers.decided[rid]) / 1e6 for rid in lost],
                       sum(rid not in answers.durable for rid in answers.decided) if not wait else 0,
                       answers.waited_ms, durable_delays, records)


def check_registry(state_dir: Path, promises: RegistryPromises) -> list[str]:
    """Hold the registry to every acknowledged call; resolves the cut-off call to whichever outcome it had."""
    if not (state_dir / "policies.sqlite3").exists():
        return [] if promises.acks == 0 else ["the registry file is gone"]
    registry = Registry(state_dir)
    problems = registry.check()
    histories = {s.policy_id: registry.history(s.policy_id) for s in registry.list()}
    stored = {v.sha256 for h in histories.values() for v in h.versions}
    if missing := promises.shas - stored:
        problems.append(f"acknowledged versions lost: {sorted(missing)}")
    for policy_id, history in histories.items():
        if [v.seq for v in history.versions] != list(range(1, len(history.versions) + 1)):
            problems.append(f"{policy_id}: version numbers have a gap")
    for policy_id, promised in promises.active.items():
        actual = histories[policy_id].active if policy_id in histories else None
        if actual is None:
            problems.append(f"{policy_id} lost its active version")
        elif promises.pending is not None and promises.pending[0] == policy_id:
            # The cut-off call may or may not have committed: either outcome is correct, nothing else is.
            if promises.pending[1] != "?" and actual.sha256 not in (promised, promises.pending[1]):
                problems.append(f"{policy_id}: active version is neither the promised one nor the cut-off call's")
            promises.active[policy_id] = actual.sha256
        elif actual.sha256 != promised:
            problems.append(f"{policy_id}: active version changed from {promised[:12]} to {actual.sha256[:12]}")
    promises.pending = None
    return problems


# -- one trial, one mode ----------------------------------------------------------------------------------------------

@dataclass
class Settings:
    clients: int = 16
    model_ms: float = 2.0  # each client's decision takes up to this long
    run_ms: float = 400.0  # a kill lands up to this long after the writer is ready


def _pump(stream, lines: queue.Queue[str | None]) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _drain(lines: queue.Queue[str | None]) -> list[str]:
    out = []
    while (line := lines.get(timeout=30)) is not None:
        out.append(line)
    return out


def _wait_ready(lines: queue.Queue[str | None], seen: list[str], stderr_path: Path) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
        if line is None:
            raise RuntimeError(f"the writer ended on its own: {stderr_path.read_text()[-2000:]}")
        seen.append(line)
        if line == "READY\n":
            return


def run_trial(state_dir: Path, wait: bool, trial: int, rng: random.Random, settings: Settings,
              promises: RegistryPromises, stderr_path: Path) -> tuple[Answers, int]:
    """Start a writer, SIGKILL it at a random moment; its answers and the kill's CLOCK_MONOTONIC ns."""
    command = [sys.executable, str(Path(__file__).resolve()), "--writer", str(state_dir), str(trial),
               str(int(wait)), str(settings.clients), str(settings.model_ms)]
    with stderr_path.open("w") as stderr:
        writer = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=stderr, text=True)
    lines: queue.Queue[str | None] = queue.Queue()
    reader = threading.Thread(target=_pump, args=(writer.stdout, lines), daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        if rng.random() < STARTUP_KILL_SHARE:  # while opening, maybe creating or migrating, the files
            time.sleep(rng.uniform(0.0, STARTUP_KILL_S))
        else:
            _wait_ready(lines, seen, stderr_path)
            time.sleep(rng.uniform(0.0, settings.run_ms / 1000))
        kill_ns = time.monotonic_ns()
        writer.send_signal(signal.SIGKILL)
        writer.wait(timeout=30)
        if writer.returncode != -signal.SIGKILL:
            raise RuntimeError(f"writer exited {writer.returncode}: {stderr_path.read_text()[-2000:]}")
        seen += _drain(lines)  # lines already in the pipe when the kill landed were answers too
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()
        reader.join(timeout=30)
        writer.stdout.close()
    answers = Answers()
    _read_lines(seen, answers, promises)
    return answers, kill_ns


@dataclass
class ModeResult:
    mode: str
    trials: int = 0
    failures: list[str] = field(default_factory=list)
    answered: int = 0
    registry_acks: int = 0
    startup_kills: int = 0
    at_risk: int = 0  # answered but not yet fsynced at the kill, summed over trials
    lost: list[int] = field(default_factory=list)  # per trial: answered decisions without a record
    lost_ages_ms: list[float] = field(default_factory=list)
    waited_ms: list[float] = field(default_factory=list)
    ack_to_durable_ms: list[float] = field(default_factory=list)


def run_mode(mode: str, trials: int, seed: int, work_dir: Path, settings: Settings,
             progress: Callable[[ModeResult], None] = lambda result: None) -> ModeResult:
    """`trials` kills of writers sharing one state directory, so later kills land in bigger files."""
    wait = mode == "wait"
    rng = random.Random(f"{seed}-{mode}")
    state_dir = work_dir / f"state-{mode}"
    promises = RegistryPromises()
    result = ModeResult(mode)
    records = 0
    for trial in range(trials):
        answers, kill_ns = run_trial(state_dir, wait, trial, rng, settings, promises, work_dir / f"{mode}.stderr")
        audit = check_audit(state_dir, trial, answers, kill_ns, wait, records)
        problems = audit.problems + check_registry(state_dir, promises)
        records = max(records, audit.records)
        result.trials += 1
        result.failures += [f"trial {trial}: {p}" for p in problems]
        result.answered += audit.answered
        result.startup_kills += not answers.ready
        result.at_risk += audit.at_risk
        result.lost.append(len(audit.lost_ages_ms))
        result.lost_ages_ms += audit.lost_ages_ms
        result.ack_to_durable_ms += audit.ack_to_durable_ms
        result.waited_ms += audit.waited_ms
        progress(result)
    result.registry_acks = promises.acks
    return result


# -- the report -------------------------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def report(result: ModeResult) -> str:
    lost_total = sum(result.lost)
    lines = [f"mode {result.mode} (audit_wait={'on' if result.mode == 'wait' else 'off'}): {result.trials} trials "
             f"({result.startup_kills} killed while opening), {len(result.failures)} failures; "
             f"{result.answered} decisions answered, {result.registry_acks} registry calls acknowledged"]
    if result.mode == "wait":
        lines.append(f"  answered decisions without a record: {lost_total}")
    else:
        lines.append(f"  answered decisions not yet fsynced at the kill: {result.at_risk}; of these lost (no record "
                     f"after the kill): {lost_total}, in {sum(n > 0 for n in result.lost)} of {result.trials} trials")
        lines.append(f"  loss window: at most {max(result.lost, default=0)} records lost in one kill; a lost record "
                     f"was answered at most {max(result.lost_ages_ms, default=0.0):.2f} ms before the kill "
                     f"(p50 {_percentile(result.lost_ages_ms, 0.5):.2f} ms)")
        delays = result.ack_to_durable_ms
        lines.append(f"  answer to fsync (what a power cut could lose): p50 {_percentile(delays, 0.5):.2f} ms, "
                     f"p99 {_percentile(delays, 0.99):.2f} ms, max {max(delays, default=0.0):.2f} ms over "
                     f"{len(delays)} records")
    waited = result.waited_ms
    lines.append(f"  submit to answer (the answer's wait for the audit log): p50 {_percentile(waited, 0.5):.2f} ms, "
                 f"p99 {_percentile(waited, 0.99):.2f} ms, max {max(waited, default=0.0):.2f} ms")
    lines += [f"  FAIL {failure}" for failure in result.failures[:20]]
    return "\n".join(lines)


def _progress_bar(total: int) -> Callable[[ModeResult], None]:
    def show(result: ModeResult) -> None:
        done = result.trials
        bar = "#" * (30 * done // total)
        end = "\n" if done == total else ""
        print(f"\r{result.mode:<8}[{bar:<30}] {done}/{total} trials, {len(result.failures)} failures, "
              f"{result.answered} answered", end=end, file=sys.stderr, flush=True)
    return show


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=200, help="kills per mode")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument("--seed", type=int, default=20_261_204)
    parser.add_argument("--clients", type=int, default=Settings.clients, help="concurrent clients in the writer")
    parser.add_argument("--model-ms", type=float, default=Settings.model_ms,
                        help="each decision takes up to this long before it is audited and answered")
    parser.add_argument("--run-ms", type=float, default=Settings.run_ms,
                        help="a kill lands up to this long after the writer has opened its files")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="where the state directories go (default: a fresh temp directory, removed after); "
                             "put it on the disk you mean to measure: a tmpfs makes every fsync free")
    parser.add_argument("--writer", nargs=5, help=argparse.SUPPRESS)  # internal: be the writer process
    args = parser.parse_args()
    if args.writer:
        state_dir, trial, wait, clients, model_ms = args.writer
        asyncio.run(_write(Path(state_dir), wait == "1", int(trial), int(clients), float(model_ms) / 1000))
        return 0
    settings = Settings(args.clients, args.model_ms, args.run_ms)
    with tempfile.TemporaryDirectory(prefix="crash-trials-", dir=args.work_dir) as tmp:
        results = [run_mode(mode, args.trials, args.seed, Path(tmp), settings, _progress_bar(args.trials))
                   for mode in args.modes]
    print(f"{args.clients} concurrent clients, decisions taking up to {args.model_ms:g} ms, kills up to "
          f"{args.run_ms:g} ms after start-up (one in {round(1 / STARTUP_KILL_SHARE)} during it); "
          f"{os.cpu_count()} CPUs; state under {args.work_dir or tempfile.gettempdir()}")
    for result in results:
        print(report(result))
    return 1 if any(r.failures for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
