"""Dev tool (issues 11, 14): cold TTFT against the number of chunks the cold plan prefills from the front.

    python3 bench/dev/cold_front_probe.py --out DIR [--context 16384] [--kv-dtypes model,fp8] [--fronts 0,8,16,24,32]

Forces the cold-load plan's front (`layerwise.plan_request_loads` wrapped) and times cold
requests (page cache dropped, pools cleared) through the bench's runner, beside the plan's own
estimate for each front and the plan it would choose. Writes cold_front.json under --out. Not a
product path.
"""

from __future__ import annotations

import argparse
import json

import torch

from kvfuse.bench import ttft
from kvfuse.bench.timing import host_to_gpu_gbps, median, timed
from kvfuse.runtime import coldplan, layerwise
from kvfuse.runtime.fusion import full_prefill
from probe_setup import probe_setup


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--kv-dtypes", default="model,fp8")
    ap.add_argument("--fronts", default="")
    ap.add_argument("--reps", type=int, default=2)
    args, out, cfg, lm, n = probe_setup(ap)
    fronts = [int(x) for x in args.fronts.split(",")] if args.fronts else [0, n // 4, n // 2, 5 * n // 8, 3 * n // 4, 7 * n // 8, n]
    forced = {"front": None}
    original = layerwise.plan_request_loads

    def plan_request_loads(tiers, request_id, n_question, selector, ratio, rates, n_layers):
        plan, pooled = original(tiers, request_id, n_question, selector, ratio, rates, n_layers)
        if plan is not None and forced["front"] is not None:
            k = forced["front"]
            plan.choices = ["recompute"] * k + ["load"] * (len(plan.choices) - k)
        return plan, pooled

    layerwise.plan_request_loads = plan_request_loads
    ceiling = host_to_gpu_gbps(device="cuda")
    results = {"context": args.context, "ratio": args.ratio, "selector": args.selector, "fronts": fronts, "stores": {}}
    for kv in args.kv_dtypes.split(","):
        store, prefix, ids = ttft.ensure_store(ttft.store_dir(cfg, "llama3-8b", kv), lm, n, cfg.chunk_tokens, cfg.prefix_tokens, "cuda", kv)
        engine = ttft.make_engine(store, lm, cfg)
        tiers = engine.source.tiers
        disk = ttft.measure_disk_gbps(tiers, ids, cfg.workers)
        gen = torch.Generator().manual_seed(1)
        question = torch.randint(0, lm.model.config.vocab_size, (cfg.question_tokens,), generator=gen)
        runner = ttft.Runner(engine, question, args.selector)
        request = [prefix, *ids[:n]]
        metas = tiers.read_metas(request)
        tokens = torch.cat([*[metas[c]["tokens"] for c in request], question.int()])
        full_ms, _ = timed(lambda: full_prefill(lm, tokens), "cuda", reps=3)
        rates = coldplan.LoadRates(disk_gbps=disk, h2d_gbps=ceiling["pinned_gbps"],
                                   prefill_tok_s=len(tokens) / (median(full_ms) * 1e-3))
        runner.fused(request, args.ratio, "warm", rates)     # teaches fused_scale
        warm = [runner.fused(request, args.ratio, "warm")["ttft_ms"] for _ in range(3)]
        forced["front"] = None
        chosen = runner.fused(request, args.ratio, "cold", rates)
        rows = []
        for k in fronts:
            forced["front"] = k
            runs = [runner.fused(request, args.ratio, "cold", rates) for _ in range(args.reps)]
            keep = ("ttft_ms", "open_s", "acquire_s", "select_s", "recompute_s", "front_tokens", "cold", "plain_prefill")
            row = {"front": k, "ttft_ms": median([r["ttft_ms"] for r in runs]),
                   "runs": [{key: r.get(key) for key in keep} for r in runs],
                   "est_ms": 1e3 * (runs[0].get("cold_plan") or {}).get("est_s", float("nan"))}
            rows.append(row)
            print(f"[{kv}] front {k:>3}: cold {row['ttft_ms']:7.1f} ms  (full {median(full_ms):.1f}; "
                  f"{[round(r['ttft_ms'], 1) for r in runs]}; select {runs[0].get('select_s', 0)*1e3:.0f} "
                  f"recompute {runs[0].get('recompute_s', 0)*1e3:.0f} open {runs[0].get('open_s', 0)*1e3:.0f})", flush=True)
        forced["front"] = None
        plan = chosen.get("cold_plan") or {}
        results["stores"][kv] = {"disk_gbps": disk, "full_ms": median(full_ms), "warm_ms": median(warm),
                                 "rates": rates.as_dict(), "chosen": {"front": plan.get("recomputed"),
                                 "ttft_ms": chosen["ttft_ms"], "est_ms": 1e3 * plan.get("est_s", 0)}, "rows": rows}
        print(f"[{kv}] disk {disk:.2f} GB/s, full {median(full_ms):.1f}, warm {median(warm):.1f}, plan's choice "
              f"front {plan.get('recomputed')}: {chosen['ttft_ms']:.1f} ms; rates {rates.as_dict()}", flush=True)
        engine.close()
    (out / "cold_front.json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
