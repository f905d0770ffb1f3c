"""The tritonserver runtime that ships in the nvidia-pytriton wheel: where its binary, backends and libraries are, the
environment the binary and its python-backend stub need, and the version it reports.

The wheel carries tritonserver 2.51 and the python backend, but not laid out for running the binary directly: its
environment puts the wheel's bundled libraries and this interpreter's libpython on LD_LIBRARY_PATH (the stub links
libpython and finds its other libraries through a relative RPATH that copying the backends breaks), this
interpreter's `bin` first on PATH (the stub takes its Python environment, so numpy<2 and the appliance, from the
`python3` it finds there) and the appliance's sources on PYTHONPATH.

Both the launcher (`server.triton.launcher`) and the build manifest (`build_scripts.build`) use it, so it lives
below both.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import os
import signal
import subprocess
import sys
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from classification.errors import ApplianceError

STUB_NAME = "triton_python_backend_stub"


class TritonLaunchError(ApplianceError):
    """tritonserver could not be found, started or made ready."""


@dataclass(frozen=True)
class TritonInstall:
    """Where the wheel keeps the server, its backends, the per-Python stubs and its bundled shared libraries."""

    root: Path  # site-packages/pytriton/tritonserver
    libs: Path  # site-packages/nvidia_pytriton.libs

    @property
    def binary(self) -> Path:
        return self.root / "bin" / "tritonserver"

    @property
    def stub(self) -> Path:
        return self.root / "python_backend_stubs" / f"{sys.version_info.major}.{sys.version_info.minor}" / STUB_NAME

    @classmethod
    def find(cls) -> TritonInstall:
        try:
            import pytriton
        except ImportError:
            raise TritonLaunchError("tritonserver is not installed: install the appliance with its 'cpu' extra "
                              "(nvidia-pytriton)") from None
        site = Path(pytriton.__file__).resolve().parents[1]
        install = cls(site / "pytriton" / "tritonserver", site / "nvidia_pytriton.libs")
        missing = [str(p) for p in (install.binary, install.stub, install.libs) if not p.exists()]
        if missing:
            raise TritonLaunchError(f"the nvidia-pytriton install is incomplete: missing {', '.join(missing)}")
        return install


_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def die_with_parent() -> None:
    """Runs in the child before exec: the kernel SIGKILLs tritonserver if its owner dies without stopping it
    (the server has its own session, so a killed owner would otherwise leave it running). The signal follows the
    thread that started the server, so start it from a thread that lives as long as the server should."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


ORPHAN_GRACE_S = 3.0
# The watcher: a bare interpreter (-S -I: no site, no environment) polling the stub's parent; os and time only.
_WATCHER = """
import os, sys, time
stub, server, grace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
def parent():
    stat = open(f"/proc/{stub}/stat").read()
    return int(stat[stat.rindex(")") + 2:].split()[1])
while parent() == server:
    time.sleep(0.5)
time.sleep(grace)
os.kill(stub, 9)
"""


def watch_stub_parent(grace_s: float = ORPHAN_GRACE_S) -> subprocess.Popen:
    """Run in a python-backend stub (the model's initialize): a small watcher process ends the stub if its
    tritonserver dies and the stub has not exited `grace_s` later.

    The stub notices a dead server itself and exits within a second or two, but not if the server died in the middle
    of talking to it (killed with its owner while a stream was open): then it waits for good on a lock in shared
    memory that the dead server held, holding the GIL, so no thread of its own can end it, and it keeps the model's
    memory. Triton forks stubs from short-lived threads, so PR_SET_PDEATHSIG in the stub would kill it at once;
    the watcher instead watches the stub's parent change (reparenting is immediate, however the dead server is
    reaped), and dies with the stub itself (PR_SET_PDEATHSIG from the stub's main thread, which runs initialize), so
    it can never signal a reused pid. The launcher's reaper removes the shared memory a killed stub leaves."""
    return subprocess.Popen([sys.executable, "-S", "-I", "-c", _WATCHER, str(os.getpid()), str(os.getppid()),
                             str(grace_s)], stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)


def environment(install: TritonInstall) -> dict[str, str]:
    import engine

    env = dict(os.environ)

    def prepend(name: str, *paths: str) -> None:
        env[name] = os.pathsep.join([*paths, *filter(None, [env.get(name)])])

    prepend("LD_LIBRARY_PATH", str(install.libs), sysconfig.get_config_var("LIBDIR"))
    # Not resolved: a venv's bin/python is a symlink to the base interpreter, and the venv is what the stub needs.
    prepend("PATH", str(Path(sys.executable).parent))
    prepend("PYTHONPATH", str(Path(engine.__file__).resolve().parents[1]))
    return env


def signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


@functools.cache
def tritonserver_version() -> str | None:
    """The version the bundled server reports (it prints it in its start-up table); None if not installed."""
    try:
        install = TritonInstall.find()
    except TritonLaunchError:
        return None
    with tempfile.TemporaryDirectory(prefix="tritonserver-version-") as empty:
        command = [str(install.binary), f"--model-repository={empty}", "--model-control-mode=explicit",
                   "--allow-http=false", "--allow-grpc=false", "--allow-metrics=false"]
        process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, env=environment(install), start_new_session=True,
                                   preexec_fn=die_with_parent)
        try:
            assert process.stdout is not None
            for raw in process.stdout:
                cells = [c.strip() for c in raw.decode(errors="replace").split("|")]
                if len(cells) > 2 and cells[1] == "server_version":
                    return cells[2]
            return None
        finally:
            signal_group(process.pid, signal.SIGKILL)  # holds no models, no shared memory: nothing to clean
            process.wait()
