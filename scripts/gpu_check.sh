#!/usr/bin/env bash
# One command for the GPU check: scripts/gpu_check.sh [OUT_FILE] [gpu_check.py options, e.g. --device cpu --quick]
#   Needs only torch (no vLLM). Python: $PYTHON, else the project venv, else python3.
#   Writes OUT_FILE (default gpu_check_results.json) and prints a summary; exits 1 if a correctness check failed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
out="${1:-gpu_check_results.json}"
shift || true
python="${PYTHON:-}"
if [ -z "$python" ]; then
  if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
exec "$python" "$root/scripts/gpu_check.py" --out "$out" "$@"
