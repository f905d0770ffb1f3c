"""The serving core without gRPC: a real tritonserver (the canned executor), a real SQLite registry and audit log.

One event loop serves the whole module (grpc.aio channels belong to the loop that made them), so each test runs its
coroutine on the module's `asyncio.Runner`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
import pytest
from test_triton_client import (
    BANANA,
    FAIL,
    FAILURE_MESSAGE,
    FINGERPRINT,
    GARBLE,
    SLOW,
    start_canned_triton,
    wait_for,
)
from tritonclient.grpc import model_config_pb2, service_pb2, service_pb2_grpc

from build_scripts.repository import CannedRepository
from classification.content import Chat, PromptResponse, Text, Turn
from classification.policy import load_policy, parse_policy
from classification.vocab import load_harmony_encoding
from server.audit import AuditLog
from server.classifier import Classifier
from server.errors import DeadlineExceeded, Internal, InvalidArgument, NotFound, ResourceExhausted, ServiceError
from server.jobs import BatchJob, Classification, ClassifyJob, ReasoningText, Selector
from server.metrics import Metrics
from server.registry import Registry
from server.settings import ServerSettings
from server.triton.launcher import TritonServer

POLICIES = Path(__file__).resolve().parents[1] / "policies"
SMOKE = load_policy(POLICIES / "smoke.md")
INLINE = """+++
id = "fruit"
version = "1"
title = "Fruit"
reasoning_effort = "low"

[output]
format = "binary"
+++
Answer 1 when the content names a fruit, else 0.
"""


@dataclass
class Stack:
    runner: asyncio.Runner
    classifier: Classifier
    registry: Registry
    audit: AuditLog
    triton: TritonServer
    model: CannedRepository

    def run(self, coroutine):
        return self.runner.run(coroutine)


def job(content=None, selector: Selector | None = None, **changes) -> ClassifyJob:
    made = ClassifyJob(selector or Selector(ref="smoke"), content or Text("hello there"), None, True,
                       f"req-{time.perf_counter_ns()}", time.perf_counter(), None)
    return replace(made, **changes)


def settings_for(endpoints: list[str], state: Path, **changes) -> ServerSettings:
    return ServerSettings(listen="127.0.0.1:0", triton_endpoints=tuple(endpoints),
                          state_dir=str(state), metrics_port=0, health_interval_s=0.2, policy_refresh_s=0.3,
                          max_in_flight=2, batch_concurrency=2, max_content_tokens=500, **changes)


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("classifier")
    triton, model = start_canned_triton(root)
    registry = Registry(root / "state")
    registry.add(SMOKE, activate=True)
    settings = settings_for([triton.grpc_url], root / "state")
    audit = AuditLog(settings.audit_path, store_rationale=True, store_content=False)
    runner = asyncio.Runner()
    classifier = Classifier(settings, registry, audit, Metrics(), load_harmony_encoding())
    runner.run(classifier.start())
    yield Stack(runner, classifier, registry, audit, triton, model)
    runner.run(classifier.stop())
    runner.close()
    audit.close()
    triton.stop()


def test_ready_after_warming_the_active_policy(stack):
    assert stack.classifier.ready
    warm = [r for r in stack.model.requests() if r["max_tokens"] == 0]
    assert warm and warm[0]["prefix_len"] == warm[0]["prompt"] and warm[0]["priority"] == 90


def test_classify_reports_verdict_policy_usage_timings_and_audits(stack):
    request = job()
    result = stack.run(stack.classifier.classify(request))
    assert result.verdict.status == "ok" and result.verdict.violation is False
    assert result.reasoning == "The content does not mention bananas."
    assert (result.policy.id, result.policy.version, result.policy.sha256) == ("smoke", "1.0.0", SMOKE.sha256)
    assert result.policy.active and result.policy.tokens > 100
    prefix = stack.classifier.policies.cached_active()[0].prefixes["low"]
    assert result.usage.cached_prompt_tokens == len(prefix.ids)  # warmed at start, so cached from the first request
    assert result.usage.prompt_tokens > len(prefix.ids)
    assert 0 < result.usage.reasoning_tokens < result.usage.output_tokens
    t = result.timings
    assert 0 <= t.queue_ms <= t.time_to_first_token_ms <= t.time_to_verdict_ms <= t.total_ms
    assert result.model_fingerprint == FINGERPRINT and result.finish_reason == "stop"
    # audit_wait is off by default: the record is queued before the answer and lands a moment later.
    assert stack.run(wait_for(lambda: any(e.request_id == request.request_id for e in stack.audit.tail(20))))
    record = next(e for e in stack.audit.tail(20) if e.request_id == request.request_id)
    assert (record.policy_id, record.violation, record.parse_status) == ("smoke", False, "ok")
    assert record.prompt_tokens == result.usage.prompt_tokens


def test_violation_with_category_and_rule_ids(stack):
    result = stack.run(stack.classifier.classify(job(PromptResponse(f"{BANANA} split recipe?", "Sure."))))
    verdict = result.verdict
    assert (verdict.violation, verdict.category, verdict.rule_ids) == (True, "BN1", ("BN1.a",))


def test_reasoning_is_returned_only_when_asked(stack):
    result = stack.run(stack.classifier.classify(job(include_reasoning=False)))
    assert result.reasoning == "" and result.verdict.analysis


def test_unparseable_answer_is_a_result_with_its_parse_status(stack):
    result = stack.run(stack.classifier.classify(job(Text(f"{GARBLE} this"))))
    assert result.verdict.status == "malformed" and result.verdict.violation is None
    assert stack.classifier.metrics.registry.get_sample_value(
        "safeguard_parse_failures_total", {"policy": "smoke", "status": "malformed"}) >= 1


def test_model_failure_is_internal_with_the_models_message(stack):
    with pytest.raises(Internal, match=FAILURE_MESSAGE):
        stack.run(stack.classifier.classify(job(Text(f"{FAIL} now"))))


def test_inline_policy_is_cached_after_its_first_use(stack):
    first = stack.run(stack.classifier.classify(job(selector=Selector(inline_text=INLINE))))
    second = stack.run(stack.classifier.classify(job(Text("another text"), Selector(inline_text=INLINE))))
    assert first.usage.cached_prompt_tokens == 0
    prefix_len = second.usage.cached_prompt_tokens
    assert prefix_len > 0 and prefix_len == len(stack.classifier.policies._resolve_inline(INLINE).prefixes["low"].ids)
    assert first.policy.id == "fruit" and not first.policy.active
    assert first.verdict.status == "malformed"  # the canned model answers in JSON; this policy asks for 0 or 1


@pytest.mark.parametrize(("selector", "error", "message"), [
    (Selector(ref="nope"), NotFound, "unknown policy 'nope'; known policies: smoke"),
    (Selector(ref="smoke@9.9.9"), NotFound, "9.9.9"),
    (Selector(ref="smoke@"), InvalidArgument, "names no version"),
    (Selector(), InvalidArgument, "no policy given"),
    (Selector(inline_text="+++\nid = 'x'\n+++\nbody"), InvalidArgument, "front matter needs version"),
])
def test_policy_selection_errors(stack, selector, error, message):
    with pytest.raises(error, match=message):
        stack.run(stack.classifier.classify(job(selector=selector)))


@pytest.mark.parametrize(("content", "message"), [
    (Text("   "), "content.text is empty"),
    (PromptResponse("", ""), "empty prompt and an empty response"),
    (Chat(()), "no turns"),
    (Chat((Turn("system", "hi"),)), "turn 1 has role 'system'"),
    (Text("word " * 600), "content is 60[0-9] tokens; this appliance accepts at most 500"),
])
def test_content_errors(stack, content, message):
    with pytest.raises(InvalidArgument, match=message):
        stack.run(stack.classifier.classify(job(content)))


def test_stream_sends_reasoning_then_the_result(stack):
    async def collect() -> list:
        return [event async for event in stack.classifier.stream(job(Text(f"{BANANA} in the stream")))]

    events = stack.run(collect())
    deltas, result = events[:-1], events[-1]
    assert len(deltas) >= 3 and all(isinstance(d, ReasoningText) for d in deltas)
    assert isinstance(result, Classification)
    assert "".join(d.text for d in deltas) == result.reasoning


def test_batch_mixes_results_and_item_errors(stack):
    from server.errors import InvalidArgument as Invalid

    items = [("a", Text("plain"), []), ("b", Text(f"{BANANA} bread"), []), ("c", Text(""), []),
             ("d", Invalid("content.conversation has no turns"), []), ("e", Text("x"), [Selector(ref="missing")])]
    batch = BatchJob(items, None, False, "batch-1", time.perf_counter(), None)

    async def collect() -> list:
        return [outcome async for outcome in stack.classifier.batch(replace(
            batch, items=[(i, c, s or [Selector(ref="smoke"), Selector(inline_text=INLINE)]) for i, c, s in items]))]

    outcomes = stack.run(collect())
    by_key = {(o.item_id, o.policy_ref): o for o in outcomes}
    assert len(outcomes) == 9  # four items x two policies, one item with its own single policy
    assert by_key[("b", "smoke")].result.verdict.violation is True
    assert by_key[("a", "smoke")].result.request_id == "batch-1/a"
    assert by_key[("c", "smoke")].error.code == "INVALID_ARGUMENT"
    assert by_key[("d", "smoke")].error.message == "content.conversation has no turns"
    assert by_key[("e", "missing")].error.code == "NOT_FOUND"
    inline_ref = next(ref for _, ref in by_key if ref.startswith("inline:"))
    assert by_key[("a", inline_ref)].result.policy.id == "fruit"


def test_deadline_cancels_the_triton_request(stack):
    request = job(Text(f"{SLOW} please"), deadline=time.monotonic() + 0.3)
    with pytest.raises(DeadlineExceeded):
        stack.run(stack.classifier.classify(request))
    assert stack.run(wait_for(lambda: request.request_id in stack.model.cancelled()))


def test_an_expired_deadline_never_reaches_triton(stack):
    request = job(deadline=time.monotonic() - 1)
    with pytest.raises(DeadlineExceeded):
        stack.run(stack.classifier.classify(request))
    assert request.request_id not in {r["id"] for r in stack.model.requests()}


def test_overload_is_refused_with_a_retry_hint(stack):
    async def scenario() -> ServiceError:
        slow = [asyncio.create_task(stack.classifier.classify(job(Text(f"{SLOW} {i}")))) for i in range(2)]
        await wait_for(lambda: stack.classifier.admission.in_flight == 2)
        try:
            await stack.classifier.classify(job())
        except ResourceExhausted as exc:
            return exc
        finally:
            for task in slow:
                task.cancel()
            await asyncio.gather(*slow, return_exceptions=True)
        raise AssertionError("not refused")

    refused = stack.run(scenario())
    assert refused.retry_after_ms and f"retry in {refused.retry_after_ms} ms" in refused.message
    assert stack.classifier.admission.in_flight == 0


def test_admin_changes_the_active_version_and_warms_it(stack):
    v2 = SMOKE.text.replace('version = "1.0.0"', 'version = "2.0.0"').replace("bananas.", "bananas!")
    info = stack.run(stack.classifier.put_policy(v2, activate=True))
    assert (info.version, info.active) == ("2.0.0", True)
    new_prefix = stack.classifier.policies.cached_active()[0].prefixes["low"]
    warm = [r for r in stack.model.requests() if r["max_tokens"] == 0 and r["prompt"] == len(new_prefix.ids)]
    assert warm, "the new version's prefix was not warmed"
    result = stack.run(stack.classifier.classify(job()))
    assert result.policy.version == "2.0.0" and result.usage.cached_prompt_tokens == len(new_prefix.ids)
    pinned = stack.run(stack.classifier.classify(job(selector=Selector(ref="smoke@1.0.0"))))
    assert (pinned.policy.version, pinned.policy.active) == ("1.0.0", False)

    assert stack.run(stack.classifier.rollback_policy("smoke")).version == "1.0.0"
    assert stack.run(stack.classifier.classify(job())).policy.version == "1.0.0"
    assert stack.run(stack.classifier.activate_policy("smoke", "2.0.0")).version == "2.0.0"
    assert stack.run(stack.classifier.classify(job())).policy.version == "2.0.0"
    listed = stack.run(stack.classifier.list_policies())
    assert [(p.id, p.version, p.active) for p in listed] == [("smoke", "2.0.0", True)]
    document_info, text = stack.run(stack.classifier.get_policy("smoke@1.0.0"))
    assert document_info.version == "1.0.0" and parse_policy(text) == SMOKE

    # A change made by another process (the CLI) is picked up by the periodic refresh.
    stack.registry.activate("smoke", "1.0.0")
    assert stack.run(wait_for(lambda: stack.classifier.policies.cached_active()[0].info.version == "1.0.0", 3.0))
    assert stack.run(stack.classifier.classify(job())).policy.version == "1.0.0"


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda c: c.rollback_policy("ghost"), NotFound, "unknown policy 'ghost'; known policies: smoke"),
    (lambda c: c.activate_policy("smoke", "7.7.7"), NotFound, "7.7.7"),
    (lambda c: c.put_policy("no front matter", False), InvalidArgument, "starts with a '\\+\\+\\+' line"),
    (lambda c: c.get_policy(""), InvalidArgument, "no policy given"),
])
def test_admin_errors(stack, call, error, message):
    with pytest.raises(error, match=message):
        stack.run(call(stack.classifier))


class _FlakyTriton(service_pb2_grpc.GRPCInferenceServiceServicer):
    """A KServe endpoint that says it is ready and serves the same model, but drops every inference stream."""

    async def ServerReady(self, request, context):
        return service_pb2.ServerReadyResponse(ready=True)

    async def ModelReady(self, request, context):
        return service_pb2.ModelReadyResponse(ready=True)

    async def ModelConfig(self, request, context):
        config = model_config_pb2.ModelConfig(name=request.name)
        config.parameters["model_fingerprint"].string_value = FINGERPRINT
        return service_pb2.ModelConfigResponse(config=config)

    async def ModelStreamInfer(self, request_iterator, context):
        await context.abort(grpc.StatusCode.UNAVAILABLE, "connection dropped")
        yield  # an async generator, as grpc.aio expects for a streaming method


def test_a_failing_endpoint_is_marked_down_and_the_request_moves_on(stack, tmp_path):
    async def scenario() -> tuple[Classification, float, bool]:
        def failures() -> float:
            return classifier.metrics.registry.get_sample_value("safeguard_endpoint_failures_total",
                                                                {"endpoint": flaky_url}) or 0.0

        flaky = grpc.aio.server()
        service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(_FlakyTriton(), flaky)
        port = flaky.add_insecure_port("127.0.0.1:0")
        await flaky.start()
        flaky_url = f"127.0.0.1:{port}"
        settings = settings_for([flaky_url, stack.triton.grpc_url], tmp_path / "state")
        audit = AuditLog(settings.audit_path, store_rationale=True, store_content=False)
        # An empty registry: no active policy to warm, so only the request below calls the flaky endpoint.
        classifier = Classifier(settings, Registry(settings.state_path), audit, Metrics(), load_harmony_encoding())
        try:
            await classifier.start()
            # Once both endpoints take traffic, find a policy prefix whose requests go to the flaky one first.
            assert await wait_for(lambda: all(s.healthy for s in classifier.router.status()), 5.0)
            for n in range(50):
                selector = Selector(inline_text=f"{INLINE}Variant {n}.\n")  # the body decides the prefix key
                resolved = await classifier.policies.resolve(selector)
                key = (await classifier.policies.prefix(resolved, "low")).key
                if classifier.router.candidates(key)[0].url == flaky_url:
                    break
            result = await classifier.classify(job(selector=selector))
            flaky_down = any(s.endpoint.url == flaky_url and not s.healthy for s in classifier.router.status())
            return result, failures(), flaky_down
        finally:
            await classifier.stop()
            audit.close()
            await flaky.stop(0)

    result, failed_calls, flaky_down = stack.run(scenario())
    assert result.verdict.status == "malformed" and result.finish_reason == "stop"  # answered by the real Triton
    assert failed_calls == 1 and flaky_down
