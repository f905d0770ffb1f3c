"""A real `appliance serve --repository` (canned model), SIGKILLed while serving, with its temp directory set to the
test's own: its state is private while it serves (the audit log's -wal and -shm files included), tritonserver dies
with it, and what it could not remove (its Triton work directory; shared memory, where a stub had not removed it) is
removed by the next launcher start, so nothing of it remains in the temp directory or /dev/shm. It is killed with
a stream open, which is when a python-backend stub would otherwise outlive it. Triton and its
stubs get a temporary directory inside the work directory, so what they create there (torch makes
`$TMPDIR/torchinductor_<user>` at import) goes with it.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
from click.testing import CliRunner
from frontend_api import classify_request
from test_triton_client import FINGERPRINT, SLOW, canned_scripts

from appliance.cli import main
from build_scripts.repository import write_canned_repository
from classification.library import bundled_policy
from server.audit_file import AUDIT_DB_NAME
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc
from server.registry import DB_NAME
from server.triton import reaper
from server.triton.launcher import SHM_DIR, TritonConfig, TritonServer

APPLIANCE = Path(sys.executable).parent / "appliance"
READY_TIMEOUT_S = 120.0


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _live_pids_mentioning(text: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and text in (entry / "cmdline").read_bytes().decode(errors="replace") \
                    and reaper.start_time(int(entry.name)) is not None:
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def _environment(pid: int) -> dict[str, str]:
    entries = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(entry.split("=", 1) for entry in entries if "=" in entry)


def _classified(port: int, text: str = "hello there") -> bool:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        try:
            pb_grpc.SafeguardStub(channel).Classify(classify_request(text), timeout=10)
            return True
        except grpc.RpcError:
            return False


def _wait(condition, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_killed_serve_leaves_private_state_and_nothing_in_tmp_or_shm(tmp_path: Path, monkeypatch):
    repo = write_canned_repository(tmp_path / "repo", canned_scripts(), FINGERPRINT).path
    state, tmp = tmp_path / "state", tmp_path / "tmp"
    tmp.mkdir()
    added = CliRunner().invoke(main, ["policy", "--state-dir", str(state), "add", str(bundled_policy("smoke")),
                                      "--activate"])
    assert added.exit_code == 0, added.output
    port = _free_port()
    env = {**os.environ, "TMPDIR": str(tmp)}
    serve = subprocess.Popen([str(APPLIANCE), "serve", "--repository", str(repo), "--state-dir", str(state),
                              "--listen", f"127.0.0.1:{port}", "--metrics-port", "0", "--max-output-tokens", "40"],
                             env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        assert _wait(lambda: _classified(port) or serve.poll() is not None, READY_TIMEOUT_S), "never answered"
        assert serve.poll() is None, serve.communicate()[1].decode()[-2000:]
        owned_shm = f"{reaper.SHM_PREFIX}{serve.pid}_"
        (workdir,) = [p for p in tmp.iterdir() if p.name.startswith(f"{reaper.WORKDIR_PREFIX}{serve.pid}-")]
        assert list(SHM_DIR.glob(f"{owned_shm}*")), "the python backend's segments carry the owner's pid"
        # Their own temporary files (torch's inductor cache directory, ...) go inside the work directory.
        triton_pids = [pid for pid in _live_pids_mentioning(str(repo)) if pid != serve.pid]
        assert triton_pids and all(_environment(pid)["TMPDIR"] == str(workdir / "tmp") for pid in triton_pids)
        # The audit writer keeps its connection once it has written the record, so the log's -wal and -shm exist.
        assert _wait(lambda: (state / f"{AUDIT_DB_NAME}-shm").exists(), 10), "no audit record written"
        assert _mode(state) == 0o700
        for name in (DB_NAME, AUDIT_DB_NAME, f"{AUDIT_DB_NAME}-wal", f"{AUDIT_DB_NAME}-shm"):
            assert _mode(state / name) == 0o600, name
        # Killed mid-stream: a stub that was talking to its server when the server died would wait on it for good.
        for _ in range(3):
            threading.Thread(target=_classified, args=(port, SLOW), daemon=True).start()
        time.sleep(1.0)
    finally:
        serve.kill()
        serve.wait()
        serve.stderr.close()
    # The kernel kills tritonserver with its owner, and the stubs with their server (engine.triton.runtime).
    assert _wait(lambda: not _live_pids_mentioning(str(repo)), 15), \
        "tritonserver or a stub outlived its owner"
    assert workdir.is_dir(), "a killed owner cannot clean up after itself (so this test can see the reaper work)"

    # The next start, here a launcher in this process with the same temp directory, removes the leftovers.
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    with TritonServer(TritonConfig(repo)) as second:
        assert second.workdir is not None and second.workdir.parent == tmp
        assert not workdir.exists()
        assert list(SHM_DIR.glob(f"{owned_shm}*")) == []
    assert list(tmp.iterdir()) == []
    assert list(SHM_DIR.glob(f"{owned_shm}*")) == []


def test_the_reaper_spares_live_owners_and_unattributable_files(tmp_path: Path):
    live = tmp_path / f"{reaper.WORKDIR_PREFIX}{os.getpid()}-{reaper.start_time(os.getpid())}-abc"
    reused = tmp_path / f"{reaper.WORKDIR_PREFIX}{os.getpid()}-1-abc"  # our pid, but an earlier process's
    foreign = tmp_path / f"{reaper.WORKDIR_PREFIX}something-else"
    for path in (live, reused, foreign):
        path.mkdir()
    shm = tmp_path / "shm"
    shm.mkdir()
    dead_segment = shm / f"{reaper.SHM_PREFIX}{os.getpid()}_1_0123abcd_uuid"
    live_segment = shm / f"{reaper.SHM_PREFIX}{os.getpid()}_{reaper.start_time(os.getpid())}_0123abcd_uuid"
    other = shm / "someone_elses_segment"
    for path in (dead_segment, live_segment, other):
        path.touch()
    assert sorted(reaper.reap(tmp_path, shm)) == sorted([reused, dead_segment])
    assert live.is_dir() and foreign.is_dir() and live_segment.exists() and other.exists()
