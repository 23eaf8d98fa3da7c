#!/usr/bin/env bash
# Set up the venv and run every test: the fast suite, then the slow end-to-end tests (2-process DDP run,
# a short SFT→GRPO run), then the vLLM backend against a real vLLM server (.venv-vllm, launch/setup_vllm.sh).
# pytest's exit 5 ("no tests ran") counts as a failure.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source launch/setup_venv.sh
bash launch/setup_browser.sh  # the web environment's tests drive a real headless Chromium
run() {
  local status=0
  python -m pytest "$@" || status=$?
  if [ "$status" -ne 0 ]; then
    echo "[test] pytest $* failed with exit $status (5 = no tests collected)" >&2
    exit "$status"
  fi
}
echo "[test] fast suite"
run -q
echo "[test] slow suite"
run -q -m slow
echo "[test] vLLM backend against a real vLLM server"
source launch/setup_vllm.sh
run -q -m vllm
echo "[test] all passed"
