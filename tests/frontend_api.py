"""The front end as the gRPC tests drive it: one event loop per module (server and clients), a stub per API."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from build_scripts.repository import CannedRepository
from classification.library import bundled_policy
from classification.policy import load_policy
from server.generated.safeguard.v1 import safeguard_pb2 as pb
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.servicer import Frontend, build_server
from server.settings import ServerSettings

SMOKE = load_policy(bundled_policy("smoke"))


@dataclass
class Api:
    runner: asyncio.Runner
    frontend: Frontend
    stub: pb_grpc.SafeguardStub
    health: health_pb2_grpc.HealthStub
    channel: grpc.aio.Channel
    model: CannedRepository | None = None  # the canned Triton model, when that is what serves

    def run(self, awaitable):
        return self.runner.run(_awaited(awaitable))

    def call(self, method: str, request, **kwargs):
        return self.run(getattr(self.stub, method)(request, **kwargs))

    def error(self, method: str, request, **kwargs) -> grpc.aio.AioRpcError:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            self.call(method, request, **kwargs)
        return caught.value


async def _awaited(awaitable):
    # Runner.run takes coroutines only; a gRPC call is an awaitable object.
    return await awaitable


def classify_request(text: str = "hello there", ref: str = "smoke", **fields) -> pb.ClassifyRequest:
    return pb.ClassifyRequest(policy=pb.PolicySelector(ref=ref), content=pb.Content(text=text), **fields)


def frontend_settings(endpoint: str, state: Path, **changes) -> ServerSettings:
    values = dict(listen="127.0.0.1:0", triton_endpoints=(endpoint,), state_dir=str(state),
                  metrics_port=0, health_interval_s=0.2, policy_refresh_s=0.5, max_in_flight=2,
                  batch_concurrency=2, max_content_tokens=500)
    values.update(changes)
    return ServerSettings(**values)


async def open_frontend(settings: ServerSettings) -> tuple[Frontend, grpc.aio.Channel]:
    frontend = build_server(settings)
    await frontend.start()
    return frontend, grpc.aio.insecure_channel(frontend.address)


async def eventually(condition, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


async def poll(probe, expected, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await probe() == expected:
            return True
        await asyncio.sleep(0.1)
    return False
