#!/usr/bin/env bash
# Runs the whole test suite (fast and slow real-model tests), installing what a fresh machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
python3 -m pytest -m "slow or not slow" -q "$@"
