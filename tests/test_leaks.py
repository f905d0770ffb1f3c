"""A small storm of cancelled streams and slow readers against the Triton model running the reference executor
(`benchmarks/bench_cancel_storm.py` with small parameters, in its own process as a benchmark runs): every stream
is answered or cancelled, and the executor's requests in flight, and the streams the model holds open, return to
zero (read from Triton's metrics endpoint, where the model publishes them). The stub's resident memory is printed,
never asserted on; the full storm and its figures are the benchmark's.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from engine.executors.heap import HeapTrimmer

REPO = Path(__file__).resolve().parents[1]
STREAMS, SLOW_READERS, SLOW_EVERY, WARM_UP = 60, 3, 20, 2


def test_a_cancel_storm_leaves_nothing_in_flight(tmp_path: Path):
    out = tmp_path / "storm.json"
    run = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_cancel_storm", "--streams", str(STREAMS), "--slow-readers",
         str(SLOW_READERS), "--slow-every", str(SLOW_EVERY), "--sample-every", "20", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300)
    print(run.stdout)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(out.read_text())
    slow = SLOW_READERS * (STREAMS // SLOW_EVERY) + WARM_UP
    endings = result["endings"]
    assert endings.pop("cancelled by the client") == STREAMS
    assert sum(count for ending, count in endings.items() if ending.startswith("slow reader answered")) == slow
    assert all(ending.startswith("slow reader answered") for ending in endings), endings
    figures = result["figures"]
    assert {name: figures[name] for name in ("requests_running", "requests_waiting", "streams_open")} == dict.fromkeys(
        ("requests_running", "requests_waiting", "streams_open"), 0)
    assert figures["requests_finished"] == STREAMS + slow
    assert figures["finished_cancelled"] == STREAMS and figures["finished_error"] == 0
    assert figures["heap_trims"] >= 1, "the CPU heap is trimmed as requests finish"


def test_the_heap_trimmer_runs_at_most_once_per_interval():
    trimmer = HeapTrimmer(interval_s=3600)
    assert trimmer.available, "glibc has malloc_trim"
    assert trimmer.after_request() and not trimmer.after_request()
    assert trimmer.trims == 1
    eager = HeapTrimmer(interval_s=0)
    assert eager.after_request() and eager.after_request() and eager.trims == 2
