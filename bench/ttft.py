"""`kvfuse bench ttft`: full prefill against fused prefill from each tier (DESIGN §5-6).

For each model shape (random weights, built on the GPU) and context length, in one run:
full-prefill TTFT; fused TTFT with the chunks cold (on disk, page cache dropped),
warm (pinned host pool) and hot (GPU pool); the load stall (time the compute stream
waits on layer copies); the loader's throughput (a warm load alone, copies + gather +
re-rotation) against the host->GPU ceiling measured in the same run.

Cold runs use the cold-load plan (`runtime.coldplan`: load or recompute each chunk in no
pool) with the rates this run measured (the store's cold disk read rate, the pinned
ceiling, the full prefill's tokens per second); `cold.cold_plan` holds its choices and
`cold_load_all` the same cold request with every chunk loaded (the behaviour without it).
"""

from __future__ import annotations

import gc
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from kvfuse.loader.store import Store
from kvfuse.runtime.coldplan import LoadRates
from kvfuse.runtime.engine import EngineConfig, FusionEngine
from kvfuse.runtime.fusion import full_prefill
from kvfuse.runtime.layerwise import open_load
from kvfuse.runtime.requests import FusionRequest

from .shapes import build_random_model
from .metrics import bootstrap_ci
from .synthetic import write_synthetic_store
from .timing import environment, host_to_gpu_gbps, median, sync, timed

# Acceptance targets (issue 5): H100, Llama-3-8B shape, warm pool, ratio 0.15.
TARGETS = {"shape": "llama3-8b", "ratio": 0.15, "speedup": {16384: 3.5, 32768: 2.8},
           "loader_fraction": 0.8, "stall_fraction": 0.10}


@dataclass
class TTFTConfig:
    shapes: tuple[str, ...] = ("llama3-8b", "qwen2.5-7b")
    contexts: tuple[int, ...] = (4096, 16384, 32768)
    ratios: tuple[float, ...] = (0.1, 0.15, 0.2)
    selector: str = "a3"
    chunk_tokens: int = 512
    prefix_tokens: int = 32
    question_tokens: int = 32
    reps: int = 3
    host_pool_gb: float = 8.0
    gpu_pool_gb: float = 8.0
    workers: int = 8
    store_root: str = "/tmp/kvfuse-bench"
    store_chunks: int = 0          # chunks to write (0: as many as the longest context needs)
    device: str = "cuda"
    profile: str | None = "llama3-8b:16384:0.15"   # shape:context:ratio profiled (warm), or None
    compare_selectors: tuple[str, ...] = ("epic", "kvfuse")  # also timed warm at the target points
    out_dir: str = "bench/results"
    extra: dict = field(default_factory=dict)
    kv_dtype: str = "model"        # how the synthetic store holds the KV: "model", "fp8", "int8"
    cold_reps: int = 3             # cold runs with the plan (page cache dropped and pools cleared before each)
    pair_kv_dtype: str | None = None   # a second store's KV dtype, timed warm in alternation with the first
    pair_reps: int = 12                # pairs of those alternating runs (`paired_warm`)


def ensure_store(root: Path, lm, n_chunks: int, chunk_tokens: int, prefix_tokens: int, device: str,
                 kv_dtype: str = "model"):
    """Open the synthetic store for lm's shape at root, (re)writing it unless it fits."""
    try:
        store = Store.open(root)
        ok = (store.model["fingerprint"] == lm.spec.fingerprint and len(store.records()) >= n_chunks
              and store.manifest.get("params", {}).get("chunk_tokens") == chunk_tokens
              and store.codec.name == kv_dtype)
    except Exception:
        ok = False
    if not ok:
        shutil.rmtree(root, ignore_errors=True)
        t0 = time.perf_counter()
        write_synthetic_store(root, lm.spec, n_chunks, chunk_tokens, prefix_tokens,
                              vocab=lm.model.config.vocab_size, device=device, kv_dtype=kv_dtype)
        os.sync()  # written back, so dropping the page cache really makes the next read cold
        print(f"  wrote {n_chunks} chunks to {root} in {time.perf_counter() - t0:.1f} s", flush=True)
        store = Store.open(root)
    return store, store.prefix_id, [r.chunk_id for r in store.records()]


def make_engine(store, lm, cfg, policy="lookahead", drop_page_cache=False) -> FusionEngine:
    """The product engine over the bench store, with the tiered loader (store -> pinned -> GPU pool)."""
    return FusionEngine(store.cache_dir, lm, release=store.release, config=EngineConfig(
        verify=False, source="tiered", host_pool_bytes=int(cfg.host_pool_gb * 2**30),
        gpu_pool_bytes=int(cfg.gpu_pool_gb * 2**30), pool_policy=policy, chunk_tokens=cfg.chunk_tokens,
        drop_page_cache=drop_page_cache, measure_stall=True, warmup=False))  # the bench warms up itself


def measure_disk_gbps(tiers, chunk_ids: list[str], workers: int) -> float:
    """The store's cold read rate (GB/s): page cache dropped, `workers` threads reading whole
    chunks by pread into pinned buffers, as the prefetcher does; the pages are dropped again."""
    from concurrent.futures import ThreadPoolExecutor
    reader, store = tiers.prefetcher.reader, tiers.prefetcher.store
    ids = chunk_ids[: 2 * workers]
    L, two, H, _, D = tiers.host.slot_shape
    pin = tiers.device.type == "cuda"
    bufs = [torch.empty((L, two, H, store.record(c).n_tokens, D), dtype=tiers.host.dtype, pin_memory=pin)
            for c in ids]
    scales = [torch.empty((L, H, tiers.codec.row_width(D, store.record(c).n_tokens)), dtype=tiers.codec.scale_dtype,
                          pin_memory=pin) if tiers.codec.quantised else None for c in ids]  # [L, H_kv, W] a quantised store's
    reader.drop_cached_pages()
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda c: reader.read_into(c[0], c[1], scales_out=c[2]), zip(ids, bufs, scales)))
    seconds = time.perf_counter() - t0
    reader.drop_cached_pages()
    return sum(b.numel() * b.element_size() for b in bufs + [s for s in scales if s is not None]) / seconds / 1e9


class Runner:
    """Runs one request through the engine with its tiers in a given state (cold / warm / hot)."""

    def __init__(self, engine: FusionEngine, question: torch.Tensor, selector: str):
        self.engine, self.lm, self.question, self.selector = engine, engine.lm, question, selector
        self.tiers = engine.source.tiers
        self.n = 0
        self.mallocs = torch.cuda.memory_stats(self.tiers.device).get("num_device_alloc", 0) \
            if self.tiers.device.type == "cuda" else 0

    def fused(self, request: list[str], ratio: float, state: str, rates: LoadRates | None = None) -> dict:
        """One request; state cold / warm / hot. rates: the cold-load plan's (None: load every chunk)."""
        t = self.tiers
        self.engine.source.rates = rates
        cached = None                                      # cold: bytes of the store the page cache still holds
        if state == "cold":
            t.prefetcher.drain()   # reads a recomputing request left running would stay pinned
            t.gpu.clear()
            t.host.clear()
            t.prefetcher.reader.drop_cached_pages()
            cached = t.prefetcher.reader.cached_bytes()    # what the drop left: 0, or the run is not cold
        elif state == "warm":
            t.gpu.clear()
        self.n += 1
        rid = f"b{self.n}"
        sync(t.device)
        collections = [g["collections"] for g in gc.get_stats()]
        t0 = time.perf_counter()
        res = self.engine.fused_prefill(FusionRequest(question_ids=self.question.tolist(), chunk_ids=list(request[1:]),
                                                      selector=self.selector, ratio=ratio, request_id=rid))
        ms = (time.perf_counter() - t0) * 1e3
        out = {"ttft_ms": ms, "n_selected": res.n_recomputed, **{k: v for k, v in res.timings.items()},
               "gc_collections": [g["collections"] - c for g, c in zip(gc.get_stats(), collections)]}
        if cached is not None:
            out["page_cache_mb"] = cached / 1e6
        if t.device.type == "cuda":   # new cudaMalloc segments during the request (an allocator not yet warm)
            stats = torch.cuda.memory_stats(t.device)
            out["cuda_mallocs"] = stats.get("num_device_alloc", 0) - self.mallocs
            self.mallocs = stats.get("num_device_alloc", 0)
        return out

    def loader_only(self, request: list[str]) -> dict:
        """A warm load with no compute: every layer copied, gathered and re-rotated."""
        t = self.tiers
        t.gpu.clear()
        self.n += 1
        rid = f"b{self.n}"
        t.submit(rid, request)
        t0 = time.perf_counter()
        load = open_load(t, rid, len(self.question), self.lm.rope_inv_freq(), depth=0, measure_stall=True)
        load.issue_all()
        info = load.close()
        ms = info.get("copy_ms", (time.perf_counter() - t0) * 1e3)  # GPU: side-stream events
        h2d_ms = info.get("h2d_ms", ms)
        return {"copy_ms": ms, "h2d_ms": h2d_ms, "bytes": info["h2d_bytes"],
                "gbps": info["h2d_bytes"] / (h2d_ms * 1e-3) / 1e9,          # the transfers: disk tier -> GPU slots
                "pipeline_gbps": info["h2d_bytes"] / (ms * 1e-3) / 1e9}     # + gather + re-rotation, end to end


def paired_warm(a: Runner, a_request: list[str], b: Runner, b_request: list[str], ratio: float,
                pairs: int) -> dict:
    """Warm runs of two engines (two stores of one model, e.g. bf16 and fp8 KV) alternating in one
    process, in ABBA order, so that both see the same state of the host, whose speed moves the
    warm TTFT by 20-35 ms between requests on the H200 (docs/loader.md): the paired differences
    b - a (ms) and their bootstrap 95% interval decide "no slower" where medians of separate
    processes can't. Returns the runs, the medians, the mean difference and its interval."""
    a.fused(a_request, ratio, "warm")
    b.fused(b_request, ratio, "warm")
    a_ms, b_ms = [], []
    for i in range(pairs):
        order = [(a, a_request, a_ms), (b, b_request, b_ms)]
        for runner, request, out in (order if i % 2 == 0 else order[::-1]):
            out.append(runner.fused(request, ratio, "warm")["ttft_ms"])
    diff = [y - x for x, y in zip(a_ms, b_ms)]
    lo, hi = bootstrap_ci(diff)
    return {"a_runs_ms": [round(x, 2) for x in a_ms], "b_runs_ms": [round(x, 2) for x in b_ms],
            "a_ms": median(a_ms), "b_ms": median(b_ms), "diff_ms_mean": sum(diff) / len(diff),
            "diff_ms_ci95": [lo, hi], "b_faster_pairs": sum(d < 0 for d in diff), "pairs": len(diff)}


def new_shape_runs(runner: Runner, lm, request: list[str], tokens: torch.Tensor, question: torch.Tensor,
                   ratio: float, reps: int, device: str) -> dict:
    """Warm requests as a server sees them: each with a question of a length not asked before
    (a new shape for every kernel that plans per shape: cuDNN's attention; runtime/shape_buckets.py),
    and full prefills of prompts of new lengths likewise. The other rows replay one request."""
    gen = torch.Generator().manual_seed(2)
    vocab = lm.model.config.vocab_size
    fused, full = [], []
    try:
        for i in range(reps):
            runner.question = torch.randint(0, vocab, (len(question) + 3 + 2 * i,), generator=gen)
            fused.append(runner.fused(request, ratio, "warm")["ttft_ms"])
            longer = torch.cat((tokens, torch.randint(0, vocab, (3 + 2 * i,), generator=gen).to(tokens.dtype)))
            full.append(timed(lambda: full_prefill(lm, longer), device, reps=1, warmup=0)[0][0])
    finally:
        runner.question = question
    return {"fused_runs_ms": [round(x, 2) for x in fused], "full_runs_ms": [round(x, 2) for x in full],
            "fused_ms": median(fused), "full_ms": median(full), "speedup": median(full) / median(fused)}


def _summary(runs: list[dict]) -> dict:
    out = {"ttft_ms": median([r["ttft_ms"] for r in runs]), "runs_ms": [round(r["ttft_ms"], 2) for r in runs]}
    for key in ("stall_ms", "copy_ms", "open_s", "acquire_s", "issue_s", "select_s", "recompute_s", "repair_s",
                "page_cache_mb"):
        values = [r[key] for r in runs if key in r]  # runs may differ: a cold run's plan may prefill everything
        if values:
            out[key] = median(values)
    # each run's stages (None where a run has none) and Python's garbage collections during it
    # [gen 0, 1, 2]: which stage a slow run spent its extra time in (warm runs are bimodal on the H200)
    out["stages_runs"] = {key: [r.get(key) for r in runs] for key in ("select_s", "repair_s", "recompute_s", "stall_ms")
                          if any(key in r for r in runs)}
    if any("gc_collections" in r for r in runs):
        out["stages_runs"]["gc_collections"] = [r.get("gc_collections") for r in runs]
    for key in ("hot", "warm", "cold", "recompute", "n_selected", "h2d_bytes", "cold_plan", "front_tokens", "cuda_mallocs"):
        if key in runs[-1]:
            out[key] = runs[-1][key]
    return out


def profile_run(runner: Runner, request, ratio, path: Path) -> str:
    """torch.profiler over one warm run: a table by CUDA time, and a gzipped Chrome trace beside it."""
    import gzip
    from torch.profiler import ProfilerActivity, profile
    runner.fused(request, ratio, "warm")  # warm-up
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        runner.fused(request, ratio, "warm")
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=40)
    path.write_text(table)
    trace = path.with_suffix(".trace.json")
    prof.export_chrome_trace(str(trace))
    with open(trace, "rb") as f, gzip.open(f"{trace}.gz", "wb") as g:
        shutil.copyfileobj(f, g)
    trace.unlink()
    return table


def store_dir(cfg: TTFTConfig, shape: str, kv_dtype: str) -> Path:
    """Where the bench keeps its synthetic store of `shape` holding the KV as `kv_dtype`."""
    return Path(cfg.store_root) / (shape if kv_dtype == "model" else f"{shape}-{kv_dtype}")


def run_shape(cfg: TTFTConfig, shape: str, out_dir: Path) -> dict:
    print(f"[{shape}] building random model on {cfg.device}", flush=True)
    t0 = time.perf_counter()
    lm = build_random_model(shape, cfg.device)
    build_s = time.perf_counter() - t0
    n_store = max(cfg.store_chunks, max(cfg.contexts) // cfg.chunk_tokens)
    store, prefix, ids = ensure_store(store_dir(cfg, shape, cfg.kv_dtype), lm, n_store, cfg.chunk_tokens,
                                      cfg.prefix_tokens, cfg.device, cfg.kv_dtype)
    ceiling = host_to_gpu_gbps(device=cfg.device)
    print(f"  host->GPU: pinned {ceiling['pinned_gbps']:.1f} GB/s, pageable {ceiling['pageable_gbps']:.1f} GB/s",
          flush=True)
    engine = make_engine(store, lm, cfg)
    tiers = engine.source.tiers
    disk_gbps = measure_disk_gbps(tiers, ids, cfg.workers)
    print(f"  disk (page cache dropped, {cfg.workers} readers): {disk_gbps:.2f} GB/s", flush=True)
    gen = torch.Generator().manual_seed(1)
    question = torch.randint(0, lm.model.config.vocab_size, (cfg.question_tokens,), generator=gen)
    runner = Runner(engine, question, cfg.selector)
    pair = None   # (runner, [prefix, *chunk ids]) of the store timed against this one (--pair-kv-dtype)
    if cfg.pair_kv_dtype:
        pair_store, pair_prefix, pair_ids = ensure_store(store_dir(cfg, shape, cfg.pair_kv_dtype), lm, n_store,
                                                         cfg.chunk_tokens, cfg.prefix_tokens, cfg.device,
                                                         cfg.pair_kv_dtype)
        pair = Runner(make_engine(pair_store, lm, cfg), question, cfg.selector), [pair_prefix, *pair_ids]
    # the tokens without the KV: a `Store.read` of a quantised chunk dequantises through its memory
    # map, and the kernel keeps mapped pages however the cold runs drop the page cache
    metas = tiers.read_metas([prefix, *ids])
    prefix_tokens = metas[prefix]["tokens"]
    rows = []
    try:
        for ctx in cfg.contexts:
            n = ctx // cfg.chunk_tokens
            request = [prefix, *ids[:n]]
            tokens = torch.cat([prefix_tokens, *[metas[c]["tokens"] for c in ids[:n]],
                                question.int()])
            full_ms, _ = timed(lambda: full_prefill(lm, tokens), cfg.device, reps=cfg.reps)
            torch.cuda.empty_cache() if cfg.device.startswith("cuda") else None
            runner.fused(request, cfg.ratios[0], "warm")  # warm-up of this shape's kernels
            loader = [runner.loader_only(request) for _ in range(cfg.reps)]
            loader_gbps = median([x["gbps"] for x in loader])
            pipeline_gbps = median([x["pipeline_gbps"] for x in loader])
            print(f"  {ctx:>6} tokens: full {median(full_ms):8.1f} ms, loader {loader_gbps:.1f} GB/s", flush=True)
            for ratio in cfg.ratios:
                row = {"shape": shape, "context": ctx, "ratio": ratio, "tokens": len(tokens),
                       "kv_bytes": round(tiers.codec.bytes_per_token(lm.spec.n_layers, lm.spec.n_kv_heads,
                                                                     lm.spec.head_dim, lm.spec.dtype, cfg.chunk_tokens)
                                         * (len(tokens) - len(question))),   # as stored (fp8 / int8: codes + scales)
                       "full_ms": median(full_ms), "full_runs_ms": [round(x, 2) for x in full_ms],
                       "loader_gbps": loader_gbps, "loader_fraction": loader_gbps / ceiling["pinned_gbps"],
                       "pipeline_gbps": pipeline_gbps}
                # the cold-load plan with this run's rates: disk, pinned ceiling, the full prefill's tokens/s
                h2d = ceiling["pinned_gbps"] if ceiling["pinned_gbps"] == ceiling["pinned_gbps"] else 1e3  # CPU: nan
                rates = LoadRates(disk_gbps=disk_gbps, h2d_gbps=h2d,
                                  prefill_tok_s=len(tokens) / (median(full_ms) * 1e-3))
                # one warm request first teaches the plan what this fused pass costs (rates.fused_scale),
                # as a serving engine's earlier requests do
                runner.fused(request, ratio, "warm", rates)
                row["cold"] = _summary([runner.fused(request, ratio, "cold", rates) for _ in range(cfg.cold_reps)])
                row["cold_load_all"] = _summary([runner.fused(request, ratio, "cold")])
                row["cold_load_all"]["speedup"] = row["full_ms"] / row["cold_load_all"]["ttft_ms"]
                runner.fused(request, ratio, "warm")  # pinned again after the cold run's evictions
                row["warm"] = _summary([runner.fused(request, ratio, "warm") for _ in range(cfg.reps)])
                runner.fused(request, ratio, "hot")
                row["hot"] = _summary([runner.fused(request, ratio, "hot") for _ in range(cfg.reps)])
                row["new_shapes"] = new_shape_runs(runner, lm, request, tokens, question, ratio, cfg.reps, cfg.device)
                if pair is not None:
                    row["kv_pair"] = {"a": cfg.kv_dtype, "b": cfg.pair_kv_dtype,
                                      **paired_warm(runner, request, pair[0], pair[1][:n + 1], ratio, cfg.pair_reps)}
                for state in ("cold", "warm", "hot"):
                    row[state]["speedup"] = row["full_ms"] / row[state]["ttft_ms"]
                    row[state]["stall_fraction"] = row[state].get("stall_ms", 0.0) / row[state]["ttft_ms"]
                plan = row["cold"].get("cold_plan") or {}
                print(f"    r={ratio}: cold plan: {plan.get('recomputed', 0)} of {n} chunks recomputed "
                      f"(est. {1e3 * plan.get('est_s', 0):.0f} ms, all loaded {1e3 * plan.get('load_all_s', 0):.0f} ms); "
                      f"cold all loaded {row['cold_load_all']['ttft_ms']:7.1f} ms", flush=True)
                print(f"    r={ratio}: cold {row['cold']['ttft_ms']:7.1f}  warm {row['warm']['ttft_ms']:7.1f} "
                      f"(x{row['warm']['speedup']:.2f}, stall {row['warm'].get('stall_ms', 0):.1f})  "
                      f"hot {row['hot']['ttft_ms']:7.1f} (x{row['hot']['speedup']:.2f}) ms", flush=True)
                rows.append(row)
                if shape == TARGETS["shape"] and ratio == TARGETS["ratio"] and ctx in TARGETS["speedup"]:
                    row["selectors"] = {}
                    for name in cfg.compare_selectors:   # what the token selection costs, warm
                        other = Runner(engine, question, name)
                        other.n = runner.n = runner.n + 1000
                        other.fused(request, ratio, "warm")
                        runs = [other.fused(request, ratio, "warm") for _ in range(cfg.reps)]
                        row["selectors"][name] = _summary(runs)
                        row["selectors"][name]["speedup"] = row["full_ms"] / row["selectors"][name]["ttft_ms"]
                if cfg.profile == f"{shape}:{ctx}:{ratio}":
                    profile_run(runner, request, ratio, out_dir / f"profile_{shape}_{ctx}_{ratio}.txt")
        return {"shape": shape, "build_s": build_s, "ceiling": ceiling, "rows": rows,
                "pools": {"host": tiers.host.stats.as_dict(), "gpu": tiers.gpu.stats.as_dict()}}
    finally:
        engine.close()
        if pair is not None:
            pair[0].engine.close()
        del lm, tiers, runner, engine, pair
        gc.collect()
        if cfg.device.startswith("cuda"):
            torch.cuda.empty_cache()


def check_targets(shapes: list[dict]) -> list[dict]:
    out = []
    for s in shapes:
        for row in s["rows"]:
            if row["ratio"] != TARGETS["ratio"] or row["context"] not in TARGETS["speedup"]:
                continue
            ctx, warm = row["context"], row["warm"]
            # issue 11: every shape's loader at >= 80% of the ceiling, cold fused never slower than full prefill
            out += [
                {"what": ("" if s["shape"] == TARGETS["shape"] else f"{s['shape']} ") + f"loader / pinned ceiling at {ctx}",
                 "target": f">= {TARGETS['loader_fraction']}",
                 "measured": round(row["loader_fraction"], 3),
                 "met": row["loader_fraction"] >= TARGETS["loader_fraction"]},
                {"what": f"{s['shape']} cold fused / full prefill at {ctx}", "target": "<= 1.0",
                 "measured": round(row["cold"]["ttft_ms"] / row["full_ms"], 3),
                 "met": row["cold"]["ttft_ms"] <= row["full_ms"]},
            ]
            if s["shape"] != TARGETS["shape"]:
                continue
            out += [
                {"what": f"warm speed-up at {ctx}", "target": f">= {TARGETS['speedup'][ctx]}",
                 "measured": round(warm["speedup"], 2), "met": warm["speedup"] >= TARGETS["speedup"][ctx]},
                {"what": f"load stall / fused TTFT at {ctx}", "target": f"< {TARGETS['stall_fraction']}",
                 "measured": round(warm["stall_fraction"], 3),
                 "met": warm["stall_fraction"] < TARGETS["stall_fraction"]},
            ]
    return out


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# kvfuse bench ttft — {env.get('device')} — {env['date']}", "",
             f"Command: `{result['command']}`  ",
             f"Versions: torch {env['torch']}, transformers {env['transformers']}, CUDA {env.get('cuda')}, "
             f"python {env['python']}  ",
             f"Selector `{cfg['selector']}`, {cfg['chunk_tokens']}-token chunks, prefix {cfg['prefix_tokens']} + "
             f"question {cfg['question_tokens']} tokens, median of {cfg['reps']} runs (cold: median of {cfg.get('cold_reps', 1)}; all loaded: 1 run).  "]
    att = result.get("recompute_attention")
    if att:
        lines.append(f"Recompute attention: `{att['backend']}`"
                     + (f" (FlexAttention failed: {att['flex_failed']})" if att.get("flex_failed") else ""))
    lines.append("")
    for s in result["shapes"]:
        c = s["ceiling"]
        kv = cfg.get("kv_dtype", "model")
        lines += [f"## {s['shape']} (random weights; KV stored {'in the model dtype' if kv == 'model' else 'as ' + kv})", "",
                  f"Host->GPU in this run: pinned {c['pinned_gbps']:.1f} GB/s, pageable {c['pageable_gbps']:.1f} GB/s."
                  if c["pinned_gbps"] == c["pinned_gbps"] else "Host->GPU: none (no GPU in this run).",
                  "",
                  "| context | ratio | full prefill ms | fused cold ms | fused warm ms | fused hot ms | speed-up warm | "
                  "speed-up hot | stall warm ms (% TTFT) | loader GB/s (% pinned) | + gather, rotation GB/s |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in s["rows"]:
            w = r["warm"]
            lines.append(
                f"| {r['context']} | {r['ratio']} | {r['full_ms']:.1f} | {r['cold']['ttft_ms']:.1f} | "
                f"{w['ttft_ms']:.1f} | {r['hot']['ttft_ms']:.1f} | {w['speedup']:.2f}x | {r['hot']['speedup']:.2f}x | "
                f"{w.get('stall_ms', 0):.1f} ({100 * w['stall_fraction']:.1f}%) | "
                f"{r['loader_gbps']:.1f} ({100 * r['loader_fraction']:.0f}%) | {r.get('pipeline_gbps', 0):.1f} |")
        lines.append("")
        shapes = [r for r in s["rows"] if r.get("new_shapes")]
        if shapes:
            lines += ["Warm requests whose question has a length not seen before (a server's traffic; the table "
                      "above replays one request), and full prefills of new lengths:", "",
                      "| context | ratio | full prefill ms (new lengths) | fused warm ms (new question lengths) | speed-up |",
                      "|---|---|---|---|---|"]
            lines += [f"| {r['context']} | {r['ratio']} | {r['new_shapes']['full_ms']:.1f} | "
                      f"{r['new_shapes']['fused_ms']:.1f} | {r['new_shapes']['speedup']:.2f}x |" for r in shapes]
            lines.append("")
        cold = [r for r in s["rows"] if r["cold"].get("cold_plan")]
        if cold:
            lines += ["Cold (page cache dropped, nothing pinned): the cold-load plan against loading every chunk:", "",
                      "| context | ratio | full prefill ms | cold ms (plan; median of runs) | chunks recomputed | plan's estimate ms | "
                      "cold ms, all loaded | disk GB/s | prefill tok/s | page cache left MB |", "|---|---|---|---|---|---|---|---|---|---|"]
            for r in cold:
                p = r["cold"]["cold_plan"]
                runs = ", ".join(f"{x:.0f}" for x in r["cold"]["runs_ms"])
                lines.append(f"| {r['context']} | {r['ratio']} | {r['full_ms']:.1f} | {r['cold']['ttft_ms']:.1f} ({runs}) | "
                             f"{p['recomputed']} of {len(p['choices'])} | {1e3 * p['est_s']:.0f} | "
                             f"{r['cold_load_all']['ttft_ms']:.1f} | {p['rates']['disk_gbps']:.2f} | "
                             f"{p['rates']['prefill_tok_s']:.0f} | {r['cold'].get('page_cache_mb', float('nan')):.0f} |")
            lines.append("")
        cmp = [(r, n, x) for r in s["rows"] for n, x in r.get("selectors", {}).items()]
        if cmp:
            lines += ["Warm fused TTFT by selector (the selection's own cost shows here):", "",
                      "| context | ratio | selector | warm ms | select ms | of which repair ms | recompute ms | speed-up |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in s["rows"]:
                if "selectors" not in r:
                    continue
                w = r["warm"]
                for n, x in [(result['config']['selector'], w), *r["selectors"].items()]:
                    lines.append(f"| {r['context']} | {r['ratio']} | {n} | {x['ttft_ms']:.1f} | {1e3 * x['select_s']:.1f} | "
                                 f"{1e3 * x.get('repair_s', 0.0):.1f} | {1e3 * x['recompute_s']:.1f} | {x['speedup']:.2f}x |")
            lines.append("")
        pairs = [r for r in s["rows"] if "kv_pair" in r]
        if pairs:
            lines += ["Two stores' warm runs alternating in this process (ABBA; b - a paired per run, bootstrap 95%):", "",
                      "| context | ratio | a: KV | b: KV | a warm ms | b warm ms | b - a ms (95% interval) | b faster in |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in pairs:
                k = r["kv_pair"]
                lo, hi = k["diff_ms_ci95"]
                lines.append(f"| {r['context']} | {r['ratio']} | {k['a']} | {k['b']} | {k['a_ms']:.1f} | {k['b_ms']:.1f} | "
                             f"{k['diff_ms_mean']:+.1f} [{lo:+.1f}, {hi:+.1f}] | {k['b_faster_pairs']} of {k['pairs']} |")
            lines.append("")
    if result["targets"]:
        lines += ["## Targets (Llama-3-8B shape, warm pool, ratio 0.15)", "", "| what | target | measured | met |",
                  "|---|---|---|---|"]
        lines += [f"| {t['what']} | {t['target']} | {t['measured']} | {'yes' if t['met'] else 'NO'} |"
                  for t in result["targets"]]
    return "\n".join(lines) + "\n"


def run_ttft(cfg: TTFTConfig, command: str = "kvfuse bench ttft") -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    result = {"command": command, "environment": environment(cfg.device), "config": asdict(cfg), "shapes": []}
    for shape in cfg.shapes:
        result["shapes"].append(run_shape(cfg, shape, out_dir))
        (out_dir / "ttft.json").write_text(json.dumps(result, indent=1))  # keep what finished
    result["targets"] = check_targets(result["shapes"])
    from kvfuse.runtime import recompute_attention
    result["recompute_attention"] = {"backend": recompute_attention.default_backend(cfg.device),
                                     "flex_failed": recompute_attention._flex_failed}
    (out_dir / "ttft.json").write_text(json.dumps(result, indent=1))
    (out_dir / "ttft.md").write_text(markdown(result))
    return result
