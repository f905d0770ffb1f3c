"""Fuzz every RPC of safeguard.v1.Safeguard with hypothesis, at length.

    .venv/bin/python scripts/fuzz_rpcs.py [--cases 10000] [--seed 0] [--tmp DIR]

Starts its own tritonserver (the canned model) and a front end in its own process, in a temporary directory, sends
`--cases` requests drawn from tests/rpc_strategies.py (valid, hostile, and bytes that are not a request), and checks
each answer as tests/test_fuzz.py does: a status expected of that method (never INTERNAL, UNKNOWN or a hang), the
front end alive and SERVING after every case and classifying a good request every `--check-every` cases, and no
error in its log that escaped the mapping to a status. It prints the cases run, the statuses seen per RPC and each
kind of failure with the first case that showed it and a shrunk, minimal repro. Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import warnings
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(TESTS))  # the shared strategies and harness live with the tests

from hypothesis import HealthCheck, Phase, find, given, seed, settings  # noqa: E402
from hypothesis.errors import Flaky, NoSuchExample, Unsatisfiable  # noqa: E402
from rpc_fuzzing import FuzzTarget, Outcome, Tally, problems  # noqa: E402
from rpc_strategies import Case, cases  # noqa: E402

PROGRESS_EVERY_S = 10.0
warnings.filterwarnings("ignore", message="Generating overly large repr")  # a huge string's repr is not shown


def _signature(case: Case, found: list[str]) -> tuple[str, str, str]:
    return case.method, case.label or "random", found[0].split(":")[0]


class Run:
    def __init__(self, target: FuzzTarget, runner: asyncio.Runner, args: argparse.Namespace):
        self.target, self.runner, self.args = target, runner, args
        self.tally = Tally()
        self.first: dict[tuple[str, str, str], tuple[Case, list[str]]] = {}
        self.stopped = ""  # why the run ended early: the front end stopped answering
        self.started = self.last_report = time.monotonic()

    def one(self, case: Case) -> None:
        if self.stopped:
            return
        outcome = self.runner.run(self.target.call(case))
        found = problems(case, outcome)
        check_classify = (self.tally.cases + 1) % self.args.check_every == 0
        unwell = self.runner.run(self.target.answering(classify=check_classify))
        self.tally.add(case, outcome, found + unwell)
        if found or unwell:
            self.first.setdefault(_signature(case, found + unwell), (case, found + unwell))
        if unwell:
            self.stopped = f"after {case.describe()}: {unwell[0]}"
        self._progress()

    def _progress(self) -> None:
        now = time.monotonic()
        if now - self.last_report >= PROGRESS_EVERY_S or self.tally.cases == self.args.cases:
            self.last_report = now
            rate = self.tally.cases / max(now - self.started, 1e-9)
            print(f"  {self.tally.cases:,}/{self.args.cases:,} cases, {len(self.tally.failures)} failing, "
                  f"{rate:.0f} cases/s", file=sys.stderr, flush=True)

    def shrink(self, case: Case, found: list[str]) -> Case:
        """The simplest case of the same method and kind that fails the same way (a bounded number of calls),
        against the server as the run left it: registered policies included."""
        wanted, calls = _signature(case, found), [0]

        def fails(candidate: Case) -> bool:
            calls[0] += 1
            if calls[0] > self.args.shrink_calls:
                return candidate == case
            outcome: Outcome = self.runner.run(self.target.call(candidate))
            again = problems(candidate, outcome)
            return bool(again) and _signature(candidate, again) == wanted

        def same_kind(candidate: Case) -> bool:
            return (candidate.method, candidate.label) == (case.method, case.label)

        try:
            return find(cases().filter(same_kind), fails,
                        settings=settings(max_examples=self.args.shrink_calls, database=None, deadline=None,
                                          suppress_health_check=list(HealthCheck)))
        except (NoSuchExample, Unsatisfiable, Flaky):  # nothing simpler failed the same way (every time)
            return case


def _report(run: Run) -> int:
    tally = run.tally
    elapsed = time.monotonic() - run.started
    print(f"\ncases run: {tally.cases} in {elapsed:.0f} s ({tally.cases / max(elapsed, 1e-9):.0f}/s), "
          f"seed {run.args.seed}")
    print("statuses per RPC:")
    for method in sorted(tally.statuses):
        counts = ", ".join(f"{code} {n}" for code, n in tally.statuses[method].most_common())
        print(f"  {method:<28} {sum(tally.statuses[method].values()):>6}  {counts}")
        if run.args.details:
            for code in tally.statuses[method]:
                print(f"      {code}: {tally.examples.get((method, code), '')[:160]!r}")
    print(f"health NOT_SERVING right after a case (then SERVING again): {run.target.not_serving_seen} times")
    if run.stopped:
        print(f"the front end stopped answering {run.stopped}")
    if not run.first:
        print("failing cases: none")
        return 0
    print(f"failing cases: {len(tally.failures)}, of {len(run.first)} kinds")
    for (method, label, what), (case, found) in sorted(run.first.items()):
        count = sum(1 for c, f in tally.failures if _signature(c, f) == (method, label, what))
        print(f"\n- {what} ({count} cases)")
        print(f"  problem: {found[0][:400]}")
        print(f"  first case: {case.describe(300)}")
        if not run.stopped and run.args.shrink_calls:
            print(f"  minimal repro (on the server as the run left it): {run.shrink(case, found).describe(300)}")
    return 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000, help="cases to run")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed, for a repeatable run")
    parser.add_argument("--check-every", type=int, default=20, help="cases between good-Classify checks")
    parser.add_argument("--shrink-calls", type=int, default=150, help="calls spent shrinking each kind of failure")
    parser.add_argument("--details", action="store_true", help="print the first message seen with each status")
    parser.add_argument("--tmp", help="parent of the temporary directory (default: the system's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fuzz-rpcs-", dir=args.tmp) as root:
        target = FuzzTarget(Path(root))
        runner = asyncio.Runner()
        try:
            runner.run(target.start().open())
            run = Run(target, runner, args)
            print(f"fuzzing {target.address} with {args.cases:,} cases", file=sys.stderr, flush=True)

            @seed(args.seed)
            @settings(max_examples=args.cases, deadline=None, database=None, phases=[Phase.generate],
                      suppress_health_check=list(HealthCheck))
            @given(cases())
            def fuzz(case: Case) -> None:
                run.one(case)

            fuzz()
            if not run.stopped:
                final = runner.run(target.answering())
                run.stopped = f"at the end: {final[0]}" if final else ""
            status = _report(run)
            faults = target.faults_logged()
            print(f"front end log lines with an escaped error: {len(faults)}")
            for line in faults[:5]:
                print(f"  {line[:300]}")
            return status or (1 if faults else 0)
        finally:
            runner.run(target.close())
            target.stop()
            runner.close()


if __name__ == "__main__":
    sys.exit(main())
