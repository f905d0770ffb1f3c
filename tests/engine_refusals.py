"""Requests the engine executors (TensorRT-LLM, vLLM) refuse before any stream exists, with a word the message must
carry: the shared validation of engine/executors/base.py, plus the free position a prefill-only request needs
because both engines always generate a token. Both executors' tests run this one table."""

from engine.executors.base import SamplingParams

REFUSED_BEFORE_STREAMING = [
    ({"input_ids": ()}, "empty"),
    ({"input_ids": (201088,)}, "outside the vocabulary"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 8192}, "context limit"),
    ({"prefix_len": 101}, "prefix_len"),
    ({"prefix_priority": 101}, "prefix_priority"),
    ({"sampling": SamplingParams(temperature=float("nan"))}, "finite"),
    ({"sampling": SamplingParams(seed=2**64)}, "seed"),
    ({"input_ids": (1,) * 8192, "max_tokens": 0, "prefix_len": 0}, "one free position"),
]
