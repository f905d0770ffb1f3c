"""What fuzzing the API runs against and how it judges an answer: a real tritonserver over the canned model, a front end
in its own process (so a crash is a dead process, not a dead test), and each `Case` sent as raw bytes through a
generic gRPC method, so a message that is not a valid request travels the same way as one that is.

Shared by tests/test_fuzz.py and scripts/fuzz_rpcs.py.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from rpc_strategies import EXPECTED_ITEM, METHODS, STREAM, Case
from test_triton_client import FINGERPRINT, canned_scripts

from build_scripts.repository import write_canned_repository
from classification.library import bundled_policy
from classification.policy import load_policy
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.registry import Registry
from server.servicer import SERVICE_NAME
from server.triton.launcher import TritonConfig, TritonServer

REPO = Path(__file__).resolve().parents[1]
CALL_TIMEOUT_S = 30.0  # past it a case counts as a hang
FRONTEND_START_S = 60.0
# How long health may stay NOT_SERVING after a case: an activation can leave it so until the next probe.
SETTLE_S = 5.0
MAX_DETAILS_CHARS = 8192  # an error message is for a person; gRPC drops any over 16 KiB of metadata
# Lines the front end writes only when something escaped the error mapping.
FAULT_MARKERS = ("Traceback", "unexpected error")
_SERVE = ("import asyncio, json, sys\n"
          "from server.servicer import serve\n"
          "from server.settings import ServerSettings\n"
          "asyncio.run(serve(ServerSettings.from_mapping(json.loads(sys.argv[1]))))\n")


@dataclass(frozen=True)
class Outcome:
    code: str  # a gRPC status code name
    details: str = ""
    item_codes: tuple[str, ...] = ()  # a batch's per-item error codes ("OK" for a result)
    events: tuple[str, ...] = ()  # a ClassifyStream's event kinds
    longest_item_error: int = 0  # characters in a batch's longest per-item error message


def problems(case: Case, outcome: Outcome) -> list[str]:
    """What is wrong with `outcome` as the answer to `case` (nothing: the answer is acceptable)."""
    found = []
    if outcome.code not in case.expected:
        found.append(f"{case.method} answered {outcome.code}: {outcome.details[:300]}")
    bad_items = sorted(set(outcome.item_codes) - EXPECTED_ITEM - {"OK"})
    if bad_items:
        found.append(f"{case.method} item errors {bad_items}")
    if "metadata size exceeds" in outcome.details:  # the client got gRPC's complaint, not the server's answer
        found.append(f"{case.method} error message too long to deliver: {outcome.details[:200]}")
    elif len(outcome.details) > MAX_DETAILS_CHARS:
        found.append(f"{case.method} error message over {MAX_DETAILS_CHARS:,} characters: {len(outcome.details):,}")
    if "CLIENT: Received message larger than max" in outcome.details:  # an answer far bigger than its question
        found.append(f"{case.method} response too large for a client: {outcome.details[:200]}")
    if outcome.longest_item_error > MAX_DETAILS_CHARS:
        found.append(f"{case.method} item error message over {MAX_DETAILS_CHARS:,} characters: "
                     f"{outcome.longest_item_error:,}")
    if "Traceback" in outcome.details:
        found.append(f"{case.method} details carry a traceback")
    if case.method == "ClassifyStream" and outcome.code == "OK" and outcome.events[-1:] != ("result",):
        found.append(f"ClassifyStream ended without a result: {outcome.events}")
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Tally:
    """Cases run and the statuses seen, per method (batch items apart)."""

    cases: int = 0
    statuses: dict[str, Counter[str]] = field(default_factory=dict)
    failures: list[tuple[Case, list[str]]] = field(default_factory=list)
    examples: dict[tuple[str, str], str] = field(default_factory=dict)  # the first details per (method, status)

    def add(self, case: Case, outcome: Outcome, found: list[str]) -> None:
        self.cases += 1
        key = f"{case.method} (raw bytes)" if case.raw else case.method
        self.statuses.setdefault(key, Counter())[outcome.code] += 1
        self.examples.setdefault((key, outcome.code), outcome.details)
        if outcome.item_codes:
            self.statuses.setdefault("ClassifyBatch items", Counter()).update(outcome.item_codes)
        if found:
            self.failures.append((case, found))


class FuzzTarget:
    """Triton (canned model) and a front end with the smoke policy active, under `root`; `stop` ends both."""

    def __init__(self, root: Path, **settings: object):
        self.root = root
        self.triton: TritonServer | None = None
        self.process: subprocess.Popen | None = None
        self.channel: grpc.aio.Channel | None = None
        self.settings = settings
        self.log_path = root / "frontend.log"
        self.not_serving_seen = 0  # health checks after a case that found NOT_SERVING (it came back)

    def start(self) -> FuzzTarget:
        write_canned_repository(self.root / "repo", canned_scripts(), FINGERPRINT, keep_logs=False)
        Registry(self.root / "state").add(load_policy(bundled_policy("smoke")), activate=True)
        self.triton = TritonServer(TritonConfig(self.root / "repo")).start()
        self.address = f"127.0.0.1:{_free_port()}"
        values = dict(listen=self.address, triton_endpoints=[self.triton.grpc_url], state_dir=str(self.root / "state"),
                      metrics_port=0, health_interval_s=0.5, policy_refresh_s=1.0, max_in_flight=8,
                      batch_concurrency=4, max_content_tokens=2000, max_batch_items=32, max_output_tokens=64,
                      default_timeout_s=CALL_TIMEOUT_S)
        values.update(self.settings)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen([sys.executable, "-c", _SERVE, json.dumps(values)], cwd=REPO,
                                            stdout=log, stderr=subprocess.STDOUT)
        return self

    async def open(self) -> None:
        """Connect, and wait until the front end is ready."""
        self.channel = grpc.aio.insecure_channel(self.address)
        deadline = time.monotonic() + FRONTEND_START_S
        while await self._health() != health_pb2.HealthCheckResponse.SERVING:
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the front end did not become ready:\n{self.log_text()[-3000:]}")
            await asyncio.sleep(0.2)

    async def call(self, case: Case) -> Outcome:
        path = f"/safeguard.v1.Safeguard/{case.method}"
        try:  # no serializers: the bytes go out as they are and come back as they are
            if METHODS[case.method] == STREAM:
                answers = [m async for m in self.channel.unary_stream(path)(case.payload(), timeout=CALL_TIMEOUT_S)]
                return _streamed(case.method, answers)
            await self.channel.unary_unary(path)(case.payload(), timeout=CALL_TIMEOUT_S)
            return Outcome("OK")
        except grpc.aio.AioRpcError as exc:
            return Outcome(exc.code().name, exc.details() or "")

    async def answering(self, classify: bool = True) -> list[str]:
        """Why the front end is not fine (nothing: it lives, is SERVING, or back to it within `SETTLE_S`, and
        classifies a good request). A passing NOT_SERVING is counted in `not_serving_seen`, not failed."""
        if self.process.poll() is not None:
            return [f"the front end exited with {self.process.returncode}:\n{self.log_text()[-3000:]}"]
        health = await self._health()
        if health == health_pb2.HealthCheckResponse.NOT_SERVING:
            self.not_serving_seen += 1
            deadline = time.monotonic() + SETTLE_S
            while health != health_pb2.HealthCheckResponse.SERVING and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
                health = await self._health()
        if health != health_pb2.HealthCheckResponse.SERVING:
            return [f"health is {health_pb2.HealthCheckResponse.ServingStatus.Name(health)}; the front end's log "
                    f"ends:\n{self.log_text()[-4000:]}"]
        if classify:
            good = pb.ClassifyRequest(policy=pb.PolicySelector(ref="smoke"), content=pb.Content(text="hello there"))
            outcome = await self.call(Case("Classify", good))
            if outcome.code != "OK":
                return [f"a good Classify answered {outcome.code}: {outcome.details}"]
        return []

    def faults_logged(self) -> list[str]:
        """The front end's log lines that say an error escaped the mapping to a status."""
        return [line for line in self.log_text().splitlines() if any(m in line for m in FAULT_MARKERS)]

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    async def close(self) -> None:
        if self.channel is not None:
            await self.channel.close()
            self.channel = None

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.triton is not None:
            self.triton.stop()

    async def _health(self) -> int:
        try:
            answer = await health_pb2_grpc.HealthStub(self.channel).Check(
                health_pb2.HealthCheckRequest(service=SERVICE_NAME), timeout=5)
            return answer.status
        except grpc.aio.AioRpcError:
            return health_pb2.HealthCheckResponse.UNKNOWN


def _streamed(method: str, answers: list[bytes]) -> Outcome:
    if method == "ClassifyStream":
        return Outcome("OK", events=tuple(pb.ClassifyEvent.FromString(a).WhichOneof("event") for a in answers))
    results = [pb.BatchResult.FromString(a) for a in answers]
    return Outcome("OK", item_codes=tuple(r.error.code if r.HasField("error") else "OK" for r in results),
                   longest_item_error=max((len(r.error.message) for r in results), default=0))


ECHO_LIMIT = 1000  # chars; quoted in an error (escaped, then percent-encoded) it nears gRPC's 16 KiB metadata limit


def _policy_texts(request: object) -> list[str]:
    if isinstance(request, pb.PutPolicyRequest):
        return [request.text]
    if isinstance(request, pb.ClassifyRequest):
        return [request.policy.inline_text]
    if isinstance(request, pb.ClassifyBatchRequest):
        return [s.inline_text for s in _selectors(request)]
    return []


def _selectors(request: pb.ClassifyBatchRequest) -> list[pb.PolicySelector]:
    return [*request.policies, *(s for item in request.items for s in item.policies)]


def echoes_long_string(case: Case) -> bool:
    """Whether `case` carries a policy ref, id, version or front matter an error message may quote back whole."""
    request = case.request
    quoted: list[str] = [text.partition("\n+++")[0] for text in _policy_texts(request)]
    if isinstance(request, pb.ClassifyRequest):
        quoted.append(request.policy.ref)
    elif isinstance(request, pb.ClassifyBatchRequest):
        quoted.extend(s.ref for s in _selectors(request))
    elif isinstance(request, pb.GetPolicyRequest):
        quoted.append(request.ref)
    elif isinstance(request, pb.ActivatePolicyRequest | pb.RollbackPolicyRequest):
        quoted.extend([request.id, getattr(request, "ref", "")])
    return any(len(text) > ECHO_LIMIT for text in quoted)
