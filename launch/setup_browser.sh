#!/usr/bin/env bash
# Install the headless Chromium that the web environment (environments/web.py) drives, with apt-get, when it
# is missing; silent when it is already there. Playwright (a pip dependency) drives this system Chromium: its
# own browser download (`playwright install`) cannot reach its servers from these machines.
# Needs root or sudo the first time (about 1 minute). Source it or run it.
set -euo pipefail
if ! command -v chromium >/dev/null 2>&1; then
  echo "[setup-browser] installing chromium with apt-get (about 1 minute)"
  SUDO=""
  if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null
  command -v chromium >/dev/null 2>&1 || { echo "[setup-browser] chromium is still not on PATH" >&2; exit 1; }
  echo "[setup-browser] $(chromium --version 2>/dev/null)"
fi
