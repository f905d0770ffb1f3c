"""Authentication and authorisation of every RPC: who calls (an API key, a client certificate), and may they.

`AuthInterceptor` wraps each method's handler (a grpc.aio interceptor sees only the method name; the credentials are
in the call's metadata and transport, which the handler's ServicerContext gives). Per call it asks each
authenticator (server/keys.py, server/client_certs.py) in turn; the first identity found is the caller. Then the
method's scope (METHOD_SCOPES) is checked and the identity set in `identity.current_identity` for the handler, which
puts it into the job. Health and reflection stay open: probes and generic tools must work without a key.

Modes (setting `auth`): `off`: every call is `ANONYMOUS`; `on`: a call without a credential is refused; `auto`
(the default): as `on` once any API key has been created (revoked ones count: revoking the last key must not open
the API) or certificate identities are configured, else as `off`.

The refusals are ServiceErrors raised inside the handler, so the StatusInterceptor (which must come before this
one in the server's list, making it the outer wrapper) maps them: UNAUTHENTICATED for a missing or bad credential,
PERMISSION_DENIED for a missing scope.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any

import grpc

from server.errors import Unauthenticated
from server.identity import (
    ADMIN,
    ANONYMOUS,
    CLASSIFY,
    POLICY_READ,
    POLICY_WRITE,
    Authenticator,
    Identity,
    current_identity,
)
from server.keys import SEND_KEY_HINT, KeyAuthenticator
from server.settings import ServerSettings, ServerSettingsError, exposed_addresses

_SAFEGUARD = "/safeguard.v1.Safeguard/"
METHOD_SCOPES: dict[str, str] = {
    f"{_SAFEGUARD}Classify": CLASSIFY,
    f"{_SAFEGUARD}ClassifyStream": CLASSIFY,
    f"{_SAFEGUARD}ClassifyBatch": CLASSIFY,
    f"{_SAFEGUARD}GetPolicy": POLICY_READ,
    f"{_SAFEGUARD}ListPolicies": POLICY_READ,
    f"{_SAFEGUARD}PutPolicy": POLICY_WRITE,
    f"{_SAFEGUARD}ActivatePolicy": POLICY_WRITE,
    f"{_SAFEGUARD}RollbackPolicy": POLICY_WRITE,
}
# Services anyone may call. Any other method (one added to the API but not to METHOD_SCOPES) needs `admin`.
OPEN_SERVICES = ("/grpc.health.v1.Health/", "/grpc.reflection.v1alpha.ServerReflection/",
                 "/grpc.reflection.v1.ServerReflection/")


def method_scope(method: str) -> str | None:
    """The scope a method needs; None for the open services."""
    if method.startswith(OPEN_SERVICES):
        return None
    return METHOD_SCOPES.get(method, ADMIN)


class Authentication:
    """Turns a call's credentials into an identity, by the `auth` mode."""

    def __init__(self, mode: str, keys: KeyAuthenticator, others: Sequence[Authenticator] = ()):
        self.mode = mode
        self.keys = keys
        self.authenticators: tuple[Authenticator, ...] = (keys, *others)
        self._others = bool(others)

    def enforced(self) -> bool:
        if self.mode == "auto":
            return self._others or self.keys.enforced()
        return self.mode == "on"

    def is_cheap(self, metadata: Mapping[str, str]) -> bool:
        return self.mode == "off" or self.keys.is_cheap(metadata)

    def identify(self, metadata: Mapping[str, str], auth_context: Mapping[str, Sequence[bytes]]) -> Identity:
        if self.mode == "off":
            return ANONYMOUS
        for authenticator in self.authenticators:
            found = authenticator(metadata, auth_context)
            if found is not None:
                return found
        if self.enforced():
            certificate = ", or present a mapped client certificate" if self._others else ""
            raise Unauthenticated(f"this call needs a credential: {SEND_KEY_HINT}{certificate}; `appliance keys "
                                  "create` makes a key")
        return ANONYMOUS

    def check_exposure(self, settings: ServerSettings) -> None:
        """Refuse to serve other hosts without authentication, unless the operator said so."""
        exposed = exposed_addresses(settings)
        if exposed and not settings.allow_unauthenticated and not self.enforced():
            why = f"auth is {self.mode}" + (" and no API key exists" if self.mode == "auto" else "")
            raise ServerSettingsError(
                f"refusing to listen on {' and '.join(exposed)} without authentication: {why}, so anyone who "
                "reaches the port could classify and change policies. Create a key (`appliance keys create "
                "--tenant T --scope ...`), listen on 127.0.0.1, or set allow_unauthenticated")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return {key.lower(): value for key, value in (context.invocation_metadata() or ())
            if isinstance(value, str)}


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates each call and checks its method's scope; see the module docstring."""

    def __init__(self, authentication: Authentication):
        self.authentication = authentication
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def _identify(self, scope: str, context: grpc.aio.ServicerContext) -> Identity:
        metadata, transport = _metadata(context), context.auth_context() or {}
        if self.authentication.is_cheap(metadata):
            identity = self.authentication.identify(metadata, transport)
        else:  # a key seen for the first time costs scrypt (tens of ms): keep it off the event loop
            identity = await asyncio.to_thread(self.authentication.identify, metadata, transport)
        identity.require(scope)
        return identity

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        scope = method_scope(details.method)
        if handler is None or scope is None:
            return handler
        found = self._wrapped.get(details.method)
        if found is not None:
            return found
        # Client-streaming kinds too: the API has none today, but one added later must not go unchecked.
        kinds = ((handler.unary_unary, grpc.unary_unary_rpc_method_handler, self._unary),
                 (handler.stream_unary, grpc.stream_unary_rpc_method_handler, self._unary),
                 (handler.unary_stream, grpc.unary_stream_rpc_method_handler, self._stream),
                 (handler.stream_stream, grpc.stream_stream_rpc_method_handler, self._stream))
        behavior, make, wrap = next(kind for kind in kinds if kind[0] is not None)
        wrapped = make(wrap(behavior, scope), handler.request_deserializer, handler.response_serializer)
        self._wrapped[details.method] = wrapped
        return wrapped

    def _unary(self, behavior: Callable[..., Awaitable[Any]], scope: str) -> Callable[..., Awaitable[Any]]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> Any:
            token = current_identity.set(await self._identify(scope, context))
            try:
                return await behavior(request, context)
            finally:
                current_identity.reset(token)

        return authenticated

    def _stream(self, behavior: Callable[..., AsyncIterator[Any]], scope: str) -> Callable[..., AsyncIterator[Any]]:
        async def authenticated(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            # Set before the first response and kept for the stream's life: each RPC runs in its own task.
            current_identity.set(await self._identify(scope, context))
            async for response in behavior(request, context):
                yield response

        return authenticated
