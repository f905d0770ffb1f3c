"""The front end over real gRPC on loopback: a real tritonserver (the canned executor from test_triton_client, steered
by marker words), a real SQLite registry and audit log, health, reflection and metrics.

One event loop runs the whole module (server and clients); tests drive it through the module's `asyncio.Runner`.
Sync gRPC clients (reflection) run on a worker thread so the loop keeps serving. A Triton that dies and comes back,
and the smoke model end to end, are in test_serving_end_to_end.py.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import urllib.request
from collections.abc import Iterator

import grpc
import pytest
from frontend_api import SMOKE, Api, classify_request, eventually, frontend_settings, open_frontend
from google.protobuf import descriptor_pool, json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from test_triton_client import (
    BANANA,
    FAIL,
    FAILURE_MESSAGE,
    FINGERPRINT,
    GARBLE,
    SLOW,
    start_canned_triton,
)

from server import log as slog
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.registry import Registry
from server.servicer import LIVENESS_SERVICE, SERVICE_NAME, build_server
from server.settings import ServerSettings

INLINE = """+++
id = "fruit"
version = "1"
title = "Fruit"
reasoning_effort = "medium"

[output]
format = "binary"
+++
Answer 1 when the content names a fruit, else 0.
"""


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("servicer")
    triton, model = start_canned_triton(root)
    Registry(root / "state").add(SMOKE, activate=True)
    runner = asyncio.Runner()
    frontend, channel = runner.run(open_frontend(frontend_settings(triton.grpc_url, root / "state")))
    yield Api(runner, frontend, pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel), channel, model)
    runner.run(channel.close())
    runner.run(frontend.stop(grace=1))
    runner.close()
    triton.stop()


def test_settings_are_documented_and_validated():
    from dataclasses import fields

    from server.settings import SETTING_HELP, ServerSettingsError

    assert set(SETTING_HELP) == {f.name for f in fields(ServerSettings)} and all(SETTING_HELP.values())
    settings = ServerSettings.from_mapping({"triton_endpoints": ["a:1", "b:2"], "max_in_flight": 4})
    assert settings.triton_endpoints == ("a:1", "b:2") and settings.validate() is settings
    with pytest.raises(ServerSettingsError, match="unknown settings: colour"):
        ServerSettings.from_mapping({"colour": "red"})
    with pytest.raises(ServerSettingsError) as bad:
        ServerSettings(listen="nowhere", triton_endpoints=("a:1", "a:1"), max_in_flight=0,
                       prefix_priority=101).validate()
    assert bad.value.problems == [
        "listen: 'nowhere' is not host:port", "triton_endpoints: an endpoint is listed twice",
        "prefix_priority: must be within 0..100, got 101", "max_in_flight: must be at least 1, got 0"]


def test_a_second_front_end_on_a_busy_port_refuses_to_start(api, tmp_path):
    from server.settings import ServerSettingsError

    settings = frontend_settings("127.0.0.1:9", tmp_path, listen=api.frontend.address)

    async def build() -> None:
        build_server(settings)

    with pytest.raises(ServerSettingsError, match=f"cannot listen on {api.frontend.address}"):
        api.run(build())


def _health(api: Api, service: str) -> int:
    return api.run(api.health.Check(health_pb2.HealthCheckRequest(service=service))).status


def test_health_is_serving_once_ready(api):
    assert _health(api, "") == health_pb2.HealthCheckResponse.SERVING
    assert _health(api, SERVICE_NAME) == health_pb2.HealthCheckResponse.SERVING
    assert _health(api, LIVENESS_SERVICE) == health_pb2.HealthCheckResponse.SERVING


def test_classify(api):
    response = api.call("Classify", classify_request(request_id="my-id", include_reasoning=True))
    assert response.request_id == "my-id"
    assert response.verdict.parse_status == pb.PARSE_STATUS_OK
    assert response.verdict.HasField("violation") and not response.verdict.violation
    assert response.reasoning == "The content does not mention bananas."
    assert (response.policy.id, response.policy.version, response.policy.sha256) == ("smoke", "1.0.0",
                                                                                      SMOKE.sha256)
    assert response.usage.cached_prompt_tokens > 300  # the active policy's prefix was warmed at start
    assert response.usage.prompt_tokens > response.usage.cached_prompt_tokens
    assert response.model_fingerprint == FINGERPRINT and response.finish_reason == "stop"
    t = response.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.time_to_verdict_ms <= t.total_ms


def test_violation_fields(api):
    response = api.call("Classify", pb.ClassifyRequest(
        policy=pb.PolicySelector(ref="smoke@1.0.0"),
        content=pb.Content(conversation=pb.Conversation(turns=[pb.Turn(role="user", content=f"{BANANA}?"),
                                                                pb.Turn(role="assistant", content="Yes.")]))))
    verdict = response.verdict
    assert (verdict.violation, verdict.category, list(verdict.rule_ids)) == (True, "BN1", ["BN1.a"])
    assert response.reasoning == ""  # not asked for


def test_second_request_for_a_policy_reports_its_prefix_as_cached(api):
    def ask(text: str) -> pb.ClassifyResponse:
        return api.call("Classify", pb.ClassifyRequest(policy=pb.PolicySelector(inline_text=INLINE),
                                                       content=pb.Content(text=text)))

    first, second = ask("an apple"), ask("a pear")
    assert first.usage.cached_prompt_tokens == 0
    prefix = api.frontend.classifier.policies._resolve_inline(INLINE).prefixes["medium"]
    assert second.usage.cached_prompt_tokens == len(prefix.ids)
    assert first.verdict.parse_status == pb.PARSE_STATUS_MALFORMED  # the canned answer is JSON, not 0/1


def test_classify_stream_sends_reasoning_deltas_then_the_result(api):
    async def collect() -> list[pb.ClassifyEvent]:
        return [event async for event in api.stub.ClassifyStream(classify_request(f"{BANANA} split",
                                                                                  include_reasoning=True))]

    events = api.run(collect())
    kinds = [event.WhichOneof("event") for event in events]
    assert kinds[-1] == "result" and set(kinds[:-1]) == {"reasoning"} and len(kinds) >= 3
    result = events[-1].result
    assert "".join(e.reasoning.text for e in events[:-1]) == result.reasoning
    assert result.verdict.violation


def test_classify_batch_streams_results_and_item_errors(api):
    request = pb.ClassifyBatchRequest(
        request_id="b1",
        policies=[pb.PolicySelector(ref="smoke"), pb.PolicySelector(inline_text=INLINE)],
        items=[
            pb.BatchItem(item_id="ok", content=pb.Content(text="plain words")),
            pb.BatchItem(item_id="banana", content=pb.Content(text=f"{BANANA} bread")),
            pb.BatchItem(item_id="empty", content=pb.Content()),
            pb.BatchItem(item_id="role", content=pb.Content(conversation=pb.Conversation(
                turns=[pb.Turn(role="narrator", content="once upon a time")]))),
            pb.BatchItem(content=pb.Content(text="x"), policies=[pb.PolicySelector(ref="ghost")]),
        ])

    async def collect() -> list[pb.BatchResult]:
        return [result async for result in api.stub.ClassifyBatch(request)]

    results = api.run(collect())
    assert len(results) == 9
    by_key = {(r.item_id, r.policy_ref): r for r in results}
    assert by_key[("banana", "smoke")].result.verdict.violation
    assert by_key[("ok", "smoke")].result.request_id == "b1/ok"
    assert by_key[("empty", "smoke")].error.code == "INVALID_ARGUMENT"
    assert "role 'narrator'" in by_key[("role", "smoke")].error.message
    assert by_key[("4", "ghost")].error.code == "NOT_FOUND"  # unnamed items are named by their index
    inline = [r for r in results if r.policy_ref.startswith("inline:") and r.item_id == "ok"]
    assert inline and inline[0].result.policy.id == "fruit"


def test_batch_limits_and_items_without_a_policy(api):
    async def collect(request: pb.ClassifyBatchRequest) -> list[pb.BatchResult]:
        return [result async for result in api.stub.ClassifyBatch(request)]

    too_many = pb.ClassifyBatchRequest(items=[pb.BatchItem(content=pb.Content(text="x"))] * 257,
                                       policies=[pb.PolicySelector(ref="smoke")])
    with pytest.raises(grpc.aio.AioRpcError) as refused:
        api.run(collect(too_many))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "257 items; at most 256" in refused.value.details()
    [orphan] = api.run(collect(pb.ClassifyBatchRequest(items=[pb.BatchItem(content=pb.Content(text="x"))])))
    assert orphan.error.code == "INVALID_ARGUMENT" and "no policy for this item" in orphan.error.message


def test_policy_administration(api):
    v2 = SMOKE.text.replace('version = "1.0.0"', 'version = "1.1.0"').replace("# Smoke", "# The smoke")
    put = api.call("PutPolicy", pb.PutPolicyRequest(text=v2, activate=True))
    assert (put.id, put.version, put.active) == ("smoke", "1.1.0", True) and put.tokens > 100
    assert api.call("Classify", classify_request()).policy.version == "1.1.0"
    document = api.call("GetPolicy", pb.GetPolicyRequest(ref="smoke@1.0.0"))
    assert document.version.version == "1.0.0" and not document.version.active and "banana" in document.text
    listed = api.call("ListPolicies", pb.ListPoliciesRequest())
    assert [(p.id, p.version) for p in listed.policies] == [("smoke", "1.1.0")]
    assert api.call("RollbackPolicy", pb.RollbackPolicyRequest(id="smoke")).version == "1.0.0"
    assert api.call("Classify", classify_request()).policy.version == "1.0.0"
    assert api.call("ActivatePolicy", pb.ActivatePolicyRequest(id="smoke", ref=put.sha256[:12])).version == "1.1.0"
    assert api.call("RollbackPolicy", pb.RollbackPolicyRequest(id="smoke")).version == "1.0.0"


@pytest.mark.parametrize(("method", "request_", "code", "message"), [
    ("PutPolicy", pb.PutPolicyRequest(text="+++\nid = 'x'\n+++\n"), grpc.StatusCode.INVALID_ARGUMENT,
     "front matter needs version"),
    ("RollbackPolicy", pb.RollbackPolicyRequest(id="ghost"), grpc.StatusCode.NOT_FOUND, "known policies: smoke"),
    ("ActivatePolicy", pb.ActivatePolicyRequest(id="smoke", ref="9.9"), grpc.StatusCode.NOT_FOUND, "9.9"),
    ("GetPolicy", pb.GetPolicyRequest(ref="ghost"), grpc.StatusCode.NOT_FOUND, "unknown policy 'ghost'"),
])
def test_policy_administration_errors(api, method, request_, code, message):
    error = api.error(method, request_)
    assert error.code() == code and message in error.details()


@pytest.mark.parametrize(("request_", "code", "message"), [
    (classify_request(ref="ghost"), grpc.StatusCode.NOT_FOUND, "unknown policy 'ghost'; known policies: smoke"),
    (classify_request(ref="smoke@3.0"), grpc.StatusCode.NOT_FOUND, "3.0"),
    (classify_request(""), grpc.StatusCode.INVALID_ARGUMENT, "content.text is empty"),
    (pb.ClassifyRequest(policy=pb.PolicySelector(ref="smoke")), grpc.StatusCode.INVALID_ARGUMENT,
     "no content given"),
    (classify_request("word " * 700), grpc.StatusCode.INVALID_ARGUMENT, "accepts at most 500"),
    (classify_request(reasoning_effort=7), grpc.StatusCode.INVALID_ARGUMENT, "reasoning_effort 7 is not a known"),
    (pb.ClassifyRequest(policy=pb.PolicySelector(inline_text="+++\nid = 'x'\n"), content=pb.Content(text="a")),
     grpc.StatusCode.INVALID_ARGUMENT, "never closed"),
    (classify_request(f"{FAIL} now"), grpc.StatusCode.INTERNAL, FAILURE_MESSAGE),
])
def test_error_statuses(api, request_, code, message):
    error = api.error("Classify", request_)
    assert error.code() == code
    assert message in error.details() and "Traceback" not in error.details()


def test_an_unexpected_error_is_internal_without_a_traceback(api, monkeypatch):
    async def broken(job):
        raise KeyError("a bug in the server")

    monkeypatch.setattr(api.frontend.classifier, "classify", broken)
    error = api.error("Classify", classify_request(request_id="buggy"))
    assert error.code() == grpc.StatusCode.INTERNAL
    assert error.details() == "internal error; the server log has the details under request id buggy"


def test_tiny_deadline_is_deadline_exceeded(api):
    assert api.error("Classify", classify_request(f"{SLOW} deadline"), timeout=0.001).code() == \
        grpc.StatusCode.DEADLINE_EXCEEDED


def test_a_client_that_goes_away_cancels_its_triton_request(api):
    async def leave() -> None:
        stream = api.stub.ClassifyStream(classify_request(f"{SLOW} then gone", request_id="gone"))
        await stream.read()
        stream.cancel()

    api.run(leave())
    assert api.run(eventually(lambda: "gone" in api.model.cancelled()))
    assert api.run(eventually(lambda: api.frontend.classifier.admission.in_flight == 0))


def test_overload_is_resource_exhausted_with_a_retry_hint(api):
    async def scenario() -> grpc.aio.AioRpcError:
        streams = [api.stub.ClassifyStream(classify_request(f"{SLOW} {i}")) for i in range(2)]
        for stream in streams:  # both admitted and streaming
            await stream.read()
        try:
            await api.stub.Classify(classify_request())
        except grpc.aio.AioRpcError as exc:
            return exc
        finally:
            for stream in streams:
                stream.cancel()
        raise AssertionError("not refused")

    refused = api.run(scenario())
    assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    hint = dict(refused.trailing_metadata())["retry-after-ms"]
    assert int(hint) > 0 and f"retry in {hint} ms" in refused.details()
    assert api.run(eventually(lambda: api.frontend.classifier.admission.in_flight == 0))


def test_logs_are_json_lines_with_the_request_id(api):
    stream = io.StringIO()
    handler = slog.configure("info", stream)
    try:
        api.error("Classify", classify_request(ref="ghost", request_id="trace-me"))
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    rpc = next(line for line in lines if line.get("request_id") == "trace-me")
    assert rpc["code"] == "NOT_FOUND" and rpc["method"] == "/safeguard.v1.Safeguard/Classify"


def test_a_generic_client_calls_the_service_through_reflection(api):
    def generic_call() -> tuple[list[str], dict]:
        with grpc.insecure_channel(api.frontend.address) as channel:
            database = ProtoReflectionDescriptorDatabase(channel)
            services = database.get_services()
            pool = descriptor_pool.DescriptorPool(database)
            method = pool.FindServiceByName("safeguard.v1.Safeguard").FindMethodByName("Classify")
            request_class = message_factory.GetMessageClass(method.input_type)
            response_class = message_factory.GetMessageClass(method.output_type)
            request = json_format.ParseDict({"policy": {"ref": "smoke"}, "content": {"text": f"{BANANA}!"}},
                                            request_class())
            call = channel.unary_unary(f"/{method.containing_service.full_name}/{method.name}",
                                       request_serializer=request_class.SerializeToString,
                                       response_deserializer=response_class.FromString)
            return services, json_format.MessageToDict(call(request, timeout=10))

    services, response = api.run(asyncio.to_thread(generic_call))
    assert {"safeguard.v1.Safeguard", "grpc.health.v1.Health"} <= set(services)
    assert response["verdict"]["parseStatus"] == "PARSE_STATUS_OK" and response["verdict"]["violation"] is True
    assert response["policy"]["id"] == "smoke"


def test_metrics_are_exposed_after_requests(api):
    api.call("Classify", classify_request(f"{GARBLE} it"))
    api.call("Classify", classify_request(f"{BANANA} again"))
    api.error("Classify", classify_request(ref="ghost"))
    port = api.frontend.metrics_server.port

    def scrape() -> str:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return response.read().decode()

    text = api.run(asyncio.to_thread(scrape))
    for expected in ('safeguard_requests_total{outcome="ok",policy="smoke"}',
                     'safeguard_requests_total{outcome="not_found",policy="unknown"}',
                     'safeguard_prompt_tokens_total{policy="smoke"}',
                     'safeguard_cached_prompt_tokens_total{policy="smoke"}',
                     'safeguard_reasoning_tokens_total{policy="smoke"}',
                     'safeguard_output_tokens_total{policy="smoke"}',
                     'safeguard_verdicts_total{category="BN1",policy="smoke",violation="true"}',
                     'safeguard_parse_failures_total{policy="smoke",status="malformed"}',
                     'safeguard_queue_seconds_bucket{le="0.001",policy="smoke"}',
                     'safeguard_time_to_first_token_seconds_count{policy="smoke"}',
                     'safeguard_time_to_verdict_seconds_count{policy="smoke"}',
                     'safeguard_request_duration_seconds_count{policy="smoke"}',
                     "safeguard_requests_in_flight 0.0",
                     'safeguard_prefix_warmups_total{outcome="ok"}'):
        assert expected in text, expected
