"""The canned executor: scripted harmony completions and no model, behind the same `Executor` interface.

Generation costs nothing, so a benchmark of the front end measures only the front end, and the front end's tests can
steer the answers: a marker token sequence in the prompt (after its policy prefix, so a policy's own words never
match) picks a script that answers, streams slowly or fails. It runs in the real Triton model
(`engine.triton.model`) from an ordinary repository, so whatever talks to it talks to the real Triton model.

Options (`EngineSettings.canned`):
    scripts  a list of `Script` fields; the first script whose marker occurs in the prompt after its prefix answers
             (an empty marker matches every prompt), and the last answers when none does
    log_dir  optional: each request is appended to requests.log (one JSON object a line) and each request that ends
             before its script does (cancelled, or left by its reader) to cancelled.log (its id); left out in
             benchmarks, where file appends would stall behind the audit log's fsyncs on the same disk

It keeps the executor contract where it has a meaning without a model: a completion stops at the first of the
request's stop tokens (included) or at its budget (finish "length"), or else at the script's end (finish "stop");
`max_tokens == 0` answers one empty final chunk, "length". Each streamed chunk is `chunk` tokens, after a pause of
`delay_s`, and cancellation is noticed before each chunk. A prefix counts as cached (all `prefix_len` tokens) once
any request has named it; the set of seen prefixes is unbounded, which suits a stub. An error script ends the
stream with finish reason "error" and its message.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from classification.render import prefix_key
from classification.tokens import VOCAB_SIZE
from engine.executors.base import BookedExecutor, GenerationChunk, GenerationRequest, RequestBook
from engine.settings import EngineSettings, SettingsError

REQUESTS_LOG = "requests.log"
CANCELLED_LOG = "cancelled.log"
_OPTIONS = ("scripts", "log_dir")

# Answers in the format of the bundled smoke policy (policies/smoke.md), for scripts that answer it plausibly.
SAFE_ANALYSIS = "The content does not mention bananas."
SAFE_FINAL = '{"violation": 0, "policy_category": null, "rule_ids": []}'
UNSAFE_ANALYSIS = "The content mentions bananas, so BN1.a applies."
UNSAFE_FINAL = '{"violation": 1, "policy_category": "BN1", "rule_ids": ["BN1.a"]}'


@dataclass(frozen=True)
class Script:
    """What the canned executor streams when `marker` occurs in the prompt after its prefix."""

    marker: Sequence[int] = ()
    completion: Sequence[int] = ()
    chunk: int = 8  # tokens per streamed chunk
    delay_s: float = 0.0  # before each chunk
    error: str = ""  # end the stream with this error instead

    def __post_init__(self) -> None:
        # Tuples, whatever sequences were given: a script is hashable and compares with its JSON round trip.
        object.__setattr__(self, "marker", tuple(self.marker))
        object.__setattr__(self, "completion", tuple(self.completion))
        if self.chunk < 1 or self.delay_s < 0:
            raise SettingsError(f"a canned script needs chunk >= 1 and delay_s >= 0, got {self.chunk}, {self.delay_s}")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> Script:
        try:
            return cls(**raw)
        except TypeError as exc:
            raise SettingsError(f"canned script: {exc}") from None

    def matches(self, ids: Sequence[int]) -> bool:
        n = len(self.marker)
        return any(tuple(ids[i:i + n]) == self.marker for i in range(len(ids) - n + 1))

    def plan(self, request: GenerationRequest) -> tuple[tuple[int, ...], str]:
        """The tokens this script answers `request` with, and the finish reason."""
        if request.max_tokens == 0:
            return (), "length"
        stops = frozenset(request.sampling.stop_token_ids)
        end = next((i + 1 for i, token in enumerate(self.completion) if token in stops), len(self.completion))
        if end > request.max_tokens:
            return self.completion[:request.max_tokens], "length"
        return self.completion[:end], "stop"


def canned_options(scripts: Sequence[Script], log_dir: Path | None = None) -> dict[str, Any]:
    """`EngineSettings.canned` for these scripts."""
    options: dict[str, Any] = {"scripts": [asdict(s) | {"marker": list(s.marker), "completion": list(s.completion)}
                                           for s in scripts]}
    if log_dir is not None:
        options["log_dir"] = str(log_dir)
    return options


def harmony_completion(encode_special: Callable[[str], list[int]], analysis: str, final: str) -> list[int]:
    """An analysis message then a final one, ended by <|return|>, as the model would write them."""
    return encode_special(f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant<|channel|>final"
                          f"<|message|>{final}<|return|>")


def read_log(log_dir: Path, name: str) -> list[str]:
    """The lines of one of the canned executor's logs so far."""
    path = Path(log_dir) / name
    return path.read_text().splitlines() if path.exists() else []


@dataclass(eq=False)
class _Job:
    cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self.cancelled.set()


@dataclass
class _Tally:
    finish: str = "cancelled"  # what a stream left before its final chunk amounts to
    generated: int = 0


class CannedExecutor(BookedExecutor):
    def __init__(self, settings: EngineSettings):
        if settings.executor != "canned":
            raise SettingsError(f"CannedExecutor needs executor 'canned', got {settings.executor!r}")
        unknown = sorted(set(settings.canned) - set(_OPTIONS))
        if unknown:
            raise SettingsError(f"unknown canned executor options: {', '.join(unknown)}")
        self.scripts = tuple(Script.from_dict(raw) for raw in settings.canned.get("scripts", ()))
        if not self.scripts:
            raise SettingsError("the canned executor needs at least one script")
        log_dir = settings.canned.get("log_dir")
        self.log_dir = Path(log_dir) if log_dir else None
        self.vocab_size = VOCAB_SIZE
        self.max_context = settings.max_context
        self._fingerprint = settings.model_fingerprint
        self._seen: set[str] = set()
        self._lock = threading.Lock()  # the seen prefixes and the log files
        self._book: RequestBook[_Job] = RequestBook("canned")

    def stats(self) -> dict[str, float]:
        counts, running = self._book.figures()
        with self._lock:
            return {**counts, "requests_running": running, "prefix_cache_entries": len(self._seen)}

    async def close(self) -> None:
        self._book.close()

    def script_for(self, request: GenerationRequest) -> Script:
        after_prefix = request.input_ids[request.prefix_len:]
        return next((s for s in self.scripts if s.matches(after_prefix)), self.scripts[-1])

    async def _stream(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        job = _Job()
        self._book.open(request.request_id, job)
        cached = self._cached_tokens(request)
        self._log(REQUESTS_LOG, json.dumps({"id": request.request_id, "prompt": len(request.input_ids),
                                            "prefix_len": request.prefix_len, "priority": request.prefix_priority,
                                            "max_tokens": request.max_tokens}))
        tally = _Tally()
        try:
            async for chunk in self._play(request, job, cached, tally):
                yield chunk
        finally:
            if tally.finish == "cancelled":
                self._log(CANCELLED_LOG, request.request_id)
            prompt = len(request.input_ids)
            self._book.done(request.request_id, job, tally.finish, prompt_tokens=prompt, prompt_tokens_cached=cached,
                            prompt_tokens_computed=prompt - cached, generated_tokens=tally.generated)

    async def _play(self, request: GenerationRequest, job: _Job, cached: int, tally: _Tally
                    ) -> AsyncIterator[GenerationChunk]:
        script = self.script_for(request)
        if script.error:
            tally.finish = "error"
            yield GenerationChunk((), cached, "error", script.error)
            return
        tokens, finish = script.plan(request)
        pieces = [tokens[i:i + script.chunk] for i in range(0, len(tokens), script.chunk)] or [()]
        for n, piece in enumerate(pieces):
            first = cached if n == 0 else None
            if script.delay_s:
                await asyncio.sleep(script.delay_s)
            if job.cancelled.is_set():
                yield GenerationChunk((), first, "cancelled")
                return
            last = n == len(pieces) - 1
            tally.generated += len(piece)
            if last:
                tally.finish = finish
            yield GenerationChunk(piece, first, finish if last else None)

    def _cached_tokens(self, request: GenerationRequest) -> int:
        if not request.prefix_len:
            return 0
        key = prefix_key(self._fingerprint, request.input_ids[:request.prefix_len])
        with self._lock:
            seen = key in self._seen
            self._seen.add(key)
        return request.prefix_len if seen else 0

    def _log(self, name: str, line: str) -> None:
        if self.log_dir is None:
            return
        with self._lock, (self.log_dir / name).open("a") as log:
            log.write(line + "\n")
