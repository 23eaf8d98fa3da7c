#!/usr/bin/env bash
# Create or refresh the project venv (.venv) with pinned versions; torch is held to its CPU wheel by
# launch/constraints.txt (an unconstrained install would pull a multi-GB CUDA build).
# Re-installs only when pyproject.toml or the constraints change. Source it: `source launch/setup_venv.sh`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${AGENTRL_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating venv at $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.agentrl-install-stamp"
want="$(cat "$ROOT/pyproject.toml" "$ROOT/launch/constraints.txt" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pinned dependencies (about 1-2 minutes on a fresh machine)"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c "$ROOT/launch/constraints.txt" -e "$ROOT[test,mcp,web,reasoning]"
  "$VENV/bin/python" -m pip check
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export HF_HOME="$ROOT/.cache/hf" TORCH_EXTENSIONS_DIR="$ROOT/.cache/torch_extensions"
