"""The front end's added latency: Classify through the front end against the same tokens sent to Triton directly.

    python -m benchmarks.bench_frontend [--requests 400] [--concurrency 1 4] [--chunk 8]

One tritonserver serves the safeguard model over the canned executor (`write_canned_repository`): it streams a
fixed, short harmony completion, so generation costs almost nothing and every difference between the two paths is
the front end's. The front end runs in its own process, as in production, with the smoke policy active
(and audit records queued without waiting for the fsync, `audit_wait=False`; see the printed note). Both paths run
the same rendered prompts at the same closed-loop concurrency, interleaved in rounds so drift on a shared machine
hits both alike:

- direct: the prompt's token ids streamed from Triton with `server.triton.client` (the cheapest client we have),
  until the final response;
- front end: `Classify` over gRPC: policy lookup, rendering, routing, the same Triton call, verdict parsing,
  audit, metrics.

It prints p50/p99 per path and the differences. Nothing asserts.

The canned executor (engine/executors/canned.py) also serves the front end's tests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.frontend_process import serve_json, wait_serving
from build_scripts.repository import write_canned_repository
from classification.library import bundled_policy
from engine.executors.canned import SAFE_ANALYSIS, SAFE_FINAL, Script, harmony_completion
from engine.triton.contract import MODEL_NAME

# -- the measurement ----------------------------------------------------------------------------------------------

RAW, TRITONCLIENT, FRONTEND = "direct, raw KServe stubs", "direct, tritonclient.grpc.aio", "front end Classify"


@dataclass
class PathResult:
    latencies_ms: list[float] = field(default_factory=list)
    client_cpu_s: float = 0.0  # this process's CPU time spent on the path
    frontend_cpu_s: float = 0.0  # the front end process's CPU time while the path ran


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _process_cpu_s(pid: int) -> float:
    """utime + stime of a process, from /proc."""
    fields_ = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields_[11]) + int(fields_[12])) / os.sysconf("SC_CLK_TCK")


async def _closed_loop(call: Callable[[int], Awaitable[None]], requests: int, concurrency: int) -> list[float]:
    latencies: list[float] = []
    counter = iter(range(requests))

    async def worker() -> None:
        for i in counter:
            started = time.perf_counter()
            await call(i)
            latencies.append((time.perf_counter() - started) * 1000)

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies


def _texts(count: int) -> list[str]:
    subjects = ("apples", "the weather", "a parcel", "train times", "a recipe", "the meeting", "a new phone")
    return [f"Message {i}: a short note about {subjects[i % len(subjects)]}, nothing more." for i in range(count)]


async def _measure(triton_url: str, frontend_url: str, frontend_pid: int, fingerprint: str, model: str,
                   args: argparse.Namespace) -> dict[int, dict[str, PathResult]]:
    import grpc
    import numpy as np
    import tritonclient.grpc.aio as tritonclient

    from classification.content import Text
    from classification.policy import load_policy
    from classification.render import PromptRenderer
    from classification.vocab import load_harmony_encoding
    from server.generated.safeguard.v1 import safeguard_pb2 as pb
    from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
    from server.triton.client import GenerateRequest, TritonEndpoint

    policy = load_policy(bundled_policy("smoke"))
    renderer = PromptRenderer(load_harmony_encoding(), fingerprint)
    prefix = renderer.prefix(policy.body, policy.reasoning_effort)
    texts = _texts(64)
    prompts = [renderer.render(prefix, Text(t)) for t in texts]
    requests = [pb.ClassifyRequest(policy=pb.PolicySelector(ref=policy.id), content=pb.Content(text=t)) for t in texts]
    endpoint = TritonEndpoint(triton_url, model)
    triton_client = tritonclient.InferenceServerClient(triton_url)
    channel = grpc.aio.insecure_channel(frontend_url)
    stub = pb_grpc.SafeguardStub(channel)

    async def raw(i: int) -> None:
        p = prompts[i % len(prompts)]
        request = GenerateRequest(p.ids, args.max_tokens, p.prefix_len, 90)
        async with contextlib.aclosing(endpoint.generate(request, 30.0)) as chunks:
            async for _ in chunks:
                pass

    async def via_tritonclient(i: int) -> None:
        p = prompts[i % len(prompts)]
        inputs = []
        for name, values in (("input_ids", p.ids), ("max_tokens", [args.max_tokens]), ("prefix_len", [p.prefix_len]),
                             ("prefix_priority", [90])):
            tensor = tritonclient.InferInput(name, [len(values)], "INT32")
            tensor.set_data_from_numpy(np.asarray(values, dtype=np.int32))
            inputs.append(tensor)

        async def one_request():
            yield {"model_name": model, "inputs": inputs, "enable_empty_final_response": True}

        async for result, error in triton_client.stream_infer(one_request(), stream_timeout=30.0):
            if error is not None:
                raise error
            if result.get_response().parameters["triton_final_response"].bool_param:
                break

    async def frontend(i: int) -> None:
        await stub.Classify(requests[i % len(requests)], timeout=30.0)

    paths = {RAW: raw, TRITONCLIENT: via_tritonclient, FRONTEND: frontend}
    results = {c: {name: PathResult() for name in paths} for c in args.concurrency}
    for c in args.concurrency:
        for call in paths.values():
            await _closed_loop(call, args.warmup, c)
        per_round = max(1, args.requests // args.rounds)
        for _ in range(args.rounds):
            for name, call in paths.items():
                result = results[c][name]
                cpu, frontend_cpu = time.process_time(), _process_cpu_s(frontend_pid)
                result.latencies_ms += await _closed_loop(call, per_round, c)
                result.client_cpu_s += time.process_time() - cpu
                result.frontend_cpu_s += _process_cpu_s(frontend_pid) - frontend_cpu
    await channel.close()
    await triton_client.close()
    await endpoint.close()
    return results


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_frontend(settings: dict, log_path: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "benchmarks.bench_frontend", "--serve", json.dumps(settings)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])


def _report(results: dict[int, dict[str, PathResult]], args: argparse.Namespace) -> None:
    print(f"canned completion streamed in {args.chunk}-token responses, {args.response_delay_ms:g} ms apart; "
          f"{args.requests} requests per path and "
          f"concurrency, {args.rounds} interleaved rounds; {os.cpu_count()} CPUs shared by client, front end and "
          f"Triton; registry and audit log under {args.state_parent or tempfile.gettempdir()}")
    print(f"{'concurrency':>11}  {'path':<31} {'p50 ms':>8} {'p99 ms':>8} {'client CPU/req':>15} "
          f"{'front end CPU/req':>18}")
    for c, paths in results.items():
        for name, r in paths.items():
            n = len(r.latencies_ms)
            frontend_cpu = f"{r.frontend_cpu_s / n * 1000:>15.3f} ms" if name == FRONTEND else f"{'':>18}"
            print(f"{c:>11}  {name:<31} {_percentile(r.latencies_ms, 0.5):>8.3f} "
                  f"{_percentile(r.latencies_ms, 0.99):>8.3f} {r.client_cpu_s / n * 1000:>12.3f} ms {frontend_cpu}")
        base, front = paths[RAW].latencies_ms, paths[FRONTEND].latencies_ms
        print(f"{c:>11}  added by the front end over the raw direct call: p50 "
              f"{_percentile(front, 0.5) - _percentile(base, 0.5):.3f} ms, p99 "
              f"{_percentile(front, 0.99) - _percentile(base, 0.99):.3f} ms")
    print("audit records are queued, not awaited (audit_wait=False, the default); with audit_wait=True each answer "
          "also waits for the audit log's fsync")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=400, help="measured requests per path and concurrency")
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds per concurrency")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--chunk", type=int, default=8, help="tokens per streamed Triton response")
    parser.add_argument("--response-delay-ms", type=float, default=0.0,
                        help="pause before each streamed response, like a model's decoding steps (0: back to back, "
                             "so the front end's per-response work cannot overlap generation)")
    parser.add_argument("--max-tokens", type=int, default=1024)
    parser.add_argument("--state-parent", type=Path, default=None,
                        help="where the front end's registry and audit log go (default: the temp directory); "
                             "/dev/shm takes this machine's slow fsyncs out of the figures")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run a front end with these settings
    args = parser.parse_args()
    if args.serve:
        serve_json(args.serve)
        return
    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    from classification.policy import load_policy
    from classification.vocab import load_harmony_encoding
    from server.registry import Registry
    from server.triton.launcher import TritonConfig, TritonServer

    encoding = load_harmony_encoding()

    def encode(text: str) -> list[int]:
        return encoding.encode(text, allowed_special="all")

    fingerprint = "canned-model"
    with tempfile.TemporaryDirectory(prefix="bench-frontend-") as tmp:
        root = Path(tmp)
        completion = harmony_completion(encode, SAFE_ANALYSIS, SAFE_FINAL)
        script = Script((), completion, chunk=args.chunk, delay_s=args.response_delay_ms / 1000)
        write_canned_repository(root / "repo", [script], fingerprint, keep_logs=False)
        state = Path(tempfile.mkdtemp(prefix="bench-frontend-state-", dir=args.state_parent))
        Registry(state).add(load_policy(bundled_policy("smoke")), activate=True)
        with TritonServer(TritonConfig(root / "repo")) as triton:
            port = _free_port()
            settings = {"listen": f"127.0.0.1:{port}", "triton_endpoints": [triton.grpc_url],
                        "triton_model": MODEL_NAME, "state_dir": str(state), "metrics_port": 0,
                        "audit_wait": False, "log_level": "warning", "max_output_tokens": args.max_tokens}
            process = _start_frontend(settings, root / "frontend.log")
            try:
                await wait_serving(f"127.0.0.1:{port}")
                results = await _measure(triton.grpc_url, f"127.0.0.1:{port}", process.pid, fingerprint, MODEL_NAME,
                                         args)
            except RuntimeError:
                print((root / "frontend.log").read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                process.terminate()
                process.wait(30)
                shutil.rmtree(state, ignore_errors=True)
    _report(results, args)


if __name__ == "__main__":
    main()
