"""Keeps a local tritonserver running for `appliance serve`: started once, restarted when it dies.

The server runs from a dedicated thread that lives exactly as long as the supervision, because the launcher ties
tritonserver's life to the thread that started it (so a killed `appliance serve` never leaves a server behind).
Restarts reuse the first start's ports, so the front end's endpoint address stays valid; while the server is down
the front end's health probes see it and answer UNAVAILABLE.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, replace
from pathlib import Path

from engine.triton.runtime import TritonLaunchError
from server.triton.launcher import TritonConfig, TritonServer

log = logging.getLogger("safeguard.supervisor")


@dataclass(frozen=True)
class SupervisorConfig:
    repository: Path
    start_timeout_s: float = 300.0
    backoff_initial_s: float = 1.0
    backoff_max_s: float = 30.0
    poll_s: float = 0.5


class TritonSupervisor:
    def __init__(self, config: SupervisorConfig):
        self.config = config
        self.restarts = 0
        self._stopping = threading.Event()
        self._started = threading.Event()
        self._failure: TritonLaunchError | None = None
        self._server: TritonServer | None = None
        self._thread = threading.Thread(target=self._run, name="triton-supervisor", daemon=False)

    @property
    def grpc_url(self) -> str:
        if self._server is None:
            raise TritonLaunchError("tritonserver has not started")
        return self._server.grpc_url

    @property
    def server(self) -> TritonServer | None:
        return self._server

    def start(self) -> str:
        """Start the server and block until it is ready; raise TritonLaunchError (with Triton's log) if it cannot."""
        self._thread.start()
        self._started.wait()
        if self._failure is not None:
            self._thread.join()
            raise self._failure
        return self.grpc_url

    def stop(self) -> None:
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join()

    def _run(self) -> None:
        triton = TritonConfig(self.config.repository, exit_timeout_s=5)
        backoff = self.config.backoff_initial_s
        while not self._stopping.is_set():
            server = TritonServer(triton)
            try:
                server.start(self.config.start_timeout_s)
            except TritonLaunchError as exc:
                if not self._started.is_set():
                    self._failure = exc
                    self._started.set()
                    return
                log.error("tritonserver failed to restart; retrying in %.0f s: %s", backoff, exc.problems[0])
                self._stopping.wait(backoff)
                backoff = min(backoff * 2, self.config.backoff_max_s)
                continue
            self._server = server
            if not self._started.is_set():
                # Later restarts come back on the same ports, so the front end's endpoint stays valid.
                triton = replace(triton, grpc_port=server.grpc_port, http_port=server.http_port,
                                 metrics_port=server.metrics_port)
                self._started.set()
            backoff = self.config.backoff_initial_s
            while not self._stopping.wait(self.config.poll_s):
                if server.process is not None and server.process.poll() is not None:
                    log.error("tritonserver exited with code %s; restarting it", server.process.returncode)
                    self.restarts += 1
                    break
            server.stop()
