"""The front end's life around a real Triton that dies and comes back, and the real smoke model end to end through
the repository `appliance build --gpu cpu` writes."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from frontend_api import SMOKE, Api, classify_request, eventually, frontend_settings, open_frontend, poll
from grpc_health.v1 import health_pb2, health_pb2_grpc
from test_triton_client import FINGERPRINT, SLOW, canned_scripts

from build_scripts.repository import write_canned_repository
from classification.golden import golden_path, load_golden
from classification.library import bundled_policy
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.registry import Registry
from server.servicer import LIVENESS_SERVICE, SERVICE_NAME
from server.triton.launcher import TritonConfig, TritonServer


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def test_triton_coming_dying_and_coming_back(tmp_path):
    """The front end's life around Triton's. Started before Triton it is live but not ready, and refuses with
    UNAVAILABLE; ready once Triton answers. Killing tritonserver mid-stream gives the client UNAVAILABLE within 2 s;
    once Triton is back on the same port the prober notices, re-warms the policy and the service answers again. A
    request accepted before a graceful stop still gets its answer."""
    write_canned_repository(tmp_path / "repo", canned_scripts(), FINGERPRINT)
    grpc_port, http_port, metrics_port = _free_ports(3)
    config = TritonConfig(tmp_path / "repo", grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port)
    Registry(tmp_path / "state").add(SMOKE, activate=True)
    runner = asyncio.Runner()
    frontend, channel = runner.run(open_frontend(frontend_settings(f"127.0.0.1:{grpc_port}", tmp_path / "state",
                                                           max_output_tokens=40)))
    stub, health = pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel)
    servers: list[TritonServer] = []

    async def status(service: str = SERVICE_NAME) -> int:
        return (await health.Check(health_pb2.HealthCheckRequest(service=service))).status

    async def refused(message: str) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Classify(classify_request(), timeout=2)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE and message in caught.value.details()
        assert int(dict(caught.value.trailing_metadata())["retry-after-ms"]) > 0

    async def before_triton() -> None:
        assert await status(LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING
        assert await status("") == health_pb2.HealthCheckResponse.NOT_SERVING
        await refused("not ready")

    async def answered() -> bool:
        try:
            await stub.Classify(classify_request(), timeout=2)
            return True
        except grpc.aio.AioRpcError:
            return False

    async def kill_mid_stream(triton: TritonServer) -> float:
        stream = stub.ClassifyStream(classify_request(f"{SLOW} to the end"))
        assert (await stream.read()).WhichOneof("event") == "reasoning"
        triton.process.kill()
        killed = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            while await stream.read() != grpc.aio.EOF:
                pass
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, caught.value
        return time.monotonic() - killed

    async def while_down() -> None:
        assert await poll(status, health_pb2.HealthCheckResponse.NOT_SERVING, 5)
        await refused("no healthy Triton endpoint")

    async def answered_during_shutdown() -> pb.ClassifyResponse:
        pending = asyncio.ensure_future(stub.Classify(classify_request(f"{SLOW} while stopping"), timeout=10))
        await eventually(lambda: frontend.classifier.admission.in_flight == 1)
        await frontend.stop(grace=5)
        return await pending

    try:
        runner.run(before_triton())
        for life in ("first", "after the kill"):
            servers.append(TritonServer(config).start())
            assert runner.run(poll(answered, True, 30)), f"the service did not answer once Triton was up ({life})"
            assert runner.run(poll(status, health_pb2.HealthCheckResponse.SERVING, 10))
            if life == "first":
                assert runner.run(kill_mid_stream(servers[-1])) < 2.0
                runner.run(while_down())
                servers[-1].stop()
        assert runner.run(answered_during_shutdown()).finish_reason == "length"
    finally:
        runner.run(channel.close())
        runner.run(frontend.stop(grace=0))
        runner.close()
        for server in servers:
            server.stop()


# -- the real smoke model, end to end -----------------------------------------------------------------------------

GOLDEN = load_golden(golden_path(bundled_policy("smoke")))


@pytest.fixture(scope="module")
def smoke_api(tmp_path_factory) -> Iterator[Api]:
    """The repository `appliance build --gpu cpu` writes for the trained smoke checkpoint, served by tritonserver,
    behind a front end that learns the model fingerprint from the repository's engine.json."""
    from click.testing import CliRunner

    from build_scripts.cli import build_command
    from engine.checkpoint.smoke.cache import ensure_trained

    root = tmp_path_factory.mktemp("smoke-e2e")
    built = CliRunner().invoke(build_command, ["--gpu", "cpu", "--model", str(ensure_trained()),
                                               "--out", str(root / "repo"), "--dtype", "float32"])
    assert built.exit_code == 0, built.output
    triton = TritonServer(TritonConfig(root / "repo")).start(timeout=300)
    Registry(root / "state").add(SMOKE, activate=True)
    runner = asyncio.Runner()
    settings = frontend_settings(triton.grpc_url, root / "state", triton_model="safeguard",
                                 model_repository=str(root / "repo"), max_output_tokens=256)
    try:
        frontend, channel = runner.run(open_frontend(settings))
    except BaseException:
        triton.stop()
        raise
    yield Api(runner, frontend, pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel), channel)
    runner.run(channel.close())
    runner.run(frontend.stop(grace=1))
    runner.close()
    triton.stop()


@pytest.mark.parametrize("example", [GOLDEN[0], GOLDEN[1]], ids=lambda e: e.id)
def test_smoke_model_verdicts_end_to_end(smoke_api, example):
    from engine.settings import EngineSettings

    response = smoke_api.call("Classify", classify_request(example.content.text, include_reasoning=True), timeout=120)
    assert response.verdict.parse_status == pb.PARSE_STATUS_OK, response.verdict
    assert response.verdict.violation == example.violation
    assert response.verdict.category == (example.category or "")
    assert response.reasoning
    prefix = smoke_api.frontend.classifier.policies.cached_active()[0].prefixes["low"]
    assert response.usage.cached_prompt_tokens == len(prefix.ids)  # warmed on activation
    engine = EngineSettings.load(Path(smoke_api.frontend.settings.model_repository) / "safeguard" / "1")
    assert response.model_fingerprint == engine.model_fingerprint


def test_smoke_model_classify_stream_end_to_end(smoke_api):
    async def collect() -> list[pb.ClassifyEvent]:
        request = classify_request("A banana a day keeps the doctor away.", include_reasoning=True)
        return [event async for event in smoke_api.stub.ClassifyStream(request, timeout=120)]

    events = smoke_api.run(collect())
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "result" and kinds[:-1] and set(kinds[:-1]) == {"reasoning"}
    result = events[-1].result
    assert "".join(e.reasoning.text for e in events[:-1]) == result.reasoning
    assert result.verdict.parse_status == pb.PARSE_STATUS_OK and result.verdict.violation


def test_smoke_model_classify_batch_with_good_and_bad_items_end_to_end(smoke_api):
    request = pb.ClassifyBatchRequest(
        policies=[pb.PolicySelector(ref="smoke")],
        items=[
            pb.BatchItem(item_id="yes", content=pb.Content(prompt_response=pb.PromptResponse(
                prompt="What should I pack?", response="Pack two bananas and water."))),
            pb.BatchItem(item_id="no", content=pb.Content(conversation=pb.Conversation(turns=[
                pb.Turn(role="user", content="Any plans?"), pb.Turn(role="assistant", content="A walk by the sea.")]))),
            pb.BatchItem(item_id="empty", content=pb.Content(text="")),
            pb.BatchItem(item_id="ghost", content=pb.Content(text="hi"), policies=[pb.PolicySelector(ref="ghost")]),
        ])

    async def collect() -> list[pb.BatchResult]:
        return [result async for result in smoke_api.stub.ClassifyBatch(request, timeout=120)]

    by_item = {r.item_id: r for r in smoke_api.run(collect())}
    assert set(by_item) == {"yes", "no", "empty", "ghost"}
    assert by_item["yes"].result.verdict.violation and by_item["yes"].result.verdict.category == "BN1"
    assert by_item["no"].result.verdict.parse_status == pb.PARSE_STATUS_OK
    assert not by_item["no"].result.verdict.violation
    assert by_item["empty"].error.code == "INVALID_ARGUMENT"
    assert by_item["ghost"].error.code == "NOT_FOUND"


def test_smoke_model_policy_administration_end_to_end(smoke_api):
    v2 = SMOKE.text.replace('version = "1.0.0"', 'version = "1.0.1"')  # a new text: a new version
    put = smoke_api.call("PutPolicy", pb.PutPolicyRequest(text=v2, activate=True))
    assert (put.version, put.active) == ("1.0.1", True)
    first = smoke_api.call("Classify", classify_request("bananas again"), timeout=120)
    assert first.policy.version == "1.0.1"
    assert first.usage.cached_prompt_tokens > 0  # activation warmed the new prefix on Triton
    assert smoke_api.call("RollbackPolicy", pb.RollbackPolicyRequest(id="smoke")).version == "1.0.0"
    listed = smoke_api.call("ListPolicies", pb.ListPoliciesRequest())
    assert [(p.id, p.version) for p in listed.policies] == [("smoke", "1.0.0")]
    assert smoke_api.call("Classify", classify_request("bananas again"), timeout=120).policy.version == "1.0.0"
