# GPU image for the vLLM engine (the A100 default; an --engine vllm choice on Hopper): Triton's python backend, vLLM
# 0.33.0 (the release engine/executors/vllm.py is written against) and the appliance with its tokenizer vocabulary.
# Nothing is downloaded at run time: build this where the registries are reachable, then `docker save` it for an
# air-gapped site (docs/air-gap.md, docs/vllm.md).
#
#   docker build -f build_scripts/containers/gpu-vllm.Dockerfile -t safeguard-appliance:gpu-vllm .
#
# The base is Triton's plain python-backend image, and vLLM comes from PyPI at the pin with the dependencies vLLM
# itself pins (its own CUDA build of torch 2.14.0 among them). Triton's `-vllm-python-py3` images carry whatever
# vLLM their month shipped; one may be used instead (--build-arg TRITON_IMAGE=...) only if it holds vLLM 0.33.x: the
# version check below refuses anything else.
ARG TRITON_IMAGE=nvcr.io/nvidia/tritonserver:26.10-py3
FROM ${TRITON_IMAGE}

ARG VLLM_VERSION=0.33.0

# APPLIANCE_STATE_DIR: the one state directory (policy registry, audit log) of `serve`, `policy` and `audit`.
# VLLM_NO_USAGE_STATS / DO_NOT_TRACK: vLLM would otherwise try to report usage; the appliance runs offline.
ENV APPLIANCE_CACHE_DIR=/opt/safeguard/cache \
    APPLIANCE_STATE_DIR=/var/lib/safeguard \
    TIKTOKEN_ENCODINGS_BASE=/opt/safeguard/cache/vocab \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    VLLM_NO_USAGE_STATS=1 \
    DO_NOT_TRACK=1 \
    PIP_NO_CACHE_DIR=1

WORKDIR /opt/safeguard/src
COPY pyproject.toml README.md ./
COPY appliance ./appliance
COPY classification ./classification
COPY engine ./engine
COPY server ./server
COPY build_scripts ./build_scripts
COPY benchmarks ./benchmarks
COPY policies /opt/safeguard/policies

# vLLM first, with its own pins (torch, transformers, numpy); then the appliance beside it without letting pip replace
# them (--no-deps, then the appliance's few pure-Python pins). The image build fails unless vLLM is the pinned
# release and the executor module and vLLM's engine API import.
RUN if ! python3 -c "import vllm" 2>/dev/null; then python3 -m pip install "vllm==${VLLM_VERSION}"; fi \
 && python3 -m pip install --no-deps . \
 && python3 -m pip install "click==8.5.1" "openai-harmony==0.0.8" "quicktok-v1==0.4.0" "prometheus-client==0.26.0" \
      "grpcio-health-checking==1.81.1" "grpcio-reflection==1.81.1" "tritonclient[grpc]==2.73.0" \
 && python3 -c "import sys; from importlib.metadata import version; v = version('vllm'); print('vllm', v); \
sys.exit(0 if v.startswith('0.33.') else 'expected vLLM 0.33.x')" \
 && python3 -c "from vllm import AsyncEngineArgs, SamplingParams, TokensPrompt; \
from vllm.sampling_params import RequestOutputKind; from vllm.v1.engine.async_llm import AsyncLLM; \
from vllm.exceptions import VLLMClientError; import engine.executors.vllm; print('vLLM engine API present')" \
 && python3 -c "from classification.vocab import ensure_encodings_base; print(ensure_encodings_base())"

EXPOSE 50151 9464
ENTRYPOINT ["appliance"]
CMD ["--help"]
