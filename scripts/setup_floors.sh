#!/usr/bin/env bash
# Floors job: .venv-floors with every direct dependency at its lowest allowed version (scripts/floors.txt, which
# tests/test_floors.py keeps equal to pyproject.toml's lower bounds; torch is the local CPU build, torch==2.13.0),
# then a fast subset of the suite (adapter, a 2-step trainer run, checkpoints, hub against the fake hub).
# Usage: bash scripts/setup_floors.sh [extra pytest args]      Idempotent: an existing .venv-floors is re-pinned.
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TRANSFORMERS_NO_ADVISORY_WARNINGS=1
[ -x .venv-floors/bin/python ] || python3 -m venv .venv-floors
py=.venv-floors/bin/python
"$py" -m pip install -q --upgrade pip >/dev/null
# torch first and explicitly: this takes the local CPU build instead of a multi-GB CUDA one.
"$py" -c "import torch" 2>/dev/null || "$py" -m pip install -q "torch==2.13.0"
# The package with its direct dependencies held at the floors (-c); their own dependencies resolve freely.
"$py" -m pip install -q -c scripts/floors.txt -e . "pytest>=8"
"$py" -m pip check
"$py" - <<'PY'
import importlib.metadata as md, re
pins = dict(re.match(r"([A-Za-z0-9_.-]+)==(\S+)", l).groups() for l in open("scripts/floors.txt")
            if l.strip() and not l.startswith("#"))
got = {name: md.version(name) for name in ["torch", *pins]}
bad = {n: (v, got[n]) for n, v in pins.items() if got[n] != v}
assert not bad, f"not at the floor (pinned, installed): {bad}"
print("floors:", " ".join(f"{n}=={v}" for n, v in got.items()))
PY
# The fast subset: one architecture (Llama, tied) of the per-architecture adapter tests, the trainer's loss, 2-step
# training, resume and save tests, one of each kind of checkpoint refusal and damage, and all hub tests (fake hub).
subset='(llama-tied or not tied) and not gradient_accumulation and not tokens_trained'
subset+=' and not (damaged and not truncate) and not (refused and not (temperature or another_teacher))'
exec "$py" -m pytest -q -p no:cacheprovider -m "not slow" -k "$subset" --durations=5 \
  tests/test_floors.py tests/test_adapter.py tests/test_trainer.py tests/test_checkpoints.py tests/test_hub.py "$@"
