"""`kvfuse bench ...`: the loader's benchmarks on the device machine (results under bench/results/)."""

from __future__ import annotations

import sys

import click


def _floats(text: str) -> tuple[float, ...]:
    return tuple(float(x) for x in text.split(","))


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(","))


def _command() -> str:
    return "kvfuse " + " ".join(sys.argv[1:])


@click.group()
def bench():
    """Benchmarks: TTFT against full prefill, and a serving stream (needs a CUDA GPU)."""


_common = [
    click.option("--selector", default="kvfuse", show_default=True,
                 help="Selector name from the registry (default: the engine's, what ask and serve use)."),
    click.option("--host-pool-gb", type=float, help="Pinned host pool size."),
    click.option("--gpu-pool-gb", type=float, help="GPU pool size."),
    click.option("--workers", default=8, show_default=True, type=click.IntRange(1), help="Disk read threads."),
    click.option("--store-root", default="/tmp/kvfuse-bench", show_default=True,
                 help="Where the synthetic stores are written (local disk)."),
    click.option("--device", default="cuda", show_default=True),
    click.option("--out", "out_dir", default="bench/results", show_default=True, type=click.Path()),
]


def common(fn):
    for opt in reversed(_common):
        fn = opt(fn)
    return fn


def _check(selector: str, device: str) -> None:
    from kvfuse.runtime.selectors import get_selector
    get_selector(selector)
    if device.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            raise click.ClickException("no CUDA GPU here; run the benchmarks on the device machine (or --device cpu "
                                       "with --shapes tiny for a smoke run)")


@bench.command()
@click.option("--shapes", default="llama3-8b,qwen2.5-7b", show_default=True)
@click.option("--contexts", default="4096,16384,32768", show_default=True)
@click.option("--ratios", default="0.1,0.15,0.2", show_default=True)
@click.option("--reps", default=3, show_default=True, type=click.IntRange(1))
@click.option("--store-chunks", default=0, show_default=True, type=click.IntRange(0),
              help="Chunks per synthetic store (0: what the longest context needs; 160 lets `bench serve` reuse it).")
@click.option("--compare-selectors", default="epic,kvfuse", show_default=True,
              help="Selectors also timed (warm) at the target points, comma-separated, or 'none'.")
@click.option("--profile", default="llama3-8b:16384:0.15", show_default=True,
              help="shape:context:ratio to profile with torch.profiler (warm), or 'none'.")
@click.option("--kv-dtype", default="model", show_default=True, type=click.Choice(["model", "fp8", "int8"]),
              help="How the synthetic store holds the KV (build-cache --kv-dtype); its pools hold the same bytes.")
@click.option("--pair-kv-dtype", default=None, type=click.Choice(["model", "fp8", "int8"]),
              help="Also time a second store holding the KV this way, warm, alternating with the first in this "
                   "process (paired runs: what separate processes' medians can't decide).")
@click.option("--pair-reps", default=12, show_default=True, type=click.IntRange(2),
              help="Alternating pairs for --pair-kv-dtype.")
@common
def ttft(shapes, contexts, ratios, reps, store_chunks, compare_selectors, profile, selector, host_pool_gb, gpu_pool_gb, workers, store_root,
         device, out_dir, kv_dtype="model", pair_kv_dtype=None, pair_reps=12):
    """Full prefill vs fused TTFT (cold / warm / hot), load stall and loader GB/s."""
    from kvfuse.bench.ttft import TTFTConfig, run_ttft
    _check(selector, device)
    cfg = TTFTConfig(shapes=tuple(shapes.split(",")), contexts=_ints(contexts), ratios=_floats(ratios), reps=reps,
                     store_chunks=store_chunks, selector=selector, workers=workers, store_root=store_root, device=device, out_dir=out_dir,
                     kv_dtype=kv_dtype, pair_kv_dtype=pair_kv_dtype, pair_reps=pair_reps,
                     profile=None if profile == "none" else profile,
                     compare_selectors=() if compare_selectors == "none" else tuple(compare_selectors.split(",")))
    if host_pool_gb:
        cfg.host_pool_gb = host_pool_gb
    if gpu_pool_gb:
        cfg.gpu_pool_gb = gpu_pool_gb
    result = run_ttft(cfg, _command())
    for t in result["targets"]:
        click.echo(f"{t['what']:>36}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'MISSED'}")


@bench.command()
@click.option("--shape", default="llama3-8b", show_default=True)
@click.option("--corpus-chunks", default=160, show_default=True, type=click.IntRange(1))
@click.option("--context", default=4096, show_default=True, type=click.IntRange(1))
@click.option("--requests", default=120, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=20, show_default=True, type=click.IntRange(0))
@click.option("--zipf", "zipf_s", default=1.0, show_default=True, type=float)
@click.option("--lookahead", default=4, show_default=True, type=click.IntRange(0))
@click.option("--ratio", default=0.15, show_default=True, type=click.FloatRange(0, 1))
@click.option("--policies", default="lru,lookahead", show_default=True)
@common
def serve(shape, corpus_chunks, context, requests, warmup, zipf_s, lookahead, ratio, policies, selector,
          host_pool_gb, gpu_pool_gb, workers, store_root, device, out_dir):
    """A Zipf request stream over a corpus larger than the pools: LRU vs look-ahead LRU."""
    from kvfuse.bench.serve import ServeConfig, run_serve
    _check(selector, device)
    cfg = ServeConfig(shape=shape, corpus_chunks=corpus_chunks, context=context, requests=requests, warmup=warmup,
                      zipf_s=zipf_s, lookahead=lookahead, ratio=ratio, selector=selector,
                      policies=tuple(policies.split(",")), workers=workers, store_root=store_root, device=device,
                      out_dir=out_dir)
    if host_pool_gb:
        cfg.host_pool_gb = host_pool_gb
    if gpu_pool_gb:
        cfg.gpu_pool_gb = gpu_pool_gb
    run_serve(cfg, _command())
