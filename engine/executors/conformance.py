"""The executor conformance suite: what any executor must do, checked against a live instance.

CI runs it on the reference and canned executors (tests/test_conformance.py); `appliance selftest --repo REPO` runs
it on a GPU host against the executor a built repository names. The checks only use the `Executor` interface and
compare an executor with itself (same request twice, cached against uncached, alone against concurrent), so they
hold for any backend and need no reference outputs.

Executors differ in one documented way: TensorRT-LLM and vLLM reuse KV cache in whole blocks of the prompt, so a
warm repeat of a prompt may report fewer cached tokens than its prefix (the prefix rounded down to a block) or more (a
repeated prompt matches beyond its prefix), but never the whole prompt: its last token is always computed, for the
logits. The reference executor caches the exact prefix. `cached_tokens` must therefore be 0 cold and, warm, positive
and below the prompt's length; an executor that declares `exact_prefix_cache` must report exactly the prefix length.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace

from engine.executors.base import Executor, GenerationChunk, GenerationRequest, SamplingParams


@dataclass(frozen=True)
class Outcome:
    tokens: tuple[int, ...]
    cached_tokens: int | None
    finish_reason: str | None
    error: str | None


@dataclass(frozen=True)
class CheckResult:
    name: str
    passed: bool
    detail: str
    seconds: float


@dataclass(frozen=True)
class SuiteConfig:
    prompts: Sequence[Sequence[int]]  # at least two prompts sharing `prefix_len` leading tokens
    prefix_len: int
    max_tokens: int = 16
    exact_prefix_cache: bool = False
    concurrency: int = 4


@dataclass
class Suite:
    executor: Executor
    config: SuiteConfig
    results: list[CheckResult] = field(default_factory=list)

    def request(self, prompt: Sequence[int], **overrides) -> GenerationRequest:
        base = GenerationRequest(request_id=uuid.uuid4().hex, input_ids=tuple(prompt),
                                 max_tokens=self.config.max_tokens, sampling=SamplingParams())
        return replace(base, **overrides)

    async def run(self, request: GenerationRequest, on_chunk: Callable[[GenerationChunk], None] | None = None
                  ) -> Outcome:
        tokens: list[int] = []
        cached = finish = error = None
        async for chunk in self.executor.generate(request):
            tokens.extend(chunk.token_ids)
            if chunk.cached_tokens is not None:
                cached = chunk.cached_tokens
            if chunk.final:
                finish, error = chunk.finish_reason, chunk.error
            if on_chunk is not None:
                on_chunk(chunk)
        return Outcome(tuple(tokens), cached, finish, error)


CHECKS: list[tuple[str, Callable[[Suite], Awaitable[str]]]] = []


def check(name: str):
    def register(fn: Callable[[Suite], Awaitable[str]]):
        CHECKS.append((name, fn))
        return fn
    return register


class ConformanceFailure(AssertionError):
    pass


def _expect(condition: bool, message: str) -> None:
    if not condition:
        raise ConformanceFailure(message)


@check("greedy decoding is deterministic")
async def greedy_determinism(suite: Suite) -> str:
    prompt = suite.config.prompts[0]
    first = await suite.run(suite.request(prompt))
    second = await suite.run(suite.request(prompt))
    _expect(first.error is None, f"generation failed: {first.error}")
    _expect(first.tokens == second.tokens, f"two greedy runs differ: {first.tokens} vs {second.tokens}")
    return f"{len(first.tokens)} tokens, identical"


@check("a cached prefix gives the same tokens as no cache")
async def cached_equals_uncached(suite: Suite) -> str:
    cfg = suite.config
    for prompt in cfg.prompts[:2]:
        uncached = await suite.run(suite.request(prompt, prefix_len=0))
        warm = await suite.run(suite.request(prompt, prefix_len=cfg.prefix_len))  # warms (or hits) the prefix
        again = await suite.run(suite.request(prompt, prefix_len=cfg.prefix_len))
        _expect(uncached.tokens == warm.tokens == again.tokens,
                f"cached and uncached generations differ: {uncached.tokens} / {warm.tokens} / {again.tokens}")
    return f"{len(cfg.prompts[:2])} prompts after one shared prefix of {cfg.prefix_len} tokens"


@check("cached_tokens reports prefix reuse")
async def cached_tokens_reported(suite: Suite) -> str:
    cfg = suite.config
    cold_prompt = [*cfg.prompts[0]]
    cold_prompt[0] = random.randrange(199_998)  # a prefix nothing has cached yet, even on a second run
    cold = await suite.run(suite.request(cold_prompt, prefix_len=cfg.prefix_len))
    warm = await suite.run(suite.request(cold_prompt, prefix_len=cfg.prefix_len))
    _expect(cold.cached_tokens == 0, f"a cold request reported {cold.cached_tokens} cached tokens")
    if cfg.exact_prefix_cache:
        _expect(warm.cached_tokens == cfg.prefix_len,
                f"warm request reported {warm.cached_tokens} cached tokens, expected {cfg.prefix_len}")
    else:
        _expect(warm.cached_tokens is not None and 0 < warm.cached_tokens < len(cold_prompt),
                f"warm request reported {warm.cached_tokens} cached tokens for a {len(cold_prompt)}-token prompt "
                f"(expected more than 0, and fewer than the prompt: its last token is always computed)")
    return f"cold 0, warm {warm.cached_tokens} of {cfg.prefix_len}"


@check("generation stops at a stop token and includes it")
async def stop_tokens(suite: Suite) -> str:
    prompt = suite.config.prompts[0]
    free = await suite.run(suite.request(prompt))
    _expect(len(free.tokens) >= 3, f"need 3 generated tokens to pick a stop token, got {len(free.tokens)}")
    stop = free.tokens[2]
    cut = free.tokens.index(stop) + 1
    stopped = await suite.run(suite.request(prompt, sampling=SamplingParams(stop_token_ids=(stop,))))
    _expect(stopped.finish_reason == "stop", f"finish_reason {stopped.finish_reason!r}, expected 'stop'")
    _expect(stopped.tokens == free.tokens[:cut], f"expected {free.tokens[:cut]}, got {stopped.tokens}")
    return f"stopped after {cut} tokens at id {stop}"


@check("max_tokens is an exact budget")
async def budgets(suite: Suite) -> str:
    prompt = suite.config.prompts[0]
    no_stop = SamplingParams(stop_token_ids=())
    for budget in (1, 5):
        out = await suite.run(suite.request(prompt, max_tokens=budget, sampling=no_stop))
        _expect(out.finish_reason == "length", f"budget {budget}: finish_reason {out.finish_reason!r}")
        _expect(len(out.tokens) == budget, f"budget {budget}: got {len(out.tokens)} tokens")
    warm = await suite.run(suite.request(prompt, max_tokens=0, prefix_len=suite.config.prefix_len))
    _expect(warm.tokens == () and warm.finish_reason == "length",
            f"a prefill-only request returned {warm.tokens} / {warm.finish_reason!r}")
    return "1 and 5 tokens exactly; 0 is prefill only"


@check("cancel stops generation within one step")
async def cancellation(suite: Suite) -> str:
    request = suite.request(suite.config.prompts[1], max_tokens=200, sampling=SamplingParams(stop_token_ids=()))
    seen: list[int] = []

    def on_chunk(chunk: GenerationChunk) -> None:
        seen.extend(chunk.token_ids)
        if len(seen) >= 2:
            suite.executor.cancel(request.request_id)

    out = await suite.run(request, on_chunk)
    _expect(out.finish_reason == "cancelled", f"finish_reason {out.finish_reason!r}, expected 'cancelled'")
    # One step may already be in flight when cancel arrives; more than that means it was ignored.
    _expect(len(out.tokens) <= 4, f"{len(out.tokens)} tokens arrived after cancelling at 2")
    return f"cancelled at 2, {len(out.tokens)} tokens in all"


@check("concurrent requests match sequential ones")
async def concurrency(suite: Suite) -> str:
    cfg = suite.config
    prompts = [cfg.prompts[i % len(cfg.prompts)] for i in range(cfg.concurrency)]
    alone = [await suite.run(suite.request(p, prefix_len=cfg.prefix_len)) for p in prompts]
    together = await asyncio.gather(*(suite.run(suite.request(p, prefix_len=cfg.prefix_len)) for p in prompts))
    for a, b in zip(alone, together, strict=True):
        _expect(a.tokens == b.tokens, f"concurrent run differs: {a.tokens} vs {b.tokens}")
    return f"{cfg.concurrency} at once, identical"


def harmony_config(encoding, policy_text: str, max_tokens: int = 16, exact_prefix_cache: bool = False
                   ) -> SuiteConfig:
    """Real classification prompts: one policy prefix, three contents (what the appliance sends)."""
    from classification.content import Text
    from classification.render import PromptRenderer

    renderer = PromptRenderer(encoding, model_fingerprint="conformance")
    prefix = renderer.prefix(policy_text, "low")
    contents = ("Win a free cruise, reply with your card number!", "Meeting moved to 3pm, see you there.",
                "Is this real? 'Your account is locked, verify at secure-login.example.com'")
    prompts = [renderer.render(prefix, Text(c)).ids for c in contents]
    return SuiteConfig(prompts, len(prefix.ids), max_tokens, exact_prefix_cache)


async def run_suite(executor: Executor, config: SuiteConfig, only: Sequence[str] = ()) -> list[CheckResult]:
    """Run every check (or those named in `only`); a failing check never stops the others."""
    if len(config.prompts) < 2 or any(len(p) <= config.prefix_len for p in config.prompts):
        raise ValueError("the suite needs two or more prompts, each longer than prefix_len")
    suite = Suite(executor, config)
    for name, fn in CHECKS:
        if only and name not in only:
            continue
        started = time.perf_counter()
        try:
            detail, passed = await fn(suite), True
        except ConformanceFailure as failure:
            detail, passed = str(failure), False
        except Exception as exc:  # an executor crash is a failed check, reported with the rest
            detail, passed = f"{type(exc).__name__}: {exc}", False
        suite.results.append(CheckResult(name, passed, detail, time.perf_counter() - started))
    return suite.results
