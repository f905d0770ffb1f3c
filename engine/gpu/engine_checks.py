"""The GPU report's executor-generic items: checks written against the `Executor` interface alone.

On a GPU host they run on the TensorRT-LLM and vLLM executors; in CI the same functions run on the reference executor
with a small checkpoint, which proves their logic. Each returns `Item`s (engine.gpu.report_items); an executor that
crashes or refuses a request gives a failed item, never a crashed report.

The prompts are fixed pseudo-random token ids: a policy-sized prefix and short contents after it. The checkpoints are
random weights, so text would mean nothing, and ids need no tokenizer package on a bare GPU machine. The prefix is
320 tokens, ten of TensorRT-LLM's 32-token KV blocks, so block reuse has whole blocks to reuse.
"""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from engine.executors.base import Executor, GenerationChunk, GenerationRequest, RequestError, SamplingParams
from engine.gpu.report_items import Item, compare_tokens, failed, passed, skipped, verdict

PREFIX_TOKENS = 320
CONTENT_TOKENS = 32
ORDINARY_IDS = 199_998  # gpt-oss ids below this are ordinary (mergeable) tokens; the specials above hold the stops
NO_STOP = SamplingParams(stop_token_ids=())  # random weights may pick a stop token: greedy runs keep their length
# Salts of the prompt sets, so each check starts from a prefix no earlier check cached.
GREEDY_SALT, CACHE_SALT, WARMUP_SALT, ABORT_SALT, SEED_SALT = range(5)
WARMUP_TOKENS = 2
ABORT_MAX_TOKENS = 256  # far more than the check lets through
# The cancel arrives while the next step may already run, and one finished token may already be in the stream.
MAX_TOKENS_AFTER_CANCEL = 2
SEED_A, SEED_B = 1234, 4321
# Two greedy runs on different kernels (CUDA and CPU, BF16 and MXFP4 experts) part for good at the first near-tie
# that rounding flips, and random weights have many: at full width, bf16 against float32 on CPU picks a different top
# token at 4 of 32 positions. So when two runs differ, one is fed the other's tokens and must pick the same next token
# at most positions (that run of bf16 against float32: 28 of 32); a layout or kernel fault agrees at almost none.
MIN_FORCED_AGREEMENT = 0.5
SAMPLED_TEMPERATURE = 1.0

CACHED_TOKENS = "cached_tokens cold 0 / warm > 0"
REUSED_BLOCKS = "num_reused_blocks > 0 warm"
FIRST_TOKEN = "time to first token cold vs warm"
ABORT = "abort within one step"
SEEDS = "seed behaviour at temperature 1"
EXPANDED = "BF16-expanded experts give MXFP4's greedy tokens"
SERVING_ITEMS = (CACHED_TOKENS, REUSED_BLOCKS, FIRST_TOKEN, ABORT, SEEDS)  # one executor's: `generic_items`
GENERIC_ITEMS = (*SERVING_ITEMS, EXPANDED)


@dataclass(frozen=True)
class Prompts:
    """Prompts sharing one leading prefix of `prefix_len` tokens."""

    prefix_len: int
    prompts: tuple[tuple[int, ...], ...]


def make_prompts(salt: int, count: int = 2) -> Prompts:
    rng = random.Random(salt)
    prefix = [rng.randrange(ORDINARY_IDS) for _ in range(PREFIX_TOKENS)]
    contents = [[rng.randrange(ORDINARY_IDS) for _ in range(CONTENT_TOKENS)] for _ in range(count)]
    return Prompts(PREFIX_TOKENS, tuple(tuple(prefix + c) for c in contents))


def request(prompts: Prompts, max_tokens: int, *, which: int = 0, sampling: SamplingParams = NO_STOP,
            prefix: bool = True) -> GenerationRequest:
    return GenerationRequest(request_id=f"gpu-report-{uuid.uuid4().hex}", input_ids=prompts.prompts[which],
                             max_tokens=max_tokens, prefix_len=prompts.prefix_len if prefix else 0,
                             sampling=sampling)


@dataclass(frozen=True)
class Timed:
    """One request's answer with its timing."""

    tokens: tuple[int, ...]
    cached_tokens: int | None
    first_token_seconds: float | None
    seconds: float
    finish_reason: str | None
    error: str | None

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed after the first token."""
        if self.first_token_seconds is None or len(self.tokens) < 2 or self.seconds <= self.first_token_seconds:
            return None
        return (len(self.tokens) - 1) / (self.seconds - self.first_token_seconds)

    def problem(self) -> str | None:
        """Why this answer is unusable, or None."""
        if self.error is not None:
            return f"the request failed: {self.error}"
        if not self.tokens:
            return f"no tokens (finish reason {self.finish_reason!r})"
        return None


async def timed_run(executor: Executor, req: GenerationRequest,
                    on_chunk: Callable[[GenerationChunk], None] | None = None) -> Timed:
    """Stream `req` to its end; RequestError (a refusal before any work) reaches the caller."""
    tokens: list[int] = []
    cached = first = finish = error = None
    started = time.perf_counter()
    async for chunk in executor.generate(req):
        if chunk.token_ids and first is None:
            first = time.perf_counter() - started
        tokens.extend(chunk.token_ids)
        if chunk.cached_tokens is not None and cached is None:
            cached = chunk.cached_tokens
        if chunk.final:
            finish, error = chunk.finish_reason, chunk.error
        if on_chunk is not None:
            on_chunk(chunk)
    return Timed(tuple(tokens), cached, first, time.perf_counter() - started, finish, error)


async def greedy(executor: Executor, max_tokens: int, salt: int = GREEDY_SALT) -> Timed:
    """The greedy answer every comparison uses: the first prompt of `salt`, its prefix marked, no stop tokens. A
    refusal or crash is an answer with an error, which the items that use it report."""
    try:
        return await timed_run(executor, request(make_prompts(salt), max_tokens))
    except Exception as exc:
        return Timed((), None, None, 0.0, "error", f"{type(exc).__name__}: {exc}")


async def warm_up(executor: Executor) -> None:
    """A throwaway first request: it pays for lazy start-up work (CUDA kernels, cuBLAS handles, sampler state), so
    "cold" in the items after it means a cold prefix only."""
    with contextlib.suppress(Exception):  # whatever fails here fails again, and is reported, in the items after
        await timed_run(executor, request(make_prompts(WARMUP_SALT), WARMUP_TOKENS, prefix=False))


async def timed_items(section: str, names: Sequence[str], check: Callable[[], Awaitable[Item | list[Item]]]
                      ) -> list[Item]:
    """Run one check giving the items `names`, timed; an exception from the executor fails each of them."""
    started = time.perf_counter()
    try:
        result = await check()
    except Exception as exc:
        result = [failed(section, name, f"{type(exc).__name__}: {exc}") for name in names]
    items = result if isinstance(result, list) else [result]
    seconds = (time.perf_counter() - started) / len(items)
    for item in items:
        item.seconds = seconds
    return items


async def prefix_cache_items(executor: Executor, section: str, max_tokens: int) -> list[Item]:
    """A cold request and a warm one on the same prefix: cached_tokens, reused KV blocks, time to first token."""
    prompts = make_prompts(CACHE_SALT)
    cold = await timed_run(executor, request(prompts, max_tokens, which=0))
    before_warm = executor.stats()
    warm = await timed_run(executor, request(prompts, max_tokens, which=1))
    after_warm = executor.stats()
    trouble = cold.problem() or warm.problem()
    if trouble is not None:
        return [failed(section, name, trouble) for name in (CACHED_TOKENS, REUSED_BLOCKS, FIRST_TOKEN)]

    plen = prompts.prefix_len
    ok = cold.cached_tokens == 0 and warm.cached_tokens is not None and 0 < warm.cached_tokens <= plen
    items = [Item(section, CACHED_TOKENS, verdict(ok), f"cold {cold.cached_tokens}, warm {warm.cached_tokens} of a "
                  f"{plen}-token prefix", data={"cold": cold.cached_tokens, "warm": warm.cached_tokens,
                                                "prefix_len": plen})]
    if "kv_blocks_reused" not in after_warm:
        items.append(skipped(section, REUSED_BLOCKS, "not available: this executor's stats() has no "
                                                     "kv_blocks_reused"))
    else:
        reused = after_warm["kv_blocks_reused"] - before_warm.get("kv_blocks_reused", 0)
        items.append(Item(section, REUSED_BLOCKS, verdict(reused > 0), f"{reused:g} KV blocks reused by the warm "
                          f"request", data={"kv_blocks_reused": reused}))
    cold_s, warm_s = cold.first_token_seconds or 0.0, warm.first_token_seconds or 0.0
    ratio = cold_s / warm_s if warm_s else None
    faster = f" ({ratio:.1f}x)" if ratio else ""
    # Timing is recorded, not judged: on a GPU a 2-layer prefill is milliseconds, within noise of the cache lookup.
    items.append(passed(section, FIRST_TOKEN, f"cold {cold_s * 1000:.1f} ms, warm {warm_s * 1000:.1f} ms{faster}",
                        cold_seconds=round(cold_s, 5), warm_seconds=round(warm_s, 5),
                        cold_over_warm=None if ratio is None else round(ratio, 3),
                        prompt_tokens=len(prompts.prompts[0]),
                        decode_tokens_per_second=_round(warm.tokens_per_second)))
    return items


async def abort_item(executor: Executor, section: str) -> Item:
    """Cancel right after the first token; count the tokens that still arrive."""
    req = request(make_prompts(ABORT_SALT), ABORT_MAX_TOKENS, prefix=False)
    after: list[int] = []
    state = {"cancelled": False, "known": False}

    def on_chunk(chunk: GenerationChunk) -> None:
        if state["cancelled"]:
            after.extend(chunk.token_ids)
        elif chunk.token_ids:
            state["cancelled"] = True
            state["known"] = executor.cancel(req.request_id)

    out = await timed_run(executor, req, on_chunk)
    data = {"tokens_after_cancel": len(after), "tokens": len(out.tokens), "finish_reason": out.finish_reason,
            "allowed_after_cancel": MAX_TOKENS_AFTER_CANCEL}
    if not state["known"]:
        return failed(section, ABORT, f"cancel() did not know the running request (finish {out.finish_reason!r})",
                      **data)
    ok = out.finish_reason == "cancelled" and len(after) <= MAX_TOKENS_AFTER_CANCEL
    return Item(section, ABORT, verdict(ok), f"cancelled after the first token; {len(after)} token(s) arrived after "
                f"the cancel, finish {out.finish_reason!r}", data=data)


async def seed_item(executor: Executor, section: str, max_tokens: int) -> Item:
    """Seed A twice and seed B once at temperature 1: is A repeatable, and does B differ? A refusal is a finding."""
    prompts = make_prompts(SEED_SALT)

    def sampled(seed: int) -> GenerationRequest:
        return request(prompts, max_tokens, prefix=False, sampling=SamplingParams(SAMPLED_TEMPERATURE, seed, ()))

    try:
        first = await timed_run(executor, sampled(SEED_A))
    except RequestError as exc:
        return passed(section, SEEDS, f"refused before any work: {exc}", refused=True, message=str(exc))
    if first.error is not None and "seed" in first.error.lower():  # a refusal that arrives as a stream error
        return passed(section, SEEDS, f"refused: {first.error}", refused=True, message=first.error)
    again = await timed_run(executor, sampled(SEED_A))
    other = await timed_run(executor, sampled(SEED_B))
    trouble = first.problem() or again.problem() or other.problem()
    if trouble is not None:
        return failed(section, SEEDS, trouble)
    repeatable, distinct = first.tokens == again.tokens, first.tokens != other.tokens
    data = {"refused": False, "same_seed_same_tokens": repeatable, "other_seed_other_tokens": distinct,
            "agreement_same_seed": compare_tokens(first.tokens, again.tokens).to_dict()}
    if repeatable and distinct:
        return passed(section, SEEDS, f"seed {SEED_A} twice: identical {len(first.tokens)} tokens; seed {SEED_B}: "
                                      f"different", **data)
    seen = "same seed gave different tokens (the seed is ignored)" if not repeatable else \
        "different seeds gave the same tokens (the seed is ignored)"
    return failed(section, SEEDS, seen, **data)


async def forced_agreement(executor: Executor, tokens: tuple[int, ...], salt: int = GREEDY_SALT) -> int:
    """At how many positions `executor`, given the greedy prompt and `tokens[:k]`, picks `tokens[k]` next."""
    prompts = make_prompts(salt)
    same = 0
    for k, expected in enumerate(tokens):
        forced = Prompts(prompts.prefix_len, ((*prompts.prompts[0], *tokens[:k]),))
        out = await timed_run(executor, request(forced, 1))
        trouble = out.problem()
        if trouble is not None:
            raise RuntimeError(f"forced step {k}: {trouble}")
        same += out.tokens[0] == expected
    return same


async def compare_greedy(executor: Executor, reference: Timed, answer: Timed) -> tuple[bool, str, dict[str, Any]]:
    """Does `answer` (from `executor`) agree with `reference` (another run's greedy answer to the same request)?
    Identical passes at once; otherwise `executor` is fed the reference tokens (MIN_FORCED_AGREEMENT)."""
    agreement = compare_tokens(reference.tokens, answer.tokens)
    data: dict[str, Any] = agreement.to_dict()
    if agreement.identical:
        return True, agreement.describe(), data
    same = await forced_agreement(executor, reference.tokens)
    n = len(reference.tokens)
    data.update(forced_same=same, forced_positions=n, min_forced_agreement=MIN_FORCED_AGREEMENT)
    return same >= MIN_FORCED_AGREEMENT * n, f"{agreement.describe()}; fed the other run's tokens, it picks the " \
                                            f"same next token at {same} of {n} positions", data


async def expanded_item(section: str, mxfp4: Timed, expanded_executor: Executor, max_tokens: int) -> Item:
    """The same greedy request on the BF16-expanded checkpoint against the MXFP4 one's answer `mxfp4`."""
    bf16 = await greedy(expanded_executor, max_tokens)
    trouble = mxfp4.problem() or bf16.problem()
    if trouble is not None:
        return failed(section, EXPANDED, trouble)
    ok, detail, data = await compare_greedy(expanded_executor, mxfp4, bf16)
    return Item(section, EXPANDED, verdict(ok), detail, data={**data, "mxfp4_tokens": list(mxfp4.tokens),
                                                              "bf16_tokens": list(bf16.tokens)})


async def generic_items(executor: Executor, section: str, max_tokens: int) -> list[Item]:
    """Every generic item but the expanded comparison, which needs a second executor."""
    items = await timed_items(section, (CACHED_TOKENS, REUSED_BLOCKS, FIRST_TOKEN),
                              lambda: prefix_cache_items(executor, section, max_tokens))
    items += await timed_items(section, (ABORT,), lambda: abort_item(executor, section))
    items += await timed_items(section, (SEEDS,), lambda: seed_item(executor, section, max_tokens))
    return items


def skip_all(section: str, names: Sequence[str], reason: str) -> list[Item]:
    return [skipped(section, name, reason) for name in names]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)
