"""The air-gap proof: nothing the appliance does needs a network. `make test` runs the whole suite through
scripts/offline.sh, inside a network namespace whose only interface is loopback; these tests check that the suite
really is in one, and run the quickstart there (tritonserver, the front end and real verdicts, all on 127.0.0.1)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
OFFLINE = REPO / "scripts" / "offline.sh"


def _namespace_problem() -> str | None:
    """Why no network namespace can be made here, or None when one can."""
    probe = subprocess.run([str(OFFLINE), sys.executable, "-c", "import socket; print(socket.if_nameindex())"],
                           capture_output=True, text=True, timeout=60)
    return None if probe.stdout.strip() == "[(1, 'lo')]" else (probe.stderr.strip() or probe.stdout.strip())


def test_offline_sh_leaves_only_loopback():
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(f"this machine cannot make a network namespace: {problem}")
    outside = [name for _, name in socket.if_nameindex()]
    if os.environ.get("APPLIANCE_OFFLINE") == "1":
        assert outside == ["lo"], "the suite runs under offline.sh but sees network interfaces"


def test_the_quickstart_gives_real_verdicts_without_a_network(tmp_path):
    problem = _namespace_problem()
    if problem is not None:
        pytest.skip(f"this machine cannot make a network namespace: {problem}")
    env = {k: v for k, v in os.environ.items() if k != "APPLIANCE_OFFLINE"}  # a namespace of its own, not ours
    appliance = Path(sys.executable).parent / "appliance"
    run = subprocess.run([str(OFFLINE), str(appliance), "quickstart", "--work-dir", str(tmp_path / "work")],
                         capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "0 verdict(s) differ from the labels" in run.stdout, run.stdout[-3000:]
