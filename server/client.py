"""A small Python client for programs that call the appliance (the proto is the contract; this is convenience).

    from server.client import SafeguardClient

    with SafeguardClient("127.0.0.1:50151") as client:
        response = client.classify("spam-scams", "WIN A FREE CRUISE!!! reply with your card number")
        print(response.verdict.violation, response.verdict.category)

Content is a string (one text), a `(prompt, response)` tuple, or a list of `(role, content)` turns. Over TLS give
the CA that signed the server's certificate, and for mutual TLS the client's certificate and key (PEM files):
`SafeguardClient(target, tls_ca="ca.pem", tls_cert="me.pem", tls_key="me.key")`. A server that requires
authentication takes `SafeguardClient(target, api_key="sgk_...")` (sent as `authorization: Bearer`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import grpc

from classification.errors import ApplianceError
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc

ContentLike = Union[str, tuple[str, str], Sequence[tuple[str, str]]]  # noqa: UP007 - readable alias
EFFORTS = {None: pb.REASONING_EFFORT_UNSPECIFIED, "low": pb.REASONING_EFFORT_LOW,
           "medium": pb.REASONING_EFFORT_MEDIUM, "high": pb.REASONING_EFFORT_HIGH}


def content_message(content: ContentLike) -> pb.Content:
    if isinstance(content, str):
        return pb.Content(text=content)
    if isinstance(content, tuple) and len(content) == 2 and all(isinstance(c, str) for c in content):
        return pb.Content(prompt_response=pb.PromptResponse(prompt=content[0], response=content[1]))
    turns = [pb.Turn(role=role, content=text) for role, text in content]
    return pb.Content(conversation=pb.Conversation(turns=turns))


def policy_selector(policy: str) -> pb.PolicySelector:
    """A registered policy ("id" or "id@version"), or a whole policy file's text (it starts with '+++')."""
    if policy.lstrip().startswith("+++"):
        return pb.PolicySelector(inline_text=policy)
    return pb.PolicySelector(ref=policy)


def _pem(what: str, path: str | Path | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).expanduser().read_bytes()
    except OSError as exc:
        raise ApplianceError(f"{what}: cannot read {path}: {exc.strerror or exc}") from None


def channel_credentials(tls_ca: str | Path | None = None, tls_cert: str | Path | None = None,
                        tls_key: str | Path | None = None) -> grpc.ChannelCredentials:
    """TLS credentials: the CA to verify the server with (None: the system's), and the client's own certificate
    and key for mutual TLS."""
    if (tls_cert is None) != (tls_key is None):
        raise ApplianceError("a client certificate and its key go together: give both or neither")
    return grpc.ssl_channel_credentials(_pem("TLS CA", tls_ca), _pem("TLS key", tls_key), _pem("TLS cert", tls_cert))


class _KeyInterceptor(grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor):
    """Adds the API key to every call's metadata."""

    def __init__(self, api_key: str):
        self._metadata = (("authorization", f"Bearer {api_key}"),)

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        return _CallDetails(details.method, details.timeout, (*(details.metadata or ()), *self._metadata),
                            details.credentials, details.wait_for_ready, details.compression)

    def intercept_unary_unary(self, continuation, details, request):
        return continuation(self._details(details), request)

    def intercept_unary_stream(self, continuation, details, request):
        return continuation(self._details(details), request)


@dataclass(frozen=True)
class _CallDetails(grpc.ClientCallDetails):
    method: str
    timeout: float | None
    metadata: tuple[tuple[str, str], ...]
    credentials: grpc.CallCredentials | None
    wait_for_ready: bool | None
    compression: grpc.Compression | None


class SafeguardClient:
    def __init__(self, target: str = "127.0.0.1:50151", *, timeout: float | None = 120.0,
                 channel: grpc.Channel | None = None, tls_ca: str | Path | None = None,
                 tls_cert: str | Path | None = None, tls_key: str | Path | None = None, api_key: str | None = None):
        if channel is None and (tls_ca or tls_cert or tls_key):
            channel = grpc.secure_channel(target, channel_credentials(tls_ca, tls_cert, tls_key))
        self._channel = channel or grpc.insecure_channel(target)
        if api_key:
            self._channel = grpc.intercept_channel(self._channel, _KeyInterceptor(api_key))
        self._stub = pb_grpc.SafeguardStub(self._channel)
        self.timeout = timeout

    def request(self, policy: str, content: ContentLike, *, effort: str | None = None,
                include_reasoning: bool = False, request_id: str = "") -> pb.ClassifyRequest:
        return pb.ClassifyRequest(policy=policy_selector(policy), content=content_message(content),
                                  reasoning_effort=EFFORTS[effort], include_reasoning=include_reasoning,
                                  request_id=request_id)

    def classify(self, policy: str, content: ContentLike, **options) -> pb.ClassifyResponse:
        return self._stub.Classify(self.request(policy, content, **options), timeout=self.timeout)

    def classify_stream(self, policy: str, content: ContentLike, **options) -> Iterator[pb.ClassifyEvent]:
        """Reasoning deltas as the model writes them, then one event holding the result."""
        yield from self._stub.ClassifyStream(self.request(policy, content, **options), timeout=self.timeout)

    def classify_batch(self, items: Sequence[ContentLike], policies: Sequence[str], *, effort: str | None = None,
                       include_reasoning: bool = False) -> Iterator[pb.BatchResult]:
        request = pb.ClassifyBatchRequest(
            items=[pb.BatchItem(item_id=str(i), content=content_message(c)) for i, c in enumerate(items)],
            policies=[policy_selector(p) for p in policies], reasoning_effort=EFFORTS[effort],
            include_reasoning=include_reasoning)
        yield from self._stub.ClassifyBatch(request, timeout=self.timeout)

    def put_policy(self, text: str, *, activate: bool = False) -> pb.PolicyVersion:
        return self._stub.PutPolicy(pb.PutPolicyRequest(text=text, activate=activate), timeout=self.timeout)

    def get_policy(self, ref: str) -> pb.PolicyDocument:
        return self._stub.GetPolicy(pb.GetPolicyRequest(ref=ref), timeout=self.timeout)

    def list_policies(self) -> list[pb.PolicyVersion]:
        return list(self._stub.ListPolicies(pb.ListPoliciesRequest(), timeout=self.timeout).policies)

    def activate_policy(self, policy_id: str, ref: str) -> pb.PolicyVersion:
        return self._stub.ActivatePolicy(pb.ActivatePolicyRequest(id=policy_id, ref=ref), timeout=self.timeout)

    def rollback_policy(self, policy_id: str) -> pb.PolicyVersion:
        return self._stub.RollbackPolicy(pb.RollbackPolicyRequest(id=policy_id), timeout=self.timeout)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> SafeguardClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
