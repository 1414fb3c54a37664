"""`kvfuse bench serve`: a request stream over a corpus larger than the pools, LRU vs look-ahead LRU.

Each request retrieves `context / chunk_tokens` distinct chunks drawn by Zipf
popularity over the corpus (plus the shared prefix). The engine knows the next
`lookahead` requests (its pending queue): they are submitted ahead, so their
chunks are prefetched disk -> pinned, and the look-ahead policy protects them.
Disk reads drop the pages they read from the page cache, so a pool miss is a real
disk read. Reported per policy: hit rates per tier, mean / P50 / P99 TTFT (from the
request's start to its first-token logits).
"""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from kvfuse.runtime.requests import FusionRequest

from .shapes import build_random_model
from .timing import environment, median, percentile
from .ttft import ensure_store, make_engine


@dataclass
class ServeConfig:
    shape: str = "llama3-8b"
    corpus_chunks: int = 160
    context: int = 4096
    requests: int = 120
    warmup: int = 20                 # requests run before the measured ones (pools fill up)
    zipf_s: float = 1.0
    lookahead: int = 4               # queued requests the engine knows ahead
    ratio: float = 0.15
    selector: str = "kvfuse"             # the engine's default, as `kvfuse bench serve` runs it
    policies: tuple[str, ...] = ("lru", "lookahead")
    host_pool_gb: float = 5.0
    gpu_pool_gb: float = 2.0
    workers: int = 8
    chunk_tokens: int = 512
    prefix_tokens: int = 32
    question_tokens: int = 32
    seed: int = 0
    store_root: str = "/tmp/kvfuse-bench"
    device: str = "cuda"
    out_dir: str = "bench/results"


def request_stream(n_chunks: int, per_request: int, n_requests: int, s: float, seed: int) -> list[list[int]]:
    """Chunk indices per request: distinct chunks, popularity ~ 1 / rank^s over a shuffled corpus."""
    gen = torch.Generator().manual_seed(seed)
    if per_request > n_chunks:
        raise ValueError(f"a request of {per_request} chunks needs a corpus of at least that many, got {n_chunks}")
    rank_of = torch.randperm(n_chunks, generator=gen)
    weights = 1.0 / (torch.arange(1, n_chunks + 1, dtype=torch.float64) ** s)
    return [rank_of[torch.multinomial(weights, per_request, replacement=False, generator=gen)].tolist()
            for _ in range(n_requests)]


def run_policy(lm, store, prefix, ids, stream, question, cfg: ServeConfig, policy: str) -> dict:
    engine = make_engine(store, lm, cfg, policy=policy, drop_page_cache=True)
    tiers = engine.source.tiers
    tiers.prefetcher.reader.drop_cached_pages()
    try:
        handles = {}

        def submit(i):  # through the engine: its queue is what prefetch and look-ahead eviction see
            handles[i] = engine.submit_prefill(FusionRequest(
                question_ids=question.tolist(), chunk_ids=[ids[j] for j in stream[i]], selector=cfg.selector,
                ratio=cfg.ratio, request_id=f"q{i}"))

        for i in range(min(cfg.lookahead + 1, len(stream))):
            submit(i)
        runs = []
        t_start = time.perf_counter()
        for i in range(len(stream)):
            res = handles.pop(i).result()
            if i + cfg.lookahead + 1 < len(stream):
                submit(i + cfg.lookahead + 1)
            runs.append({"ttft_ms": res.timings["total_s"] * 1e3, "open_ms": res.timings["open_s"] * 1e3,
                         **{k: res.timings[k] for k in ("hot", "warm", "cold")}})
        wall = time.perf_counter() - t_start
        measured = runs[cfg.warmup:]
        n = sum(r["hot"] + r["warm"] + r["cold"] for r in measured)
        hot, warm, cold = (sum(r[k] for r in measured) for k in ("hot", "warm", "cold"))
        ttft = [r["ttft_ms"] for r in measured]
        return {
            "policy": policy, "requests": len(measured), "chunk_accesses": n,
            "gpu_hit_rate": hot / n, "pinned_hit_rate": warm / max(1, warm + cold), "memory_hit_rate": (hot + warm) / n,
            "disk_rate": cold / n, "ttft_mean_ms": sum(ttft) / len(ttft), "ttft_p50_ms": median(ttft),
            "ttft_p99_ms": percentile(ttft, 99), "wall_s": wall, "disk_reads": tiers.prefetcher.disk_reads,
            "pools": {"host": tiers.host.stats.as_dict(), "gpu": tiers.gpu.stats.as_dict()},
            "ttft_ms": [round(x, 2) for x in ttft],
        }
    finally:
        engine.close()


def markdown(result: dict) -> str:
    env, cfg = result["environment"], result["config"]
    lines = [f"# kvfuse bench serve — {env.get('device')} — {env['date']}", "",
             f"Command: `{result['command']}`  ",
             f"Versions: torch {env['torch']}, transformers {env['transformers']}, CUDA {env.get('cuda')}  ",
             f"{cfg['shape']} shape, corpus {cfg['corpus_chunks']} chunks of {cfg['chunk_tokens']} tokens "
             f"({result['corpus_gb']:.1f} GB), pinned pool {cfg['host_pool_gb']} GiB, GPU pool {cfg['gpu_pool_gb']} GiB; "
             f"{cfg['requests']} requests of {cfg['context']} tokens (+{cfg['warmup']} warm-up), Zipf s={cfg['zipf_s']}, "
             f"look-ahead {cfg['lookahead']} requests, selector {cfg['selector']} at ratio {cfg['ratio']}.", "",
             "Hit rates are the pools' own counters over the whole stream (warm-up included): a chunk counts as a "
             "hit in a tier when it is resident there (or being read into it by a prefetch) as the request runs; "
             "disk reads count every chunk read from disk, prefetches included. \"Waited\" is the share of chunk "
             "accesses of the measured requests that were not in memory yet when the request started.", "",
             "| policy | GPU pool hit rate | pinned pool hit rate (of GPU misses) | disk reads | waited | "
             "mean TTFT ms | P50 ms | P99 ms |",
             "|---|---|---|---|---|---|---|---|"]
    for p in result["policies"]:
        gpu, host = p["pools"]["gpu"], p["pools"]["host"]
        lines.append(f"| {p['policy']} | {100 * gpu['hit_rate']:.1f}% | {100 * host['hit_rate']:.1f}% | "
                     f"{p['disk_reads']} | {100 * p['disk_rate']:.1f}% | {p['ttft_mean_ms']:.1f} | "
                     f"{p['ttft_p50_ms']:.1f} | {p['ttft_p99_ms']:.1f} |")
    return "\n".join(lines) + "\n"


def run_serve(cfg: ServeConfig, command: str = "kvfuse bench serve") -> dict:
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lm = build_random_model(cfg.shape, cfg.device)
    store, prefix, ids = ensure_store(Path(cfg.store_root) / cfg.shape, lm, cfg.corpus_chunks, cfg.chunk_tokens,
                                      cfg.prefix_tokens, cfg.device)
    ids = ids[: cfg.corpus_chunks]
    per_request = cfg.context // cfg.chunk_tokens
    stream = request_stream(len(ids), per_request, cfg.warmup + cfg.requests, cfg.zipf_s, cfg.seed)
    gen = torch.Generator().manual_seed(1)
    question = torch.randint(0, lm.model.config.vocab_size, (cfg.question_tokens,), generator=gen)
    result = {"command": command, "environment": environment(cfg.device), "config": asdict(cfg),
              "corpus_gb": len(ids) * cfg.chunk_tokens * lm.spec.kv_bytes_per_token() / 1e9, "policies": []}
    try:
        for policy in cfg.policies:
            print(f"[serve] policy {policy}", flush=True)
            p = run_policy(lm, store, prefix, ids, stream, question, cfg, policy)
            print(f"  GPU hits {100 * p['gpu_hit_rate']:.1f}%, pinned hits {100 * p['pinned_hit_rate']:.1f}%, "
                  f"disk {100 * p['disk_rate']:.1f}%; TTFT mean {p['ttft_mean_ms']:.1f} ms, "
                  f"P99 {p['ttft_p99_ms']:.1f} ms", flush=True)
            result["policies"].append(p)
            gc.collect()
    finally:
        del lm
        gc.collect()
    (out_dir / "serve.json").write_text(json.dumps(result, indent=1))
    (out_dir / "serve.md").write_text(markdown(result))
    return result
