"""The pieces of the GPU report: one item's verdict, token-sequence comparison, the time budget and progress lines.

Every check the GPU report makes (`engine.gpu.gpu_report`) ends as an `Item`: passed, failed, or skipped with the
reason it could not run here ("no CUDA device", "tensorrt_llm not importable", "time budget"). The report fails when
any item failed, never because one was skipped, so the same run is meaningful on a CPU-only box and on a GPU host.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Any, TextIO

PASSED, FAILED, SKIPPED = "passed", "failed", "skipped"
STATUSES = (PASSED, FAILED, SKIPPED)


@dataclass
class Item:
    section: str  # "checkpoint", "reference", "reference/cuda", "trtllm", "vllm"
    name: str
    status: str
    detail: str  # what was seen, or why it was skipped
    seconds: float = 0.0
    data: dict[str, Any] = field(default_factory=dict)  # the figures behind the verdict, JSON-ready

    def to_dict(self) -> dict[str, Any]:
        return {"section": self.section, "name": self.name, "status": self.status, "detail": self.detail,
                "seconds": round(self.seconds, 3), "data": self.data}


def passed(section: str, name: str, detail: str, **data: Any) -> Item:
    return Item(section, name, PASSED, detail, data=data)


def failed(section: str, name: str, detail: str, **data: Any) -> Item:
    return Item(section, name, FAILED, detail, data=data)


def skipped(section: str, name: str, reason: str) -> Item:
    return Item(section, name, SKIPPED, reason)


def verdict(ok: bool) -> str:
    return PASSED if ok else FAILED


@dataclass(frozen=True)
class Agreement:
    """How far two token sequences agree."""

    identical: bool
    first_divergence: int | None  # index of the first differing token (or where the shorter one ends)
    agreeing: int  # tokens equal before the first divergence
    length: int  # of the longer sequence

    def describe(self) -> str:
        if self.identical:
            return f"all {self.length} tokens identical"
        return f"first {self.agreeing} of {self.length} tokens identical, first divergence at index " \
               f"{self.first_divergence}"

    def to_dict(self) -> dict[str, Any]:
        return {"identical": self.identical, "first_divergence": self.first_divergence, "agreeing": self.agreeing,
                "length": self.length}


def compare_tokens(a: tuple[int, ...], b: tuple[int, ...]) -> Agreement:
    same = next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))
    identical = a == b
    return Agreement(identical, None if identical else same, same, max(len(a), len(b)))


class Budget:
    """Wall-clock time left for the whole run; a stage that would not fit is skipped, saying so."""

    def __init__(self, total_seconds: float):
        self.total = total_seconds
        self.started = time.perf_counter()

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def left(self) -> float:
        return self.total - self.elapsed()

    def shortfall(self, needs: float) -> str | None:
        """None when a stage needing about `needs` seconds fits, else the reason to skip it."""
        left = self.left()
        if left >= needs:
            return None
        return f"time budget: {max(left, 0):.0f} s left of {self.total:.0f} s, this stage needs about {needs:.0f} s"


class Progress:
    """Stage names with the elapsed time, printed as they start and end, since a full run takes minutes."""

    def __init__(self, budget: Budget, out: TextIO | None = None):
        self.budget = budget
        self.out = out
        self.stages: list[dict[str, Any]] = []

    def say(self, text: str) -> None:
        print(f"[{self.budget.elapsed():6.1f} s] {text}", file=self.out or sys.stdout, flush=True)

    def stage(self, name: str) -> _Stage:
        return _Stage(self, name)


class _Stage:
    def __init__(self, progress: Progress, name: str):
        self.progress, self.name = progress, name

    def __enter__(self) -> _Stage:
        self.started = time.perf_counter()
        self.progress.say(f"{self.name} ...")
        return self

    def __exit__(self, *exc: object) -> None:
        seconds = time.perf_counter() - self.started
        self.progress.stages.append({"name": self.name, "seconds": round(seconds, 2)})
        self.progress.say(f"{self.name}: {seconds:.1f} s")
