"""The `safeguard` model served by the real tritonserver from the repository `appliance build --gpu cpu` writes for
the smoke checkpoint, called over gRPC with tritonclient: tokens equal transformers' own greedy generation for a
real harmony prompt, the KV cache figure, finish reasons, cancellation, bad input, and a clean stop.

The first tests cover the adapter's pure helpers without Triton, then the adapter inside Triton over a scripted
executor (its failure paths, deterministically), then the built repository with the reference executor.
"""

from __future__ import annotations

import queue
import re
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from click.testing import CliRunner
from conftest import cached_checkpoint

from build_scripts.cli import build_command
from classification.content import Text
from classification.policy import load_policy
from classification.render import PromptRenderer
from classification.tokens import STOP_TOKEN_IDS
from classification.vocab import load_harmony_encoding
from engine.executors.base import DEFAULT_PREFIX_PRIORITY, GenerationChunk, RequestError
from engine.triton.model import generation_request, response_arrays
from server.triton.launcher import SHM_DIR, TritonConfig, TritonServer, group_members

POLICY = Path(__file__).resolve().parents[1] / "policies" / "smoke.md"
MODEL = "safeguard"
REPLY_TIMEOUT_S = 120


# -- helpers without Triton ----------------------------------------------------------------------------------------

def arrays(**values: list) -> dict[str, np.ndarray]:
    dtypes = {"temperature": np.float32, "seed": np.uint64}
    return {name: np.array(v, dtype=dtypes.get(name, np.int32)) for name, v in values.items()}


def test_generation_request_defaults() -> None:
    request = generation_request("r1", arrays(input_ids=[1, 2, 3], max_tokens=[5]))
    assert (request.request_id, request.input_ids, request.max_tokens) == ("r1", (1, 2, 3), 5)
    assert (request.prefix_len, request.prefix_priority) == (0, DEFAULT_PREFIX_PRIORITY)
    assert request.sampling.temperature == 0.0 and request.sampling.seed is None
    assert request.sampling.stop_token_ids == STOP_TOKEN_IDS


def test_generation_request_every_input() -> None:
    request = generation_request("r", arrays(input_ids=[7] * 4, max_tokens=[9], prefix_len=[2], prefix_priority=[90],
                                             temperature=[0.5], seed=[2**64 - 1], stop_token_ids=[]))
    assert (request.prefix_len, request.prefix_priority) == (2, 90)
    assert (request.sampling.temperature, request.sampling.seed) == (0.5, 2**64 - 1)
    assert request.sampling.stop_token_ids == ()  # an explicit empty list: no stop tokens


@pytest.mark.parametrize(("values", "message"), [
    (dict(max_tokens=[5]), "input input_ids is required"),
    (dict(input_ids=[1]), "input max_tokens is required"),
    (dict(input_ids=[[1, 2]], max_tokens=[5]), r"input input_ids must have shape \[-1\], got \[1, 2\]"),
    (dict(input_ids=[1], max_tokens=[5, 6]), r"input max_tokens must have shape \[1\], got \[2\]"),
    (dict(input_ids=[1], max_tokens=[5], temperature=[float("nan")]), "temperature must be a finite number"),
])
def test_generation_request_refuses_bad_inputs(values: dict, message: str) -> None:
    with pytest.raises(RequestError, match=message):
        generation_request("r", arrays(**values))


def test_response_arrays_carry_all_three_outputs() -> None:
    first = response_arrays(GenerationChunk((5, 6), cached_tokens=12), 12)
    assert first["output_ids"].tolist() == [5, 6] and first["output_ids"].dtype == np.int32
    assert first["cached_tokens"].tolist() == [12] and first["finish_reason"].tolist() == [b""]
    last = response_arrays(GenerationChunk((), finish_reason="stop"), 12)
    assert last["output_ids"].shape == (0,) and last["cached_tokens"].tolist() == [12]
    assert last["finish_reason"].tolist() == [b"stop"]


# -- a tritonclient gRPC client ----------------------------------------------------------------------------------

@dataclass
class Reply:
    responses: list[tuple[list[int], int, str]] = field(default_factory=list)  # output_ids, cached_tokens, finish
    error: str | None = None
    final: bool = False

    @property
    def tokens(self) -> list[int]:
        return [t for ids, _, _ in self.responses for t in ids]

    @property
    def finish_reason(self) -> str:
        return self.responses[-1][2]

    @property
    def cached_tokens(self) -> int:
        return self.responses[0][1]


def make_inputs(input_ids: list[int], max_tokens: int, **optional: list | int | float) -> list[grpcclient.InferInput]:
    kinds = {"prefix_len": "INT32", "prefix_priority": "INT32", "temperature": "FP32", "seed": "UINT64",
             "stop_token_ids": "INT32"}
    dtypes = {"INT32": np.int32, "FP32": np.float32, "UINT64": np.uint64}
    values: list[tuple[str, str, np.ndarray]] = [("input_ids", "INT32", np.array(input_ids, dtype=np.int32)),
                                                 ("max_tokens", "INT32", np.array([max_tokens], dtype=np.int32))]
    for name, value in optional.items():
        kind = kinds[name]
        values.append((name, kind, np.array(value if isinstance(value, list) else [value], dtype=dtypes[kind])))
    inputs = []
    for name, kind, array in values:
        tensor = grpcclient.InferInput(name, list(array.shape), kind)
        tensor.set_data_from_numpy(array)
        inputs.append(tensor)
    return inputs


class Stream:
    """One tritonclient gRPC stream; requests on it are told apart by id. Errors carry no id through
    tritonclient's callback, so a request expected to fail gets a stream of its own."""

    def __init__(self, url: str):
        self.client = grpcclient.InferenceServerClient(url)
        self.events: queue.Queue = queue.Queue()
        self.client.start_stream(callback=lambda result, error: self.events.put((result, error)))
        self.replies: dict[str, Reply] = {}

    def send(self, request_id: str, inputs: list[grpcclient.InferInput]) -> None:
        self.replies[request_id] = Reply()
        self.client.async_stream_infer(MODEL, inputs, request_id=request_id, enable_empty_final_response=True)

    def receive(self) -> Reply:
        """The next event, added to its request's reply."""
        result, error = self.events.get(timeout=REPLY_TIMEOUT_S)
        if error is not None:
            [reply] = [r for r in self.replies.values() if not r.final]
            reply.error, reply.final = error.message(), True
            return reply
        response = result.get_response()
        reply = self.replies[response.id]
        reply.final = response.parameters["triton_final_response"].bool_param
        ids, cached, finish = (result.as_numpy(n) for n in ("output_ids", "cached_tokens", "finish_reason"))
        reply.responses.append((ids.tolist(), int(cached[0]), finish[0].decode()))
        return reply

    def wait(self) -> dict[str, Reply]:
        while not all(r.final for r in self.replies.values()):
            self.receive()
        return self.replies

    def close(self, cancel: bool = False) -> None:
        self.client.stop_stream(cancel_requests=cancel)
        self.client.close()


def generate(server: TritonServer, input_ids: list[int], max_tokens: int, **optional: list | int | float) -> Reply:
    """A "plain" call: a decoupled model takes no unary infer, so send one request and collect its whole stream."""
    stream = Stream(server.grpc_url)
    try:
        stream.send("only", make_inputs(input_ids, max_tokens, **optional))
        return stream.wait()["only"]
    finally:
        stream.close()


# -- the adapter in Triton, over a scripted executor ------------------------------------------------------------------

SCRIPTED_MODEL = '''
"""The real adapter over a scripted executor: input_ids[0] picks the behaviour."""
import asyncio

import engine.triton.model as adapter
from engine.executors.base import Executor, GenerationChunk, RequestError


class ScriptedExecutor(Executor):
    def __init__(self):
        self.cancelled = set()

    def generate(self, request):
        if request.input_ids[0] == 6:
            raise RequestError("refused before streaming")
        return self._stream(request)

    async def _stream(self, request):
        kind = request.input_ids[0]
        yield GenerationChunk((10,), cached_tokens=7)
        if kind == 1:
            yield GenerationChunk((11,))
            yield GenerationChunk((12,), finish_reason="stop")
        elif kind == 2:
            yield GenerationChunk((), finish_reason="error", error="kaboom")
        elif kind == 3:
            raise RuntimeError("exploded")
        elif kind == 4:
            while request.request_id not in self.cancelled:
                await asyncio.sleep(0.01)
                yield GenerationChunk((13,))
            yield GenerationChunk((), finish_reason="cancelled")

    def cancel(self, request_id):
        self.cancelled.add(request_id)
        return True

    def stats(self):
        return {}


adapter.create_executor = lambda settings: ScriptedExecutor()
TritonPythonModel = adapter.TritonPythonModel
'''


def write_scripted_repository(root: Path) -> Path:
    from build_scripts.repository import write_repository
    from engine.settings import EngineSettings

    version_dir = write_repository(root, EngineSettings("reference", "/nowhere", "scripted"), "KIND_CPU")
    (version_dir / "model.py").write_text(SCRIPTED_MODEL)
    return root


@pytest.fixture(scope="module")
def scripted(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    with TritonServer(TritonConfig(write_scripted_repository(tmp_path_factory.mktemp("scripted") / "repo"))) as server:
        yield server


@pytest.mark.parametrize(("kind", "tokens", "finish", "error"), [
    (1, [10, 11, 12], "stop", None),
    (2, [10], None, "generation failed: kaboom"),
    (3, [10], None, "generation failed: exploded"),
    (5, [10], None, "the executor ended the stream without a finish reason"),
    (6, [], None, "refused before streaming"),
])
def test_adapter_streams_and_reports_failures(scripted: TritonServer, kind: int, tokens: list[int],
                                              finish: str | None, error: str | None) -> None:
    reply = generate(scripted, [kind], 5)
    assert reply.tokens == tokens and reply.error == error
    assert all(cached == 7 for _, cached, _ in reply.responses)
    if finish:
        assert reply.finish_reason == finish


def test_adapter_cancels_when_the_client_leaves(scripted: TritonServer) -> None:
    log_before = scripted.log_text()
    stream = Stream(scripted.grpc_url)
    stream.send("endless", make_inputs([4], 5))
    while len(stream.replies["endless"].responses) < 5:
        stream.receive()
    stream.close(cancel=True)
    deadline = time.monotonic() + 10
    while "safeguard: request endless#" not in scripted.log_text()[len(log_before):]:
        assert time.monotonic() < deadline, "the executor was never told to cancel"
        time.sleep(0.05)
    assert generate(scripted, [1], 5).finish_reason == "stop"


def test_stop_with_a_stream_still_open(tmp_path: Path) -> None:
    """Triton neither cancels a decoupled request in flight at shutdown nor unloads its model while it is open, and
    stays up past its exit timeout: the launcher kills it then, and leaves nothing behind."""
    server = TritonServer(TritonConfig(write_scripted_repository(tmp_path / "repo"), workdir=tmp_path / "work",
                                       exit_timeout_s=1)).start()
    assert server.process is not None
    pgid, prefix = server.process.pid, server.shm_prefix
    stream = Stream(server.grpc_url)
    try:
        stream.send("endless", make_inputs([4], 5))
        stream.receive()
        started = time.monotonic()
        assert server.stop() == -signal.SIGKILL
        assert time.monotonic() - started < 8
    finally:
        stream.close()
    assert "Exit timeout expired" in server.log_text()
    assert group_members(pgid) == [] and list(SHM_DIR.glob(f"{prefix}*")) == []


# -- the built repository, served -----------------------------------------------------------------------------------

@dataclass
class Serving:
    server: TritonServer
    renderer: PromptRenderer
    instructions: str
    effort: str
    model_dir: Path
    startup_s: float

    def prompt(self, content: str, policy_suffix: str = "") -> tuple[list[int], int]:
        prefix = self.renderer.prefix(self.instructions + policy_suffix, self.effort)
        rendered = self.renderer.render(prefix, Text(content))
        return rendered.ids, rendered.prefix_len


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serving]:
    model_dir = cached_checkpoint("smoke")
    root = tmp_path_factory.mktemp("serving")
    repo = root / "repo"
    built = CliRunner().invoke(build_command, ["--gpu", "cpu", "--model", str(model_dir), "--out", str(repo),
                                               "--dtype", "float32"])
    assert built.exit_code == 0, built.output
    server = TritonServer(TritonConfig(repo, workdir=root / "triton"))  # kept: the last test reads the log
    started = time.monotonic()
    server.start(timeout=300)
    policy = load_policy(POLICY)
    renderer = PromptRenderer(load_harmony_encoding(model_dir), "smoke-under-test")
    try:
        yield Serving(server, renderer, policy.body, policy.reasoning_effort, model_dir, time.monotonic() - started)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def transformers_greedy(serving: Serving):
    """transformers' own greedy generation on the same checkpoint, in float32 like the build."""
    import torch
    from transformers import AutoModelForCausalLM, Mxfp4Config

    model = AutoModelForCausalLM.from_pretrained(serving.model_dir, quantization_config=Mxfp4Config(dequantize=True),
                                                 dtype=torch.float32).eval()

    def greedy(ids: list[int], max_new_tokens: int) -> list[int]:
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                                 eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=199999)
        return out[0, len(ids):].tolist()

    return greedy


def test_streamed_tokens_equal_transformers_greedy(serving: Serving, transformers_greedy) -> None:
    ids, prefix_len = serving.prompt("I had a banana with my breakfast.")
    reply = generate(serving.server, ids, 40, prefix_len=prefix_len, prefix_priority=80)
    assert reply.error is None
    # The smoke checkpoint's weights are random, so its greedy answer runs to the budget rather than <|return|>.
    assert reply.tokens == transformers_greedy(ids, 40)
    assert reply.finish_reason == "length"
    # Streamed: several responses, finish_reason empty until the last, cached_tokens on every one.
    assert len(reply.responses) > 1
    assert [finish for _, _, finish in reply.responses] == [""] * (len(reply.responses) - 1) + ["length"]
    assert len({cached for _, cached, _ in reply.responses}) == 1


def test_stop_and_length_finishes(serving: Serving, transformers_greedy) -> None:
    ids, prefix_len = serving.prompt("Nothing about fruit here.")
    reply = generate(serving.server, ids, 4, prefix_len=prefix_len)
    assert reply.finish_reason == "length" and reply.tokens == transformers_greedy(ids, 4)
    full = transformers_greedy(ids, 30)
    # A stop token is part of the output, as with transformers: stop at the third greedy token.
    stop = full[2]
    stopped = generate(serving.server, ids, 30, stop_token_ids=[stop])
    assert stopped.finish_reason == "stop" and stopped.tokens == full[:full.index(stop) + 1]
    assert generate(serving.server, ids, 30, stop_token_ids=[199999]).tokens == full


def test_cached_tokens_cold_then_warm(serving: Serving) -> None:
    ids, prefix_len = serving.prompt("A bandana, not a banana.", policy_suffix="\n\n(cache test)")
    cold = generate(serving.server, ids, 3, prefix_len=prefix_len)
    warm = generate(serving.server, ids, 3, prefix_len=prefix_len)
    assert cold.cached_tokens == 0
    assert warm.cached_tokens == prefix_len > 0
    assert warm.tokens == cold.tokens
    other, _ = serving.prompt("Something else entirely.", policy_suffix="\n\n(cache test)")
    assert generate(serving.server, other, 3, prefix_len=prefix_len).cached_tokens == prefix_len
    assert generate(serving.server, other, 3).cached_tokens == 0  # no prefix named, nothing reused


def test_prefill_only_warms_the_prefix(serving: Serving) -> None:
    ids, prefix_len = serving.prompt("Warm me.", policy_suffix="\n\n(prefill test)")
    warmup = generate(serving.server, ids[:prefix_len], 0, prefix_len=prefix_len, prefix_priority=100)
    assert warmup.error is None and warmup.tokens == [] and warmup.finish_reason == "length"
    assert warmup.cached_tokens == 0
    assert generate(serving.server, ids, 2, prefix_len=prefix_len).cached_tokens == prefix_len


def test_concurrent_requests_on_one_stream(serving: Serving, transformers_greedy) -> None:
    prompts = [serving.prompt(text)[0] for text in ("Bananas are yellow.", "Apples are red.", "Plain text.")]
    stream = Stream(serving.server.grpc_url)
    try:
        for i, ids in enumerate(prompts):
            stream.send(f"req-{i}", make_inputs(ids, 12))
        replies = stream.wait()
    finally:
        stream.close()
    for i, ids in enumerate(prompts):
        assert replies[f"req-{i}"].tokens == transformers_greedy(ids, 12)


def test_seeded_sampling_repeats(serving: Serving) -> None:
    ids, _ = serving.prompt("Sample me.")
    first, second = (generate(serving.server, ids, 16, temperature=1.5, seed=1234) for _ in range(2))
    assert first.tokens == second.tokens and first.error is None


def test_client_cancellation_stops_generation(serving: Serving) -> None:
    ids, _ = serving.prompt("Keep talking.")
    log_before = serving.server.log_text()
    stream = Stream(serving.server.grpc_url)
    stream.send("long", make_inputs(ids, 4000, stop_token_ids=[]))
    while len(stream.replies["long"].responses) < 3:
        stream.receive()
    stream.close(cancel=True)
    received = len(stream.replies["long"].tokens)
    deadline = time.monotonic() + 30
    pattern = re.compile(r"safeguard: request long#\d+ cancelled")
    while not pattern.search(serving.server.log_text()[len(log_before):]):
        assert time.monotonic() < deadline, "the model never reported the cancellation"
        time.sleep(0.1)
    assert received < 4000
    # The model is free again: a new request is answered at once.
    assert generate(serving.server, ids, 2).finish_reason == "length"


@pytest.mark.parametrize(("build", "message"), [
    (lambda ids: make_inputs([], 5), "input_ids is empty"),
    (lambda ids: make_inputs(ids, 5, prefix_len=len(ids) + 1), r"prefix_len \d+ is outside 0..\d+"),
    (lambda ids: make_inputs([*ids, 10**6], 5), "outside the vocabulary"),
    (lambda ids: make_inputs(ids, 10**6), "exceeds the context limit"),
    (lambda ids: make_inputs(ids, 5, prefix_priority=101), "prefix_priority must be within 0..100"),
    (lambda ids: make_inputs(ids, 5, temperature=float("nan")), "temperature must be a finite number"),
    (lambda ids: make_inputs(ids, 5)[:1], "max_tokens"),  # Triton itself refuses a missing required input
])
def test_bad_input_is_a_clear_error(serving: Serving, build, message: str) -> None:
    ids, _ = serving.prompt("Bad input test.")
    stream = Stream(serving.server.grpc_url)
    try:
        stream.send("bad", build(ids))
        reply = stream.wait()["bad"]
    finally:
        stream.close()
    assert reply.error is not None and re.search(message, reply.error), reply.error
    assert reply.responses == []
    assert generate(serving.server, ids, 1).finish_reason == "length"  # the model survived


def test_wrong_shape_is_refused(serving: Serving) -> None:
    ids, _ = serving.prompt("Shape test.")
    tensor = grpcclient.InferInput("input_ids", [1, len(ids)], "INT32")
    tensor.set_data_from_numpy(np.array([ids], dtype=np.int32))
    stream = Stream(serving.server.grpc_url)
    try:
        stream.send("bad", [tensor, *make_inputs(ids, 5)[1:]])
        reply = stream.wait()["bad"]
    finally:
        stream.close()
    assert reply.error is not None and "input_ids" in reply.error and "shape" in reply.error, reply.error


def test_server_stops_cleanly(serving: Serving) -> None:
    server = serving.server
    assert server.process is not None
    pgid, prefix = server.process.pid, server.shm_prefix
    print(f"tritonserver with the smoke model was ready in {serving.startup_s:.1f} s")
    assert server.stop() == 0
    assert group_members(pgid) == []
    assert list(SHM_DIR.glob(f"{prefix}*")) == []
    log = server.log_text()
    assert "successfully unloaded 'safeguard' version 1" in log  # finalize ran and returned
    assert "Traceback" not in log and "safeguard: shutdown" not in log
