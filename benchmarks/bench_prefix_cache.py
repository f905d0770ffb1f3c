"""Prefix caching in the reference executor: time to first token with the policy prefix warm versus cold, and the
share of each warm prompt that is still computed.

Workload: the synthetic "mid" checkpoint (4 layers, hidden 512, 8 experts), a real policy cut to a ~600-token
harmony prefix, and ~100 tokens of distinct content per request, one request at a time; default engine settings
(so each worker has its share of torch's threads, as in service).
Targets: warm TTFT at most one fifth of cold; a warm request computes at most 20% of its prompt. Every forward
also pays a fixed cost, one decode step's worth (on this small model mostly the lm_head over the 201k vocabulary),
which caching cannot remove; the report gives the ratio beyond that floor too.

    python -m benchmarks.bench_prefix_cache [--runs 7]

The checkpoint is synthesized once into `$APPLIANCE_CACHE_DIR/bench/` (or the default appliance cache).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from classification.content import Text
from classification.library import bundled_policy
from classification.policy import load_policy
from classification.render import PromptPrefix, PromptRenderer
from classification.vocab import default_cache_dir, load_harmony_encoding
from engine.checkpoint import synth
from engine.checkpoint.config import preset_dict
from engine.executors.base import GenerationRequest, SamplingParams
from engine.executors.prefix_store import PrefixStore
from engine.executors.reference import ReferenceExecutor
from engine.settings import EngineSettings

PRESET = "mid"
PREFIX_TOKENS = 600
CONTENT_TOKENS = 100
POLICY = bundled_policy("spam-scams")
FILLER = ("Hello friend, I am writing about an exclusive offer for a luxury watch at ninety percent off, "
          "shipped free from our warehouse, pay by gift card only, reply today with your address. ")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    prefix_len: int


def checkpoint() -> Path:
    """The synthetic checkpoint, rebuilt when the preset or the synthesizer changes."""
    digest = hashlib.sha256(json.dumps(preset_dict(PRESET), sort_keys=True).encode())
    digest.update(Path(synth.__file__).read_bytes())
    final = default_cache_dir() / "bench" / f"{PRESET}-notok-{digest.hexdigest()[:12]}"
    if not (final / "config.json").is_file():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        synth.synthesize(PRESET, partial, tokenizer=False)
        shutil.rmtree(final, ignore_errors=True)
        partial.rename(final)
    return final


def policy_prefix(renderer: PromptRenderer) -> PromptPrefix:
    """The real policy cut at a paragraph so that the whole harmony prefix is as close to PREFIX_TOKENS as can be."""
    paragraphs = load_policy(POLICY).body.split("\n\n")
    cuts = [renderer.prefix("\n\n".join(paragraphs[:n]), "low") for n in range(1, len(paragraphs) + 1)]
    return min(cuts, key=lambda prefix: abs(len(prefix.ids) - PREFIX_TOKENS))


def prompts(renderer: PromptRenderer, prefix: PromptPrefix, count: int) -> list[Prompt]:
    """Distinct contents of about CONTENT_TOKENS each (a number up front makes each one different)."""
    made = []
    for i in range(count):
        words = f"Ticket {i}. {FILLER * 4}".split()
        rendered = renderer.render(prefix, Text(" ".join(words[:CONTENT_TOKENS * 3 // 4])))
        made.append(Prompt(tuple(rendered.ids), rendered.prefix_len))
    return made


@dataclass(frozen=True)
class Timing:
    first_token: float  # seconds from generate() to the first chunk
    next_token: float  # seconds from the first chunk to the second: one decode step, the floor of any TTFT
    computed_share: float  # prompt tokens not served from the prefix store, as a fraction of the prompt


async def timed(executor: ReferenceExecutor, prompt: Prompt, prefix_len: int) -> Timing:
    request = GenerationRequest(f"bench-{time.monotonic_ns()}", prompt.ids, 2, prefix_len=prefix_len,
                                sampling=SamplingParams(stop_token_ids=()))
    start = time.perf_counter()
    stream = executor.generate(request)
    head = await anext(stream)
    first = time.perf_counter()
    await anext(stream)
    return Timing(first - start, time.perf_counter() - first, 1 - head.cached_tokens / len(prompt.ids))


async def bench(executor: ReferenceExecutor, batch: list[Prompt]) -> dict[str, list[Timing]]:
    """Uncached, cold and warm requests interleaved per content, so drifting load on the host hits all three alike.
    Cold empties the store first; warm follows it with the same prefix."""
    budget = executor.settings.prefix_cache_bytes
    runs: dict[str, list[Timing]] = {"uncached": [], "cold": [], "warm": []}
    for prompt in [batch[0], *batch]:  # the first round warms allocator and kernels and is dropped
        runs["uncached"].append(await timed(executor, prompt, 0))
        executor.store = PrefixStore(budget)
        runs["cold"].append(await timed(executor, prompt, prompt.prefix_len))
        runs["warm"].append(await timed(executor, prompt, prompt.prefix_len))
    return {name: timings[1:] for name, timings in runs.items()}


def report(executor: ReferenceExecutor, runs: dict[str, list[Timing]]) -> None:
    ms = {name: statistics.median(t.first_token for t in timings) * 1e3 for name, timings in runs.items()}
    pairs = statistics.median(w.first_token / c.first_token for w, c in zip(runs["warm"], runs["cold"], strict=True))
    step = statistics.median(t.next_token for timings in runs.values() for t in timings) * 1e3
    print(f"{executor.settings.dtype}, {executor.threads_per_worker} torch thread(s) per worker")
    print(f"  TTFT median: uncached {ms['uncached']:.1f} ms, cold {ms['cold']:.1f} ms, warm {ms['warm']:.1f} ms; "
          f"one decode step {step:.1f} ms")
    # Without the fixed cost every request pays, the ratio shows how much prompt work the cache removes.
    beyond_floor = (ms["warm"] - step) / (ms["cold"] - step)
    print(f"  warm/cold TTFT {ms['warm'] / ms['cold']:.3f} (median of pairs {pairs:.3f}; target <= 0.200; "
          f"{beyond_floor:.3f} beyond one decode step); "
          f"warm requests compute {statistics.mean(t.computed_share for t in runs['warm']):.1%} of their prompt "
          f"(target <= 20%); "
          f"prefix entry {executor.stats()['prefix_cache_resident_bytes'] / 1e6:.2f} MB")


def run_one(model_dir: Path, dtype: str, concurrency: int, batch: list[Prompt]) -> None:
    settings = EngineSettings("reference", str(model_dir), "bench", dtype=dtype, max_concurrency=concurrency)
    executor = ReferenceExecutor(settings)
    report(executor, asyncio.run(bench(executor, batch)))
    asyncio.run(executor.close())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="requests per figure (median reported)")
    parser.add_argument("--concurrency", type=int, default=EngineSettings.max_concurrency,
                        help="the engine's max_concurrency, which sets each worker's share of torch threads")
    args = parser.parse_args()
    model_dir = checkpoint()
    renderer = PromptRenderer(load_harmony_encoding(), model_fingerprint="bench")
    prefix = policy_prefix(renderer)
    batch = prompts(renderer, prefix, args.runs)
    lengths = [len(p.ids) - p.prefix_len for p in batch]
    print(f"{PRESET} checkpoint {model_dir}; prefix {len(prefix.ids)} tokens, content+framing "
          f"{min(lengths)}-{max(lengths)} tokens, {args.runs} requests per figure; cold = prefix missing from "
          f"the store (prefilled, then stored), uncached = prefix_len 0")
    for dtype in ("bfloat16", "float32"):
        run_one(model_dir, dtype, args.concurrency, batch)


if __name__ == "__main__":
    main()
