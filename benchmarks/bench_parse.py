"""Parse speed: a realistic completion (long analysis, JSON final) through `parse_completion` and `parse_verdict`,
one-shot and streamed a few tokens at a time as Triton delivers them.

    python -m benchmarks.bench_parse [--analysis-tokens 2000] [--repeat 200]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from classification.completion import StreamParser, parse_completion
from classification.policy import OutputSpec
from classification.tokens import CHANNEL, END, MESSAGE, RETURN, START
from classification.verdict import parse_verdict
from classification.vocab import load_harmony_encoding

FINAL = '{"violation": 1, "policy_category": "VE1", "rule_ids": ["VE1.a"], "confidence": "high", ' \
        '"rationale": "Praises a recent attack and calls for more."}'
OUTPUT = OutputSpec("json", ("VE1", "VE2"), ("VE1.a", "VE2.a"), confidence=True, rationale=True)


def completion(analysis_tokens: int) -> list[int]:
    encoding = load_harmony_encoding()
    words = encoding.encode("The content describes an event and its framing; weigh intent. ", disallowed_special=())
    analysis = (words * (analysis_tokens // len(words) + 1))[:analysis_tokens]
    final = encoding.encode(FINAL, disallowed_special=())
    header = encoding.encode("analysis", disallowed_special=())
    final_header = [START, *encoding.encode("assistant", disallowed_special=()), CHANNEL,
                    *encoding.encode("final", disallowed_special=()), MESSAGE]
    return [CHANNEL, *header, MESSAGE, *analysis, END, *final_header, *final, RETURN]


def per_call_us(run: Callable[[], object], repeat: int) -> float:
    start = time.perf_counter()
    for _ in range(repeat):
        run()
    return (time.perf_counter() - start) / repeat * 1e6


def streamed(tokens: list[int], decode: Callable[[list[int]], str], step: int) -> None:
    parser = StreamParser(decode)
    for at in range(0, len(tokens), step):
        parser.feed(tokens[at:at + step])
    parse_verdict(parser.finish(), OUTPUT, "stop")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--analysis-tokens", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    decode = load_harmony_encoding().decode
    tokens = completion(args.analysis_tokens)
    one_shot = per_call_us(lambda: parse_verdict(parse_completion(tokens, decode), OUTPUT, "stop"), args.repeat)
    decode_only = per_call_us(lambda: decode(tokens[:args.analysis_tokens]), args.repeat)
    print(f"{len(tokens)} tokens; decode alone {decode_only:.0f} us")
    print(f"one-shot parse + verdict: {one_shot:.0f} us ({one_shot / len(tokens) * 1000:.0f} us per 1,000 tokens)")
    for step in (1, 4, 16):
        us = per_call_us(lambda step=step: streamed(tokens, decode, step), max(1, args.repeat // 10))
        print(f"streamed {step:>2} tokens per feed: {us:.0f} us ({us / len(tokens) * 1000:.0f} us per 1,000 tokens)")


if __name__ == "__main__":
    main()
