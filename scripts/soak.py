"""Soak: the appliance under steady load for minutes, watching for errors and for resident memory that keeps growing.

    python scripts/soak.py [--minutes 10] [--load 0.8] [--clients 16]

It writes a canned-model repository (build_scripts/repository.py: a fixed harmony completion streamed in
`--chunk`-token responses `--chunk-delay-ms` apart, like a model's decoding steps), registers the smoke policy in
a fresh state directory and starts `appliance serve --repository` in a subprocess: the front end process, the
tritonserver it supervises and the python-backend stub, as in production. Then:

1. capacity: `--clients` closed-loop clients call Classify for `--capacity-s` seconds; the rate they achieve, in
   prompts per second, is the measured capacity;
2. soak: an open loop offers `--load` of that capacity for `--minutes`, evenly spaced, whatever the answers do: a
   mix of Classify, ClassifyStream and small ClassifyBatch calls (a batch counts as its prompts), every call with
   a deadline; the RSS of every process in the appliance's tree is sampled every `--sample-s` seconds.

The front end runs with its defaults except `--max-in-flight` (256 here, 64 in the product): at 80% of capacity a
call takes tens of milliseconds and a handful are in flight, but a host that stalls for half a second (a shared CI
box does) piles up more than 64, which the front end rightly refuses with RESOURCE_EXHAUSTED. The soak is about
staying up and not growing, so it lets them queue; `--max-in-flight 64` runs it at the product's limit.

It prints capacity, offered and achieved rates, errors by status (the soak expects none), p50/p99 latency per kind
of call, and each process's RSS at the start, after the warm-up (`--warmup-s`, default one minute: caches, arenas
and the interpreter settle in it) and at the end, with the growth from the warm-up to the end. Exit status 1 on any
error. tests/test_soak.py runs it for a few seconds at a low load.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a file (`python scripts/soak.py`), not as a module
    sys.path.insert(0, str(REPO))

import grpc  # noqa: E402

from benchmarks.frontend_process import wait_serving  # noqa: E402
from build_scripts.repository import write_canned_repository  # noqa: E402
from classification.library import bundled_policy  # noqa: E402
from classification.policy import load_policy  # noqa: E402
from classification.vocab import load_harmony_encoding  # noqa: E402
from engine.executors.canned import SAFE_ANALYSIS, SAFE_FINAL, Script, harmony_completion  # noqa: E402
from server.generated.safeguard.v1 import safeguard_pb2 as pb  # noqa: E402
from server.generated.safeguard.v1 import safeguard_pb2_grpc as pb_grpc  # noqa: E402
from server.registry import Registry  # noqa: E402

KINDS = ("Classify", "ClassifyStream", "ClassifyBatch")
MIX = (0.7, 0.2, 0.1)  # share of calls per kind
BATCH_ITEMS = 3
DEADLINE_S = 30.0
READY_TIMEOUT_S = 300.0
TIMELINE_S = 60.0
SUBJECTS = ("apples", "the weather", "a parcel", "train times", "a recipe", "the meeting", "a new phone")


# -- the appliance under test -----------------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _write_repository(root: Path, chunk: int, chunk_delay_ms: float) -> None:
    encoding = load_harmony_encoding()
    analysis = " ".join([SAFE_ANALYSIS] * 4)  # a few dozen reasoning tokens, then the verdict
    completion = harmony_completion(lambda text: encoding.encode(text, allowed_special="all"), analysis, SAFE_FINAL)
    script = Script((), completion, chunk=chunk, delay_s=chunk_delay_ms / 1000)
    write_canned_repository(root, [script], "canned-model", keep_logs=False)


def start_appliance(root: Path, port: int, log_path: Path, max_in_flight: int) -> subprocess.Popen:
    state = root / "state"
    Registry(state).add(load_policy(bundled_policy("smoke")), activate=True)
    command = [sys.executable, "-c", "from appliance.cli import main; main()", "serve",
               "--repository", str(root / "repo"), "--listen", f"127.0.0.1:{port}", "--state-dir", str(state),
               "--metrics-port", "0", "--log-level", "warning", "--max-in-flight", str(max_in_flight)]
    with log_path.open("wb") as log:
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)


def stop_appliance(process: subprocess.Popen) -> None:
    """SIGTERM: the front end drains, then stops its tritonserver (and the stubs) itself."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# -- resident memory --------------------------------------------------------------------------------------------------

def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def _rss_kib(pid: int) -> int | None:
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return None


def _name(pid: int, root: int) -> str:
    if pid == root:
        return "front end"
    with contextlib.suppress(OSError):  # not comm: the kernel cuts it to 15 characters
        return Path(Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()).name
    return "?"


def sample_rss(root: int) -> dict[str, int]:
    """RSS in KiB of every process in the tree under `root` (the front end), keyed by name and pid."""
    tree, found, todo = _children(), {}, [root]
    while todo:
        pid = todo.pop()
        rss = _rss_kib(pid)
        if rss is not None:
            found[f"{_name(pid, root)} ({pid})"] = rss
        todo += tree.get(pid, [])
    return found


# -- the load ---------------------------------------------------------------------------------------------------------

@dataclass
class Tally:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {kind: [] for kind in KINDS})
    errors: Counter[str] = field(default_factory=Counter)
    prompts: int = 0  # answered prompts (a batch's items count one each)
    most_in_flight: int = 0  # calls outstanding at once, at the peak
    # Per window of the soak (TIMELINE_S from its start), so a burst of errors or growth can be told from a trend.
    started: float = field(default_factory=time.monotonic)
    answered_by_window: Counter[int] = field(default_factory=Counter)
    errors_by_window: Counter[int] = field(default_factory=Counter)
    peak_by_window: Counter[int] = field(default_factory=Counter)

    def window(self) -> int:
        return int((time.monotonic() - self.started) // TIMELINE_S)


def _content(i: int) -> pb.Content:
    return pb.Content(text=f"Message {i}: a short note about {SUBJECTS[i % len(SUBJECTS)]}, nothing more.")


def _call(stub: pb_grpc.SafeguardStub, kind: str, i: int) -> tuple[Callable[[], Awaitable[None]], int]:
    """One call of a kind, and how many prompts it costs."""
    policy = pb.PolicySelector(ref="smoke")

    async def classify() -> None:
        await stub.Classify(pb.ClassifyRequest(policy=policy, content=_content(i)), timeout=DEADLINE_S)

    async def stream() -> None:
        events = [e async for e in stub.ClassifyStream(pb.ClassifyRequest(policy=policy, content=_content(i)),
                                                       timeout=DEADLINE_S)]
        if not events or events[-1].WhichOneof("event") != "result":
            raise RuntimeError("the stream ended without a result")

    async def batch() -> None:
        items = [pb.BatchItem(item_id=str(n), content=_content(i + n)) for n in range(BATCH_ITEMS)]
        results = [r async for r in stub.ClassifyBatch(pb.ClassifyBatchRequest(items=items, policies=[policy]),
                                                       timeout=DEADLINE_S)]
        failed = [r.error.code for r in results if r.WhichOneof("outcome") == "error"]
        if failed or len(results) != BATCH_ITEMS:
            raise BatchItemError(failed[0] if failed else f"{len(results)} results for {BATCH_ITEMS} items")

    calls = {"Classify": (classify, 1), "ClassifyStream": (stream, 1), "ClassifyBatch": (batch, BATCH_ITEMS)}
    return calls[kind]


class BatchItemError(Exception):
    pass


async def _timed(tally: Tally, kind: str, call: Callable[[], Awaitable[None]], prompts: int) -> None:
    started = time.perf_counter()
    try:
        await call()
    except grpc.aio.AioRpcError as exc:
        tally.errors[f"{kind} {exc.code().name}"] += 1
        tally.errors_by_window[tally.window()] += 1
    except (BatchItemError, RuntimeError) as exc:
        tally.errors[f"{kind} {exc}"] += 1
        tally.errors_by_window[tally.window()] += 1
    else:
        tally.latencies_ms[kind].append((time.perf_counter() - started) * 1000)
        tally.prompts += prompts
        tally.answered_by_window[tally.window()] += prompts


async def measure_capacity(stub: pb_grpc.SafeguardStub, clients: int, seconds: float) -> tuple[float, Tally]:
    """Prompts per second that `clients` closed-loop Classify callers get through."""
    tally, counter, stop_at = Tally(), iter(range(10**9)), time.monotonic() + seconds

    async def client() -> None:
        while time.monotonic() < stop_at:
            call, prompts = _call(stub, "Classify", next(counter))
            await _timed(tally, "Classify", call, prompts)

    started = time.monotonic()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally.prompts / (time.monotonic() - started), tally


async def open_loop(stub: pb_grpc.SafeguardStub, rate: float, seconds: float, kinds: list[str],
                    on_tick: Callable[[float], None]) -> tuple[Tally, int, float]:
    """Offer `rate` prompts/s for `seconds`, calls evenly spaced by their cost, never waiting for an answer.
    Returns the tally, prompts offered and the seconds until the last answer came."""
    tally, tasks, offered = Tally(), set(), 0
    started = time.monotonic()
    next_at, i = started, 0
    while (now := time.monotonic()) < started + seconds:
        if now < next_at:
            await asyncio.sleep(min(next_at - now, 0.5))
            on_tick(now - started)
            continue
        kind = kinds[i % len(kinds)]
        call, prompts = _call(stub, kind, i)
        task = asyncio.create_task(_timed(tally, kind, call, prompts))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        tally.most_in_flight = max(tally.most_in_flight, len(tasks))
        window = tally.window()
        tally.peak_by_window[window] = max(tally.peak_by_window[window], len(tasks))
        offered += prompts
        next_at += prompts / rate
        i += 1
        await asyncio.sleep(0)  # let answers in even when sending has fallen behind
    if tasks:
        await asyncio.wait(tasks)
    return tally, offered, time.monotonic() - started


def _mix(count: int = 100) -> list[str]:
    """A repeating sequence of call kinds in the MIX proportions, spread out."""
    slots = [(n / (count * share), kind) for kind, share in zip(KINDS, MIX, strict=True)
             for n in range(round(count * share))]
    return [kind for _, kind in sorted(slots)]


# -- the report -------------------------------------------------------------------------------------------------------

def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def _rss_table(samples: list[tuple[float, dict[str, int]]], warmup_s: float) -> list[str]:
    start = samples[0][1]
    warm = next((s for t, s in samples if t >= warmup_s), samples[-1][1])
    end = samples[-1][1]
    lines = [f"  {'process':<40} {'start MiB':>10} {'warm MiB':>9} {'end MiB':>8} {'growth after warm-up':>21}"]
    for name in end:
        first, settled, last = start.get(name), warm.get(name), end[name]
        growth = f"{(last - settled) / settled * 100:+.1f} %" if settled else "n/a"
        lines.append(f"  {name:<40} {_mib(first):>10} {_mib(settled):>9} {_mib(last):>8} {growth:>21}")
    return lines


def _mib(kib: int | None) -> str:
    return "-" if kib is None else f"{kib / 1024:.1f}"


def report(capacity: float, clients: int, capacity_s: float, load: float, tally: Tally, offered: int,
           elapsed: float, samples: list[tuple[float, dict[str, int]]], warmup_s: float) -> str:
    lines = [f"capacity: {capacity:.1f} prompts/s ({clients} closed-loop Classify clients, {capacity_s:g} s)",
             f"offered: {offered / elapsed:.1f} prompts/s ({load:.0%} of capacity, {offered} prompts over "
             f"{elapsed:.0f} s); achieved: {tally.prompts / elapsed:.1f} prompts/s; at most "
             f"{tally.most_in_flight} calls in flight at once",
             f"errors: {sum(tally.errors.values())}" + "".join(f"; {k}: {n}" for k, n in sorted(tally.errors.items()))]
    for kind, values in tally.latencies_ms.items():
        lines.append(f"latency {kind}: {len(values)} calls, p50 {_percentile(values, 0.5):.1f} ms, "
                     f"p99 {_percentile(values, 0.99):.1f} ms")
    lines.append(f"resident memory (RSS, {len(samples)} samples; growth from the sample after the "
                 f"{warmup_s:g} s warm-up to the end):")
    return "\n".join(lines + _rss_table(samples, warmup_s) + _timeline(tally, elapsed, samples))


def _timeline(tally: Tally, elapsed: float, samples: list[tuple[float, dict[str, int]]]) -> list[str]:
    windows = range(max(1, round(elapsed / TIMELINE_S)))
    last_window = windows[-1]
    # The answers that come in after the soak's end, while the last calls drain, count in its last window.
    for counts, combine in ((tally.answered_by_window, sum), (tally.errors_by_window, sum),
                            (tally.peak_by_window, max)):
        for late in [w for w in counts if w > last_window]:
            counts[last_window] = combine((counts[last_window], counts.pop(late)))
    last = [next((rss for t, rss in reversed(samples) if t < (w + 1) * TIMELINE_S), samples[0][1]) for w in windows]
    lines = [f"timeline, per {TIMELINE_S:g} s window of the soak:",
             "  answered prompts/s: " + " ".join(
                 f"{tally.answered_by_window[w] / (TIMELINE_S if w < last_window else elapsed - w * TIMELINE_S):.0f}"
                 for w in windows),
             "  errors: " + " ".join(str(tally.errors_by_window[w]) for w in windows),
             "  most calls in flight: " + " ".join(str(tally.peak_by_window[w]) for w in windows)]
    lines += [f"  RSS MiB at the window's end, {name}: " + " ".join(_mib(rss.get(name)) for rss in last)
              for name in samples[-1][1]]
    return lines


# -- the run ----------------------------------------------------------------------------------------------------------

async def soak(args: argparse.Namespace, address: str, frontend_pid: int) -> tuple[str, bool]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.SafeguardStub(channel)
        print(f"measuring capacity for {args.capacity_s:g} s ...", file=sys.stderr, flush=True)
        capacity, probe = await measure_capacity(stub, args.clients, args.capacity_s)
        if probe.errors or capacity <= 0:
            raise RuntimeError(f"capacity run failed: {dict(probe.errors)}")
        seconds, samples = args.minutes * 60, [(0.0, sample_rss(frontend_pid))]

        def on_tick(t: float) -> None:
            if t - samples[-1][0] >= args.sample_s:
                samples.append((t, sample_rss(frontend_pid)))
                done = int(30 * min(1.0, t / seconds))
                print(f"\rsoak [{'#' * done:<30}] {t:.0f}/{seconds:.0f} s", end="", file=sys.stderr, flush=True)

        tally, offered, elapsed = await open_loop(stub, capacity * args.load, seconds, _mix(), on_tick)
        samples.append((elapsed, sample_rss(frontend_pid)))
        print(file=sys.stderr)
    text = report(capacity, args.clients, args.capacity_s, args.load, tally, offered, elapsed, samples,
                  args.warmup_s)
    return text, not tally.errors


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak at the offered load")
    parser.add_argument("--load", type=float, default=0.8, help="share of the measured capacity to offer")
    parser.add_argument("--clients", type=int, default=16, help="concurrent clients while measuring capacity")
    parser.add_argument("--capacity-s", type=float, default=20.0, help="seconds to measure capacity")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="memory growth is measured from this point")
    parser.add_argument("--sample-s", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--max-in-flight", type=int, default=256,
                        help="the front end's admission limit (the product default is 64); above the load's usual "
                             "concurrency, so a stall of a shared host queues calls rather than refusing them")
    parser.add_argument("--chunk", type=int, default=4, help="tokens per streamed Triton response")
    parser.add_argument("--chunk-delay-ms", type=float, default=2.0, help="pause before each streamed response")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root = Path(tmp)
        _write_repository(root / "repo", args.chunk, args.chunk_delay_ms)
        port, log_path = _free_port(), root / "appliance.log"
        process = start_appliance(root, port, log_path, args.max_in_flight)
        try:
            asyncio.run(wait_serving(f"127.0.0.1:{port}", process, log_path, READY_TIMEOUT_S))
            text, clean = asyncio.run(soak(args, f"127.0.0.1:{port}", process.pid))
        finally:
            stop_appliance(process)
        print(f"canned model: {args.chunk}-token responses {args.chunk_delay_ms:g} ms apart; --max-in-flight "
              f"{args.max_in_flight}; calls: "
              f"{', '.join(f'{k} {s:.0%}' for k, s in zip(KINDS, MIX, strict=True))} (batches of {BATCH_ITEMS}); "
              f"{os.cpu_count()} CPUs shared by the load, the front end and Triton")
        print(text)
        if process.returncode not in (0, -signal.SIGTERM):
            print(f"appliance serve exited {process.returncode}: {log_path.read_text()[-3000:]}")
            return 1
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
