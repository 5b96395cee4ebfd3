#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls exactly this).
# Installs what the tests need on a fresh Debian machine, then runs the whole suite: `-m ""` clears the
# fast-tier default of pyproject.toml (`-m 'not slow'`), so the slow tier runs too. A later `-m` given
# to this script still wins. The fast tier alone, for development: `python3 -m pytest`.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v chromium >/dev/null 2>&1; then
  # Debian's Chromium drives the real-browser test (never `playwright install`, which downloads).
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null
fi
if ! apt-cache policy dataset-fashion-mnist 2>/dev/null | grep -q "Candidate: [0-9]"; then
  # The vision demo's test fetches Debian's Fashion-MNIST package (apt-get download): it needs the lists.
  apt-get update -qq
fi
python3 -m pip install -q -r requirements.txt -r requirements-dev.txt
python3 -m pytest -m "" "$@"
