"""Readiness: which endpoints answer, which model they serve, and which policy prefixes they hold warm.

The service is ready once an endpoint answers, its model is known (`server/model_discovery.py`), and every active
policy's prefix is warm on the endpoint its requests go to; the prober re-warms an endpoint each time it comes
back, and the refresh loop warms what other processes (the CLI) activated. Warm-ups go through one paced,
coalescing queue (`server/warmup.py`), so activating policies in a loop cannot crowd classification out; a policy
whose warm-up waits there, or whose earlier version is warm, is behind, not cold, and keeps the service ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from openai_harmony import HarmonyEncoding

from classification.content import Text
from classification.render import PromptPrefix, PromptRenderer
from server.errors import ServiceError
from server.log import event
from server.metrics import Metrics
from server.model_discovery import ModelInfo, discover_model
from server.policy_book import PolicyBook, ResolvedPolicy
from server.registry_errors import RegistryError
from server.routing import Endpoint, NoHealthyEndpoint, Router
from server.settings import ServerSettings
from server.triton.client import EndpointUnavailable, GenerateRequest, ModelError, TritonEndpoint, TritonError
from server.warmup import Warmups

# The serving core's modules log as one component, so its log lines keep one name.
log = logging.getLogger("safeguard.classifier")

WARM_TIMEOUT_S = 60.0


class Readiness:
    """Probes the endpoints, learns the model, warms policy prefixes; `on_change` hears each change of `ready`."""

    def __init__(self, settings: ServerSettings, router: Router, endpoints: dict[str, TritonEndpoint],
                 policies: PolicyBook, metrics: Metrics, encoding: HarmonyEncoding,
                 encode: Callable[[str], list[int]], on_change: Callable[[bool], Awaitable[None]]):
        self.settings = settings
        self.router = router
        self.endpoints = endpoints
        self.policies = policies
        self.metrics = metrics
        self._encoding = encoding
        self._encode = encode
        self._on_change = on_change
        self.model: ModelInfo | None = None
        self.framing_tokens = 0  # what the prompt adds around the prefix and the content
        self._healthy: dict[str, bool] = {}
        self._warm: set[tuple[str, str]] = set()  # (endpoint, prefix key) warmed since the endpoint came up
        self._was_warm: set[tuple[str, str]] = set()  # (endpoint, policy) with some version warmed there
        self.warmups = Warmups(settings.warm_interval_s, paced=lambda: self._ready)
        self._tasks: list[asyncio.Task] = []
        self._ready = False

    @property
    def ready(self) -> bool:
        return self._ready

    async def start(self) -> None:
        """Probe the endpoints once (so a healthy deployment is ready when this returns), then keep probing."""
        await self._probe_all()
        self._tasks = [asyncio.create_task(self._probe_loop(), name="probe-endpoints"),
                       asyncio.create_task(self._refresh_loop(), name="refresh-policies")]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        await self.warmups.stop()

    def endpoint_failed(self, endpoint: Endpoint, exc: TritonError) -> None:
        self.router.mark_failure(endpoint, connection_error=True)
        self.metrics.endpoint_failures.labels(endpoint.url).inc()
        # A server that dropped a connection may have restarted with an empty cache: warm it again when it is back.
        self._forget_warm(endpoint.url)

    def _forget_warm(self, url: str) -> None:
        self._warm = {(u, key) for u, key in self._warm if u != url}
        self._was_warm = {(u, key) for u, key in self._was_warm if u != url}

    async def warm_policy(self, resolved: ResolvedPolicy) -> None:
        """Prefill the policy's default-effort prefix on its endpoint, at high retention priority, through the
        warm-up queue; returns once it is warm (or the warm-up failed, which the log and metrics tell)."""
        prefix = await self.policies.prefix(resolved, resolved.policy.reasoning_effort)
        if self._warm_target(prefix) is None:
            return  # warm already (the refresh loop asks for every active policy), or nowhere to warm it
        await self.warmups.warm(_policy_key(resolved), resolved.info.sha256, lambda: self._warm_now(resolved, prefix))

    def _warm_target(self, prefix: PromptPrefix) -> Endpoint | None:
        """The endpoint the prefix's requests go to, unless it is warm there already (or none is healthy)."""
        try:
            endpoint = self.router.candidates(prefix.key)[0]
        except NoHealthyEndpoint:
            return None
        return None if (endpoint.url, prefix.key) in self._warm else endpoint

    async def _warm_now(self, resolved: ResolvedPolicy, prefix: PromptPrefix) -> None:
        endpoint = self._warm_target(prefix)  # checked again: the queue may have waited while things changed
        if endpoint is None:
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
            self._mark_warm(endpoint.url, prefix.key, resolved)
            return
        except TritonError as exc:
            self.metrics.warmups.labels("failed").inc()
            event(log, logging.WARNING, "warming a policy prefix failed", policy=resolved.info.id,
                  endpoint=endpoint.url, error=exc.message)
            if isinstance(exc, EndpointUnavailable):
                self.endpoint_failed(endpoint, exc)
            return
        self.metrics.warmups.labels("ok").inc()
        self._mark_warm(endpoint.url, prefix.key, resolved)
        event(log, logging.INFO, "policy prefix warm", policy=resolved.info.id, version=resolved.info.version,
              endpoint=endpoint.url, prefix_tokens=len(prefix.ids))

    def _mark_warm(self, url: str, key: str, resolved: ResolvedPolicy) -> None:
        self._warm.add((url, key))
        self._was_warm.add((url, _policy_key(resolved)))

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
            self.policies.renderer = PromptRenderer(self._encoding, info.fingerprint,
                                                    encode_ordinary=self._encode)
            self.framing_tokens = len(self.policies.renderer.render(PromptPrefix((), "", ""), Text("")).ids)
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
            await self.warm_policy(resolved)

    async def _set_ready(self) -> None:
        ready = self.policies.renderer is not None and any(self._healthy.values()) and self._all_warm()
        if ready != self._ready:
            self._ready = ready
            event(log, logging.INFO, "ready" if ready else "not ready")
            await self._on_change(ready)

    def _all_warm(self) -> bool:
        for resolved in self.policies.cached_active():
            prefix = resolved.prefixes.get(resolved.policy.reasoning_effort)
            try:
                endpoint = self.router.candidates(prefix.key)[0] if prefix else None
            except NoHealthyEndpoint:
                return False
            if (endpoint is None or (endpoint.url, prefix.key) not in self._warm) and not self._behind(resolved):
                return False
        return True

    def _behind(self, resolved: ResolvedPolicy) -> bool:
        """Warm-ups are behind, the policy is not cold: an earlier version of it is warm on an endpoint that is up
        (its new version's warm-up follows, or the refresh loop retries it), or, in a service already ready, its
        warm-up waits in the queue. Requests are served meanwhile, so an activation storm keeps the service
        SERVING; a service starting, or back from losing its endpoints, still waits for its warm-ups."""
        key = _policy_key(resolved)
        return (self._ready and self.warmups.behind(key)) or any(policy == key for _, policy in self._was_warm)


def _policy_key(resolved: ResolvedPolicy) -> str:
    """What warm-ups coalesce on: one policy, whatever its version (one tenant's: another tenant's policy of the same
    id is another policy; tenant names hold no '/')."""
    return f"{resolved.tenant}/{resolved.info.id}"
