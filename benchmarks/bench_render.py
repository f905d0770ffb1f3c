"""Prompt rendering cost: a request with a cached policy prefix and 2,000 characters of content (target: under
200 µs), and rendering a ~600-token policy prefix from scratch (done once per policy version, effort and model).

    python -m benchmarks.bench_render
"""

from __future__ import annotations

import statistics
import time

from classification.content import Text
from classification.library import bundled_policies, library_dir
from classification.policy import load_policy
from classification.render import PromptRenderer, prefix_ids
from classification.vocab import load_harmony_encoding


def _timed(fn, items) -> list[float]:
    out = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        out.append((time.perf_counter() - start) * 1e6)
    return out


def _report(label: str, micros: list[float]) -> None:
    micros = sorted(micros)
    p99 = micros[int(len(micros) * 0.99) - 1]
    print(f"{label:<48} median {statistics.median(micros):8.1f} µs   p99 {p99:8.1f} µs   (n={len(micros)})")


def main() -> None:
    encoding = load_harmony_encoding()
    renderer = PromptRenderer(encoding, model_fingerprint="bench")
    policy = min((load_policy(p) for p in bundled_policies()),
                 key=lambda p: abs(len(encoding.encode(p.body, disallowed_special=())) - 600))
    tokens = len(encoding.encode(policy.body, disallowed_special=()))
    prefix = renderer.prefix(policy.body, "medium")
    # Distinct realistic texts, so no tokenizer cache can flatter the figure.
    corpus = " ".join(p.read_text() for p in sorted(library_dir().glob("*.md")))
    contents = [Text(corpus[(i * 97) % (len(corpus) - 2000):][:2000]) for i in range(2000)]
    renderer.render(prefix, contents[0])
    print(f"policy {policy.id}: {tokens} tokens, prefix {len(prefix.ids)} tokens; content 2,000 characters")
    _report("render request (cached prefix + content)", _timed(lambda c: renderer.render(prefix, c), contents))
    _report("render policy prefix from scratch", _timed(lambda _: prefix_ids(encoding, policy.body, "medium"),
                                                        range(300)))


if __name__ == "__main__":
    main()
