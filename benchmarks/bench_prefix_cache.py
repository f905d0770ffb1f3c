"""Prefix caching in the reference executor: time to first token with the policy prefix warm versus cold, and the
share of each warm prompt that is still computed.

Workload: the synthetic "mid" checkpoint (4 layers, hidden 512, 8 experts), a real policy cut to a ~600-token
harmony prefix, and ~100 tokens of distinct content per request; one worker, so a request has all the threads.
Targets: warm TTFT at most one fifth of cold; a warm request computes at most 20% of its prompt.

    python -m benchmarks.bench_prefix_cache [--runs 7]

The checkpoint is synthesized once into `$APPLIANCE_CACHE_DIR/bench/` (or the default appliance cache).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.executor import GenerationRequest
from engine.prefix_cache import PrefixStore
from engine.prompt import PromptPrefix, PromptRenderer, Text
from engine.reference_executor import ReferenceExecutor
from engine.settings import EngineSettings
from engine.synth import synthesize
from engine.vocab import default_cache_dir, load_harmony_encoding
from server.policy import load_policy

REPO = Path(__file__).resolve().parents[1]
PRESET = "mid"
PREFIX_TOKENS = 600
CONTENT_TOKENS = 100
POLICY = REPO / "policies" / "spam-scams.md"
FILLER = ("Hello friend, I am writing about an exclusive offer for a luxury watch at ninety percent off, "
          "shipped free from our warehouse, pay by gift card only, reply today with your address. ")


@dataclass(frozen=True)
class Prompt:
    ids: tuple[int, ...]
    prefix_len: int


def checkpoint() -> Path:
    final = default_cache_dir() / "bench" / f"{PRESET}-notok"
    if not (final / "config.json").is_file():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        synthesize(PRESET, partial, tokenizer=False)
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


async def first_token_seconds(executor: ReferenceExecutor, request: GenerationRequest) -> tuple[float, int]:
    start = time.perf_counter()
    stream = executor.generate(request)
    first = await anext(stream)
    elapsed = time.perf_counter() - start
    await stream.aclose()
    return elapsed, first.cached_tokens or 0


def measure(executor: ReferenceExecutor, batch: list[Prompt], prefix_len: Callable[[Prompt], int],
            before_each: Callable[[], None] = lambda: None) -> list[float]:
    times = []
    for n, prompt in enumerate(batch):
        before_each()
        request = GenerationRequest(f"bench-{n}-{time.monotonic_ns()}", prompt.ids, 1, prefix_len=prefix_len(prompt))
        times.append(asyncio.run(first_token_seconds(executor, request))[0])
    return times


def bench(model_dir: Path, dtype: str, batch: list[Prompt]) -> None:
    executor = ReferenceExecutor(EngineSettings("reference", str(model_dir), "bench", dtype=dtype, max_concurrency=1))
    budget = executor.settings.prefix_cache_bytes

    def empty_store() -> None:
        executor.store = PrefixStore(budget)

    measure(executor, batch[:2], lambda p: p.prefix_len, empty_store)  # warm-up: allocator, kernels, page cache
    uncached = measure(executor, batch, lambda _: 0)
    cold = measure(executor, batch, lambda p: p.prefix_len, empty_store)
    before = executor.stats()
    warm = measure(executor, batch, lambda p: p.prefix_len)
    after = executor.stats()
    asyncio.run(executor.close())
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    total = after["prompt_tokens"] - before["prompt_tokens"]
    medians = {name: statistics.median(times) * 1e3 for name, times in
               (("uncached", uncached), ("cold", cold), ("warm", warm))}
    print(f"{dtype:<9} threads {torch.get_num_threads()}  TTFT median (ms): uncached {medians['uncached']:7.1f}   "
          f"cold {medians['cold']:7.1f}   warm {medians['warm']:6.1f}   warm/cold {medians['warm'] / medians['cold']:.3f}"
          f" (target <= 0.200)   warm computes {computed / total:.1%} of the prompt (target <= 20%)"
          f"   prefix entry {after['prefix_cache_resident_bytes'] / 1e6:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="requests per figure (median reported)")
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
        bench(model_dir, dtype, batch)


if __name__ == "__main__":
    main()
