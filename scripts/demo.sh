#!/usr/bin/env bash
# Sets everything up, then runs the main job on the embedded default:
# Wikipedia sample -> smollm2-135m -> KV cache -> a question answered from it, against a full prefill.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
kvfuse demo --workdir demo_cache "$@"
