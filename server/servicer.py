"""The gRPC face of the appliance: `safeguard.v1.Safeguard` on grpc.aio, with health, reflection and status mapping.

A request is read top-down from here: the servicer turns protos into the core's types (`server.jobs`), the
classifier (`server.classifier`) resolves the policy, renders, routes and streams from Triton, and the servicer
turns the result back into protos. Errors travel as `errors.ServiceError`; `server.status.StatusInterceptor` maps
them to gRPC status codes, and anything unexpected to INTERNAL, so a client never sees a traceback.

Health (`grpc.health.v1`): the services "" and "safeguard.v1.Safeguard" are NOT_SERVING until the classifier is
ready (Triton answers, active policies are warm) and follow it from then on; "liveness" is SERVING as long as the
process answers at all (for probes that must not restart a front end merely because Triton is down). Server
reflection lists every service, so generic tools (grpcurl, the reflection test) can call the API without our proto.

Authentication (`server/auth.py`) runs inside StatusInterceptor, so its refusals map like any other; each handler
reads the caller from `identity.current_identity` into the job or admin call. With `admin_listen` set, a second
gRPC server on that address alone serves the policy changes; the main one refuses them with PERMISSION_DENIED.

`build_server(settings)` assembles everything and returns a `Frontend` whose `start`/`stop` are the lifecycle
hooks; `serve(settings)` is the whole `appliance serve` main loop.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from classification.content import Chat, Content, PromptResponse, Text, Turn
from classification.verdict import EXTRA_MESSAGES, MALFORMED, MISSING_FINAL, OK, TRUNCATED, Verdict
from classification.vocab import load_harmony_encoding
from server import log as slog
from server import tls
from server.audit import AuditLog
from server.auth import Authentication, AuthInterceptor
from server.classifier import Classifier
from server.client_certs import CertificateAuthenticator, certificate_authenticator
from server.errors import InvalidArgument, PermissionDenied, ServiceError
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.identity import Authenticator, Identity, current_identity
from server.jobs import BatchJob, BatchOutcome, Classification, ClassifyJob, PolicyInfo, ReasoningText, Selector
from server.keys import KeyAuthenticator, KeyStore
from server.metrics import Metrics, MetricsServer, serve_metrics
from server.registry import Registry
from server.request_ids import RequestIds, check_request_id
from server.settings import ServerSettings, ServerSettingsError
from server.state import keys_path
from server.status import StatusInterceptor, capped

log = logging.getLogger("safeguard.servicer")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Safeguard"].full_name
LIVENESS_SERVICE = "liveness"
_EFFORTS = {pb.REASONING_EFFORT_LOW: "low", pb.REASONING_EFFORT_MEDIUM: "medium", pb.REASONING_EFFORT_HIGH: "high"}
_PARSE_STATUS = {OK: pb.PARSE_STATUS_OK, MALFORMED: pb.PARSE_STATUS_MALFORMED,
                 MISSING_FINAL: pb.PARSE_STATUS_MISSING_FINAL, TRUNCATED: pb.PARSE_STATUS_TRUNCATED,
                 EXTRA_MESSAGES: pb.PARSE_STATUS_EXTRA_MESSAGES}


# -- protos in ----------------------------------------------------------------------------------------------------

def effort_of(value: int) -> str | None:
    if value == pb.REASONING_EFFORT_UNSPECIFIED:
        return None
    effort = _EFFORTS.get(value)
    if effort is None:
        raise InvalidArgument(f"reasoning_effort {value} is not a known value; use REASONING_EFFORT_LOW, "
                              "REASONING_EFFORT_MEDIUM or REASONING_EFFORT_HIGH, or leave it unset for the "
                              "policy's default")
    return effort


def content_of(message: pb.Content) -> Content:
    kind = message.WhichOneof("kind")
    if kind == "text":
        return Text(message.text)
    if kind == "prompt_response":
        return PromptResponse(message.prompt_response.prompt, message.prompt_response.response)
    if kind == "conversation":
        return Chat(tuple(Turn(turn.role, turn.content) for turn in message.conversation.turns))
    raise InvalidArgument("no content given: set content.text, content.prompt_response or content.conversation")


def selector_of(message: pb.PolicySelector) -> Selector:
    if message.WhichOneof("source") == "inline_text":
        return Selector(inline_text=message.inline_text)
    return Selector(ref=message.ref)


def _deadline(context: grpc.aio.ServicerContext) -> float | None:
    remaining = context.time_remaining()
    return None if remaining is None else time.monotonic() + remaining


# -- protos out ---------------------------------------------------------------------------------------------------

def verdict_proto(v: Verdict) -> pb.Verdict:
    message = pb.Verdict(parse_status=_PARSE_STATUS.get(v.status, pb.PARSE_STATUS_UNSPECIFIED),
                         category=v.category or "", rule_ids=v.rule_ids, confidence=v.confidence or "",
                         rationale=v.rationale or "", final_text=v.final_text, detail=v.detail)
    if v.violation is not None:
        message.violation = v.violation
    return message


def policy_proto(p: PolicyInfo) -> pb.PolicyVersion:
    return pb.PolicyVersion(id=p.id, version=p.version, sha256=p.sha256, title=p.title, active=p.active,
                            created_unix_ms=p.created_unix_ms, tokens=p.tokens)


def response_proto(c: Classification) -> pb.ClassifyResponse:
    u, t = c.usage, c.timings
    return pb.ClassifyResponse(
        request_id=c.request_id, verdict=verdict_proto(c.verdict), reasoning=c.reasoning,
        policy=policy_proto(c.policy),
        usage=pb.Usage(prompt_tokens=u.prompt_tokens, cached_prompt_tokens=u.cached_prompt_tokens,
                       reasoning_tokens=u.reasoning_tokens, output_tokens=u.output_tokens),
        timings=pb.Timings(queue_ms=t.queue_ms, time_to_first_token_ms=t.time_to_first_token_ms,
                           time_to_verdict_ms=t.time_to_verdict_ms, total_ms=t.total_ms),
        model_fingerprint=c.model_fingerprint, finish_reason=c.finish_reason)


def batch_result_proto(o: BatchOutcome) -> pb.BatchResult:
    if o.result is not None:
        return pb.BatchResult(item_id=o.item_id, policy_ref=o.policy_ref, result=response_proto(o.result))
    error = o.error or ServiceError("no result")
    return pb.BatchResult(item_id=o.item_id, policy_ref=o.policy_ref,
                          error=pb.ItemError(code=error.code, message=capped(error.message)))


# -- the service ----------------------------------------------------------------------------------------------

class SafeguardServicer(pb_grpc.SafeguardServicer):
    def __init__(self, classifier: Classifier, request_ids: RequestIds, *, serves_changes: bool = True):
        self.classifier = classifier
        self.request_ids = request_ids  # shared by both listeners: an id in flight on one is in use on the other
        self.serves_changes = serves_changes  # False on the main listener when admin_listen is set

    def _changer(self) -> Identity:
        if not self.serves_changes:
            raise PermissionDenied("policy changes are served only on the admin listener (the server's "
                                   "admin_listen address); send PutPolicy, ActivatePolicy and RollbackPolicy there")
        return current_identity.get()

    def _job(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext, request_id: str) -> ClassifyJob:
        arrival = time.perf_counter()
        return ClassifyJob(selector_of(request.policy), content_of(request.content),
                           effort_of(request.reasoning_effort), request.include_reasoning,
                           request_id, arrival, _deadline(context), current_identity.get())

    async def Classify(self, request: pb.ClassifyRequest, context: grpc.aio.ServicerContext) -> pb.ClassifyResponse:
        with self.request_ids.claim(request.request_id) as request_id:
            return response_proto(await self.classifier.classify(self._job(request, context, request_id)))

    async def ClassifyStream(self, request: pb.ClassifyRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.ClassifyEvent]:
        with self.request_ids.claim(request.request_id) as request_id:
            async for item in self.classifier.stream(self._job(request, context, request_id)):
                if isinstance(item, ReasoningText):
                    yield pb.ClassifyEvent(reasoning=pb.ReasoningDelta(text=item.text))
                else:
                    yield pb.ClassifyEvent(result=response_proto(item))

    async def ClassifyBatch(self, request: pb.ClassifyBatchRequest,
                            context: grpc.aio.ServicerContext) -> AsyncIterator[pb.BatchResult]:
        arrival = time.perf_counter()
        with self.request_ids.claim(request.request_id) as request_id:
            shared = [selector_of(s) for s in request.policies]
            job = BatchJob([_batch_item(i, item, shared) for i, item in enumerate(request.items)],
                           effort_of(request.reasoning_effort), request.include_reasoning,
                           request_id, arrival, _deadline(context), current_identity.get())
            async for outcome in self.classifier.batch(job):
                yield batch_result_proto(outcome)

    async def PutPolicy(self, request: pb.PutPolicyRequest, context: grpc.aio.ServicerContext) -> pb.PolicyVersion:
        return policy_proto(await self.classifier.put_policy(request.text, request.activate, self._changer()))

    async def GetPolicy(self, request: pb.GetPolicyRequest, context: grpc.aio.ServicerContext) -> pb.PolicyDocument:
        info, text = await self.classifier.get_policy(request.ref, current_identity.get())
        return pb.PolicyDocument(version=policy_proto(info), text=text)

    async def ListPolicies(self, request: pb.ListPoliciesRequest,
                           context: grpc.aio.ServicerContext) -> pb.ListPoliciesResponse:
        listed = await self.classifier.list_policies(current_identity.get())
        return pb.ListPoliciesResponse(policies=[policy_proto(p) for p in listed])

    async def ActivatePolicy(self, request: pb.ActivatePolicyRequest,
                             context: grpc.aio.ServicerContext) -> pb.PolicyVersion:
        return policy_proto(await self.classifier.activate_policy(request.id, request.ref, self._changer()))

    async def RollbackPolicy(self, request: pb.RollbackPolicyRequest,
                             context: grpc.aio.ServicerContext) -> pb.PolicyVersion:
        return policy_proto(await self.classifier.rollback_policy(request.id, self._changer()))


def _batch_item(index: int, item: pb.BatchItem, shared: list[Selector]) -> tuple[str, Content | ServiceError,
                                                                                   list[Selector]]:
    """One item for the core; content it cannot use becomes that item's error instead of failing the batch."""
    try:
        check_request_id(item.item_id, f"items[{index}].item_id")
        content: Content | ServiceError = content_of(item.content)
    except ServiceError as exc:
        content = exc
    return item.item_id or str(index), content, [selector_of(s) for s in item.policies] or shared


# -- assembly and lifecycle ---------------------------------------------------------------------------------------

@dataclass
class Frontend:
    """A built front end: call `start`, then `stop` (or use `serve`)."""

    settings: ServerSettings
    server: grpc.aio.Server
    port: int  # the gRPC port actually bound (settings may ask for 0)
    classifier: Classifier
    health: health.aio.HealthServicer
    metrics: Metrics
    audit: AuditLog
    metrics_server: MetricsServer | None = None
    certificates: tls.ReloadingCertificates | None = None  # TLS on: the (reloading) certificate files
    certificate_authenticator: CertificateAuthenticator | None = None  # mutual TLS with a client_cert_map
    admin_server: grpc.aio.Server | None = None  # serves the policy changes when admin_listen is set
    admin_port: int | None = None

    @property
    def address(self) -> str:
        return f"{self.settings.listen.rpartition(':')[0]}:{self.port}"

    @property
    def admin_address(self) -> str | None:
        return None if self.admin_port is None else f"{self.settings.admin_listen.rpartition(':')[0]}:{self.admin_port}"

    async def start(self) -> None:
        """Answer at once (live, NOT_SERVING), then probe Triton and warm policies; ready when that succeeds."""
        for service in ("", SERVICE_NAME):
            await self.health.set(service, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.health.set(LIVENESS_SERVICE, health_pb2.HealthCheckResponse.SERVING)
        self.classifier.on_readiness = self._readiness
        self.metrics_server = serve_metrics(self.metrics, self.settings.metrics_address, self.settings.metrics_port,
                                            self.certificates.https_context if self.certificates else None)
        await self.server.start()
        if self.admin_server is not None:
            await self.admin_server.start()
        await self.classifier.start()

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let running ones finish within the grace period, flush the audit log."""
        await self.health.enter_graceful_shutdown()
        grace = self.settings.grace_s if grace is None else grace
        await asyncio.gather(*(s.stop(grace) for s in (self.server, self.admin_server) if s is not None))
        await self.classifier.stop()
        self.audit.close()
        if self.metrics_server is not None:
            self.metrics_server.stop()
            self.metrics_server = None

    async def _readiness(self, ready: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if ready else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE_NAME):
            await self.health.set(service, status)


def build_server(settings: ServerSettings) -> Frontend:
    """Assemble the front end (call inside the event loop that will run it: grpc.aio binds to it)."""
    settings.validate()
    certificates, by_certificate = tls.load_certificates(settings), certificate_authenticator(settings)
    metrics = Metrics(policy_labels=settings.metrics_policy_labels)
    audit = AuditLog(settings.audit_path, store_rationale=settings.audit_store_rationale,
                     store_content=settings.audit_store_content)
    try:
        encoding = load_harmony_encoding(Path(settings.model_dir).expanduser() if settings.model_dir else None)
        classifier = Classifier(settings, Registry(settings.state_path), audit, metrics, encoding)
        authentication = _authentication(settings, by_certificate)
        authentication.check_exposure(settings)
    except BaseException:
        audit.close()
        raise
    health_servicer = health.aio.HealthServicer()
    request_ids = RequestIds()
    server = _grpc_server(SafeguardServicer(classifier, request_ids, serves_changes=not settings.admin_listen),
                          health_servicer, authentication)
    try:
        port = (server.add_insecure_port(settings.listen) if certificates is None
                else server.add_secure_port(settings.listen, tls.server_credentials(certificates)))
    except RuntimeError:
        audit.close()
        raise ServerSettingsError(f"cannot listen on {settings.listen}: the address is in use or not "
                                  "available on this host") from None
    admin_server, admin_port = None, None
    if settings.admin_listen:
        admin_server = _grpc_server(SafeguardServicer(classifier, request_ids), health_servicer, authentication)
        try:
            admin_port = (admin_server.add_insecure_port(settings.admin_listen) if certificates is None
                          else admin_server.add_secure_port(settings.admin_listen,
                                                            tls.server_credentials(certificates)))
        except RuntimeError:
            audit.close()
            raise ServerSettingsError(f"cannot listen on {settings.admin_listen} (admin_listen): the address is in "
                                      "use or not available on this host") from None
    return Frontend(settings, server, port, classifier, health_servicer, metrics, audit,
                    certificates=certificates, certificate_authenticator=by_certificate, admin_server=admin_server,
                    admin_port=admin_port)


def preflight(settings: ServerSettings) -> None:
    """Raise what `build_server` would refuse (settings, certificate files, exposure without authentication), for
    commands to check before they start anything slow, such as Triton."""
    settings.validate()
    tls.load_certificates(settings)
    _authentication(settings, certificate_authenticator(settings)).check_exposure(settings)


def _authentication(settings: ServerSettings, by_certificate: Authenticator | None) -> Authentication:
    keys = KeyAuthenticator(KeyStore(keys_path(settings.state_dir)), settings.key_refresh_s)
    return Authentication(settings.auth, keys, () if by_certificate is None else (by_certificate,))


def _grpc_server(servicer: SafeguardServicer, health_servicer: health.aio.HealthServicer,
                 authentication: Authentication) -> grpc.aio.Server:
    # StatusInterceptor first: it is then the outer wrapper, and maps what authentication refuses.
    # No SO_REUSEPORT: a second front end on the same port must fail to start, not silently share its traffic.
    server = grpc.aio.server(interceptors=[StatusInterceptor(), AuthInterceptor(authentication)],
                             options=[("grpc.so_reuseport", 0)])
    pb_grpc.add_SafeguardServicer_to_server(servicer, server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server)
    return server


async def serve(settings: ServerSettings) -> None:
    """Run a front end until SIGTERM or SIGINT, then shut down gracefully."""
    slog.configure(settings.log_level)
    frontend = build_server(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await frontend.start()
        slog.event(log, logging.INFO, "serving", address=frontend.address, endpoints=list(settings.triton_endpoints),
                   metrics_port=frontend.metrics_server.port if frontend.metrics_server else None,
                   **({"admin_address": frontend.admin_address} if frontend.admin_address else {}))
        await stop.wait()
    finally:
        slog.event(log, logging.INFO, "shutting down", grace_s=settings.grace_s)
        await frontend.stop()
