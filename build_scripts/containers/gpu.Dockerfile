# GPU image: Triton with TensorRT-LLM 1.2.1 (the release engine/executors/trtllm.py is written against), plus the
# appliance and its tokenizer vocabulary. Nothing is downloaded at run time: build this where the registries are
# reachable, then `docker save` it for an air-gapped site (docs/air-gap.md).
#
#   docker build -f build_scripts/containers/gpu.Dockerfile -t safeguard-appliance:gpu .
#
# 25.12 is the Triton release whose TensorRT-LLM backend image pins TensorRT-LLM 1.2.1 (tensorrtllm_backend's
# Dockerfile at release/1.2.1; TensorRT-LLM 1.2 release notes name the 25.12 base images).
FROM nvcr.io/nvidia/tritonserver:25.12-trtllm-python-py3

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
 && python3 -c "from classification.vocab import ensure_encodings_base; print(ensure_encodings_base())"

EXPOSE 50151 9464
ENTRYPOINT ["appliance"]
CMD ["--help"]
