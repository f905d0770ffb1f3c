"""Work bounded by what it costs, over real gRPC on loopback with the canned Triton model: batch prompt limits,
batch and tenant shares of the in-flight slots, the per-tenant rate limit, the batch deadline, and an activation
storm that must not starve classification nor take the service out of SERVING.

The canned model's SLOW marker streams for seconds (test_triton_client.py), which keeps requests in flight.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from frontend_api import SMOKE, Api, classify_request, eventually, frontend_settings, open_frontend
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_triton_client import SLOW, start_canned_triton

from classification.content import Text
from server.errors import ServiceError
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.identity import CLASSIFY, Identity
from server.jobs import BatchJob, Selector
from server.registry import Registry
from server.servicer import Frontend

SMOKE_REF = pb.PolicySelector(ref="smoke")
BOUNDED = dict(max_in_flight=16, batch_concurrency=2, max_batch_prompts=20, max_batch_policies=3,
               max_item_policies=2, warm_interval_s=0.2)


@dataclass
class Bench:
    runner: asyncio.Runner
    triton_url: str
    state: Path
    api: Api


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> Iterator[Bench]:
    root = tmp_path_factory.mktemp("bounds")
    triton, model = start_canned_triton(root)
    Registry(root / "state").add(SMOKE, activate=True)
    Registry(root / "state").add(SMOKE, activate=True, tenant="a")  # tenant a reaches only its own policies
    runner = asyncio.Runner()
    frontend, channel = runner.run(open_frontend(frontend_settings(triton.grpc_url, root / "state", **BOUNDED)))
    api = Api(runner, frontend, pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel), channel, model)
    yield Bench(runner, triton.grpc_url, root / "state", api)
    runner.run(channel.close())
    runner.run(frontend.stop(grace=1))
    runner.close()
    triton.stop()


@asynccontextmanager
async def another_frontend(bench: Bench, **changes):
    """A front end of its own (settings a test needs alone) over the module's Triton and registry."""
    frontend, channel = await open_frontend(frontend_settings(bench.triton_url, bench.state, **changes))
    try:
        yield frontend, pb_grpc.SafeguardStub(channel)
    finally:
        await channel.close()
        await frontend.stop(grace=0)


def refusals(frontend: Frontend, reason: str) -> float:
    return frontend.metrics.registry.get_sample_value("safeguard_refusals_total", {"reason": reason}) or 0.0


def batch_request(count: int, text: str = "plain words", policies=(SMOKE_REF,)) -> pb.ClassifyBatchRequest:
    return pb.ClassifyBatchRequest(policies=list(policies),
                                   items=[pb.BatchItem(item_id=f"i{i}", content=pb.Content(text=f"{text} {i}"))
                                          for i in range(count)])


async def collect(stub: pb_grpc.SafeguardStub, request: pb.ClassifyBatchRequest, **kwargs) -> list[pb.BatchResult]:
    return [result async for result in stub.ClassifyBatch(request, **kwargs)]


def test_a_batch_over_its_prompt_limit_is_refused_with_the_numbers_before_any_work(bench):
    api = bench.api
    before = len(api.model.requests())
    pinned = pb.PolicySelector(ref="smoke@1.0.0")
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        api.run(collect(api.stub, batch_request(11, policies=[SMOKE_REF, pinned])))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert ("the batch asks for 22 prompts (each item once per distinct policy); at most 20 are accepted per "
            "ClassifyBatch (split it into several smaller batches)") in refused.value.details()
    assert len(api.model.requests()) == before  # nothing reached the model
    assert refusals(api.frontend, "batch_prompts") == 1
    # Duplicates collapse: each item against smoke three times and the pinned version once is 10 x 2 prompts.
    results = api.run(collect(api.stub, batch_request(10, policies=[SMOKE_REF, SMOKE_REF, pinned, SMOKE_REF])))
    assert len(results) == 20 and all(r.WhichOneof("outcome") == "result" for r in results)
    assert {r.item_id for r in results} == {f"i{i}" for i in range(10)}


def test_one_callers_eight_batches_cannot_take_every_slot(bench):
    """Eight batches of two would fill all 16 slots; their share (75%) stops at 12, and a classify gets in."""
    api = bench.api

    async def scenario() -> tuple[list, pb.ClassifyResponse, int]:
        batches = [asyncio.ensure_future(collect(api.stub, batch_request(2, f"{SLOW} batch {b}"), timeout=30))
                   for b in range(8)]
        await eventually(lambda: api.frontend.classifier.admission.in_flight >= 12 or all(b.done() for b in batches))
        held = api.frontend.classifier.admission.in_flight
        single = await api.stub.Classify(classify_request("a single request"), timeout=10)
        for batch in batches:
            batch.cancel()
        outcomes = await asyncio.gather(*batches, return_exceptions=True)
        return outcomes, single, held

    outcomes, single, held = api.run(scenario())
    assert held == 12
    assert single.verdict.parse_status == pb.PARSE_STATUS_OK
    refused = [o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)
               and o.code() == grpc.StatusCode.RESOURCE_EXHAUSTED]
    assert len(refused) == 2
    assert "batches hold 12 slots, the most batches may take (75% of the appliance's 16" in refused[0].details()
    assert int(dict(refused[0].trailing_metadata())["retry-after-ms"]) > 0
    assert refusals(api.frontend, "batch_share") == 2
    assert api.run(eventually(lambda: api.frontend.classifier.admission.in_flight == 0))


def test_one_tenant_cannot_take_the_slots_another_tenant_needs(bench):
    """Tenant a runs eight batches through the serving core (identities reach it from the authenticating
    interceptor); it holds at most its 75% share, so a caller of another tenant still gets a classify through."""
    api = bench.api
    classifier = api.frontend.classifier
    tenant_a = Identity("key:a-key", "a", frozenset({CLASSIFY}))

    async def drain(job: BatchJob) -> list:
        return [outcome async for outcome in classifier.batch(job)]

    async def scenario() -> tuple[list, pb.ClassifyResponse, int]:
        jobs = [BatchJob([(f"{b}-{i}", Text(f"{SLOW} tenant a {b}"), [Selector(ref="smoke")]) for i in range(4)],
                         None, False, f"a-{b}", time.perf_counter(), None, tenant_a) for b in range(8)]
        batches = [asyncio.ensure_future(drain(job)) for job in jobs]
        await eventually(lambda: classifier.admission.held("a") >= 12 or all(b.done() for b in batches))
        held = classifier.admission.held("a")
        single = await api.stub.Classify(classify_request("another tenant's request"), timeout=10)
        for batch in batches:
            batch.cancel()
        return await asyncio.gather(*batches, return_exceptions=True), single, held

    outcomes, single, held = api.run(scenario())
    assert held == 12  # 75% of 16: batches of two, the seventh one refused by the tenant's share
    assert single.verdict.parse_status == pb.PARSE_STATUS_OK
    shares = [o for o in outcomes
              if isinstance(o, ServiceError) and "tenant 'a' has 12 requests in flight" in o.message]
    assert len(shares) == 2
    assert api.run(eventually(lambda: classifier.admission.in_flight == 0))


def test_the_rate_limit_refuses_with_a_retry_hint(bench):
    async def scenario() -> tuple[int, list[grpc.aio.AioRpcError], float]:
        async with another_frontend(bench, tenant_rate=0.5, tenant_burst=2) as (frontend, stub):
            answered, refused = 0, []
            for _ in range(3):
                try:
                    await stub.Classify(classify_request(), timeout=10)
                    answered += 1
                except grpc.aio.AioRpcError as exc:
                    refused.append(exc)
            with pytest.raises(grpc.aio.AioRpcError) as batch:
                await collect(stub, batch_request(1), timeout=10)  # a batch takes a token like any request
            refused.append(batch.value)
            return answered, refused, refusals(frontend, "rate")

    answered, refused, counted = bench.runner.run(scenario())
    assert answered == 2 and len(refused) == 2 and counted == 2
    for error in refused:
        assert error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "tenant 'default' is over its rate of 0.5 requests a second (bursts of 2)" in error.details()
        retry = int(dict(error.trailing_metadata())["retry-after-ms"])
        assert 0 < retry <= 2000 and f"retry in {retry} ms" in error.details()


def test_a_batch_ends_cleanly_at_its_deadline_and_gives_its_slots_back(bench):
    """Slow items still running at the batch's deadline answer DEADLINE_EXCEEDED; fast ones answer; the stream
    ends OK and every slot comes back, both for the server's batch_timeout_s and a sooner client deadline."""
    request = pb.ClassifyBatchRequest(policies=[SMOKE_REF], items=[
        pb.BatchItem(item_id="fast", content=pb.Content(text="quick words")),
        *(pb.BatchItem(item_id=f"slow{i}", content=pb.Content(text=f"{SLOW} {i}")) for i in range(3))])

    async def run(timeout: float | None, **changes) -> tuple[list[pb.BatchResult], float, int, float]:
        async with another_frontend(bench, batch_concurrency=2, **changes) as (frontend, stub):
            started = time.monotonic()
            results = await collect(stub, request, timeout=timeout)
            elapsed = time.monotonic() - started
            await eventually(lambda: frontend.classifier.admission.in_flight == 0)
            return results, elapsed, frontend.classifier.admission.in_flight, refusals(frontend, "batch_deadline")

    runs = {"the batch's deadline (1 s)": bench.runner.run(run(None, batch_timeout_s=1.0)),
            "the client's deadline": bench.runner.run(run(1.5, batch_timeout_s=60.0))}
    for whose, (results, elapsed, in_flight, cut) in runs.items():
        by_item = {r.item_id: r for r in results}
        assert set(by_item) == {"fast", "slow0", "slow1", "slow2"}
        assert by_item["fast"].WhichOneof("outcome") == "result"
        for slow in ("slow0", "slow1", "slow2"):
            assert by_item[slow].error.code == "DEADLINE_EXCEEDED", by_item[slow]
            assert by_item[slow].error.message.startswith(f"{whose} passed before this item was classified")
        assert elapsed < 4.0  # a slow item alone streams for about 4 s: the batch did not wait for them
        assert in_flight == 0 and cut == 3


def test_an_activation_storm_does_not_starve_classification_nor_health(bench):
    """Four clients put and activate new versions of a policy in a loop while another classifies: every classify
    answers, health stays SERVING throughout, and the warm-ups coalesce (fewer run than were asked for)."""
    api = bench.api
    warmups = api.frontend.classifier.readiness.warmups
    base = SMOKE.text.replace("bananas.", "bananas, in any form.")

    async def storm(worker: int, stop: asyncio.Event, activations: list[int]) -> None:
        n = 0
        while not stop.is_set():
            n += 1
            text = base.replace('version = "1.0.0"', f'version = "storm-{worker}-{n}"')
            await api.stub.PutPolicy(pb.PutPolicyRequest(text=text, activate=True), timeout=30)
            activations.append(1)

    async def scenario() -> tuple[int, int, set[int], int]:
        stop, activations = asyncio.Event(), []
        before = warmups.stats.requested, warmups.stats.run
        storms = [asyncio.create_task(storm(w, stop, activations)) for w in range(4)]
        answered, statuses = 0, set()
        started = time.monotonic()
        while time.monotonic() - started < 4.0:
            response = await api.stub.Classify(classify_request(f"message {answered}"), timeout=10)
            assert response.verdict.parse_status == pb.PARSE_STATUS_OK
            answered += 1
            statuses.add((await api.health.Check(health_pb2.HealthCheckRequest(service=""))).status)
        stop.set()
        await asyncio.gather(*storms)
        return answered, len(activations), statuses, warmups.stats.run - before[1]

    answered, activations, statuses, warm_runs = api.run(scenario())
    assert activations >= 8 and answered >= 8
    assert statuses == {health_pb2.HealthCheckResponse.SERVING}
    assert warm_runs < activations  # coalesced
    api.run(api.stub.ActivatePolicy(pb.ActivatePolicyRequest(id="smoke", ref="1.0.0")))


def test_the_activation_storm_benchmark_runs_and_prints_its_figures():
    """The CI-sized run of benchmarks/bench_activation_storm.py (its own Triton and front end, stopped after)."""
    done = subprocess.run([sys.executable, "-m", "benchmarks.bench_activation_storm", "--seconds", "0.5",
                           "--rounds", "1", "--concurrency", "2", "--activators", "2"],
                          capture_output=True, text=True, timeout=180, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 0, done.stderr[-3000:]
    figures = dict(line.split(":", 1) for line in done.stdout.splitlines() if line.startswith(("classify", "ratio")))
    assert {"classify alone", "classify during storm", "ratio storm / alone"} <= set(figures)
    assert "0 errors" in figures["classify alone"] and "0 errors" in figures["classify during storm"]
    assert float(figures["ratio storm / alone"]) > 0
