"""A canned Triton model that implements the safeguard tensor contract (DESIGN §4.2) and streams scripted
harmony completions: generation costs nothing, so the front-end benchmark measures only the front end, and the
front end's tests can steer it (a marker token sequence in the prompt picks a script that streams slowly, fails or
answers otherwise). It is a real Triton python model, served by a real tritonserver.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from classification.library import bundled_policy
from engine.triton import contract

POLICY_FILE = bundled_policy("smoke")
SAFE_ANALYSIS = "The content does not mention bananas."
SAFE_FINAL = '{"violation": 0, "policy_category": null, "rule_ids": []}'
UNSAFE_ANALYSIS = "The content mentions bananas, so BN1.a applies."
UNSAFE_FINAL = '{"violation": 1, "policy_category": "BN1", "rule_ids": ["BN1.a"]}'

CANNED_MODEL = '''"""A canned decoupled model implementing the safeguard tensor contract (DESIGN 4.2), written by
benchmarks/bench_frontend.py: fixed completions chosen by a marker found in the prompt after its prefix."""
import json
import threading
import time
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils


def _contains(haystack, needle):
    n = len(needle)
    return any(haystack[i:i + n] == needle for i in range(len(haystack) - n + 1))


class TritonPythonModel:
    def initialize(self, args):
        self._dir = Path(args["model_repository"]) / args["model_version"]
        settings = json.loads((self._dir / "canned.json").read_text())
        self._scripts, self._log_requests = settings["scripts"], settings["log_requests"]
        self._seen = set()  # prefixes "cached" so far, as an executor's prefix cache would report them
        self._lock = threading.Lock()

    def execute(self, requests):
        for request in requests:
            arrays = {}
            for name in ("input_ids", "max_tokens", "prefix_len", "prefix_priority"):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                if tensor is not None:
                    arrays[name] = tensor.as_numpy().reshape(-1).tolist()
            sender = request.get_response_sender()
            # One thread per request, so slow scripts do not hold up other requests.
            threading.Thread(target=self._serve, args=(request.request_id(), arrays, sender), daemon=True).start()
        return None

    def _log(self, name, line):
        with self._lock, open(self._dir / name, "a") as log:
            log.write(line + "\\n")

    def _serve(self, request_id, arrays, sender):
        ids = arrays["input_ids"]
        prefix_len = arrays.get("prefix_len", [0])[0]
        key = tuple(ids[:prefix_len])
        with self._lock:
            cached = prefix_len if prefix_len and key in self._seen else 0
            if prefix_len:
                self._seen.add(key)
        budget = arrays["max_tokens"][0]
        if self._log_requests:
            self._log("requests.log", json.dumps({"id": request_id, "prompt": len(ids), "prefix_len": prefix_len,
                                                 "priority": arrays.get("prefix_priority", [None])[0],
                                                 "max_tokens": budget}))
        script = next((s for s in self._scripts if _contains(ids[prefix_len:], s["marker"])), self._scripts[-1])
        if script["error"]:
            sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(script["error"])),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
            return
        tokens = script["completion"][:budget]
        finish = "stop" if len(tokens) == len(script["completion"]) else "length"
        step = script["chunk"]
        chunks = [tokens[i:i + step] for i in range(0, len(tokens), step)] or [[]]
        for n, chunk in enumerate(chunks):
            if script["delay_s"]:
                time.sleep(script["delay_s"])
            cancelled = sender.is_cancelled()
            if cancelled:
                self._log("cancelled.log", request_id)
                chunk, finish = [], "cancelled"
            last = cancelled or n == len(chunks) - 1
            outputs = [pb_utils.Tensor("output_ids", np.array(chunk, dtype=np.int32)),
                       pb_utils.Tensor("cached_tokens", np.array([cached], dtype=np.int32)),
                       pb_utils.Tensor("finish_reason", np.array([finish.encode() if last else b""],
                                                                 dtype=np.object_))]
            # Every request must end with the final flag, cancelled ones too, or Triton waits for it at shutdown.
            sender.send(pb_utils.InferenceResponse(output_tensors=outputs),
                        flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if last else 0)
            if last:
                return
'''


@dataclass(frozen=True)
class Script:
    """What the canned model streams when `marker` occurs in the prompt after the prefix (empty: the default,
    which must come last)."""

    marker: Sequence[int]
    completion: Sequence[int] = ()
    chunk: int = 8  # tokens per streamed response
    delay_s: float = 0.0  # before each response
    error: str = ""  # answer with this Triton error instead


@dataclass(frozen=True)
class CannedModel:
    name: str
    directory: Path  # the version directory, where requests.log and cancelled.log appear

    def log_lines(self, name: str) -> list[str]:
        path = self.directory / name
        return path.read_text().splitlines() if path.exists() else []


def harmony_completion(encode_special: Callable[[str], list[int]], analysis: str, final: str) -> list[int]:
    """An analysis message then a final one, ended by <|return|>, as the model would write them."""
    return encode_special(f"<|channel|>analysis<|message|>{analysis}<|end|><|start|>assistant<|channel|>final"
                          f"<|message|>{final}<|return|>")


def write_canned_model(repo: Path, scripts: Sequence[Script], *, name: str = "canned",
                       fingerprint: str = "canned-model", log_requests: bool = True) -> CannedModel:
    """Add the canned model to a Triton repository; its config names `fingerprint` as the front end expects.
    With `log_requests` each request's tensors are appended to requests.log (tests read it; a benchmark should not
    pay for file appends that stall behind the audit log's fsyncs on the same disk)."""
    version = contract.version_dir(repo, name)
    version.mkdir(parents=True, exist_ok=True)
    (version / "model.py").write_text(CANNED_MODEL)
    scripted = [asdict(s) | {"marker": list(s.marker), "completion": list(s.completion)} for s in scripts]
    (version / "canned.json").write_text(json.dumps({"scripts": scripted, "log_requests": log_requests}))
    config = contract.model_config_text({contract.FINGERPRINT_PARAMETER: fingerprint}, "KIND_CPU", model=name)
    (version.parent / "config.pbtxt").write_text(config)
    return CannedModel(name, version)
