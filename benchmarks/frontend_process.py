"""A front end in a process of its own, as the benchmarks and the soak drive it: the `--serve` mode a benchmark
re-runs itself in, and the wait until that process reports SERVING."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc


def serve_json(settings: str) -> None:
    """Run `appliance serve`'s front end on settings given as JSON (a benchmark's hidden `--serve` option)."""
    from server.servicer import serve
    from server.settings import ServerSettings

    asyncio.run(serve(ServerSettings.from_mapping(json.loads(settings))))


async def wait_serving(address: str, process: subprocess.Popen | None = None, log_path: Path | None = None,
                       timeout: float = 60.0) -> None:
    """Poll health until the front end at `address` is SERVING; raise if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if process is not None and process.poll() is not None:
                log = f": {log_path.read_text()[-3000:]}" if log_path is not None else ""
                raise RuntimeError(f"the front end exited {process.returncode}{log}")
            with contextlib.suppress(grpc.aio.AioRpcError):
                reply = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"the front end at {address} did not become ready in {timeout:.0f} s")
