"""Classification throughput alone, and during an activation storm: how much policy churn costs the data path.

    python -m benchmarks.bench_activation_storm [--seconds 10] [--concurrency 8] [--activators 4] [--mode put]

One tritonserver serves the canned model (`write_canned_repository`, a short completion in small paced chunks, like
a model decoding), behind a front end in its own process with the smoke policy active. Closed-loop Classify clients
run for `--seconds` alone, then as long again while `--activators` clients change the smoke policy's active version
in a loop:
- `put`: PutPolicy of a new version with activate=True each time (a new prefix to warm every time, the worst case);
- `activate`: ActivatePolicy among `--versions` registered versions, round robin.
Both phases are measured twice, interleaved (alone, storm, alone, storm), so drift on a shared machine hits both.

It prints the classify throughput of each phase, their ratio (storm / alone), the activations made, and the warm-ups
the front end asked for and ran (its /metrics and log). Nothing asserts; `--seconds 1` is the CI-sized run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from benchmarks.frontend_process import serve_json, wait_serving
from build_scripts.repository import write_canned_repository
from classification.library import bundled_policy
from engine.executors.canned import SAFE_ANALYSIS, SAFE_FINAL, Script, harmony_completion
from engine.triton.contract import MODEL_NAME


@dataclass
class Phase:
    name: str
    classified: int = 0
    errors: int = 0
    seconds: float = 0.0
    activations: int = 0
    activation_errors: int = 0

    @property
    def throughput(self) -> float:
        return self.classified / self.seconds if self.seconds else 0.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _version_text(base: str, version: str) -> str:
    # A different body per version: a different prefix, so each version is a warm-up of its own.
    return base.replace('version = "1.0.0"', f'version = "{version}"').replace(
        "bananas.", f"bananas (revision {version}).", 1)


async def _phase(stub, pb, name: str, args: argparse.Namespace, storm: bool, base: str,
                 counter: list[int]) -> Phase:
    import grpc

    phase = Phase(name)
    stop = asyncio.Event()
    texts = [f"Message {i}: a short note about the weather, nothing more." for i in range(64)]

    async def classify(worker: int) -> None:
        i = worker
        while not stop.is_set():
            request = pb.ClassifyRequest(policy=pb.PolicySelector(ref="smoke"),
                                         content=pb.Content(text=texts[i % len(texts)]))
            try:
                await stub.Classify(request, timeout=30)
                phase.classified += 1
            except grpc.aio.AioRpcError:
                phase.errors += 1
            i += args.concurrency

    async def activate() -> None:
        while not stop.is_set():
            counter[0] += 1
            n = counter[0]
            try:
                if args.mode == "put":
                    await stub.PutPolicy(pb.PutPolicyRequest(text=_version_text(base, f"storm-{n}"), activate=True),
                                         timeout=30)
                else:
                    await stub.ActivatePolicy(pb.ActivatePolicyRequest(id="smoke", ref=f"v{n % args.versions}"),
                                              timeout=30)
                phase.activations += 1
            except grpc.aio.AioRpcError:
                phase.activation_errors += 1

    started = time.perf_counter()
    tasks = [asyncio.create_task(classify(w)) for w in range(args.concurrency)]
    if storm:
        tasks += [asyncio.create_task(activate()) for _ in range(args.activators)]
    await asyncio.sleep(args.seconds)
    stop.set()
    phase.seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    return phase


def _scrape_warmups(port: int) -> dict[str, float]:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r'^safeguard_prefix_warmups_total\{outcome="(\w+)"\} (\S+)$', text, re.M)}


async def _measure(address: str, args: argparse.Namespace, base: str) -> list[Phase]:
    import grpc

    from server.generated.safeguard.v1 import safeguard_pb2 as pb
    from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SafeguardStub(channel)
        counter = [0]
        await _phase(stub, pb, "warm-up", argparse.Namespace(**{**vars(args), "seconds": min(1.0, args.seconds)}),
                     False, base, counter)
        phases = []
        for round_ in range(args.rounds):
            for storm in (False, True):
                phase = await _phase(stub, pb, "storm" if storm else "alone", args, storm, base, counter)
                phases.append(phase)
                print(f"  round {round_ + 1}: {phase.name:<5} {phase.throughput:8.1f} classify/s "
                      f"({phase.errors} errors), {phase.activations} activations", flush=True)
        await stub.ActivatePolicy(pb.ActivatePolicyRequest(id="smoke", ref="1.0.0"), timeout=30)
    return phases


def _report(phases: list[Phase], warmups: dict[str, float], args: argparse.Namespace) -> None:
    def total(name: str) -> Phase:
        merged = Phase(name)
        for p in phases:
            if p.name == name:
                merged.classified += p.classified
                merged.errors += p.errors
                merged.seconds += p.seconds
                merged.activations += p.activations
                merged.activation_errors += p.activation_errors
        return merged

    alone, storm = total("alone"), total("storm")
    print(f"canned completion in {args.chunk}-token responses {args.response_delay_ms:g} ms apart; {args.concurrency} "
          f"classify clients; storm: {args.activators} clients, mode {args.mode}; {args.rounds} x {args.seconds:g} s "
          f"per phase; {os.cpu_count()} CPUs shared by client, front end and Triton")
    print(f"classify alone:        {alone.throughput:8.1f} /s  ({alone.classified} answered, {alone.errors} errors)")
    print(f"classify during storm: {storm.throughput:8.1f} /s  ({storm.classified} answered, {storm.errors} errors; "
          f"{storm.activations} activations, {storm.activations / storm.seconds:.1f}/s, "
          f"{storm.activation_errors} failed)")
    ratio = storm.throughput / alone.throughput if alone.throughput else float("nan")
    print(f"ratio storm / alone:   {ratio:8.2f}")
    print(f"prefix warm-ups run (whole run, by outcome): {json.dumps(warmups)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="length of each measured phase")
    parser.add_argument("--rounds", type=int, default=2, help="alone/storm pairs, interleaved")
    parser.add_argument("--concurrency", type=int, default=8, help="closed-loop Classify clients")
    parser.add_argument("--activators", type=int, default=4, help="clients activating in a loop during the storm")
    parser.add_argument("--mode", choices=("put", "activate"), default="put")
    parser.add_argument("--versions", type=int, default=8, help="registered versions the activate mode cycles")
    parser.add_argument("--chunk", type=int, default=8, help="tokens per streamed Triton response")
    parser.add_argument("--response-delay-ms", type=float, default=2.0, help="pause before each streamed response")
    parser.add_argument("--settings", default="{}", help="JSON of extra front-end settings (e.g. warm_interval_s)")
    parser.add_argument("--serve", help=argparse.SUPPRESS)  # internal: run a front end with these settings
    args = parser.parse_args()
    if args.serve:
        serve_json(args.serve)
        return
    asyncio.run(_run(args))


async def _run(args: argparse.Namespace) -> None:
    from classification.policy import load_policy, parse_policy
    from classification.vocab import load_harmony_encoding
    from server.registry import Registry
    from server.triton.launcher import TritonConfig, TritonServer

    encoding = load_harmony_encoding()
    smoke = load_policy(bundled_policy("smoke"))
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        root = Path(tmp)
        completion = harmony_completion(lambda t: encoding.encode(t, allowed_special="all"), SAFE_ANALYSIS,
                                        SAFE_FINAL)
        script = Script((), completion, chunk=args.chunk, delay_s=args.response_delay_ms / 1000)
        write_canned_repository(root / "repo", [script], "canned-model", keep_logs=False)
        registry = Registry(root / "state")
        for v in range(args.versions if args.mode == "activate" else 0):
            registry.add(parse_policy(_version_text(smoke.text, f"v{v}")), activate=False)
        registry.add(smoke, activate=True)
        with TritonServer(TritonConfig(root / "repo")) as triton:
            port, metrics_port = _free_port(), _free_port()
            settings = {"listen": f"127.0.0.1:{port}", "triton_endpoints": [triton.grpc_url],
                        "triton_model": MODEL_NAME, "state_dir": str(root / "state"), "metrics_port": metrics_port,
                        "log_level": "warning", **json.loads(args.settings)}
            command = [sys.executable, "-m", "benchmarks.bench_activation_storm", "--serve", json.dumps(settings)]
            with (root / "frontend.log").open("wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                           cwd=Path(__file__).resolve().parents[1])
            try:
                await wait_serving(f"127.0.0.1:{port}", process)
                phases = await _measure(f"127.0.0.1:{port}", args, smoke.text)
                warmups = _scrape_warmups(metrics_port)
            except RuntimeError:
                print((root / "frontend.log").read_text()[-4000:], file=sys.stderr)
                raise
            finally:
                process.terminate()
                process.wait(30)
        shutil.rmtree(root / "state", ignore_errors=True)
    _report(phases, warmups, args)


if __name__ == "__main__":
    main()
