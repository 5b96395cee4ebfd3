#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the tests need on a fresh Debian machine, then runs the whole suite.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  # Debian's Chromium drives the real-browser test (never `playwright install`, which downloads).
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
python3 -m pytest "$@"
