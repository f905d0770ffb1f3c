"""What the serving core is asked and what it answers: the servicer builds the jobs from protos and turns the
results back into protos; nothing here knows about gRPC."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from classification.content import Content
from classification.verdict import Verdict
from server.errors import ServiceError
from server.identity import ANONYMOUS, Identity


@dataclass(frozen=True)
class Selector:
    """Which policy: a registry `ref` ("id" or "id@version-or-sha") or a whole policy file inline."""

    ref: str = ""
    inline_text: str = ""

    def label(self) -> str:
        """How a batch result names the selector it answers."""
        if self.inline_text:
            return f"inline:{hashlib.sha256(self.inline_text.encode()).hexdigest()[:12]}"
        return self.ref


@dataclass(frozen=True)
class ClassifyJob:
    selector: Selector
    content: Content
    effort: str | None  # None: the policy's default
    include_reasoning: bool
    request_id: str
    arrival: float  # time.perf_counter() when the request arrived
    deadline: float | None  # time.monotonic() by which the answer is due; None: the settings' default
    identity: Identity = ANONYMOUS  # who asked: the tenant whose policies it may use, and its limits


@dataclass(frozen=True)
class BatchJob:
    items: Sequence[tuple[str, Content | ServiceError, Sequence[Selector]]]  # item id, content (or why it is bad)
    effort: str | None
    include_reasoning: bool
    request_id: str
    arrival: float
    deadline: float | None
    identity: Identity = ANONYMOUS


@dataclass(frozen=True)
class PolicyInfo:
    id: str
    version: str
    sha256: str
    title: str
    active: bool
    created_unix_ms: int
    tokens: int


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    cached_prompt_tokens: int
    reasoning_tokens: int
    output_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    time_to_first_token_ms: float
    time_to_verdict_ms: float
    total_ms: float


@dataclass(frozen=True)
class Classification:
    request_id: str
    verdict: Verdict
    reasoning: str  # empty unless asked for
    policy: PolicyInfo
    usage: Usage
    timings: Timings
    model_fingerprint: str
    finish_reason: str


@dataclass(frozen=True)
class ReasoningText:
    """A piece of the analysis channel, as ClassifyStream sends it."""

    text: str


@dataclass(frozen=True)
class BatchOutcome:
    item_id: str
    policy_ref: str
    result: Classification | None = None
    error: ServiceError | None = None
