"""Client cancellation for the Triton model, polled on a thread of its own, which also publishes the executor's figures.

`InferenceResponseSender.is_cancelled()` is a round trip from the python backend stub to the Triton process, and so
is setting a metric. Asked on the asyncio loop that drains the executor's results, each round trip would hold up
the tokens of every stream; NVIDIA's own Triton llmapi model polls cancellation on a separate thread for the same
reason (`cancellation_loop` in TensorRT-LLM's `triton_backend/all_models/llmapi/tensorrt_llm/1/model.py`). Here
the thread tells the executor through its thread-safe `cancel()`, again on every poll until the stream ends (a
request still queued on the loop may not be known to the executor yet).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, Protocol


class Sender(Protocol):
    def is_cancelled(self) -> bool:
        """Whether the client cancelled the request (pb_utils.InferenceResponseSender)."""


class CancellationWatcher:
    """The requests being answered, by executor request id, and the thread that polls them. Thread-safe."""

    def __init__(self, cancel: Callable[[str], Any], publish: Callable[[], None], log_error: Callable[[str], None],
                 poll_s: float, publish_s: float):
        self._cancel = cancel  # the executor's cancel(request_id), safe to call from any thread
        self._publish = publish
        self._log_error = log_error
        self.poll_s, self.publish_s = poll_s, publish_s
        self._lock = threading.Lock()
        self._senders: dict[str, Sender] = {}
        self._cancelled: set[str] = set()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="safeguard-cancellation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def watch(self, request_id: str, sender: Sender) -> None:
        with self._lock:
            self._senders[request_id] = sender

    def forget(self, request_id: str) -> None:
        """Stop polling this request's sender. Call it before the final response is sent: once it returns, no
        `is_cancelled()` on that sender is running or will start. A completed sender must not be asked: with the ask
        racing the final response, tritonserver 2.51 went down mid-run in tests/test_bounds.py."""
        with self._lock:
            self._senders.pop(request_id, None)
            self._cancelled.discard(request_id)

    def open_streams(self) -> int:
        with self._lock:
            return len(self._senders)

    def stop(self, timeout: float) -> bool:
        """Stop the thread and wait for it; False if it is still running after `timeout` seconds."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()

    def poll(self) -> None:
        """One pass over the requests being answered (the thread runs this every `poll_s`). Each sender is asked
        under the lock, so `forget` cannot return while its sender is being asked."""
        with self._lock:
            request_ids = list(self._senders)
        for request_id in request_ids:
            try:
                with self._lock:
                    sender = self._senders.get(request_id)
                    if sender is None:  # ended meanwhile
                        continue
                    if request_id not in self._cancelled and not sender.is_cancelled():
                        continue
                    self._cancelled.add(request_id)
                self._cancel(request_id)
            except Exception as exc:  # the watcher must outlive any one request
                self._log_error(f"safeguard: cancellation check for {request_id}: {exc!r}")

    def _run(self) -> None:
        published = float("-inf")
        while not self._stopping.wait(self.poll_s):
            if (now := time.monotonic()) - published >= self.publish_s:
                published = now
                try:
                    self._publish()
                except Exception as exc:  # figures are a window on the model, never a reason to stop watching
                    self._log_error(f"safeguard: publishing executor figures: {exc!r}")
            self.poll()
