"""Nothing a caller sends mints unbounded state, and what a person reads back shows what it is: metric labels
from a bounded set, request ids with a length and a charset (a duplicate in flight refused), policy version and
title labels free of control, bidi and zero-width characters, front matter nested too deep refused with
INVALID_ARGUMENT over gRPC and a plain error from the CLI. Over real gRPC with the canned Triton model."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator

import grpc
import pytest
from click.testing import CliRunner
from frontend_api import SMOKE, Api, classify_request, frontend_settings, open_frontend
from grpc_health.v1 import health_pb2_grpc
from test_triton_client import BANANA, SLOW, start_canned_triton

from appliance.cli import main
from classification.content import Text, serialise
from classification.policy import PolicyError, parse_policy
from server.audit_reader import AuditReader
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.metrics import Metrics, Observation
from server.registry import Registry
from server.request_ids import MAX_LENGTH

LABEL_CAP = 3
NESTED = "a = " + "[" * 3000 + "]" * 3000
HIDDEN = ["\x00", "\x07", "\x1b", "\x7f", "\n", "\u0085", "\u2028", "\u200b", "\u200c", "\u200d", "\u2060",
          "\ufeff", "\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F)), *map(chr, range(0x2066, 0x206A))]


def policy_text(policy_id: str = "flood", version: str = "1", front: str = "", title: str = "Flood") -> str:
    return (f'+++\nid = "{policy_id}"\nversion = "{version}"\ntitle = "{title}"\n{front}\n[output]\n'
            'format = "json"\n+++\nAnswer {"violation": 0 or 1, "policy_category": "..."}.\n')


@pytest.fixture(scope="module")
def api(tmp_path_factory) -> Iterator[Api]:
    root = tmp_path_factory.mktemp("bounds")
    triton, model = start_canned_triton(root)
    Registry(root / "state").add(SMOKE, activate=True)
    runner = asyncio.Runner()
    settings = frontend_settings(triton.grpc_url, root / "state", metrics_policy_labels=LABEL_CAP, audit_wait=True,
                                 max_in_flight=8)
    frontend, channel = runner.run(open_frontend(settings))
    yield Api(runner, frontend, pb_grpc.SafeguardStub(channel), health_pb2_grpc.HealthStub(channel), channel, model)
    runner.run(channel.close())
    runner.run(frontend.stop(grace=1))
    runner.close()
    triton.stop()


# -- metric labels ----------------------------------------------------------------------------------------------

def _series(metrics: Metrics) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {(s.name, tuple(sorted(s.labels.items()))) for family in metrics.registry.collect()
            for s in family.samples if s.name.startswith("safeguard_")}


def _label_values(metrics: Metrics, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in _series(metrics) if label in dict(labels)}


def _observation(policy: str, category: str | None, declared: tuple[str, ...] = ()) -> Observation:
    return Observation(policy, 0.001, 0.002, 0.003, 0.004, 10, 5, 2, 3, "ok", True, category, declared)


def test_a_flood_of_policy_ids_and_categories_adds_no_series():
    metrics = Metrics(policy_labels=2)
    for i in range(2):
        metrics.observe(_observation(f"policy-{i}", "declared", ("declared",)))
    metrics.observe(_observation("policy-0", "undeclared-one", ("declared",)))
    metrics.failed("late-0", "not_found")
    metrics.observe(_observation("late-1", "anything"))
    before = _series(metrics)
    for i in range(500):
        metrics.observe(_observation(f"new-{i}", f"category-{i}"))
        metrics.observe(_observation("policy-0", f"category-{i}", ("declared",)))
        metrics.failed(f"gone-{i}", "not_found")
    assert _series(metrics) == before
    assert _label_values(metrics, "policy") == {"policy-0", "policy-1", "other"}
    assert _label_values(metrics, "category") == {"declared", "undeclared"}
    assert metrics.registry.get_sample_value(
        "safeguard_verdicts_total", {"policy": "other", "violation": "true", "category": "undeclared"}) == 501


def _flood(api: Api, prefix: str, count: int) -> None:
    for i in range(count):
        policy_id = f"{prefix}-{i}"
        api.call("PutPolicy", pb.PutPolicyRequest(text=policy_text(policy_id)))
        response = api.call("Classify", classify_request(f"{BANANA} here", ref=f"{policy_id}@1"))
        assert response.verdict.violation and response.verdict.category == "BN1"  # not declared by the policy


def test_a_flood_of_new_policies_over_grpc_adds_no_series(api):
    metrics = api.frontend.metrics
    api.call("Classify", classify_request(f"{BANANA}?"))  # the smoke policy declares BN1
    api.call("Classify", pb.ClassifyRequest(policy=pb.PolicySelector(inline_text=policy_text("inline-one")),
                                            content=pb.Content(text=f"{BANANA}!")))
    _flood(api, "first", LABEL_CAP + 1)
    before = _series(metrics)
    _flood(api, "second", 4)
    assert _series(metrics) == before
    named = _label_values(metrics, "policy") - {"other", "inline", "unknown"}
    assert len(named) <= LABEL_CAP and "smoke" in named and "other" in _label_values(metrics, "policy")
    assert _label_values(metrics, "category") <= {"BN1", "undeclared", "none"}
    assert metrics.registry.get_sample_value(
        "safeguard_verdicts_total", {"policy": "smoke", "violation": "true", "category": "BN1"}) >= 1
    assert metrics.registry.get_sample_value(
        "safeguard_verdicts_total", {"policy": "inline", "violation": "true", "category": "undeclared"}) == 1


# -- request ids ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("request_id", ["x" * (MAX_LENGTH + 1), "a b", "tab\there", "new\nline", "caf\u00e9",
                                        "rtl\u202eid", "zero\u200bwidth", "semi;colon", "slash/ed"])
def test_a_malformed_request_id_is_invalid_argument(api, request_id):
    async def first_batch_result() -> None:
        await api.stub.ClassifyBatch(pb.ClassifyBatchRequest(request_id=request_id)).read()

    with pytest.raises(grpc.aio.AioRpcError) as batch:
        api.run(first_batch_result())
    for error in (api.error("Classify", classify_request(request_id=request_id)), batch.value):
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "request_id" in error.details() and ("at most 128" in error.details()
                                                     or "letters, digits" in error.details())


def test_a_malformed_batch_item_id_fails_that_item_alone(api):
    async def results() -> list[pb.BatchResult]:
        items = [pb.BatchItem(item_id="ok-1", content=pb.Content(text="x")),
                 pb.BatchItem(item_id="bad id\u202e", content=pb.Content(text="x"))]
        call = api.stub.ClassifyBatch(pb.ClassifyBatchRequest(policies=[pb.PolicySelector(ref="smoke")],
                                                              items=items))
        return [result async for result in call]

    by_id = {r.item_id: r for r in api.run(results())}
    assert by_id["ok-1"].HasField("result")
    bad = by_id["bad id\u202e"].error
    assert bad.code == "INVALID_ARGUMENT" and "items[1].item_id has the character ' '" in bad.message


def test_well_formed_request_ids_are_echoed(api):
    for request_id in ["a" * MAX_LENGTH, "123e4567-e89b-12d3-a456-426614174000", "job-7:42.retry_1"]:
        assert api.call("Classify", classify_request(request_id=request_id)).request_id == request_id
    generated = api.call("Classify", classify_request()).request_id
    assert len(generated) == 16 and generated != api.call("Classify", classify_request()).request_id


def test_a_request_id_in_flight_is_refused_and_free_again_once_finished(api):
    async def scenario() -> tuple[grpc.StatusCode, grpc.StatusCode, str]:
        stream = api.stub.ClassifyStream(classify_request(f"{SLOW} now", request_id="dup-1", include_reasoning=True))
        first = await stream.read()  # a reasoning delta: the request is in flight
        assert first.HasField("reasoning")
        with pytest.raises(grpc.aio.AioRpcError) as single:
            await api.stub.Classify(classify_request(request_id="dup-1"))
        with pytest.raises(grpc.aio.AioRpcError) as batch:
            await api.stub.ClassifyBatch(pb.ClassifyBatchRequest(
                request_id="dup-1", policies=[pb.PolicySelector(ref="smoke")],
                items=[pb.BatchItem(content=pb.Content(text="x"))])).read()
        stream.cancel()
        for _ in range(100):  # the server lets go of the id once the cancelled request has unwound
            try:
                return single.value.code(), batch.value.code(), (
                    await api.stub.Classify(classify_request(request_id="dup-1"))).request_id
            except grpc.aio.AioRpcError as exc:
                assert exc.code() == grpc.StatusCode.ALREADY_EXISTS
                await asyncio.sleep(0.05)
        raise AssertionError("the id stayed claimed after its request ended")

    single, batch, reused = api.run(scenario())
    assert single == batch == grpc.StatusCode.ALREADY_EXISTS and reused == "dup-1"
    # finished requests do not hold their id: the same id again, one after another
    assert api.call("Classify", classify_request(request_id="dup-1")).request_id == "dup-1"


def test_the_refusal_of_a_duplicate_says_why(api):
    async def scenario() -> str:
        stream = api.stub.ClassifyStream(classify_request(f"{SLOW} now", request_id="dup-2", include_reasoning=True))
        await stream.read()
        try:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await api.stub.Classify(classify_request(request_id="dup-2"))
            return caught.value.details()
        finally:
            stream.cancel()

    assert "already in use by a request still running" in api.run(scenario())


# -- policy labels and front matter -----------------------------------------------------------------------------

@pytest.mark.parametrize("char", HIDDEN, ids=[f"U+{ord(c):04X}" for c in HIDDEN])
def test_version_and_title_refuse_hidden_characters(char):
    for field in ("version", "title"):
        text = policy_text(**{field: f"v{char}1".replace("\n", "\\n").replace("\x00", "\\u0000")
                              .replace("\x07", "\\u0007").replace("\x1b", "\\u001b").replace("\x7f", "\\u007f")})
        with pytest.raises(PolicyError) as caught:
            parse_policy(text)
        assert f"U+{ord(char):04X}" in caught.value.problems[0] and field in caught.value.problems[0]


def test_ids_are_lowercase_ascii_so_no_hidden_character_gets_in():
    for policy_id in ("spam\u200b", "spam\u202e", "sp\u0430m"):  # the last with a Cyrillic "а"
        with pytest.raises(PolicyError, match="must be lowercase letters"):
            parse_policy(policy_text(policy_id))


@pytest.mark.parametrize(("text", "message"), [
    (policy_text(version="1\u202e2"), "U+202E RIGHT-TO-LEFT OVERRIDE"),
    (policy_text("spam\u2066"), "must be lowercase letters"),
    (policy_text(front=NESTED), "nested too deeply"),
    (policy_text(front="b = " + "{c = " * 1000 + "1" + "}" * 1000), "nested too deeply"),
    (policy_text(front=f'notes = "{"n" * 20_000}"'), "the front matter is"),
])
def test_put_policy_refuses_with_invalid_argument(api, text, message):
    error = api.error("PutPolicy", pb.PutPolicyRequest(text=text))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()
    inline = pb.ClassifyRequest(policy=pb.PolicySelector(inline_text=text), content=pb.Content(text="x"))
    error = api.error("Classify", inline)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and message in error.details()


def test_the_cli_refuses_deeply_nested_front_matter_with_a_message(tmp_path):
    directory = tmp_path / "policies"
    directory.mkdir()
    (directory / "nested.md").write_text(policy_text("nested", front=NESTED))
    state = str(tmp_path / "state")
    for args in (["add", str(directory / "nested.md")], ["import", str(directory)]):
        result = CliRunner().invoke(main, ["policy", "--state-dir", state, *args])
        assert result.exit_code == 1, result.output
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
        assert "nested too deeply" in result.output or "not imported" in result.output
    result = CliRunner().invoke(main, ["policy", "--state-dir", state, "add", str(directory / "nested.md")])
    assert "error: nested.md: front matter is not valid TOML (arrays or tables nested too deeply)" in result.output
    (directory / "bidi.md").write_text(policy_text("bidi", version="1.0\u202e"))
    result = CliRunner().invoke(main, ["policy", "--state-dir", state, "add", str(directory / "bidi.md")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "error: bidi.md: version must be visible characters only" in result.output and "U+202E" in result.output


# -- normalisation ------------------------------------------------------------------------------------------------

def _inline(text: str, normalise: bool, request_id: str) -> pb.ClassifyRequest:
    front = "normalise_input = true" if normalise else ""
    return pb.ClassifyRequest(policy=pb.PolicySelector(inline_text=policy_text("norm", front=front)),
                              content=pb.Content(text=text), request_id=request_id)


def test_a_policy_can_ask_for_normalised_content_and_the_audit_hashes_what_was_received(api):
    hidden = "B\u200bANANA here"  # the canned model flags content that starts with BANANA
    assert not api.call("Classify", _inline(hidden, False, "norm-off")).verdict.violation
    assert api.call("Classify", _inline(hidden, True, "norm-on")).verdict.violation
    assert api.call("Classify", _inline("ＢＡＮＡＮＡ here", True, "norm-wide")).verdict.violation
    error = api.error("Classify", _inline("\u200b\u202e", True, "norm-empty"))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "content.text is empty" in error.details()
    entry, = AuditReader(api.frontend.settings.audit_path).by_request("norm-on")
    assert entry.content_sha256 == hashlib.sha256(serialise(Text(hidden)).encode()).hexdigest()


def test_the_server_wide_setting_normalises_every_policy(api, tmp_path):
    async def scenario() -> bool:
        settings = frontend_settings(api.frontend.settings.triton_endpoints[0], tmp_path, normalise_content=True)
        frontend, channel = await open_frontend(settings)
        try:
            response = await pb_grpc.SafeguardStub(channel).Classify(_inline("B\u202eANANA", False, "wide"))
            return response.verdict.violation
        finally:
            await channel.close()
            await frontend.stop(grace=1)

    assert api.run(scenario())


def test_the_label_cap_is_a_validated_setting():
    from server.settings import ServerSettings, ServerSettingsError

    with pytest.raises(ServerSettingsError, match="metrics_policy_labels: must be 0 or more, got -1"):
        ServerSettings(metrics_policy_labels=-1).validate()
    metrics = Metrics(policy_labels=0)
    metrics.observe(_observation("spam", None))
    assert _label_values(metrics, "policy") == {"other"}
