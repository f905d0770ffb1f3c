"""How fast the MXFP4 codec runs, and what expanding a checkpoint to BF16 costs in time and memory.

Run `python -m benchmarks.bench_mxfp4`. Codec figures use one gpt-oss-20b gate_up expert (5760 x 2880 values,
33 MB of BF16) and count BF16 bytes produced; the all-core figures give each thread its own expert, as a build
machine would. The converter figure expands a synthetic `mid` checkpoint in a child process, so its peak RSS
(VmHWM) covers the expansion alone; the checkpoint is synthesized once into `.cache/bench/`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from engine.checkpoint import mxfp4

REPO = Path(__file__).resolve().parents[1]
ROWS, COLS = 5760, 2880  # one gpt-oss-20b gate_up expert: [2I, H]
REPEATS = 5

_EXPAND = textwrap.dedent("""
    import json, sys, time
    from engine.checkpoint.expand import expand_checkpoint

    def high_water_bytes():
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    before = high_water_bytes()
    start = time.perf_counter()
    result = expand_checkpoint(sys.argv[1], sys.argv[2], workers=int(sys.argv[3]))
    seconds = time.perf_counter() - start
    print(json.dumps({"before": before, "after": high_water_bytes(), "seconds": seconds,
                      "bytes": result.total_bytes}))
""")


@dataclass(frozen=True)
class ExpandFigures:
    workers: int
    seconds: float
    written_bytes: int
    baseline_rss: int  # interpreter + numpy + engine, before expanding
    peak_rss: int


def _expert(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    blocks = rng.integers(0, 256, (ROWS, COLS // mxfp4.BLOCK, mxfp4.BLOCK_BYTES), dtype=np.uint8)
    scales = rng.integers(118, 124, (ROWS, COLS // mxfp4.BLOCK), dtype=np.uint8)
    return blocks, scales


def _median_seconds(run: Callable[[], object]) -> float:
    run()  # warm caches and page in the output buffers
    times = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def dequantize_rate(threads: int, *, transposed: bool) -> float:
    """GB/s of BF16 output, `threads` experts decoded at once, each into its own reused buffer."""
    rng = np.random.default_rng(0)
    experts = [_expert(rng) for _ in range(threads)]
    shape = (COLS, ROWS) if transposed else (ROWS, COLS)
    outs = [np.empty(shape, dtype=np.uint16) for _ in range(threads)]
    decode = mxfp4.dequantize_transposed if transposed else mxfp4.dequantize

    def one(i: int) -> None:
        decode(*experts[i], out=outs[i])

    with ThreadPoolExecutor(threads) as pool:
        seconds = _median_seconds(lambda: list(pool.map(one, range(threads))))
    return threads * ROWS * COLS * 2 / seconds / 1e9


def quantize_rate() -> float:
    """Million values per second quantized from float32."""
    values = (np.random.default_rng(0).standard_normal((ROWS, COLS)) * 0.02).astype(np.float32)
    return values.size / _median_seconds(lambda: mxfp4.quantize(values)) / 1e6


def mid_checkpoint() -> Path:
    """A synthetic `mid` checkpoint, built on first use (keyed by the preset, so a changed preset rebuilds it)."""
    import hashlib
    import json

    from engine.checkpoint.config import preset_dict
    from engine.checkpoint.synth import synthesize

    key = hashlib.sha256(json.dumps(preset_dict("mid"), sort_keys=True).encode()).hexdigest()[:12]
    path = REPO / ".cache" / "bench" / f"mid-{key}"
    if not (path / "config.json").is_file():
        synthesize("mid", path, tokenizer=False)
    return path


def expand_figures(src: Path, workers: int) -> ExpandFigures:
    with tempfile.TemporaryDirectory(dir=REPO / ".cache" / "bench") as tmp:
        proc = subprocess.run([sys.executable, "-c", _EXPAND, str(src), str(Path(tmp) / "out"), str(workers)],
                              cwd=REPO, capture_output=True, text=True, check=True)
    got = json.loads(proc.stdout)
    return ExpandFigures(workers, got["seconds"], got["bytes"], got["before"], got["after"])


def main() -> None:
    cores = len(os.sched_getaffinity(0))
    print(f"MXFP4 codec on one gpt-oss-20b gate_up expert ({ROWS} x {COLS}), median of {REPEATS}; {cores} cores")
    for transposed, label in ((False, "dequantize            [out, in]"), (True, "dequantize_transposed [in, out]")):
        one = dequantize_rate(1, transposed=transposed)
        every = dequantize_rate(cores, transposed=transposed)
        print(f"  {label}: {one:6.2f} GB/s BF16 on 1 core, {every:6.2f} GB/s on {cores} threads")
    rate = quantize_rate()
    print(f"  quantize (float32 in):           {rate:6.1f} M values/s = {rate * 4 / 1e3:.2f} GB/s of float32 read")

    src = mid_checkpoint()
    source_bytes = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    print(f"expand_checkpoint on a synthetic mid checkpoint ({source_bytes / 1e6:.0f} MB MXFP4)")
    for workers in sorted({1, cores}):
        f = expand_figures(src, workers)
        print(f"  workers={f.workers}: {f.seconds:5.2f} s for {f.written_bytes / 1e6:.0f} MB written "
              f"({f.written_bytes / f.seconds / 1e9:.2f} GB/s); peak RSS {f.peak_rss / 2**20:.0f} MiB, "
              f"{(f.peak_rss - f.baseline_rss) / 2**20:.0f} MiB above the {f.baseline_rss / 2**20:.0f} MiB baseline")


if __name__ == "__main__":
    main()
