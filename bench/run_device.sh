#!/usr/bin/env bash
# One call on the device machine (nvidia-h200), in phases; everything lands in $OUT (at most 8 files):
#   tests      the CUDA-marked tests (CI runs the rest) of the driver (fast path = plain path on every selector) + loader tests
#   attention  per-layer recompute attention by backend (bench/attention.py) -> attention.{json,md}
#   ttft       kvfuse bench ttft, issue 11's command -> ttft.{json,md}, profile.txt, profile trace
#              (TTFT_SELECTOR, TTFT_COMPARE: the selector and the ones compared with it)
#   serve      kvfuse bench serve -> serve.{json,md} (run it alone: 8 files at most come back)
#   copy       the loader's host->GPU copies by design against the pinned ceiling, both shapes (bench/copy_ceiling.py)
#              -> copy_ceiling.{json,md} (~1 minute)
#   qwen       kvfuse bench ttft for the Qwen2.5-7B shape (loader share, cold plan) -> qwen/ttft.{json,md} (~3 minutes)
#   build      the build's CUDA tests (staging, write path = sequential path on the GPU) and
#              bench/build_throughput.py gpu (issue 14) -> build_throughput_gpu.{json,md} (needs dask + distributed)
#   kvttft     issue 14: bench ttft at 16k, r = 0.15 over a model-dtype, an fp8 and an int8 store -> kv-<dtype>/ttft.{json,md}
#   kvpair     issue 14: bf16 and fp8 stores' warm runs alternating in one process (paired) -> kv-pair/ttft.{json,md}
#   shapes     requests of new lengths with padded shapes off / on (bench/dev/shape_probe.py, one process each) and
#              the setting alternated per request at 16k -> shapes-{0,1}/shape_probe.json, shapes-alt/... (~3 minutes)
#   bash bench/run_device.sh [phases, default tests,attention,ttft]
# About 8 minutes for the default phases on an H200 (the tests ~2, attention ~1, ttft ~5).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench/results/device}
PHASES=${1:-tests,attention,ttft}
mkdir -p "$OUT"
LOG="$OUT/run.log"
export PYTHONUNBUFFERED=1
{
  date -u; nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv; nproc; free -g | head -2
  python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
  git log -1 --format='commit %H %s' 2>/dev/null
} >"$LOG" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$LOG" 2>&1 || echo "pip install -e . failed" | tee -a "$LOG"
# wheels the device image lacks (bm25s: the engine's retrieval), carried in .whl/ (see docs/loader.md)
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl >>"$LOG" 2>&1
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
has() { [[ ",$PHASES," == *",$1,"* ]]; }
if has tests; then
  echo "== tests" | tee -a "$LOG"
  timeout 170 python3 -m pytest -q -p no:cacheprovider -m cuda -W ignore::FutureWarning \
    tests/test_layerwise.py tests/test_pool.py tests/test_prefetch.py tests/test_engine_cuda.py tests/test_coldplan.py \
    tests/test_quant.py tests/test_selectors.py tests/test_fusion.py tests/test_attention_recorder.py \
    tests/test_shape_buckets.py 2>&1 | tail -30 | tee -a "$LOG"
fi
if has tests; then   # the fused gather kernel (opt-in, KVFUSE_GATHER_KERNEL=1) against the torch gather on the GPU
  timeout 120 python3 -m pytest -q -p no:cacheprovider -W ignore::FutureWarning tests/test_gather_kernel.py 2>&1 \
    | tail -5 | tee -a "$LOG"
fi
if has attention; then
  echo "== attention" | tee -a "$LOG"
  timeout 120 python3 -m kvfuse.bench.attention --contexts 16384,32768 --ratio 0.15 --reps 20 --out "$OUT" 2>&1 \
    | grep -v '^{' | tee -a "$LOG"
fi
if has ttft; then
  echo "== bench ttft" | tee -a "$LOG"
  timeout 450 python3 -m kvfuse.cli bench ttft --shapes llama3-8b --contexts 16384,32768 --ratios 0.15 --reps 5 \
    --selector "${TTFT_SELECTOR:-kvfuse}" --compare-selectors "${TTFT_COMPARE:-a3,prophet,kvfuse-staged}" --out "$OUT" 2>&1 \
    | grep -v Warning | tee -a "$LOG"
  mv "$OUT"/profile_*.txt "$OUT/profile.txt" 2>/dev/null
fi
if has copy; then
  echo "== copy ceiling" | tee -a "$LOG"
  timeout 240 python3 -m kvfuse.bench.copy_ceiling --shapes llama3-8b,qwen2.5-7b --contexts 16384,32768 --reps 5 \
    --out "$OUT" 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if has qwen; then
  echo "== bench ttft qwen2.5-7b" | tee -a "$LOG"
  timeout 330 python3 -m kvfuse.cli bench ttft --shapes qwen2.5-7b --contexts 16384,32768 --ratios 0.15 --reps 5 \
    --compare-selectors none --profile none --out "$OUT/qwen" 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if has serve; then
  echo "== bench serve" | tee -a "$LOG"
  timeout 130 python3 -m kvfuse.cli bench serve --out "$OUT" 2>&1 | tee -a "$LOG"
fi
if has build; then
  echo "== build" | tee -a "$LOG"
  timeout 240 python3 -m pytest -q -p no:cacheprovider -m cuda -W ignore::FutureWarning \
    tests/test_shard_writer.py tests/test_build.py 2>&1 | tail -15 | tee -a "$LOG"
  timeout 420 python3 -m kvfuse.bench.build_throughput gpu --shape llama3-8b --chunks 64 --rounds 3 --workdir /tmp/bt \
    --out "$OUT/build_throughput_gpu" 2>&1 | grep -v Warning | tail -20 | tee -a "$LOG"
fi
if has kvttft; then
  for kv in ${KV_DTYPES:-model fp8 int8}; do
    echo "== bench ttft --kv-dtype $kv" | tee -a "$LOG"
    timeout 200 python3 -m kvfuse.cli bench ttft --shapes llama3-8b --contexts 16384 --ratios 0.15 --reps 5 \
      --compare-selectors none --profile none --kv-dtype "$kv" --out "$OUT/kv-$kv" 2>&1 | grep -v Warning | tee -a "$LOG"
  done
fi
if has kvpair; then   # bf16 and fp8 warm runs alternating in one process: the paired difference (issue 14)
  echo "== bench ttft --pair-kv-dtype fp8" | tee -a "$LOG"
  timeout 300 python3 -m kvfuse.cli bench ttft --shapes llama3-8b --contexts 16384,32768 --ratios 0.15 --reps 3 \
    --compare-selectors none --profile none --kv-dtype model --pair-kv-dtype fp8 --pair-reps 12 \
    --out "$OUT/kv-pair" 2>&1 | grep -v Warning | tee -a "$LOG"
fi
if has shapes; then   # what a server's requests cost (docs/loader.md, "Attention at padded shapes")
  for b in 0 1; do
    echo "== shape probe KVFUSE_SHAPE_BUCKETS=$b" | tee -a "$LOG"
    KVFUSE_SHAPE_BUCKETS=$b timeout 150 python3 bench/dev/shape_probe.py --out "$OUT/shapes-$b" --context 16384 2>&1 \
      | grep -v Warn | tee -a "$LOG"
  done
  timeout 150 python3 bench/dev/shape_probe.py --out "$OUT/shapes-alt" --context 16384 --alternate 8 2>&1 \
    | grep -v Warn | tee -a "$LOG"
fi
cat "$OUT"/attention.md "$OUT"/ttft.md "$OUT"/copy_ceiling.md "$OUT"/qwen/ttft.md "$OUT"/serve.md \
  "$OUT"/build_throughput_gpu.md "$OUT"/kv-*/ttft.md 2>/dev/null
