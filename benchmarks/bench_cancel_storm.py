"""A storm of cancelled streams and slow readers against the Triton python model running the reference executor:
does the model's resident memory stop growing, and do the executor's requests in flight return to zero?

    python -m benchmarks.bench_cancel_storm [--streams 900] [--slow-readers 4] [--preset smoke]

One tritonserver serves the `safeguard` model with the reference executor over a synthetic checkpoint (`smoke`
by default: its memory per request is the same machinery as a real model's, at a cost a CPU can storm; `mid` for
bigger K/V), synthesized once into `$APPLIANCE_CACHE_DIR/bench/`. Clients speak to Triton directly with
`server.triton.client` (what the front end uses), `--concurrency` streams at a time, each one a shared policy-like
prefix (so the prefix store is used as in service) plus distinct content. A cancelled stream reads `--read` chunks
and leaves (which cancels the gRPC call, and so the request in the model); every `--slow-every` cancels,
`--slow-readers` streams are read to the end with a pause between chunks, alongside the storm.

Printed: the stub's resident memory (psutil: the triton_python_backend_stub process running the model) after
warm-up and every `--sample-every` cancels, the growth over the first and second half, how every stream ended,
and the executor's figures at the end (`safeguard_model_executor` on Triton's metrics endpoint), whose requests
running and waiting, and streams the model holds open, must be back to zero. `tests/test_leaks.py` runs a small
storm (`--json` hands it the figures); nothing here asserts on time or memory.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import random
import shutil
import tempfile
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from build_scripts.repository import write_repository
from classification.vocab import default_cache_dir
from engine.checkpoint import synth
from engine.checkpoint.config import preset_dict
from engine.settings import EngineSettings
from engine.triton.contract import MODEL_NAME
from engine.triton.model import GAUGE_FAMILY
from engine.triton.runtime import STUB_NAME
from server.triton.client import GenerateRequest, TritonEndpoint, TritonError
from server.triton.launcher import TritonConfig, TritonServer, group_members

IN_FLIGHT = ("requests_running", "requests_waiting", "streams_open")
SETTLE_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class StormConfig:
    streams: int = 900  # cancelled streams
    concurrency: int = 4
    read: int = 2  # chunks a cancelled stream reads before it leaves
    max_tokens: int = 400  # far more than a cancelled stream reads: the cancel, not the budget, ends it
    slow_readers: int = 4
    slow_every: int = 100  # cancels between rounds of slow readers
    slow_max_tokens: int = 24
    slow_pause_s: float = 0.05  # between chunks, for a slow reader
    prefix_tokens: int = 300
    content_tokens: int = 40
    content_tokens_max: int = 0  # above content_tokens: each stream's content length is drawn from the range
    sample_every: int = 100
    distinct_prefixes: int = 0  # 1: every stream its own prefix (inline policies, a policy per caller): the store fills
    seed: int = 0


@dataclass
class StormResult:
    rss_mb: list[tuple[int, float]] = field(default_factory=list)  # (cancels so far, stub RSS in MB)
    endings: Counter[str] = field(default_factory=Counter)  # how each stream ended, from the client's side
    figures: dict[str, float] = field(default_factory=dict)  # the executor's, once settled
    seconds: float = 0.0

    def growth(self) -> tuple[float, float]:
        """RSS growth (MB) over the first and the second half of the samples after warm-up."""
        values = [mb for _, mb in self.rss_mb]
        mid = len(values) // 2
        return values[mid] - values[0], values[-1] - values[mid]


def checkpoint(preset: str) -> Path:
    """The synthetic checkpoint, rebuilt when the preset or the synthesizer changes."""
    digest = hashlib.sha256(json.dumps(preset_dict(preset), sort_keys=True).encode())
    digest.update(Path(synth.__file__).read_bytes())
    final = default_cache_dir() / "bench" / f"{preset}-notok-{digest.hexdigest()[:12]}"
    if not (final / "config.json").is_file():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        synth.synthesize(preset, partial, tokenizer=False)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    return final


def write_reference_repository(out: Path, model_dir: Path, *, prefix_cache_mb: int = 512) -> Path:
    settings = EngineSettings(executor="reference", model_dir=str(model_dir), model_fingerprint="bench-cancel-storm",
                              dtype="float32", prefix_cache_bytes=prefix_cache_mb << 20)
    write_repository(out, settings, "KIND_CPU")
    return out


def stub_process(server: TritonServer) -> psutil.Process:
    """The python-backend stub running the model (one instance, so one stub)."""
    assert server.process is not None
    for pid in group_members(server.process.pid):
        with contextlib.suppress(psutil.Error):
            process = psutil.Process(pid)
            if process.name().startswith(STUB_NAME[:15]):  # comm is cut at 15 characters
                return process
    raise RuntimeError("no python-backend stub found in the server's process group")


def executor_figures(server: TritonServer) -> dict[str, float]:
    """`safeguard_model_executor{figure=...}` from Triton's metrics endpoint."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.metrics_url, timeout=5) as response:
        text = response.read().decode()
    figures = {}
    for line in text.splitlines():
        if line.startswith(f"{GAUGE_FAMILY}{{"):
            labels, value = line.rsplit(" ", 1)
            figures[labels.split('figure="', 1)[1].split('"', 1)[0]] = float(value)
    return figures


async def settled_figures(server: TritonServer, timeout: float = SETTLE_TIMEOUT_S) -> dict[str, float]:
    """The figures once nothing is in flight (they are published about once a second), or the last seen."""
    deadline = time.monotonic() + timeout
    while True:
        figures = await asyncio.to_thread(executor_figures, server)
        if (figures and all(figures.get(name, 1) == 0 for name in IN_FLIGHT)) or time.monotonic() > deadline:
            return figures
        await asyncio.sleep(0.5)


class Storm:
    def __init__(self, endpoint: TritonEndpoint, config: StormConfig, vocab: int):
        self.endpoint, self.config = endpoint, config
        self.rng = random.Random(config.seed)
        self.vocab = vocab
        # Ids from the middle of the vocabulary: never a stop token, so only the cancel or the budget ends a stream.
        self.prefix = [self._token() for _ in range(config.prefix_tokens)]
        self.serial = 0

    def _token(self) -> int:
        return self.rng.randrange(1000, min(self.vocab, 100_000))

    def request(self, max_tokens: int) -> GenerateRequest:
        self.serial += 1
        if self.config.distinct_prefixes:
            self.prefix = [self._token() for _ in range(self.config.prefix_tokens)]
        length = self.rng.randint(self.config.content_tokens, max(self.config.content_tokens,
                                                                  self.config.content_tokens_max))
        content = [self._token() for _ in range(length)]
        return GenerateRequest([*self.prefix, *content], max_tokens, prefix_len=len(self.prefix),
                               request_id=f"storm-{self.serial}")

    async def cancelled(self) -> str:
        """Read a few chunks and leave: the call is cancelled, and so the request in the model."""
        read = 0
        try:
            async with contextlib.aclosing(self.endpoint.generate(self.request(self.config.max_tokens))) as chunks:
                async for chunk in chunks:
                    if chunk.final:
                        return f"finished {chunk.finish_reason} before the cancel"
                    read += 1
                    if read >= self.config.read:
                        return "cancelled by the client"
        except TritonError as exc:
            return f"error: {exc.message[:80]}"
        return "ended without a final response"

    async def slow(self) -> str:
        try:
            async with contextlib.aclosing(self.endpoint.generate(self.request(self.config.slow_max_tokens))) as chunks:
                async for chunk in chunks:
                    if chunk.final:
                        return f"slow reader answered ({chunk.finish_reason})"
                    await asyncio.sleep(self.config.slow_pause_s)
        except TritonError as exc:
            return f"error: {exc.message[:80]}"
        return "ended without a final response"


async def run_storm(server: TritonServer, config: StormConfig, *, vocab: int, progress: bool = True) -> StormResult:
    endpoint = TritonEndpoint(server.grpc_url, MODEL_NAME)
    storm, result = Storm(endpoint, config, vocab), StormResult()
    stub = stub_process(server)
    started = time.monotonic()
    try:
        # Warm-up: the prefix stored, the model's first-call allocations made, before the baseline sample.
        for _ in range(2):
            result.endings[await storm.slow()] += 1
        result.rss_mb.append((0, stub.memory_info().rss / 2**20))
        slow_tasks: list[asyncio.Task[str]] = []
        done = 0
        while done < config.streams:
            batch = min(config.concurrency, config.streams - done)
            for ending in await asyncio.gather(*(storm.cancelled() for _ in range(batch))):
                result.endings[ending] += 1
            before, done = done, done + batch
            if done // config.slow_every > before // config.slow_every:
                slow_tasks += [asyncio.create_task(storm.slow()) for _ in range(config.slow_readers)]
            if done // config.sample_every > before // config.sample_every or done == config.streams:
                result.rss_mb.append((done, stub.memory_info().rss / 2**20))
                if progress:
                    print(f"  {done:5d} cancelled   stub RSS {result.rss_mb[-1][1]:8.1f} MB", flush=True)
        for ending in await asyncio.gather(*slow_tasks):
            result.endings[ending] += 1
        result.figures = await settled_figures(server)
        result.rss_mb.append((done, stub.memory_info().rss / 2**20))
    finally:
        await endpoint.close()
    result.seconds = time.monotonic() - started
    return result


def report(result: StormResult) -> None:
    first, second = result.growth()
    print("stub RSS (MB) after N cancelled streams:")
    print("  " + "  ".join(f"{n}:{mb:.1f}" for n, mb in result.rss_mb))
    print(f"growth: first half {first:+.1f} MB, second half {second:+.1f} MB, "
          f"total {result.rss_mb[-1][1] - result.rss_mb[0][1]:+.1f} MB in {result.seconds:.0f} s")
    print("streams:", ", ".join(f"{count} {ending}" for ending, count in sorted(result.endings.items())))
    in_flight = {name: result.figures.get(name) for name in IN_FLIGHT}
    print(f"executor in flight at the end: {in_flight}")
    print("executor figures:", json.dumps({k: v for k, v in sorted(result.figures.items())
                                           if not k.startswith("prefix_cache_")}))
    print("prefix store:", json.dumps({k: v for k, v in sorted(result.figures.items())
                                       if k.startswith("prefix_cache_")}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = StormConfig()
    for name, value in vars(defaults).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    parser.add_argument("--preset", default="smoke", choices=("smoke", "mid"))
    parser.add_argument("--prefix-cache-mb", type=int, default=512, help="the prefix store's budget")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = parser.parse_args()
    config = StormConfig(**{name: getattr(args, name) for name in vars(defaults)})
    model_dir = checkpoint(args.preset)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    with tempfile.TemporaryDirectory(prefix="bench-cancel-storm-") as tmp:
        repo = write_reference_repository(Path(tmp) / "repo", model_dir, prefix_cache_mb=args.prefix_cache_mb)
        print(f"{args.preset} checkpoint {model_dir}; {config}", flush=True)
        with TritonServer(TritonConfig(repo)) as server:
            result = asyncio.run(run_storm(server, config, vocab=vocab))
    report(result)
    if args.json is not None:
        args.json.write_text(json.dumps({"rss_mb": result.rss_mb, "growth_mb": result.growth(),
                                         "endings": result.endings, "figures": result.figures}, indent=1))


if __name__ == "__main__":
    main()
