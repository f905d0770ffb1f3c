# GPU image: Triton with TensorRT-LLM 1.2.1 (the release engine/executors/trtllm.py is written against), plus the
# appliance and its tokenizer vocabulary. Nothing is downloaded at run time: build this where the registries are
# reachable, then `docker save` it for an air-gapped site (docs/air-gap.md).
#
#   docker build -f build_scripts/containers/gpu.Dockerfile -t safeguard-appliance:gpu .
#
# Why 26.07: in NVIDIA's Triton compatibility matrix (docs/introduction/compatibility.md, "Container Name:
# trtllm-python-py3") the 26.04, 26.05, 26.06 and 26.07 rows carry TensorRT-LLM 1.2.1 (26.03: 1.2.0; 25.12 to
# 26.02: 1.1.0), and tensorrtllm_backend's dockerfile/Dockerfile.triton.trt_llm_backend pins TENSORRTLLM_VER=1.2.1
# on its r26.04 to r26.07 branches. 26.07 is the newest of those rows: the matrix lists no trtllm image after it,
# and the 26.11 release notes say that release ships none. docs/trtllm.md ("Building the GPU image") says how to
# check a base image; the version check below repeats it in the build, because release notes have named the wrong
# TensorRT-LLM before.
FROM nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3

# APPLIANCE_STATE_DIR: the one state directory (policy registry, audit log) of `serve`, `policy` and `audit`.
ENV APPLIANCE_CACHE_DIR=/opt/safeguard/cache \
    APPLIANCE_STATE_DIR=/var/lib/safeguard \
    TIKTOKEN_ENCODINGS_BASE=/opt/safeguard/cache/vocab \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
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

# The image's own Python already has tensorrt_llm, torch and transformers; install the appliance beside them
# without letting pip replace those.
RUN python3 -m pip install --no-deps . \
 && python3 -m pip install "click==8.5.1" "openai-harmony==0.0.8" "quicktok-v1==0.4.0" "prometheus-client==0.26.0" \
      "grpcio-health-checking==1.81.1" "grpcio-reflection==1.81.1" \
 && python3 -c "import tensorrt_llm, sys; print('tensorrt_llm', tensorrt_llm.__version__); \
sys.exit(0 if tensorrt_llm.__version__.startswith('1.2.') else 'expected TensorRT-LLM 1.2.x')" \
 && python3 -c "from engine.executors.moe_backends import triton_kernels_available as a; \
print('triton_kernels importable:', a(), '(without it a TRITON MoE profile loads CUTLASS)')" \
 && python3 -c "from classification.vocab import ensure_encodings_base; print(ensure_encodings_base())"

EXPOSE 50151 9464
ENTRYPOINT ["appliance"]
CMD ["--help"]
