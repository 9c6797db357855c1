#!/usr/bin/env bash
# Set up everything on a fresh machine: a virtual environment in .venv with the suite's dependencies
# (CPU or CUDA torch, whichever pip resolves for this machine), the test tools, and robustbench's data files.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip uv >/dev/null
UV=".venv/bin/uv pip install --python .venv/bin/python -q --compile-bytecode"
$UV -r pyproject.toml --extra test --extra corruptions --extra plots
# robustbench only for its ImageNet-C data files (see pyproject.toml); never imported.
$UV --no-deps "robustbench==1.1.1"
.venv/bin/python -c "import torch, open_clip, yacs; print(f'ready: torch {torch.__version__}, open_clip {open_clip.__version__}, cuda {torch.cuda.is_available()}')"
