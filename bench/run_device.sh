#!/usr/bin/env bash
# One call on the device machine: the loader's tests (CUDA ones included), then `kvfuse bench ttft`
# and `kvfuse bench serve`. Logs, JSON, Markdown and the profile land in $OUT (6 files).
#   bash bench/run_device.sh [ttft shapes] [serve: yes|no]
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
SHAPES=${1:-llama3-8b,qwen2.5-7b}
SERVE=${2:-yes}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nproc; free -g; df -h /tmp
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
} >"$LOG" 2>&1
# kvfuse without its network-only extras: an editable install, else a namespace shim on PYTHONPATH
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1; then
  mkdir -p /tmp/shim/kvfuse
  for p in pipeline loader runtime bench; do ln -sfn "$PWD/$p" "/tmp/shim/kvfuse/$p"; done
  export PYTHONPATH=/tmp/shim${PYTHONPATH:+:$PYTHONPATH}
  echo "using the PYTHONPATH shim" >>"$LOG"
fi
KV=(python3 -c "from kvfuse.cli.main import run; run()")
echo "== tests" | tee -a "$LOG"
timeout 100 python3 -m pytest -q -p no:cacheprovider -m "cuda or not cuda" \
  tests/test_layerwise.py tests/test_pool.py tests/test_prefetch.py 2>&1 | tail -25 | tee -a "$LOG"
echo "== bench ttft" | tee -a "$LOG"
timeout 400 "${KV[@]}" bench ttft --shapes "$SHAPES" --reps 5 --store-chunks 160 --out "$OUT" 2>&1 | tee -a "$LOG"
mv "$OUT"/profile_*.txt "$OUT/profile.txt" 2>/dev/null
if [ "$SERVE" = yes ]; then
  echo "== bench serve" | tee -a "$LOG"
  timeout 130 "${KV[@]}" bench serve --out "$OUT" 2>&1 | tee -a "$LOG"
fi
cat "$OUT"/ttft.md "$OUT"/serve.md 2>/dev/null
