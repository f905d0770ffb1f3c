"""The tritonserver launcher against the real bundled server, with tiny python models written into each test's
repository: readiness, binding, start-up failures reported with Triton's log, and nothing left behind after
stop (no server or stub process, no shared-memory segment), also after the stub or the server was killed."""

from __future__ import annotations

import ipaddress
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from engine.triton.runtime import TritonLaunchError, tritonserver_version
from server.triton.launcher import SHM_DIR, TritonConfig, TritonServer, group_members

ECHO_MODEL = '''
import threading
import numpy as np
import triton_python_backend_utils as pb_utils

class TritonPythonModel:
    def initialize(self, args):
        {initialize}

    def execute(self, requests):
        for request in requests:
            threading.Thread(target=self._answer, args=(request,)).start()

    def _answer(self, request):
        sender = request.get_response_sender()
        values = pb_utils.get_input_tensor_by_name(request, "x").as_numpy()
        for value in values:
            sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("y", np.array([value + 1], np.int32))]))
        sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
'''
ECHO_CONFIG = '''
backend: "python"
max_batch_size: 0
model_transaction_policy { decoupled: true }
input [ { name: "x" data_type: TYPE_INT32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_INT32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
'''


def write_echo_repository(root: Path, initialize: str = "pass") -> Path:
    """A repository with one decoupled python model `echo` that streams x+1 per element of x."""
    model = root / "echo"
    (model / "1").mkdir(parents=True)
    (model / "config.pbtxt").write_text(ECHO_CONFIG)
    (model / "1" / "model.py").write_text(ECHO_MODEL.format(initialize=initialize))
    return root


def stream_echo(server: TritonServer, values: list[int]) -> list[int]:
    client = grpcclient.InferenceServerClient(server.grpc_url)
    responses: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: responses.put((result, error)))
    try:
        x = grpcclient.InferInput("x", [len(values)], "INT32")
        x.set_data_from_numpy(np.array(values, dtype=np.int32))
        client.async_stream_infer("echo", [x], enable_empty_final_response=True)
        out: list[int] = []
        while True:
            result, error = responses.get(timeout=30)
            assert error is None, error
            if result.get_response().parameters["triton_final_response"].bool_param:
                return out
            out += result.as_numpy("y").tolist()
    finally:
        client.stop_stream()
        client.close()


def processes_mentioning(text: str) -> list[int]:
    """Live processes whose command line contains `text` (the stub's names the server's shared memory)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if text in cmdline and state != "Z":
            found.append(int(entry.name))
    return found


def stub_pids(server: TritonServer) -> list[int]:
    assert server.process is not None
    return [pid for pid in group_members(server.process.pid)
            if b"triton_python_backend_stub" in Path(f"/proc/{pid}/cmdline").read_bytes()]


def assert_nothing_left(server: TritonServer, pgid: int, workdir: Path) -> None:
    assert group_members(pgid) == []
    assert processes_mentioning(server.shm_prefix) == []
    assert processes_mentioning(str(workdir)) == []
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")) == []
    assert not workdir.exists()


def listening_addresses(port: int) -> set[str]:
    """Addresses with a socket listening on `port`, from /proc/net/tcp{,6} (state 0A is LISTEN); an IPv4-mapped
    IPv6 address (gRPC listens that way) counts as its IPv4 address."""
    found = set()
    for table in ("tcp", "tcp6"):
        for line in Path("/proc/net", table).read_text().splitlines()[1:]:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if fields[3] != "0A" or int(port_hex, 16) != port:
                continue
            raw = bytes.fromhex(address_hex)
            # The kernel prints each 32-bit word in host (little-endian) order.
            packed = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            address = ipaddress.ip_address(packed)
            mapped = getattr(address, "ipv4_mapped", None)
            found.add(str(mapped or address))
    return found


def test_serves_on_loopback_and_stop_leaves_nothing(tmp_path):
    repo = write_echo_repository(tmp_path / "repo")
    with TritonServer(TritonConfig(repo)) as server:
        assert server.process is not None
        pgid, workdir = server.process.pid, server.workdir
        assert workdir is not None
        assert stream_echo(server, [1, 2, 3]) == [2, 3, 4]
        client = grpcclient.InferenceServerClient(server.grpc_url)
        assert client.is_server_ready() and client.is_model_ready("echo")
        client.close()
        assert len(stub_pids(server)) == 1
        assert list(SHM_DIR.glob(f"{server.shm_prefix}*")), "the python backend uses the server's own prefix"
        for port in (server.grpc_port, server.http_port, server.metrics_port):
            assert listening_addresses(port) == {"127.0.0.1"}
    assert server.process is None
    assert_nothing_left(server, pgid, workdir)
    assert server.stop() is None  # a second stop is harmless


def test_failing_model_error_carries_triton_log(tmp_path):
    repo = write_echo_repository(tmp_path / "repo", initialize='raise RuntimeError("deliberate failure 4711")')
    server = TritonServer(TritonConfig(repo, workdir=tmp_path / "work"))
    with pytest.raises(TritonLaunchError) as caught:
        server.start(timeout=60)
    message = str(caught.value)
    assert "exited with status" in message and "deliberate failure 4711" in message
    assert server.process is None
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")) == []
    assert processes_mentioning(server.shm_prefix) == []
    assert (tmp_path / "work" / "tritonserver.log").is_file(), "a workdir given by the caller is kept"


def test_not_ready_in_time_is_an_error_and_cleans_up(tmp_path):
    repo = write_echo_repository(tmp_path / "repo", initialize="import time; time.sleep(4)")
    server = TritonServer(TritonConfig(repo))
    with pytest.raises(TritonLaunchError, match="not ready after 1 s"):
        server.start(timeout=1)
    assert processes_mentioning(server.shm_prefix) == []
    assert list(SHM_DIR.glob(f"{server.shm_prefix}*")) == []


@pytest.mark.parametrize("victim", ["stub", "server"])
def test_stop_cleans_up_after_a_killed_process(tmp_path, victim):
    server = TritonServer(TritonConfig(write_echo_repository(tmp_path / "repo"))).start()
    assert server.process is not None and server.workdir is not None
    pgid, workdir = server.process.pid, server.workdir
    (stub,) = stub_pids(server)
    os.kill(stub if victim == "stub" else pgid, signal.SIGKILL)
    time.sleep(0.5)
    if victim == "server":  # the stub outlives its server: an orphan holding the shared memory
        assert stub in group_members(pgid)
        assert list(SHM_DIR.glob(f"{server.shm_prefix}*"))
    started = time.monotonic()
    server.stop()
    assert time.monotonic() - started < 20
    assert_nothing_left(server, pgid, workdir)


def test_missing_repository(tmp_path):
    with pytest.raises(TritonLaunchError, match="no such model repository"):
        TritonServer(TritonConfig(tmp_path / "nowhere")).start()


def test_tritonserver_version():
    assert tritonserver_version() == "2.51.0"


def test_extra_args_reach_the_server(tmp_path):
    repo = write_echo_repository(tmp_path / "repo")
    config = TritonConfig(repo, exit_timeout_s=7, extra_args=("--pinned-memory-pool-byte-size=0",))
    with TritonServer(config) as server:
        log = server.log_text()
    options = {cells[1]: cells[2] for line in log.splitlines()
               if len(cells := [c.strip() for c in line.split("|")]) > 3}
    assert options["exit_timeout"] == "7"
    assert options["pinned_memory_pool_byte_size"] == "0"


def test_server_dies_with_an_owner_that_is_killed(tmp_path):
    repository = write_echo_repository(tmp_path / "repo")
    owner = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from server.triton.launcher import TritonConfig, TritonServer; "
         f"s = TritonServer(TritonConfig(repository={str(repository)!r})); s.start(120); "
         "print(s.process.pid, flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[1])
    try:
        server_pid = int(owner.stdout.readline())
        owner.kill()  # no chance to stop the server itself
        owner.wait()
        deadline = time.monotonic() + 10
        while Path(f"/proc/{server_pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = Path(f"/proc/{server_pid}").exists() and "zombie" not in Path(
            f"/proc/{server_pid}/status").read_text().lower()
        assert not alive, "tritonserver outlived the process that started it"
    finally:
        owner.kill()
