"""The serving core: a request's path from policy to verdict, independent of gRPC.

    Classifier.classify / stream / batch
      └─ PolicyBook.resolve      the policy: registry ref ("id", "id@ref") or inline text; cached, with its prefix
      └─ PromptRenderer.render   cached prefix ids + the content tokenized as ordinary text
      └─ Generator.generate      Router.lease picks the endpoint that holds this prefix (rendezvous hashing,
                                 bounded load, health), TritonEndpoint.generate streams tokens; retried once
      └─ parse_verdict           the policy's output format read from the final message
      └─ AuditLog, Metrics       one record and one observation per decision

Around the path: `server/readiness.py` probes the endpoints, learns the model and warms policy prefixes (nothing
is served until the model is known), and `server/policy_admin.py` changes the registry through this process.
Errors leave as `errors.ServiceError` subclasses carrying a gRPC status code name and a message for a person; the
servicer maps them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import replace

from openai_harmony import HarmonyEncoding

from classification.completion import ParsedCompletion, parse_completion
from classification.content import Content, serialise
from classification.normalise import normalise_content
from classification.render import PromptPrefix, RenderedPrompt, content_encoder
from classification.verdict import Verdict, parse_verdict
from server.audit import AuditLog, AuditRecord
from server.audit_file import AuditError
from server.batch_plan import BatchPlan, BatchRefused, PlannedPrompt, plan_batch
from server.content_checks import check_content, content_chars
from server.errors import DeadlineExceeded, Internal, InvalidArgument, ServiceError, Unavailable
from server.generation import Generator
from server.identity import ANONYMOUS, Identity
from server.jobs import (
    BatchJob,
    BatchOutcome,
    Classification,
    ClassifyJob,
    PolicyInfo,
    ReasoningText,
    Timings,
    Usage,
)
from server.limits import Admission, Limits, Refused, Slots
from server.log import event
from server.metrics import INLINE, UNKNOWN, Metrics, Observation
from server.model_discovery import ModelInfo
from server.policy_admin import PolicyAdmin
from server.policy_book import PolicyBook, ResolvedPolicy
from server.rate_limit import TenantRateLimiter
from server.readiness import Readiness
from server.registry import Registry
from server.routing import Endpoint, Router
from server.settings import ServerSettings
from server.triton.client import GenerateRequest, TritonEndpoint

log = logging.getLogger("safeguard.classifier")

# Content this long is tokenized on a worker thread so one large request cannot stall the event loop.
THREADED_TOKENIZE_CHARS = 32_768
# A batch ends this long (or a tenth of the time left, if less) before its client's deadline, so the client reads
# the items cut short instead of losing the whole stream to its own timeout.
BATCH_DEADLINE_MARGIN_S = 0.25


class Classifier:
    """Classifies content against policies over a set of Triton endpoints; see the module docstring."""

    def __init__(self, settings: ServerSettings, registry: Registry, audit: AuditLog, metrics: Metrics,
                 encoding: HarmonyEncoding):
        self.settings = settings
        self.metrics = metrics
        self.audit = audit
        self.encoding = encoding
        self.limits = Limits(settings.max_content_tokens, settings.max_policy_tokens, settings.max_batch_items,
                             settings.max_batch_prompts, settings.max_batch_policies, settings.max_item_policies)
        self.admission = Admission(settings.max_in_flight, metrics.in_flight,
                                   tenant_share=settings.tenant_in_flight_share,
                                   batch_share=settings.batch_in_flight_share)
        self.rate = TenantRateLimiter(settings.tenant_rate, settings.tenant_burst)
        self._encode = content_encoder(encoding)
        self.policies = PolicyBook(registry, self.limits, self._encode)
        self.endpoints: dict[str, TritonEndpoint] = {}  # opened by start(): a grpc.aio channel belongs to a loop
        self.router = Router([Endpoint(address, address) for address in settings.triton_endpoints])
        self.readiness = Readiness(settings, self.router, self.endpoints, self.policies, metrics, encoding,
                                   self._encode, self._readiness_changed)
        self.generator = Generator(settings, self.router, self.endpoints, encoding.decode,
                                   self.readiness.endpoint_failed)
        self.admin = PolicyAdmin(self.policies, self.limits, self._encode, self.readiness.warm_policy)
        self.on_readiness: Callable[[bool], Awaitable[None]] | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the endpoints and probe them once (so a healthy deployment is ready when this returns)."""
        self.endpoints.update({address: TritonEndpoint(address, self.settings.triton_model)
                               for address in self.settings.triton_endpoints})
        await self.readiness.start()

    async def stop(self) -> None:
        await self.readiness.stop()
        for endpoint in self.endpoints.values():
            await endpoint.close()

    @property
    def ready(self) -> bool:
        return self.readiness.ready

    async def _readiness_changed(self, ready: bool) -> None:
        if self.on_readiness is not None:
            await self.on_readiness(ready)

    # -- classification -------------------------------------------------------------------------------------------

    async def classify(self, job: ClassifyJob) -> Classification:
        with self._admit(job.identity):
            return await self._classify(job, None)

    async def stream(self, job: ClassifyJob) -> AsyncIterator[ReasoningText | Classification]:
        """Reasoning deltas as the model writes them, then the classification."""
        queue: asyncio.Queue[ReasoningText | Classification | Exception] = asyncio.Queue()

        async def produce() -> None:
            try:
                queue.put_nowait(await self._classify(job, queue.put_nowait))
            except Exception as exc:
                queue.put_nowait(exc)

        with self._admit(job.identity):
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
        """Each (item, policy) pair classified on its own; outcomes in the order they finish. The plan is checked
        before anything runs (server/batch_plan.py); what is unfinished at the batch's deadline answers
        DEADLINE_EXCEEDED, and the stream ends cleanly."""
        plan = self._plan(job)
        deadline, whose = self._batch_deadline(job.deadline)
        with self._admit(job.identity, batch=max(1, min(plan.work, self.settings.batch_concurrency))) as slots:
            gate = asyncio.Semaphore(slots.count)
            # The batch's deadline is enforced here, for all items at once; each item keeps the client's own.
            tasks = {asyncio.create_task(self._batch_item(job, prompt, gate)): prompt
                     for prompt in plan.prompts}
            pending: set[asyncio.Task[BatchOutcome]] = set(tasks)
            try:
                while pending:
                    done, pending = await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()),
                                                       return_when=asyncio.FIRST_COMPLETED)
                    if not done:
                        break
                    for task in done:
                        yield task.result()
                if pending:
                    for outcome in await self._cut(pending, tasks, whose):
                        yield outcome
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    def _plan(self, job: BatchJob) -> BatchPlan:
        try:
            return plan_batch(job.items, self.limits)
        except BatchRefused as exc:
            self.metrics.refused(exc.reason)
            raise

    def _batch_deadline(self, client_deadline: float | None) -> tuple[float, str]:
        """When the batch must end (time.monotonic()), and whose deadline that is, for the items cut short."""
        now = time.monotonic()
        own = now + self.settings.batch_timeout_s
        if client_deadline is not None:
            client = client_deadline - min(BATCH_DEADLINE_MARGIN_S, (client_deadline - now) / 10)
            if client < own:
                return client, "the client's deadline"
        return own, f"the batch's deadline ({self.settings.batch_timeout_s:g} s)"

    async def _cut(self, pending: set[asyncio.Task[BatchOutcome]], tasks: dict[asyncio.Task[BatchOutcome],
                   PlannedPrompt], whose: str) -> list[BatchOutcome]:
        """Stop the items still running at the batch's deadline; each answers DEADLINE_EXCEEDED (or its result,
        if it finished while being stopped)."""
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        outcomes = []
        for task in pending:
            if not task.cancelled():
                outcomes.append(task.result())
                continue
            prompt = tasks[task]
            outcomes.append(BatchOutcome(prompt.item_id, prompt.selector.label() if prompt.selector else "",
                                         error=DeadlineExceeded(f"{whose} passed before this item was "
                                                                "classified (send smaller batches, or allow longer)")))
        self.metrics.refused("batch_deadline", sum(1 for o in outcomes if o.error is not None))
        return outcomes

    def _admit(self, identity: Identity, batch: int = 0) -> Slots:
        """Rate limit, then slots: one for a request, up to `batch` for a batch (fewer when its share is taken)."""
        try:
            self.rate.check(identity)
            return self.admission.acquire_batch(batch, identity) if batch else self.admission.acquire(1, identity)
        except Refused as exc:
            self.metrics.failed(UNKNOWN, "resource_exhausted")
            self.metrics.refused(exc.reason)
            raise

    async def _batch_item(self, batch: BatchJob, prompt: PlannedPrompt, gate: asyncio.Semaphore) -> BatchOutcome:
        item_id, content, selector = prompt.item_id, prompt.content, prompt.selector
        ref = selector.label() if selector is not None else ""
        if selector is None:
            return BatchOutcome(item_id, ref, error=InvalidArgument(
                "no policy for this item: set the batch's policies or the item's own"))
        if isinstance(content, ServiceError):
            return BatchOutcome(item_id, ref, error=content)
        job = ClassifyJob(selector, content, batch.effort, batch.include_reasoning,
                          f"{batch.request_id}/{item_id}", batch.arrival, batch.deadline, batch.identity)
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
            resolved = await self.policies.resolve(job.selector, job.identity.tenant)
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
        # The model reads the normalised content when asked for; the audit record hashes what was received.
        content = job.content
        if self.settings.normalise_content or resolved.policy.normalise_input:
            content = normalise_content(content)
            check_content(content)  # invisible characters alone leave nothing to classify
        rendered = await self._render(prefix, content)
        max_tokens = self._budget(model, len(rendered.ids))
        request = GenerateRequest(rendered.ids, max_tokens, rendered.prefix_len, self.settings.prefix_priority,
                                  job.request_id)
        attempt = await self.generator.generate(request, rendered.prefix_key, job.deadline, sink)
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
        model = self.readiness.model
        if model is None or self.policies.renderer is None:
            raise Unavailable("the service is not ready: no Triton endpoint has answered yet",
                              retry_after_ms=int(self.settings.health_interval_s * 1000))
        return model

    async def _render(self, prefix: PromptPrefix, content: Content) -> RenderedPrompt:
        renderer = self.policies.renderer
        assert renderer is not None  # _require_model checked it
        # Tokenizing a long text takes milliseconds: a worker thread keeps one request from stalling the others.
        if content_chars(content) > THREADED_TOKENIZE_CHARS:
            rendered = await asyncio.to_thread(renderer.render, prefix, content)
        else:
            rendered = renderer.render(prefix, content)
        self.limits.check_content(len(rendered.ids) - rendered.prefix_len - self.readiness.framing_tokens)
        return rendered

    def _budget(self, model: ModelInfo, prompt_tokens: int) -> int:
        context = model.max_context
        if context is None:
            return self.settings.max_output_tokens
        room = context - prompt_tokens
        if room < 1:
            raise InvalidArgument(f"the prompt is {prompt_tokens:,} tokens (policy and content); the model's context "
                                  f"holds {context:,} with room to answer: shorten the content")
        return min(room, self.settings.max_output_tokens)

    def _audit_record(self, job: ClassifyJob, resolved: ResolvedPolicy, model: ModelInfo, verdict: Verdict,
                      usage: Usage) -> AuditRecord:
        p = resolved.info
        return AuditRecord(job.request_id, p.id, p.version, p.sha256, model.fingerprint, verdict.violation,
                           verdict.status, serialise(job.content), verdict.category, verdict.rule_ids,
                           verdict.confidence, verdict.rationale, usage.prompt_tokens, usage.cached_prompt_tokens,
                           usage.reasoning_tokens, usage.output_tokens, _ms(time.perf_counter() - job.arrival),
                           tenant=job.identity.tenant, principal=job.identity.principal)

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
            verdict.violation, verdict.category, resolved.policy.output.categories))

    def _reported_info(self, resolved: ResolvedPolicy) -> PolicyInfo:
        # A pinned version's activity changes over time; the cached info is as of when it was loaded.
        active = resolved.label != INLINE and self.policies.is_active(resolved.info, resolved.tenant)
        return resolved.info if active == resolved.info.active else replace(resolved.info, active=active)


    # -- policy administration (server/policy_admin.py) ---------------------------------------------------------

    async def put_policy(self, text: str, activate: bool, caller: Identity = ANONYMOUS) -> PolicyInfo:
        return await self.admin.put_policy(text, activate, caller)

    async def get_policy(self, ref: str, caller: Identity = ANONYMOUS) -> tuple[PolicyInfo, str]:
        return await self.admin.get_policy(ref, caller)

    async def list_policies(self, caller: Identity = ANONYMOUS) -> list[PolicyInfo]:
        return await self.admin.list_policies(caller)

    async def activate_policy(self, policy_id: str, ref: str, caller: Identity = ANONYMOUS) -> PolicyInfo:
        return await self.admin.activate_policy(policy_id, ref, caller)

    async def rollback_policy(self, policy_id: str, caller: Identity = ANONYMOUS) -> PolicyInfo:
        return await self.admin.rollback_policy(policy_id, caller)

def _reasoning_tokens(parsed: ParsedCompletion) -> int:
    return sum(m.end - m.start for m in parsed.messages if m.role == "assistant" and m.channel == "analysis")


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def _log_audit_failure(future: Future[int]) -> None:
    exc = future.exception()
    if exc is not None:
        event(log, logging.ERROR, "an answered decision could not be audited", error=str(exc))

