#!/usr/bin/env bash
# The one-run GPU self-test (docs/gpu-selftest.md): synthesizes a full-width 2-layer gpt-oss-20b checkpoint, runs the
# reference executor on CPU and CUDA, and TensorRT-LLM / vLLM where importable; writes one JSON report, prints a
# summary, exits 1 when any item failed. Arguments go to `python -m engine.gpu.gpu_report` (--help lists them).
#
# Runs from a checkout, installed or not: on a bare GPU machine the repository root goes on PYTHONPATH, and Python
# packages the machine lacks (openai_harmony and pydantic, which the reference executor imports) may be carried as
# wheels in .whl/ beside this checkout's root; they are installed into a scratch directory, never into the system.
set -euo pipefail
cd "$(dirname "$0")/.."

py=${PYTHON:-}
if [ -z "$py" ]; then
    if [ -x .venv/bin/python ]; then py=.venv/bin/python; else py=python3; fi
fi
if ! "$py" -c "import openai_harmony" 2>/dev/null && compgen -G ".whl/*.whl" >/dev/null; then
    site=${TMPDIR:-/tmp}/gpu-selftest-site
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
if ! "$py" -c "import openai_harmony" 2>/dev/null; then
    echo "note: openai_harmony is not importable with $py; the reference executor needs it (see docs/gpu-selftest.md)" >&2
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
exec "$py" -m engine.gpu.gpu_report "$@"
