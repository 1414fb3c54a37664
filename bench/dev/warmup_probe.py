"""Dev tool: the first requests' TTFT after the engine's warm-up, by warm-up size (H200).

    python3 bench/dev/warmup_probe.py --out DIR
Not a product path.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from kvfuse.bench import ttft
from kvfuse.runtime import engine as engine_module
from kvfuse.runtime.engine import EngineConfig, FusionEngine
from kvfuse.runtime.requests import FusionRequest


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--chunks", type=int, default=4, help="warmup_chunks (one setting per process: compiled kernels and plans outlive an engine)")
    ap.add_argument("--warmup-runs", type=int, default=None, help="engine.WARMUP_RUNS for this process (default: the engine's)")
    args = ap.parse_args()
    if args.warmup_runs is not None:
        engine_module.WARMUP_RUNS = args.warmup_runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = ttft.TTFTConfig(shapes=("llama3-8b",), contexts=(4096,), ratios=(0.15,))
    lm = ttft.build_random_model("llama3-8b", "cuda")
    store, prefix, ids = ttft.ensure_store(Path(cfg.store_root) / "llama3-8b-w", lm, 24, 512, 32, "cuda")
    gen = torch.Generator().manual_seed(3)
    result = {}
    for chunks in (args.chunks,):
        t0 = time.perf_counter()
        engine = FusionEngine(store.cache_dir, lm, release=store.release, config=EngineConfig(
            verify=False, source="tiered", chunk_tokens=512, warmup_chunks=chunks))
        start_s = time.perf_counter() - t0
        runs, parts = [], []   # parts: each request's timings (ms) and the cold plan's front
        for i in range(7):   # 4 requests of chunks not pooled yet, then 3 of the first one's chunks (warm)
            q = torch.randint(0, lm.model.config.vocab_size, (18 + 3 * i,), generator=gen).tolist()
            first = 4 + 4 * i if i < 4 else 4
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            r = engine.fused_prefill(FusionRequest(question_ids=q, chunk_ids=ids[first:first + 4]))
            torch.cuda.synchronize()
            runs.append(round((time.perf_counter() - t1) * 1e3, 1))
            plan = r.timings.get("cold_plan") or {}
            parts.append({k: round(v * 1e3, 1) for k, v in r.timings.items() if k.endswith("_s") and isinstance(v, float)}
                         | {"front": plan.get("recomputed"), "tiers": [r.timings.get(t) for t in ("hot", "warm", "cold")]})
        engine.close()
        result[f"warmup_chunks_{chunks}"] = {"start_s": round(start_s, 2), "first_requests_ms": runs, "timings_ms": parts}
        print(f"warmup_chunks={chunks} runs={engine_module.WARMUP_RUNS} start_s={start_s:.2f} ms={runs} front={[p['front'] for p in parts]} select={[p.get('select_s') for p in parts]}", flush=True)
    (out / f"warmup_{args.chunks}_runs{engine_module.WARMUP_RUNS}.json").write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
