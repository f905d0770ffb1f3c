"""Starting and stopping the tritonserver binary that ships in the nvidia-pytriton wheel.

Each server gets a private working directory holding a copy of the wheel's backends with the python-backend stub
for this interpreter copied into `backends/python/`, its log, and the temporary directory its processes are given
($TMPDIR); where the wheel keeps them, and the environment the binary needs, is `engine.triton.runtime`.

Every endpoint binds to one address, 127.0.0.1 unless told otherwise: the front end is the only client. The server
runs in its own session, so stopping it signals the whole process group (server and python-backend stubs) and
then waits until no member is left. Each server passes the python backend its own shared-memory prefix, so the
segments a crashed server or stub leaves in /dev/shm are found and removed without touching any other server's.
If the owner itself is killed, the next start removes what it left (`server.triton.reaper`).
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from engine.triton.runtime import (
    STUB_NAME,
    TritonInstall,
    TritonLaunchError,
    die_with_parent,
    environment,
    signal_group,
)
from server.triton import reaper

SHM_DIR = reaper.SHM_DIR
LOG_TAIL_LINES = 40
STOP_MARGIN_S = 10.0  # beyond the exit timeout, for unloading models (freeing a GPU takes seconds)
ORPHAN_GRACE_S = 2.0
# Triton 2.51 neither cancels the decoupled requests in flight at shutdown nor unloads their model while one is
# open, so a stream still open at shutdown holds the server up for good once it has logged this.
EXIT_TIMEOUT_EXPIRED = "Exit timeout expired. Exiting immediately."
POLL_S = 0.05


@dataclass(frozen=True)
class TritonConfig:
    repository: Path
    host: str = "127.0.0.1"
    grpc_port: int = 0  # 0: pick a free port
    http_port: int = 0
    metrics_port: int = 0
    log_verbose: int = 0
    # On stop, Triton gives in-flight requests this long before it unloads the models. Streams still open then
    # keep it from exiting (see EXIT_TIMEOUT_EXPIRED), so whoever sends them should end or cancel them first.
    exit_timeout_s: int = 5
    extra_args: tuple[str, ...] = ()
    workdir: Path | None = None  # backends copy and log; None: a temporary directory removed by stop()


@dataclass
class TritonServer:
    """One tritonserver process serving `config.repository`; a context manager that starts and stops it."""

    config: TritonConfig
    grpc_port: int = field(init=False, default=0)
    http_port: int = field(init=False, default=0)
    metrics_port: int = field(init=False, default=0)
    shm_prefix: str = field(init=False, default="")
    workdir: Path | None = field(init=False, default=None)
    process: subprocess.Popen | None = field(init=False, default=None, repr=False)

    @property
    def grpc_url(self) -> str:
        return f"{self.config.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"http://{self.config.host}:{self.http_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.config.host}:{self.metrics_port}/metrics"

    @property
    def log_path(self) -> Path:
        if self.workdir is None:
            raise TritonLaunchError("the server has not been started")
        return self.workdir / "tritonserver.log"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def start(self, timeout: float = 120.0) -> TritonServer:
        """Launch the server and wait until it and every model are ready; raise TritonLaunchError with the log's tail
        (the server already stopped) if it fails or times out."""
        if self.process is not None:
            raise TritonLaunchError("the server is already running")
        install = TritonInstall.find()
        cfg = self.config
        if not Path(cfg.repository).is_dir():
            raise TritonLaunchError(f"{cfg.repository}: no such model repository")
        reaper.reap()
        self.workdir = Path(cfg.workdir) if cfg.workdir else reaper.new_workdir()
        backends = _prepare_backends(install, self.workdir)
        # The server's and its stubs' temporary files (torch makes $TMPDIR/torchinductor_<user> at import) go in
        # the work directory too, so whatever removes it (stop, or the reaper after a kill) removes them.
        env = {**environment(install), "TMPDIR": str(_private_tmp(self.workdir))}
        self.grpc_port, self.http_port, self.metrics_port = (p or _free_port(cfg.host) for p in
                                                              (cfg.grpc_port, cfg.http_port, cfg.metrics_port))
        # Unique per server: the python backend names its segments <prefix><uuid>, so leftovers are attributable.
        self.shm_prefix = reaper.new_shm_prefix()
        command = [
            str(install.binary),
            f"--model-repository={Path(cfg.repository).resolve()}",
            f"--backend-directory={backends}",
            "--model-control-mode=none",
            f"--http-address={cfg.host}", f"--http-port={self.http_port}",
            f"--grpc-address={cfg.host}", f"--grpc-port={self.grpc_port}",
            f"--metrics-address={cfg.host}", f"--metrics-port={self.metrics_port}",
            "--allow-gpu-metrics=false",
            f"--log-verbose={cfg.log_verbose}",
            f"--exit-timeout-secs={cfg.exit_timeout_s}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
            *cfg.extra_args,
        ]
        try:
            with self.log_path.open("wb") as log:
                self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log,
                                                stderr=subprocess.STDOUT, env=env,
                                                cwd=self.workdir, start_new_session=True,
                                                preexec_fn=die_with_parent)
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout: float) -> None:
        """Poll /v2/health/ready until the server and all its models are ready."""
        process = self.process
        if process is None:
            raise TritonLaunchError("the server has not been started")
        deadline = time.monotonic() + timeout
        while True:
            if process.poll() is not None:
                raise TritonLaunchError(f"tritonserver exited with status {process.returncode} before it was ready; "
                                  f"its log ends:\n{self.log_tail()}")
            if _http_ok(f"{self.http_url}/v2/health/ready"):
                return
            if time.monotonic() > deadline:
                raise TritonLaunchError(f"tritonserver was not ready after {timeout:.0f} s; its log ends:\n"
                                        f"{self.log_tail()}")
            time.sleep(POLL_S)

    def _log_after(self, offset: int) -> str:
        try:
            with self.log_path.open("rb") as log:
                log.seek(offset)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, lines: int = LOG_TAIL_LINES) -> str:
        """The end of the log without the server's options table, which would push the models' errors out."""
        return "\n".join(_without_options_table(self.log_text().splitlines())[-lines:])

    def stop(self, grace: float | None = None) -> int | None:
        """Stop the server and its stubs, remove its shared memory (and its working directory if temporary);
        returns the server's exit status (negative: the signal that ended it). Safe to call twice and after a crash.

        SIGTERM goes to the server alone: it waits for in-flight requests (the exit timeout), unloads its models
        (their finalize runs) and ends its stubs. If it is still there after `grace` (default: the exit timeout plus
        STOP_MARGIN_S), or it reports the exit timeout expired, the whole process group is killed."""
        process, self.process = self.process, None
        status = None
        if process is not None:
            pgid = process.pid  # the leader of its own session
            grace = self.config.exit_timeout_s + STOP_MARGIN_S if grace is None else grace
            logged = self.log_path.stat().st_size if self.log_path.exists() else 0
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
            _wait_until(lambda: process.poll() is not None or EXIT_TIMEOUT_EXPIRED in self._log_after(logged), grace)
            if process.poll() is None:
                signal_group(pgid, signal.SIGKILL)
            status = process.wait()
            # A stub outlives a server that crashed or was killed; without its server it has nothing left to do.
            if not _wait_until(lambda: not group_members(pgid), ORPHAN_GRACE_S):
                signal_group(pgid, signal.SIGKILL)
                if not _wait_until(lambda: not group_members(pgid), STOP_MARGIN_S):
                    raise TritonLaunchError(f"processes {group_members(pgid)} of tritonserver {pgid} survived SIGKILL")
        if self.shm_prefix:
            for segment in SHM_DIR.glob(f"{self.shm_prefix}*"):
                segment.unlink(missing_ok=True)
        if self.config.workdir is None and self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return status

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def group_members(pgid: int) -> list[int]:
    """Live processes (zombies excluded: they hold nothing) in process group `pgid`, from /proc."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # exited while we looked
            continue
        # Fields after the parenthesised command name (which may contain spaces): state ppid pgrp ...
        state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            members.append(int(entry.name))
    return members


def _without_options_table(lines: list[str]) -> list[str]:
    kept, in_table = [], False
    for i, line in enumerate(lines):
        if line.startswith("+") and i + 1 < len(lines) and lines[i + 1].startswith("| Option "):
            in_table = True
        elif in_table and line.startswith("+") and i > 0 and not lines[i - 1].startswith("| Option "):
            in_table = False
            continue
        if not in_table:
            kept.append(line)
    return kept


def _prepare_backends(install: TritonInstall, workdir: Path) -> Path:
    backends = workdir / "backends"
    shutil.rmtree(backends, ignore_errors=True)
    shutil.copytree(install.root / "backends", backends, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(install.stub, backends / "python" / STUB_NAME)
    return backends


def _private_tmp(workdir: Path) -> Path:
    tmp = workdir / "tmp"
    tmp.mkdir(mode=0o700, exist_ok=True)
    return tmp


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


# Loopback must never go through an HTTP proxy from the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _http_ok(url: str) -> bool:
    try:
        with _DIRECT.open(url, timeout=1.0) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _wait_until(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL_S)
    return True
