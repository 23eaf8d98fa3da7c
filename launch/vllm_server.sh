#!/usr/bin/env bash
# Start the vLLM server a recipe's vllm policy needs (creating .venv-vllm first), in the foreground:
#   bash launch/vllm_server.sh recipes/quickstart.yaml --port 8000
# then train against it:
#   accelerate launch -m agentrl.train --config recipes/quickstart.yaml --policy.backend=vllm \
#     --policy.url=http://127.0.0.1:8000
# (or let the trainer start and stop one itself: --policy.backend=vllm --policy.launch=true)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_venv.sh
source launch/setup_vllm.sh
RECIPE="${1:?usage: launch/vllm_server.sh RECIPE [--port P] [--model DIR] [--section.key=value ...]}"
shift
exec agentrl serve-vllm --config "$RECIPE" --policy.python="$AGENTRL_VLLM_PYTHON" "$@"
