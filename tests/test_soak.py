"""scripts/soak.py at CI size: `appliance serve` on the canned model (front end, tritonserver, python-backend stub)
under a low open-loop load of Classify, ClassifyStream and ClassifyBatch for a few seconds. It must answer every call,
print its figures, and leave no process and no file behind. The 10-minute run at 80% of capacity is the script's
default; its figures are in docs/durability.md."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _alive(pid: int) -> bool:
    # A zombie (reaped late by init) counts as gone: it holds no memory and runs nothing.
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_short_soak_answers_everything_and_prints_its_figures(tmp_path: Path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "soak.py"), "--minutes", "0.3", "--capacity-s", "4",
                          "--load", "0.3", "--warmup-s", "4", "--sample-s", "2", "--clients", "4"],
                         cwd=REPO, env={**os.environ, "TMPDIR": str(tmp_path)}, capture_output=True, text=True,
                         timeout=400)
    out = run.stdout
    assert run.returncode == 0, out + run.stderr[-3000:]
    assert re.search(r"^capacity: \d+\.\d prompts/s", out, re.M), out
    assert re.search(r"^offered: \d+\.\d prompts/s .* achieved: \d+\.\d prompts/s", out, re.M), out
    assert re.search(r"^errors: 0$", out, re.M), out
    for kind in ("Classify", "ClassifyStream", "ClassifyBatch"):
        match = re.search(rf"^latency {kind}: (\d+) calls, p50 [\d.]+ ms, p99 [\d.]+ ms$", out, re.M)
        assert match and int(match[1]) > 0, out
    rows = re.findall(r"^  (\S[^(\n]*) \((\d+)\) +([\d.]+) +([\d.]+) +([\d.]+) +[+-][\d.]+ %$", out, re.M)
    names = {name.strip() for name, *_ in rows}
    assert {"front end", "tritonserver", "triton_python_backend_stub"} <= names, out
    assert all(float(mib) > 0 for *_, mib in rows)
    # Everything the run started has stopped, and its temporary files (Triton's working directory too) are gone.
    assert not [pid for _, pid, *_ in rows if _alive(int(pid))]
    assert list(tmp_path.iterdir()) == []
