"""The `kvfuse` command line (click)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from kvfuse.cli.options import DTYPES
from kvfuse.cli.storage import CachePath, storage_options


def _check_model(model: str) -> None:
    """A model name or path that `load_model` would not find fails here, before torch is imported."""
    from kvfuse.runtime.packaged import model_source_error
    error = model_source_error(model)
    if error:
        raise click.BadParameter(error, param_hint="--model")


def _load(model: str, dtype: str | None):
    from kvfuse.runtime.model import load_model
    click.echo(f"loading model {model} ...", err=True)
    return load_model(model, dtype=dtype)


def _check_cache(cache_dir: str, model: str | None = None) -> None:
    """Open CACHE_DIR's current release and close it, before the model loads (seconds): a folder
    that is not a cache fails at once with the store's own message (NoReleaseError, StoreError).
    `model`: a packaged model's name that is not the one the cache was built with fails here too
    (ModelMismatchError), before that model is converted and loaded (~10 s) only to be refused."""
    from kvfuse.loader.errors import ModelMismatchError
    from kvfuse.loader.store import Store
    from kvfuse.runtime.packaged import PACKAGED_MODELS
    with Store.open(cache_dir, lease=False) as store:
        built_with = store.model.get("name")
    if model in PACKAGED_MODELS and built_with in PACKAGED_MODELS and built_with != model:
        raise ModelMismatchError(f"cache {cache_dir} was built with model {built_with}, not {model}: use "
                                 f"`--model {built_with}`, or build a cache for {model} in another folder "
                                 f"(`kvfuse build-cache CORPUS --cache NEW_DIR --model {model}`).")


def _indented(text: str, width: int = 12) -> str:
    """A multi-line answer under its label: the lines after the first indented `width` spaces."""
    first, *rest = text.strip().splitlines() or [""]
    return "\n".join([first, *(" " * width + line if line.strip() else "" for line in rest)])


@click.group()
def main():
    """kvfuse: precomputed KV caches for RAG with query-driven selective recompute."""


@main.command("build-cache")
@click.argument("corpus", type=click.Path(exists=True))
@click.option("--cache", "cache_dir", required=True, type=CachePath(),
              help="Cache folder (created if missing), or an object-storage URL (s3://bucket/prefix).")
@storage_options
@click.option("--model", default="smollm2-135m", show_default=True, help="Packaged name, transformers folder or .gguf.")
@click.option("--dtype", default=None, type=DTYPES, help="KV/model dtype (default float32 on CPU, bfloat16 on GPU).")
@click.option("--chunk-tokens", default=512, show_default=True, type=click.IntRange(16, 1 << 16))
@click.option("--shard-mb", default=1024, show_default=True, type=click.IntRange(1), help="Target shard size.")
@click.option("--enrich/--no-enrich", default=True, show_default=True,
              help="FusionRAG: prefill each chunk after its most similar chunks (--no-enrich: isolated chunks).")
@click.option("--neighbours", default=2, show_default=True, type=click.IntRange(0), help="Neighbours per chunk.")
@click.option("--neighbour-tokens", default=1024, show_default=True, type=click.IntRange(0),
              help="Token budget for a chunk's neighbours together.")
@click.option("--neighbour-max-overlap", default=0.5, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Skip a neighbour whose token set overlaps the chunk's this much or more (Jaccard): a "
                   "near-duplicate with other facts would write them into the chunk's KV. 1: keep all but copies.")
@click.option("--embedder", default="model", show_default=True, type=click.Choice(["model", "minilm"]),
              help="model: mean-pooled hidden states of the model itself; minilm: all-MiniLM-L6-v2.")
@click.option("--scheduler", default=None, help="Run on this Dask scheduler (tcp://host:8786); default "
              "$KVFUSE_SCHEDULER, else a LocalCluster on this machine.")
@click.option("--workers", default=None, type=click.IntRange(1), help="LocalCluster workers (default: one per GPU, or 1).")
@click.option("--gpus", default=0, show_default=True, type=click.IntRange(0), help="GPUs to use, one per worker.")
@click.option("--in-process", is_flag=True, help="No Dask: run everything in this process.")
@click.option("--verify", is_flag=True, help="Checksum every chunk carried forward (default: size + header of its "
              "shard, and checksums after a reader saw a shard fail).")
@click.option("--repair", is_flag=True, help="Verify like --verify and recompute exactly the damaged chunks "
              "(`kvfuse verify` lists them).")
@click.option("--max-kv-gb", default=64.0, show_default=True, type=click.FloatRange(0, min_open=True),
              help="Refuse a release whose KV would exceed this many GiB.")
@click.option("--kv-dtype", default="model", show_default=True, type=click.Choice(["model", "fp8", "int8"]),
              help="How chunk KV is stored: model (the model's dtype), fp8 (e4m3) or int8 codes with per-channel "
                   "key / per-token value scales: ~1/2 of bf16's bytes. Another value than the cache's builds new chunks.")
def build_cache_cmd(corpus, cache_dir, model, dtype, chunk_tokens, shard_mb, enrich=True, neighbours=2,
                    neighbour_tokens=1024, embedder="model", scheduler=None, workers=None, gpus=0, in_process=False,
                    verify=False, repair=False, max_kv_gb=64.0, kv_dtype="model", neighbour_max_overlap=0.5):
    """Chunk CORPUS (jsonl, parquet, folder of .txt/.md, or a saved datasets folder), precompute
    every chunk's KV (FusionRAG-enriched unless --no-enrich) and publish a new release into --cache.
    Building onto an existing cache recomputes only new or changed chunks and those whose
    neighbours changed; a rerun after a crash resumes. Runs as a Dask job unless --in-process."""
    from kvfuse.pipeline.build import BuildConfig, build_cache
    if Path(cache_dir).exists() and not Path(cache_dir).is_dir():
        raise click.BadParameter(f"{cache_dir} is a file; give a folder (created if missing).", param_hint="--cache")
    _check_model(model)
    from kvfuse.pipeline.corpus import read_corpus
    docs = read_corpus(corpus)   # a missing, empty or malformed corpus fails here, before a model or cluster starts
    config = BuildConfig(chunk_tokens=chunk_tokens, shard_bytes=shard_mb << 20, enrich=enrich,
                         neighbours=neighbours, neighbour_tokens=neighbour_tokens, embedder=embedder,
                         neighbour_max_overlap=neighbour_max_overlap if neighbour_max_overlap < 1 else None,
                         verify=verify or repair, max_kv_gb=max_kv_gb, kv_dtype=kv_dtype)
    if in_process:
        report = build_cache(docs, cache_dir, _load(model, dtype), config)
    else:
        from kvfuse.pipeline.dask_job import ClusterConfig, ModelLoader, build_on_dask, open_client
        cluster = ClusterConfig(scheduler=scheduler, workers=workers, gpus=gpus)
        with open_client(cluster) as client:
            click.echo(f"dask: {len(client.scheduler_info()['workers'])} workers at {client.scheduler.address}", err=True)
            report = build_on_dask(client, docs, cache_dir, ModelLoader(model, dtype), config, cluster)
    for note in report.notes:
        click.echo(f"warning: {note}", err=True)
    if report.repaired:
        click.echo(f"repaired {_count(len(report.repaired), 'damaged chunk')}: {', '.join(report.repaired)}", err=True)
    transcoded = f", {report.transcoded} re-encoded from the model-dtype release" if report.transcoded else ""
    click.echo(f"release {report.release}: {report.chunks} chunks ({report.computed} computed, "
               f"{report.reused} reused{transcoded}), {report.tokens} chunk tokens stored "
               f"({report.prefilled} run through the model, with neighbours and embeddings) in {report.seconds:.1f} s "
               f"({report.tokens_per_s:.0f} stored tok/s)")


@main.command()
@click.argument("cache_dir", type=CachePath(exists=True))
@storage_options
@click.option("--keep", required=True, type=click.IntRange(1),
              help="Keep the N releases most recently current (publish history) and CURRENT.")
@click.option("--grace", default="6h", show_default=True,
              help="Never delete a release current (or created) less than this long ago: 90s, 30m, 6h, 2d, 0.")
@click.option("--dry-run", is_flag=True, help="Only say what would be deleted (works on a read-only cache).")
def gc(cache_dir, keep, grace, dry_run):
    """Delete older releases and every shard or embedding file no kept release references.
    Releases held by a live reader (a lease under CACHE_DIR/leases) are kept too."""
    from kvfuse.loader.gc import collect, parse_duration
    r = collect(cache_dir, keep, dry_run, grace_s=parse_duration(grace))
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"kept {', '.join(r.kept)}; {verb} {len(r.releases)} releases, {len(r.shards)} shards, "
               f"{len(r.embeddings)} embedding files ({r.bytes_freed / 2**20:.1f} MiB)")
    for release, why in sorted(r.reasons.items()):
        click.echo(f"  kept {release}: {why}")


@main.command()
@click.argument("cache_dir", type=CachePath(exists=True, file_okay=False))
@storage_options
@click.option("--release", default=None, help="A release id (default: CURRENT).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.option("--chunks", "list_chunks", is_flag=True,
              help="List the release's chunk ids (the prefix first), one per line, instead of the summary.")
def inspect(cache_dir, release, as_json, list_chunks):
    """Show a cache's release, model, chunks, tokens and bytes."""
    from kvfuse.loader.store import Store, list_releases
    with Store.open(cache_dir, release, lease=False) as store:
        stats = store.stats()
        chunk_ids = store.chunk_ids() if list_chunks else []
    if list_chunks:
        click.echo(json.dumps(chunk_ids) if as_json else "\n".join(chunk_ids))
        return
    stats["releases"] = list_releases(store.cache_dir)
    if as_json:
        click.echo(json.dumps(stats, indent=2))
        return
    width = max(map(len, stats))
    for key, value in stats.items():
        if key == "kv_bytes":
            value = f"{value / 2**20:.1f} MiB"
        elif key == "kv_bytes_per_token":
            value = f"{value:.0f} B"
        click.echo(f"{key:>{width}}: {value}")


@main.command()
@click.argument("cache_dir", type=CachePath(exists=True, file_okay=False))
@storage_options
@click.option("--release", default=None, help="A release id (default: CURRENT).")
@click.option("--quick", is_flag=True, help="Only sizes and headers of the shards, no chunk checksums.")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def verify(cache_dir, release, quick, as_json):
    """Check a release end to end (CURRENT, manifest, index, every shard and chunk); name every bad
    chunk. Exit status 1 when anything is wrong."""
    from kvfuse.loader.store import verify_release
    r = verify_release(cache_dir, release, checksums=not quick)
    if as_json:
        click.echo(json.dumps({"release": r.release, "ok": r.ok, "chunks": r.chunks, "checksummed": r.checksummed,
                               "problems": [p.__dict__ for p in r.problems]}, indent=2))
    else:
        for p in r.problems:
            click.echo(f"BAD {p.file}: {p.message}")
            for cid in p.chunks:
                click.echo(f"    chunk {cid}")
        what = "checksummed" if r.checksummed else "size + header checked"
        if r.ok:
            click.echo(f"release {r.release}: OK ({r.chunks} stored KV entries, the shared prefix's included, {what})")
        elif r.release is None and _not_a_cache(cache_dir):   # an empty folder, a cache's parent: see above
            click.echo(f"no release of {cache_dir} could be read: nothing to repair")
        elif r.release is None:   # a damaged CURRENT or manifest: a build falls back to a release that verifies
            click.echo(f"{cache_dir}: its current release could not be opened; run `kvfuse build-cache CORPUS "
                       f"--cache {cache_dir}` (it falls back to the newest release that verifies and builds on it)")
        else:
            click.echo(f"release {r.release}: {_count(len(r.problems), 'problem')}, "
                       f"{_count(len(r.bad_chunks), 'bad chunk')}; "
                       f"repair with `kvfuse build-cache CORPUS --cache {cache_dir} --repair`")
    if not r.ok:
        sys.exit(1)


@main.command()
@click.argument("cache_dir", type=CachePath(exists=True, file_okay=False))
@storage_options
@click.argument("question")
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--dtype", default=None, type=DTYPES, help="Model/KV dtype (default float32 on CPU, bfloat16 on GPU).")
@click.option("--top-k", default=4, show_default=True, type=click.IntRange(1))
@click.option("--selector", default="kvfuse", show_default=True,
              help="Which context tokens to recompute: kvfuse (the default), kvfuse-inc (faster, a little less "
                   "faithful), prophet, a3, cacheblend, epic, reuse (none), full (a full prefill); the rest "
                   "and what each costs: docs/selectors.md.")
@click.option("--ratio", default=0.15, show_default=True, type=click.FloatRange(0, 1))
@click.option("--max-new-tokens", default=48, show_default=True, type=click.IntRange(1))
@click.option("--compare", is_flag=True, help="Also run a full prefill of the same prompt and compare.")
@click.option("--on-overflow", default="error", show_default=True, type=click.Choice(["error", "drop"]),
              help="A prompt longer than the model's positions: stop with an error, or drop the least relevant chunks.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch CPU threads (default: torch's choice; on a machine busy with other work, fewer run faster).")
def ask(cache_dir, question, model, dtype, top_k, selector, ratio, max_new_tokens, compare, on_overflow="error",
        threads=None):
    """Answer QUESTION from the chunks retrieved out of CACHE_DIR."""
    if not question.strip():   # before importing torch (~5 s)
        raise click.BadParameter("give a non-empty question", param_hint="QUESTION")
    from kvfuse.runtime.selectors import get_selector
    try:                      # these before the engine's imports (~4 s): a wrong name or folder fails in ~1.5 s
        get_selector(selector)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--selector") from None
    _check_model(model)
    _check_cache(cache_dir, model)
    from kvfuse.runtime.engine import FusionEngine
    _set_threads(threads)
    engine = FusionEngine(cache_dir, _load(model, dtype))
    try:
        a = engine.ask(question, top_k=top_k, selector=selector, ratio=ratio, max_new_tokens=max_new_tokens,
                       compare=compare, on_overflow=on_overflow)
    finally:
        engine.close()
    scores = f"  (BM25 {', '.join(f'{x:.2f}' for x in a.retrieval_scores)})" if a.retrieval_scores else ""
    click.echo(f"retrieved:  {', '.join(a.doc_ids)}{scores}")
    for note in a.notes:
        click.echo(f"note:       {note}")
    click.echo(f"answer:     {_indented(a.text)}")
    ran = f"{selector}, ratio {ratio}" if a.fused else "every context token: a plain prefill over the stored prefix"
    click.echo(f"tokens:     {a.n_reused} reused, {a.n_recomputed} context recomputed ({ran}), {a.n_question} question")
    how = "fused" if a.fused else "plain prefill" + ("" if selector == "full" else " (fusion could not win)")
    click.echo(f"TTFT:       {a.ttft_s * 1000:.0f} ms {how}")
    if compare:
        click.echo(f"full:       {_indented(a.full_text)}")
        click.echo(f"TTFT full:  {a.full_ttft_s * 1000:.0f} ms  (speed-up {a.full_ttft_s / a.ttft_s:.2f}x, "
                   f"first-token KL {max(0.0, a.first_token_kl):.4f} nats)")
        click.echo(f"same:       {_agreement(a, engine.lm.tokenizer)}")


def _not_a_cache(cache_dir: str) -> bool:
    """A local folder with neither a CURRENT file nor a releases folder: nothing a repair could fix
    (a damaged CURRENT or manifest is a cache to repair; object storage is not looked into here)."""
    from kvfuse.loader import format as fmt
    from kvfuse.loader.fs import is_url
    folder = Path(cache_dir)
    return not is_url(cache_dir) and not (folder / fmt.CURRENT_FILE).exists() and not (folder / fmt.RELEASES_DIR).exists()


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _agreement(a, tokenizer) -> str:
    """Whether the fused answer is the full prefill's, token for token, or where it leaves it."""
    if a.full_token_ids is None:
        return "not compared (a sampled request, or one with stop strings)"
    i = a.first_difference
    if i is None:
        return "yes, token for token the full prefill's answer"
    ours, full = a.token_ids[i:i + 1], a.full_token_ids[i:i + 1]
    shown = [f"{tokenizer.decode(t)!r} (token {t[0]})" if t else "the end" for t in (ours, full)]
    where = "from the first generated token on" if i == 0 else f"from generated token {i + 1} on (the first {i} agree)"
    return f"no, the answers differ {where}: {shown[0]} against the full prefill's {shown[1]}"


def run():  # pragma: no cover
    try:
        main(standalone_mode=True)
    except Exception as e:  # clear one-line errors for known failures
        click.echo(f"error: {e}", err=True)
        sys.exit(1)


@main.command()
@click.option("--workdir", default="demo_cache", show_default=True, type=click.Path())
@click.option("--model", default="smollm2-135m", show_default=True)
@click.option("--question", default=None, help="Default: a question about a painting in the sample.")
@click.option("--threads", default=None, type=click.IntRange(1),
              help="torch CPU threads (default: torch's choice; on a machine busy with other work, fewer run faster).")
@click.pass_context
def demo(ctx, workdir, model, question, threads):
    """Sample corpus + default model -> cache -> an answered question, compared with a full prefill."""
    from kvfuse.cli.demo import DEMO_QUESTION, demo_corpus
    _set_threads(threads)
    corpus = demo_corpus(Path(workdir) / "corpus.jsonl")
    click.echo(f"corpus: {corpus}")
    ctx.invoke(build_cache_cmd, corpus=str(corpus), cache_dir=str(Path(workdir) / "cache"), model=model,
               dtype=None, chunk_tokens=512, shard_mb=1024)
    ctx.invoke(inspect, cache_dir=str(Path(workdir) / "cache"), release=None, as_json=False)
    ctx.invoke(ask, cache_dir=str(Path(workdir) / "cache"), question=question or DEMO_QUESTION, model=model,
               dtype=None, top_k=4, selector="kvfuse", ratio=0.15, max_new_tokens=48, compare=True, threads=threads)
    click.echo(f"cache:      {Path(workdir) / 'cache'} (for `kvfuse ask`, `inspect`, `serve`)")


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch
        torch.set_num_threads(threads)


from kvfuse.cli.eval import eval_cmd  # noqa: E402
main.add_command(eval_cmd)
from kvfuse.cli.bench import bench  # noqa: E402
main.add_command(bench)
from kvfuse.cli.serve import serve_cmd  # noqa: E402
main.add_command(serve_cmd)
