"""Property-based fuzzing of every RPC (tests/rpc_strategies.py), CI-sized: a real tritonserver over the canned model
and a front end in its own process, over real gRPC on loopback. Whatever arrives, valid or hostile or not a
request at all, the answer is one of the statuses expected of that method (never INTERNAL or UNKNOWN, never a hang),
the front end keeps running and answering, and its log shows no error that escaped the mapping to a status.

The long run is scripts/fuzz_rpcs.py (10,000 cases); the last test keeps it working with a handful.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from rpc_fuzzing import REPO, FuzzTarget, echoes_long_string, problems
from rpc_strategies import METHODS, Case, cases, huge_text, raw_payloads

from server.generated.safeguard.v1 import safeguard_pb2 as pb

CI_CASES = 200
CI = settings(max_examples=CI_CASES, derandomize=True, deadline=None, database=None, print_blob=True,
              suppress_health_check=list(HealthCheck))

pytestmark = pytest.mark.filterwarnings("ignore:Generating overly large repr")


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[tuple[asyncio.Runner, FuzzTarget]]:
    runner = asyncio.Runner()
    fuzzed = FuzzTarget(tmp_path_factory.mktemp("fuzz"))
    try:
        runner.run(fuzzed.start().open())
        yield runner, fuzzed
    finally:
        runner.run(fuzzed.close())
        fuzzed.stop()
        runner.close()


def test_every_rpc_answers_hostile_input_with_an_expected_status(target):
    runner, fuzzed = target

    @CI
    @given(cases())
    def answered(case: Case) -> None:
        outcome = runner.run(fuzzed.call(case))
        assert not problems(case, outcome), (case.describe(), problems(case, outcome))
        assert not runner.run(fuzzed.answering(classify=False)), case.describe()

    answered()
    assert runner.run(fuzzed.answering()) == []
    assert fuzzed.faults_logged() == []


# Found by this fuzzing: gRPC\'s own deserializer raised before the status mapping, so such bytes answered UNKNOWN.
def test_bytes_that_are_no_request_answer_invalid_argument(target):
    runner, fuzzed = target

    @settings(CI, max_examples=30)
    @given(st.sampled_from(sorted(METHODS)), raw_payloads())
    def refused(method: str, payload: bytes) -> None:
        case = Case(method, payload, "raw-bytes")
        outcome = runner.run(fuzzed.call(case))
        assert not problems(case, outcome), (case.describe(), outcome)

    refused()
    assert runner.run(fuzzed.answering()) == []


# Found by this fuzzing: errors quoted request strings whole and outgrew gRPC\'s metadata limit (the client saw
# RESOURCE_EXHAUSTED "Stream removed"); servicer.py caps every message.
def test_long_refs_and_ids_get_their_status_not_a_dropped_stream(target):
    runner, fuzzed = target

    @settings(CI, max_examples=15)
    @given(st.sampled_from(["GetPolicy", "ActivatePolicy", "RollbackPolicy", "Classify", "ClassifyBatch"]),
           huge_text())
    def answered(method: str, long: str) -> None:
        request = {"GetPolicy": lambda: pb.GetPolicyRequest(ref=f"smoke@{long}"),
                   "ActivatePolicy": lambda: pb.ActivatePolicyRequest(id="smoke", ref=long),
                   "RollbackPolicy": lambda: pb.RollbackPolicyRequest(id=long),
                   "Classify": lambda: pb.ClassifyRequest(policy=pb.PolicySelector(ref=long),
                                                          content=pb.Content(text="hello")),
                   "ClassifyBatch": lambda: pb.ClassifyBatchRequest(items=[pb.BatchItem(content=pb.Content(
                       text="hello"))], policies=[pb.PolicySelector(ref=long)])}[method]()
        case = Case(method, request)
        assume(echoes_long_string(case))
        outcome = runner.run(fuzzed.call(case))
        assert not problems(case, outcome), (case.describe(), outcome)

    answered()


def test_fuzz_script_runs_and_reports(tmp_path):
    done = subprocess.run([sys.executable, "scripts/fuzz_rpcs.py", "--cases", "8", "--seed", "3",
                           "--tmp", str(tmp_path)], cwd=REPO, capture_output=True, text=True, timeout=240)
    assert "cases run: 8" in done.stdout and "statuses per RPC:" in done.stdout, done.stdout + done.stderr
    assert "health NOT_SERVING right after a case" in done.stdout
    assert done.returncode in (0, 1) and ("failing cases: none" in done.stdout) == (done.returncode == 0)
    assert list(tmp_path.iterdir()) == []  # its temporary directory is gone
