# CPU image: the whole appliance on the reference executor (transformers on the CPU) with the bundled tritonserver
# from the nvidia-pytriton wheel. For evaluation, CI-like environments and air-gapped demos; no GPU needed.
#
#   docker build -f build_scripts/containers/cpu.Dockerfile -t safeguard-appliance:cpu .
#   docker run --rm safeguard-appliance:cpu quickstart
#
# Debian 12 (glibc 2.36) is what the tritonserver in nvidia-pytriton 0.7.0 was verified on.
FROM python:3.11.11-slim-bookworm

# APPLIANCE_STATE_DIR: the one state directory (policy registry, audit log) of `serve`, `policy` and `audit`.
ENV APPLIANCE_CACHE_DIR=/opt/safeguard/cache \
    APPLIANCE_STATE_DIR=/var/lib/safeguard \
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
COPY policies ./policies

# torch's CPU wheel comes from its own index; every other pin from pyproject.toml. The python backend stub of the
# bundled Triton links libpython, which the official image ships as a shared library.
RUN pip install "torch==2.13.0" --index-url https://download.pytorch.org/whl/cpu \
 && pip install ".[cpu]" \
 && python -c "from classification.vocab import ensure_encodings_base; print(ensure_encodings_base())" \
 && appliance synth --preset smoke --out /opt/safeguard/models/smoke

EXPOSE 50151 9464
ENTRYPOINT ["appliance"]
CMD ["quickstart"]
