"""The serving core: a request's path from policy to verdict, independent of gRPC.

    Classifier.classify / stream / batch
      └─ PolicyBook.resolve      the policy: registry ref ("id", "id@ref") or inline text; cached, with its prefix
      └─ PromptRenderer.render   cached prefix ids + the content tokenized as ordinary text
      └─ Router.lease            the endpoint that holds this prefix (rendezvous hashing, bounded load, health)
      └─ TritonEndpoint.generate streamed tokens; the client's remaining deadline is the call's timeout
      └─ parse_verdict           the policy's output format read from the final message
      └─ AuditLog, Metrics       one record and one observation per decision

Errors leave as `limits.ServiceError` subclasses carrying a gRPC status code name and a message for a person; the
servicer maps them. Retry rule: when an endpoint is unreachable or dies mid-stream and nothing has been streamed to
the client yet, the endpoint is marked down and the request runs once more on the next candidate; after that (or
once reasoning deltas went out) the client gets UNAVAILABLE.

Policies are cached in memory: the registry costs a SQLite transaction per lookup, too slow per request. Active
versions are invalidated by the admin calls made through this process and, for changes made by other processes
(the `appliance policy` CLI), by a periodic check of the registry's active versions. Pinned versions
("id@ref") and inline policies are immutable, so they are kept in bounded LRU caches.

Readiness: the model fingerprint names the model in prefix cache keys and audit records, so nothing is served
until it is known. It comes from the Triton model config's `model_fingerprint` parameter (what actually serves,
and the only source that works when Triton runs on other hosts), else from `engine.json` in a local
`model_repository`, else from the settings. The service is ready once an endpoint answers and every active policy's
prefix is warm on the endpoint its requests go to; the prober re-warms an endpoint each time it comes back.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import sqlite3
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path

from openai_harmony import HarmonyEncoding

from classification.completion import ParsedCompletion, StreamParser, parse_completion
from classification.content import CONVERSATION_ROLES, Chat, Content, PromptResponse, Text, serialise
from classification.policy import Policy, PolicyError, PolicyRef, PolicyRefError, parse_policy
from classification.render import PromptPrefix, PromptRenderer, RenderedPrompt, content_encoder
from classification.tokens import STOP_TOKEN_IDS
from classification.verdict import Verdict, parse_verdict
from engine.settings import EngineSettings, SettingsError
from engine.triton import contract
from engine.triton.contract import FINGERPRINT_PARAMETER, MAX_CONTEXT_PARAMETER
from server.audit import AuditError, AuditLog, AuditRecord
from server.limits import (
    Admission,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    Limits,
    NotFound,
    ResourceExhausted,
    ServiceError,
    Slots,
    Unavailable,
)
from server.log import event
from server.metrics import INLINE, UNKNOWN, Metrics, Observation
from server.registry import Registry, RegistryError, StoredPolicy, VersionInfo
from server.routing import Endpoint, NoHealthyEndpoint, Router
from server.settings import ServerSettings
from server.triton.client import (
    Chunk,
    EndpointUnavailable,
    GenerateRequest,
    ModelError,
    TritonEndpoint,
    TritonError,
    TritonTimeout,
)

log = logging.getLogger("safeguard.classifier")

PINNED_CACHE = 256
INLINE_CACHE = 128
WARM_TIMEOUT_S = 60.0
# Content this long is tokenized on a worker thread so one large request cannot stall the event loop.
THREADED_TOKENIZE_CHARS = 32_768
_STOP_TOKENS = frozenset(STOP_TOKEN_IDS)


# -- the request and result, as the core sees them -------------------------------------------------------------

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


@dataclass(frozen=True)
class BatchJob:
    items: Sequence[tuple[str, Content | ServiceError, Sequence[Selector]]]  # item id, content (or why it is bad)
    effort: str | None
    include_reasoning: bool
    request_id: str
    arrival: float
    deadline: float | None


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


# -- policies ---------------------------------------------------------------------------------------------------

@dataclass
class ResolvedPolicy:
    policy: Policy
    info: PolicyInfo
    label: str  # the metrics label: the policy id, or "inline"
    prefixes: dict[str, PromptPrefix] = field(default_factory=dict)  # by reasoning effort


class _Lru(OrderedDict):
    def __init__(self, size: int):
        super().__init__()
        self.size = size

    def get_fresh(self, key: object) -> object | None:
        found = self.get(key)
        if found is not None:
            self.move_to_end(key)
        return found

    def put(self, key: object, value: object) -> None:
        self[key] = value
        self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


def _created_ms(info: VersionInfo) -> int:
    return int(datetime.fromisoformat(info.created_at.replace("Z", "+00:00")).timestamp() * 1000)


class PolicyBook:
    """Resolves selectors to policies with their prefixes, caching what the registry would answer."""

    def __init__(self, registry: Registry, limits: Limits, encode: Callable[[str], list[int]]):
        self.registry = registry
        self.limits = limits
        self._encode = encode
        self._active: dict[str, ResolvedPolicy] = {}
        self._pinned = _Lru(PINNED_CACHE)
        self._inline = _Lru(INLINE_CACHE)
        self.renderer: PromptRenderer | None = None  # set once the model fingerprint is known

    async def resolve(self, selector: Selector) -> ResolvedPolicy:
        if selector.inline_text:
            return self._resolve_inline(selector.inline_text)
        if not selector.ref.strip():
            raise InvalidArgument("no policy given: set policy.ref (\"<id>\" or \"<id>@<version>\") or "
                                  "policy.inline_text")
        ref = parse_ref(selector.ref)
        if ref.version is None:
            found = self._active.get(ref.policy_id)
            if found is None:
                found = self._active[ref.policy_id] = await self._load(ref.policy_id, None)
            return found
        pinned = self._pinned.get_fresh(ref)
        if pinned is None:
            pinned = await self._load(ref.policy_id, ref.version)
            self._pinned.put(ref, pinned)
        return pinned

    async def prefix(self, resolved: ResolvedPolicy, effort: str) -> PromptPrefix:
        found = resolved.prefixes.get(effort)
        if found is None:
            if self.renderer is None:
                raise Unavailable("the service is starting: the model fingerprint is not known yet")
            # Rendering a prefix with harmony takes milliseconds: keep it off the event loop.
            found = await asyncio.to_thread(self.renderer.prefix, resolved.policy.body, effort)
            resolved.prefixes[effort] = found
        return found

    def invalidate(self, policy_id: str) -> None:
        self._active.pop(policy_id, None)

    def cached_active(self) -> list[ResolvedPolicy]:
        return list(self._active.values())

    def is_active(self, info: PolicyInfo) -> bool:
        active = self._active.get(info.id)
        return active is not None and active.info.sha256 == info.sha256

    async def load_active(self) -> list[ResolvedPolicy]:
        """Every policy's active version, re-reading any whose activation changed since it was cached."""
        summaries = await asyncio.to_thread(self.registry.list)
        current: list[ResolvedPolicy] = []
        for summary in summaries:
            if summary.active is None:
                self._active.pop(summary.policy_id, None)
                continue
            cached = self._active.get(summary.policy_id)
            if cached is None or cached.info.sha256 != summary.active.sha256:
                cached = self._active[summary.policy_id] = await self._load(summary.policy_id, None)
            current.append(cached)
        return current

    async def stored(self, policy_id: str, ref: str | None) -> StoredPolicy:
        try:
            return await asyncio.to_thread(self.registry.get, policy_id, ref)
        except RegistryError as exc:
            raise _registry_error(exc, NotFound) from None

    def info(self, stored: StoredPolicy) -> PolicyInfo:
        tokens = len(self._encode(stored.policy.body))
        return PolicyInfo(stored.info.policy_id, stored.info.version, stored.info.sha256, stored.info.title,
                          stored.active, _created_ms(stored.info), tokens)

    async def _load(self, policy_id: str, ref: str | None) -> ResolvedPolicy:
        stored = await self.stored(policy_id, ref)
        return ResolvedPolicy(stored.policy, self.info(stored), policy_id)

    def _resolve_inline(self, text: str) -> ResolvedPolicy:
        key = hashlib.sha256(text.encode()).digest()
        found = self._inline.get_fresh(key)
        if found is None:
            try:
                policy = parse_policy(text, source="inline policy")
            except PolicyError as exc:
                raise InvalidArgument(f"the inline policy cannot be used: {'; '.join(exc.problems)}") from None
            tokens = len(self._encode(policy.body))
            self.limits.check_policy(tokens, f"{policy.id} (inline)")
            info = PolicyInfo(policy.id, policy.version, policy.sha256, policy.title, False, 0, tokens)
            found = ResolvedPolicy(policy, info, INLINE)
            self._inline.put(key, found)
        return found


def parse_ref(text: str) -> PolicyRef:
    try:
        return PolicyRef.parse(text)
    except PolicyRefError as exc:
        raise InvalidArgument(str(exc)) from None


def _registry_error(exc: RegistryError, kind: type[ServiceError]) -> ServiceError:
    """`kind` for a lookup or change the registry refused; UNAVAILABLE when the registry file itself failed."""
    if isinstance(exc.__cause__, sqlite3.Error):
        return Unavailable(f"the policy registry cannot be read: {exc}")
    return kind("; ".join(exc.problems))


# -- content ----------------------------------------------------------------------------------------------------

def check_content(content: Content) -> None:
    """Refuse content with nothing to classify, or a conversation turn with a role the prompt cannot label."""
    if isinstance(content, Text):
        if not content.text.strip():
            raise InvalidArgument("content.text is empty: there is nothing to classify")
    elif isinstance(content, PromptResponse):
        if not content.prompt.strip() and not content.response.strip():
            raise InvalidArgument("content.prompt_response has an empty prompt and an empty response")
    elif isinstance(content, Chat):
        if not content.turns:
            raise InvalidArgument("content.conversation has no turns")
        for number, turn in enumerate(content.turns, 1):
            if turn.role not in CONVERSATION_ROLES:
                raise InvalidArgument(f"content.conversation turn {number} has role {turn.role!r}; a turn's role "
                                      f"must be one of {', '.join(CONVERSATION_ROLES)}")
        if not any(turn.content.strip() for turn in content.turns):
            raise InvalidArgument("content.conversation has only empty turns")
    else:
        raise InvalidArgument("no content given: set content.text, content.prompt_response or "
                              "content.conversation")


def _content_chars(content: Content) -> int:
    if isinstance(content, Text):
        return len(content.text)
    if isinstance(content, PromptResponse):
        return len(content.prompt) + len(content.response)
    return sum(len(turn.content) for turn in content.turns)


# -- the model behind Triton ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelInfo:
    fingerprint: str
    max_context: int | None  # prompt plus generated tokens; None when Triton does not say


async def discover_model(endpoint: TritonEndpoint, settings: ServerSettings) -> ModelInfo | None:
    """What the endpoint serves (see the module docstring for the sources, in order); None when nothing says."""
    params = await endpoint.parameters()
    context = params.get(MAX_CONTEXT_PARAMETER, "")
    if params.get(FINGERPRINT_PARAMETER):
        return ModelInfo(params[FINGERPRINT_PARAMETER], int(context) if context.isdigit() else None)
    engine = _local_engine_settings(settings)
    if engine is not None:
        return ModelInfo(engine.model_fingerprint, engine.max_context)
    return ModelInfo(settings.model_fingerprint, None) if settings.model_fingerprint else None


def _local_engine_settings(settings: ServerSettings) -> EngineSettings | None:
    if not settings.model_repository:
        return None
    path = contract.version_dir(Path(settings.model_repository).expanduser(), settings.triton_model)
    try:
        return EngineSettings.load(path)
    except SettingsError as exc:
        event(log, logging.WARNING, "cannot read the model repository's engine settings", error=str(exc))
        return None


# -- the core -----------------------------------------------------------------------------------------------------

@dataclass
class _Attempt:
    """What one call to an endpoint produced."""

    tokens: list[int] = field(default_factory=list)
    parsed: ParsedCompletion | None = None
    cached_tokens: int = 0
    finish_reason: str = "error"
    sent: float = 0.0
    first_token: float | None = None
    verdict_at: float | None = None
    streamed: bool = False  # reasoning text went to the client, so the request can no longer move elsewhere


class Classifier:
    """Classifies content against policies over a set of Triton endpoints; see the module docstring."""

    def __init__(self, settings: ServerSettings, registry: Registry, audit: AuditLog, metrics: Metrics,
                 encoding: HarmonyEncoding):
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.encoding = encoding
        self.limits = Limits(settings.max_content_tokens, settings.max_policy_tokens, settings.max_batch_items)
        self.admission = Admission(settings.max_in_flight, metrics.in_flight)
        self._encode = content_encoder(encoding)
        self.policies = PolicyBook(registry, self.limits, self._encode)
        self.endpoints: dict[str, TritonEndpoint] = {}  # opened by start(): a grpc.aio channel belongs to a loop
        self.router = Router([Endpoint(address, address) for address in settings.triton_endpoints])
        self.model: ModelInfo | None = None
        self._framing_tokens = 0
        self._healthy: dict[str, bool] = {}
        self._warm: set[tuple[str, str]] = set()  # (endpoint, prefix key) warmed since the endpoint came up
        self._tasks: list[asyncio.Task] = []
        self._ready = False
        self.on_readiness: Callable[[bool], Awaitable[None]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Probe the endpoints once (so a healthy deployment is ready when this returns), then keep probing."""
        self.endpoints = {address: TritonEndpoint(address, self.settings.triton_model)
                          for address in self.settings.triton_endpoints}
        await self._probe_all()
        self._tasks = [asyncio.create_task(self._probe_loop(), name="probe-endpoints"),
                       asyncio.create_task(self._refresh_loop(), name="refresh-policies")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        for endpoint in self.endpoints.values():
            await endpoint.close()

    @property
    def ready(self) -> bool:
        return self._ready

    # -- classification -------------------------------------------------------------------------------------------

    async def classify(self, job: ClassifyJob) -> Classification:
        with self._admit(1):
            return await self._classify(job, None)

    async def stream(self, job: ClassifyJob) -> AsyncIterator[ReasoningText | Classification]:
        """Reasoning deltas as the model writes them, then the classification."""
        queue: asyncio.Queue[ReasoningText | Classification | Exception] = asyncio.Queue()

        async def produce() -> None:
            try:
                queue.put_nowait(await self._classify(job, queue.put_nowait))
            except Exception as exc:
                queue.put_nowait(exc)

        with self._admit(1):
            task = asyncio.create_task(produce())
            try:
                while True:
                    item = await queue.get()
                    if isinstance(item, Exception):
                        raise item
                    yield item
                    if isinstance(item, Classification):
                        return
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    async def batch(self, job: BatchJob) -> AsyncIterator[BatchOutcome]:
        """Each (item, policy) pair classified on its own; outcomes in the order they finish."""
        self.limits.check_batch(len(job.items))
        work = [(item_id, content, selector) for item_id, content, selectors in job.items
                for selector in (selectors or (None,))]
        concurrency = min(len(work), self.settings.batch_concurrency)
        with self._admit(concurrency):
            gate = asyncio.Semaphore(concurrency)
            tasks = [asyncio.create_task(self._batch_item(job, item_id, content, selector, gate))
                     for item_id, content, selector in work]
            try:
                for next_done in asyncio.as_completed(tasks):
                    yield await next_done
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _admit(self, slots: int) -> Slots:
        try:
            return self.admission.acquire(slots)
        except ResourceExhausted:
            self.metrics.failed(UNKNOWN, "resource_exhausted")
            raise

    async def _batch_item(self, batch: BatchJob, item_id: str, content: Content | ServiceError,
                          selector: Selector | None, gate: asyncio.Semaphore) -> BatchOutcome:
        ref = selector.label() if selector is not None else ""
        if selector is None:
            return BatchOutcome(item_id, ref, error=InvalidArgument(
                "no policy for this item: set the batch's policies or the item's own"))
        if isinstance(content, ServiceError):
            return BatchOutcome(item_id, ref, error=content)
        job = ClassifyJob(selector, content, batch.effort, batch.include_reasoning,
                          f"{batch.request_id}/{item_id}", batch.arrival, batch.deadline)
        async with gate:
            try:
                return BatchOutcome(item_id, ref, result=await self._classify(job, None))
            except ServiceError as exc:
                return BatchOutcome(item_id, ref, error=exc)
            except Exception as exc:  # one item's bug must not fail the batch; the log has the traceback
                log.exception("batch item failed", extra={"fields": {"item_id": item_id}})
                return BatchOutcome(item_id, ref, error=Internal(f"internal error ({type(exc).__name__}); the "
                                                                 f"server log has the details under request "
                                                                 f"{job.request_id}"))

    async def _classify(self, job: ClassifyJob, sink: Callable[[ReasoningText], None] | None) -> Classification:
        label = UNKNOWN
        try:
            resolved = await self.policies.resolve(job.selector)
            label = resolved.label
            result = await self._run(job, resolved, sink)
        except ServiceError as exc:
            self.metrics.failed(label, exc.code.lower())
            raise
        except asyncio.CancelledError:
            self.metrics.failed(label, "cancelled")
            raise
        self.admission.record_duration(result.timings.total_ms)
        return result

    async def _run(self, job: ClassifyJob, resolved: ResolvedPolicy,
                   sink: Callable[[ReasoningText], None] | None) -> Classification:
        check_content(job.content)
        model = self._require_model()
        effort = job.effort or resolved.policy.reasoning_effort
        prefix = await self.policies.prefix(resolved, effort)
        rendered = await self._render(prefix, job.content)
        max_tokens = self._budget(len(rendered.ids))
        request = GenerateRequest(rendered.ids, max_tokens, rendered.prefix_len, self.settings.prefix_priority,
                                  job.request_id)
        attempt = await self._generate(job, request, rendered.prefix_key, sink)
        parsed = attempt.parsed or parse_completion(attempt.tokens, self.encoding.decode)
        verdict = parse_verdict(parsed, resolved.policy.output, attempt.finish_reason)
        usage = Usage(len(rendered.ids), attempt.cached_tokens, _reasoning_tokens(parsed), parsed.token_count)
        record = self._audit_record(job, resolved, model, verdict, usage)
        await self._record(record)
        done = time.perf_counter()
        timings = Timings(_ms(attempt.sent - job.arrival), _ms((attempt.first_token or done) - job.arrival),
                          _ms((attempt.verdict_at or done) - job.arrival), _ms(done - job.arrival))
        self._observe(resolved, verdict, usage, timings)
        return Classification(job.request_id, verdict, verdict.analysis if job.include_reasoning else "",
                              self._reported_info(resolved), usage, timings, model.fingerprint,
                              attempt.finish_reason)

    def _require_model(self) -> ModelInfo:
        if self.model is None or self.policies.renderer is None:
            raise Unavailable("the service is not ready: no Triton endpoint has answered yet",
                              retry_after_ms=int(self.settings.health_interval_s * 1000))
        return self.model

    async def _render(self, prefix: PromptPrefix, content: Content) -> RenderedPrompt:
        renderer = self.policies.renderer
        assert renderer is not None  # _require_model checked it
        # Tokenizing a long text takes milliseconds: a worker thread keeps one request from stalling the others.
        if _content_chars(content) > THREADED_TOKENIZE_CHARS:
            rendered = await asyncio.to_thread(renderer.render, prefix, content)
        else:
            rendered = renderer.render(prefix, content)
        self.limits.check_content(len(rendered.ids) - rendered.prefix_len - self._framing_tokens)
        return rendered

    def _budget(self, prompt_tokens: int) -> int:
        context = self.model.max_context if self.model else None
        if context is None:
            return self.settings.max_output_tokens
        room = context - prompt_tokens
        if room < 1:
            raise InvalidArgument(f"the prompt is {prompt_tokens:,} tokens (policy and content); the model's context "
                                  f"holds {context:,} with room to answer: shorten the content")
        return min(room, self.settings.max_output_tokens)

    def _timeout(self, job: ClassifyJob) -> float:
        if job.deadline is None:
            return self.settings.default_timeout_s
        remaining = job.deadline - time.monotonic()
        if remaining <= 0:
            raise DeadlineExceeded("the request's deadline passed before the model was asked")
        return remaining

    async def _generate(self, job: ClassifyJob, request: GenerateRequest, key: str,
                        sink: Callable[[ReasoningText], None] | None, *, retried: bool = False) -> _Attempt:
        """Stream one generation; if the endpoint is unreachable or dies before anything reached the client, mark
        it down and run once more on the next candidate."""
        retry_ms = int(self.settings.health_interval_s * 1000)
        try:
            with self.router.lease(key) as endpoint:
                attempt = _Attempt(sent=time.perf_counter())
                try:
                    await self._stream_from(endpoint, request, self._timeout(job), attempt, sink)
                except EndpointUnavailable as exc:
                    self._endpoint_failed(endpoint, exc)
                    if attempt.streamed or retried:
                        raise Unavailable(f"the model server failed during the request ({exc.message}); retry",
                                          retry_after_ms=retry_ms) from None
                    event(log, logging.WARNING, "endpoint failed; retrying on the next one", endpoint=endpoint.url,
                          error=exc.message)
                except TritonTimeout:
                    raise DeadlineExceeded("the deadline passed while the model was answering") from None
                except ModelError as exc:
                    raise Internal(f"the model failed this request: {exc.message}") from None
                else:
                    self.router.mark_success(endpoint)
                    return attempt
        except NoHealthyEndpoint as exc:
            raise Unavailable(f"{exc}; retry once Triton is back", retry_after_ms=retry_ms) from None
        return await self._generate(job, request, key, sink, retried=True)

    async def _stream_from(self, endpoint: Endpoint, request: GenerateRequest, timeout: float, attempt: _Attempt,
                           sink: Callable[[ReasoningText], None] | None) -> None:
        # Only a streaming client needs the incremental parser; otherwise the completion is parsed once at the end.
        parser = StreamParser(self.encoding.decode) if sink is not None else None
        async with contextlib.aclosing(self.endpoints[endpoint.url].generate(request, timeout)) as chunks:
            async for chunk in chunks:
                _take(attempt, chunk, parser, sink)
        if parser is not None:
            attempt.parsed = parser.finish()

    def _endpoint_failed(self, endpoint: Endpoint, exc: TritonError) -> None:
        self.router.mark_failure(endpoint, connection_error=True)
        self.metrics.endpoint_failures.labels(endpoint.url).inc()
        # A server that dropped a connection may have restarted with an empty cache: warm it again when it is back.
        self._forget_warm(endpoint.url)

    def _forget_warm(self, url: str) -> None:
        self._warm = {(u, key) for u, key in self._warm if u != url}

    def _audit_record(self, job: ClassifyJob, resolved: ResolvedPolicy, model: ModelInfo, verdict: Verdict,
                      usage: Usage) -> AuditRecord:
        p = resolved.info
        return AuditRecord(job.request_id, p.id, p.version, p.sha256, model.fingerprint, verdict.violation,
                           verdict.status, serialise(job.content), verdict.category, verdict.rule_ids,
                           verdict.confidence, verdict.rationale, usage.prompt_tokens, usage.cached_prompt_tokens,
                           usage.reasoning_tokens, usage.output_tokens, _ms(time.perf_counter() - job.arrival))

    async def _record(self, record: AuditRecord) -> None:
        """Audit the decision; with `audit_wait` the answer waits until the record is on disk."""
        try:
            future = self.audit.submit(record)
            if self.settings.audit_wait:
                await asyncio.wrap_future(future)
            else:
                future.add_done_callback(_log_audit_failure)
        except AuditError as exc:
            raise Unavailable(f"the decision could not be audited, so it is not returned: {exc}") from None

    def _observe(self, resolved: ResolvedPolicy, verdict: Verdict, usage: Usage, timings: Timings) -> None:
        self.metrics.observe(Observation(
            resolved.label, timings.queue_ms / 1000, timings.time_to_first_token_ms / 1000,
            timings.time_to_verdict_ms / 1000, timings.total_ms / 1000, usage.prompt_tokens,
            usage.cached_prompt_tokens, usage.reasoning_tokens, usage.output_tokens, verdict.status,
            verdict.violation, verdict.category))

    def _reported_info(self, resolved: ResolvedPolicy) -> PolicyInfo:
        # A pinned version's activity changes over time; the cached info is as of when it was loaded.
        active = resolved.label != INLINE and self.policies.is_active(resolved.info)
        return resolved.info if active == resolved.info.active else replace(resolved.info, active=active)

    # -- policy administration ----------------------------------------------------------------------------------

    async def put_policy(self, text: str, activate: bool) -> PolicyInfo:
        try:
            policy = parse_policy(text, source="policy")
        except PolicyError as exc:
            raise InvalidArgument(f"the policy cannot be used: {'; '.join(exc.problems)}") from None
        self.limits.check_policy(len(self._encode(policy.body)), policy.id)
        try:
            result = await asyncio.to_thread(self.policies.registry.add, policy, activate=activate)
        except RegistryError as exc:
            raise _registry_error(exc, FailedPrecondition) from None
        if result.activated:
            await self._activated(policy.id)
        return await self.get_policy_info(policy.id, result.info.sha256)

    async def get_policy(self, ref: str) -> tuple[PolicyInfo, str]:
        parsed = parse_ref(ref)
        stored = await self.policies.stored(parsed.policy_id, parsed.version)
        return self.policies.info(stored), stored.policy.text

    async def get_policy_info(self, policy_id: str, ref: str | None) -> PolicyInfo:
        return self.policies.info(await self.policies.stored(policy_id, ref))

    async def list_policies(self) -> list[PolicyInfo]:
        try:
            summaries = await asyncio.to_thread(self.policies.registry.list)
        except RegistryError as exc:
            raise _registry_error(exc, FailedPrecondition) from None
        return [await self.get_policy_info(s.policy_id, (s.active or s.latest).sha256) for s in summaries]

    async def activate_policy(self, policy_id: str, ref: str) -> PolicyInfo:
        await self._require_policy(policy_id)
        if not ref.strip():
            raise InvalidArgument(f"name the version of {policy_id} to activate (a version label or sha256)")
        try:
            result = await asyncio.to_thread(self.policies.registry.activate, policy_id, ref.strip())
        except RegistryError as exc:
            raise _registry_error(exc, NotFound) from None
        await self._activated(policy_id)
        return await self.get_policy_info(policy_id, result.active.sha256)

    async def rollback_policy(self, policy_id: str) -> PolicyInfo:
        await self._require_policy(policy_id)
        try:
            result = await asyncio.to_thread(self.policies.registry.rollback, policy_id)
        except RegistryError as exc:
            raise _registry_error(exc, FailedPrecondition) from None
        await self._activated(policy_id)
        return await self.get_policy_info(policy_id, result.active.sha256)

    async def _require_policy(self, policy_id: str) -> None:
        try:
            known = [s.policy_id for s in await asyncio.to_thread(self.policies.registry.list)]
        except RegistryError as exc:
            raise _registry_error(exc, FailedPrecondition) from None
        if policy_id not in known:
            names = ", ".join(known) if known else "none are registered yet"
            raise NotFound(f"unknown policy {policy_id!r}; known policies: {names}")

    async def _activated(self, policy_id: str) -> None:
        """A new active version: drop the cached one and warm the new prefix where its requests will go."""
        self.policies.invalidate(policy_id)
        if self.policies.renderer is None:
            return  # not serving yet; the prober warms every active policy once an endpoint answers
        resolved = await self.policies.resolve(Selector(ref=policy_id))
        await self._warm_policy(resolved)

    # -- warming, probing, readiness ----------------------------------------------------------------------------

    async def _warm_policy(self, resolved: ResolvedPolicy) -> None:
        """Prefill the policy's default-effort prefix on its endpoint, at high retention priority."""
        prefix = await self.policies.prefix(resolved, resolved.policy.reasoning_effort)
        try:
            endpoint = self.router.candidates(prefix.key)[0]
        except NoHealthyEndpoint:
            return
        if (endpoint.url, prefix.key) in self._warm:
            return
        request = GenerateRequest(prefix.ids, 0, len(prefix.ids), self.settings.prefix_priority,
                                  f"warm-{resolved.info.id}-{resolved.info.sha256[:12]}")
        try:
            async with contextlib.aclosing(self.endpoints[endpoint.url].generate(request, WARM_TIMEOUT_S)) as chunks:
                async for _ in chunks:
                    pass
        except ModelError as exc:
            # The model refuses this prefix (too long for its context, say): retrying cannot help, and one bad
            # policy must not hold the whole service NOT_SERVING. Its requests will fail with the same message.
            self.metrics.warmups.labels("refused").inc()
            event(log, logging.ERROR, "the model refused to warm a policy prefix", policy=resolved.info.id,
                  endpoint=endpoint.url, error=exc.message)
            self._warm.add((endpoint.url, prefix.key))
            return
        except TritonError as exc:
            self.metrics.warmups.labels("failed").inc()
            event(log, logging.WARNING, "warming a policy prefix failed", policy=resolved.info.id,
                  endpoint=endpoint.url, error=exc.message)
            if isinstance(exc, EndpointUnavailable):
                self._endpoint_failed(endpoint, exc)
            return
        self.metrics.warmups.labels("ok").inc()
        self._warm.add((endpoint.url, prefix.key))
        event(log, logging.INFO, "policy prefix warm", policy=resolved.info.id, version=resolved.info.version,
              endpoint=endpoint.url, prefix_tokens=len(prefix.ids))

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.health_interval_s)
            try:
                await self._probe_all()
            except Exception:  # the prober must outlive any one failure
                log.exception("endpoint probe failed")

    async def _refresh_loop(self) -> None:
        """Pick up activations made by other processes (the CLI), and warm what they activated."""
        while True:
            await asyncio.sleep(self.settings.policy_refresh_s)
            try:
                await self._warm_active()
                await self._set_ready()
            except Exception:
                log.exception("policy refresh failed")

    async def _probe_all(self) -> None:
        came_up = await asyncio.gather(*(self._probe(url, endpoint) for url, endpoint in self.endpoints.items()))
        if any(came_up) or not self._ready:
            await self._warm_active()
        await self._set_ready()

    async def _probe(self, url: str, endpoint: TritonEndpoint) -> bool:
        """Probe one endpoint and tell the router when its health changes; True when it just came up."""
        was_healthy = self._healthy.get(url, False)
        healthy = await endpoint.ready()
        if healthy and not was_healthy:
            healthy = await self._learn_model(endpoint)  # a restarted endpoint may serve another model now
        if healthy == self._healthy.get(url):
            return False
        self._healthy[url] = healthy
        self.router.set_health(Endpoint(url, url), healthy)
        self.metrics.endpoint_healthy.labels(url).set(1 if healthy else 0)
        if not healthy:
            self._forget_warm(url)
        event(log, logging.INFO if healthy else logging.WARNING,
              "Triton endpoint is up" if healthy else "Triton endpoint is down", endpoint=url)
        return healthy

    async def _learn_model(self, endpoint: TritonEndpoint) -> bool:
        """Check (or, the first time, learn) what model the endpoint serves; False when it cannot be used."""
        try:
            info = await discover_model(endpoint, self.settings)
        except TritonError:
            return False
        if info is None:
            event(log, logging.ERROR, "the endpoint does not say which model it serves: add a model_fingerprint "
                  "parameter to its config.pbtxt, or set model_repository or model_fingerprint",
                  endpoint=endpoint.address)
            return False
        if self.model is None:
            self.model = info
            self.policies.renderer = PromptRenderer(self.encoding, info.fingerprint,
                                                    encode_ordinary=self._encode)
            self._framing_tokens = len(self.policies.renderer.render(PromptPrefix((), "", ""), Text("")).ids)
            event(log, logging.INFO, "serving model", fingerprint=info.fingerprint, max_context=info.max_context)
        elif info.fingerprint != self.model.fingerprint:
            event(log, logging.ERROR, "the endpoint serves a different model from the others; not using it",
                  endpoint=endpoint.address, fingerprint=info.fingerprint, expected=self.model.fingerprint)
            return False
        return True

    async def _warm_active(self) -> None:
        if self.policies.renderer is None or not any(self._healthy.values()):
            return
        try:
            active = await self.policies.load_active()
        except (ServiceError, RegistryError) as exc:
            event(log, logging.WARNING, "cannot read the active policies", error=str(exc))
            return
        for resolved in active:
            await self._warm_policy(resolved)

    async def _set_ready(self) -> None:
        ready = self.policies.renderer is not None and any(self._healthy.values()) and self._all_warm()
        if ready != self._ready:
            self._ready = ready
            event(log, logging.INFO, "ready" if ready else "not ready")
            if self.on_readiness is not None:
                await self.on_readiness(ready)

    def _all_warm(self) -> bool:
        for resolved in self.policies.cached_active():
            prefix = resolved.prefixes.get(resolved.policy.reasoning_effort)
            try:
                endpoint = self.router.candidates(prefix.key)[0] if prefix else None
            except NoHealthyEndpoint:
                return False
            if endpoint is None or (endpoint.url, prefix.key) not in self._warm:
                return False
        return True


def _take(attempt: _Attempt, chunk: Chunk, parser: StreamParser | None,
          sink: Callable[[ReasoningText], None] | None) -> None:
    """Fold one streamed response into the attempt, passing new reasoning text to the sink."""
    now = time.perf_counter()
    tokens = chunk.token_ids
    if chunk.cached_tokens is not None:
        attempt.cached_tokens = chunk.cached_tokens
    if chunk.finish_reason:
        attempt.finish_reason = chunk.finish_reason
    if not tokens:
        if chunk.final and attempt.verdict_at is None:
            attempt.verdict_at = now
        return
    if attempt.first_token is None:
        attempt.first_token = now
    attempt.tokens.extend(tokens)
    if attempt.verdict_at is None and (chunk.final or not _STOP_TOKENS.isdisjoint(tokens)):
        attempt.verdict_at = now
    if parser is None or sink is None:
        return
    for delta in parser.feed(tokens):
        if delta.channel == "analysis":
            sink(ReasoningText(delta.text))
            attempt.streamed = True


def _reasoning_tokens(parsed: ParsedCompletion) -> int:
    return sum(m.end - m.start for m in parsed.messages if m.role == "assistant" and m.channel == "analysis")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _log_audit_failure(future: Future[int]) -> None:
    exc = future.exception()
    if exc is not None:
        event(log, logging.ERROR, "an answered decision could not be audited", error=str(exc))

