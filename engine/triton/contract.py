"""The Triton contract of the `safeguard` model: its name and version, its tensors, its config
parameters, and `config.pbtxt` written from them. The Triton model, the Triton client, the repository writer and the
front end's model discovery all read it from here, so the two sides of the wire cannot drift apart.

    input_ids        INT32  [-1]  rendered prompt
    max_tokens       INT32  [1]   generation budget (0: prefill only, to warm a policy prefix)
    prefix_len       INT32  [1]   optional, leading prompt tokens that are a shared policy prefix (default 0)
    prefix_priority  INT32  [1]   optional, 0..100 retention priority of that prefix (default 35)
    temperature      FP32   [1]   optional, 0 is greedy (default)
    seed             UINT64 [1]   optional
    stop_token_ids   INT32  [-1]  optional (default <|return|> 200002, <|call|> 200012; an empty list: none)

    output_ids       INT32  [-1]  the tokens new in this response (may be empty, e.g. on a prefill-only request)
    cached_tokens    INT32  [1]   prompt tokens served from the KV cache; the same value on every response
    finish_reason    BYTES  [1]   "" until the last response, then "stop", "length" or "cancelled"
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

MODEL_NAME = "safeguard"
MODEL_VERSION = "1"
INSTANCE_KINDS = ("KIND_CPU", "KIND_GPU", "KIND_MODEL")

# config.pbtxt parameters. The engine settings file is read by the model; the fingerprint and context limit repeat
# it for the front end, which asks Triton for the model config over gRPC (that works where Triton runs on another
# host and the repository is out of reach).
SETTINGS_PARAMETER = "engine_settings"
FINGERPRINT_PARAMETER = "model_fingerprint"
MAX_CONTEXT_PARAMETER = "max_context"

# Triton's KServe v2 request parameter for an explicit end of stream, and the response parameter that carries it.
EMPTY_FINAL_PARAMETER = "triton_enable_empty_final_response"
FINAL_RESPONSE_PARAMETER = "triton_final_response"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    data_type: str  # config.pbtxt's TYPE_* name
    dims: tuple[int, ...]
    optional: bool = False

    @property
    def wire_type(self) -> str:
        """The KServe v2 datatype name that goes over gRPC (TYPE_FP32 -> FP32, TYPE_STRING -> BYTES)."""
        return "BYTES" if self.data_type == "TYPE_STRING" else self.data_type.removeprefix("TYPE_")


INPUTS = (
    TensorSpec("input_ids", "TYPE_INT32", (-1,)),
    TensorSpec("max_tokens", "TYPE_INT32", (1,)),
    TensorSpec("prefix_len", "TYPE_INT32", (1,), optional=True),
    TensorSpec("prefix_priority", "TYPE_INT32", (1,), optional=True),
    TensorSpec("temperature", "TYPE_FP32", (1,), optional=True),
    TensorSpec("seed", "TYPE_UINT64", (1,), optional=True),
    TensorSpec("stop_token_ids", "TYPE_INT32", (-1,), optional=True),
)
OUTPUTS = (
    TensorSpec("output_ids", "TYPE_INT32", (-1,)),
    TensorSpec("cached_tokens", "TYPE_INT32", (1,)),
    TensorSpec("finish_reason", "TYPE_STRING", (1,)),
)
INPUT = {spec.name: spec for spec in INPUTS}
OUTPUT = {spec.name: spec for spec in OUTPUTS}


def version_dir(repository: Path, model: str = MODEL_NAME) -> Path:
    """Where a repository keeps the model's code and engine settings."""
    return Path(repository) / model / MODEL_VERSION


def _tensor_block(specs: Sequence[TensorSpec]) -> str:
    rows = []
    for spec in specs:
        optional = " optional: true" if spec.optional else ""
        dims = ", ".join(str(d) for d in spec.dims)
        rows.append(f'  {{ name: "{spec.name}" data_type: {spec.data_type} dims: [ {dims} ]{optional} }}')
    return ",\n".join(rows)


def model_config_text(parameters: Mapping[str, str], instance_kind: str, model: str = MODEL_NAME) -> str:
    """config.pbtxt of a model that implements this contract. KIND_MODEL leaves device placement to the model
    (TensorRT-LLM spreads one model over several GPUs); the reference executor runs as KIND_CPU."""
    if instance_kind not in INSTANCE_KINDS:
        raise ValueError(f"instance kind must be one of {', '.join(INSTANCE_KINDS)}, got {instance_kind!r}")
    return (
        f'name: "{model}"\n'
        'backend: "python"\n'
        "max_batch_size: 0\n"
        "model_transaction_policy { decoupled: true }\n"
        f"input [\n{_tensor_block(INPUTS)}\n]\n"
        f"output [\n{_tensor_block(OUTPUTS)}\n]\n"
        # One instance: the executor batches concurrent requests itself, and a second would load the model twice.
        f"instance_group [ {{ count: 1 kind: {instance_kind} }} ]\n"
        + "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n' for k, v in parameters.items())
    )
