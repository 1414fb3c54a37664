"""`kvfuse build-cache`: corpus -> chunks -> relate -> KV -> shards -> a published release.

    report = build_cache("corpus.jsonl", "cache/", lm, BuildConfig())   # in this process
    report = run_build(corpus, cache_dir, DaskStages(...), config)       # on Dask (pipeline/dask_job.py)

The driver logic lives here once; the model work (chunking, embedding,
prefilling + writing shards) goes through a *stages* object: `LocalStages`
runs it in this process, `kvfuse.pipeline.dask_job.DaskStages` on a Dask cluster.

Chunk identity (DESIGN §2): a chunk's *content id* hashes the model, dtype,
tokenizer, chunker, shared prefix and its tokens. Its *chunk id* hashes the
same plus the content ids of its enrichment neighbours, in prompt order, and the
KV codec (`--kv-dtype`: the stored bytes differ). So a chunk is recomputed exactly
when its tokens, its neighbour set or the KV dtype change, and a neighbour's own
neighbours changing never cascades. Isolated model-dtype chunks (`enrich=False`,
or no neighbour found) have chunk id == content id. Content ids (embeddings,
neighbours) do not depend on the KV dtype: an fp8 build reuses the embeddings.

Incremental and resumable: chunks already in the current release or in any
complete shard on disk are reused by reference (their index row points at the
old shard; nothing is copied), embeddings are cached by content id, and
`CURRENT` is replaced last, so the previous release stays readable throughout.
Nothing is reused unverified (`_Reuse`): a missing, truncated or corrupt shard's
chunks are recomputed, and a damaged CURRENT, manifest or index makes the build
fall back to the newest release that verifies (or an empty store) and say so.
Every (document, chunk number) gets an index row; identical chunks share their KV.
"""

from __future__ import annotations

import os

# Intel MKL (PyTorch's CPU BLAS) splits GEMM reductions by thread count, so the same
# prefill gives different KV bytes with 1 thread (a Dask worker sharing the cores) and
# with 2 (this process): chunk checksums then differ between builds of one corpus.
# Strict conditional numerical reproducibility makes GEMM results independent of the
# thread count (~5% slower GEMM on the CPU; CUDA is unaffected). MKL reads this on its
# first call, so it is set at import, before any model runs; a value the user set wins.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import json
import time
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Iterable, Iterator

import shutil

import torch
from tqdm import tqdm

from kvfuse.loader import format as fmt
from kvfuse.loader.errors import NoReleaseError, StoreError
from kvfuse.loader.fs import local_dir
from kvfuse.loader.quant import kv_codec
from kvfuse.loader.manifest import index_row, list_releases, read_current, read_history
from kvfuse.loader.store import DAMAGE_FILE, Store, verify_release
from kvfuse.loader.shard_writer import ShardWriterPool
from kvfuse.loader.writer import (
    ShardWriter, WrittenChunk, cache_lock, init_cache_dir, publish_release, remove_stale_tmp, scan_shards,
    verify_leftover,
)
from kvfuse.runtime.model import LoadedModel, ModelSpec
from kvfuse.runtime.prompt import PROMPT_RULE, PromptTemplate

from .chunker import Chunk, chunk_document
from .corpus import Document, read_corpus
from .isolated_kv import ISOLATED_KV, IsolatedKV
from .precompute import embed_chunks, prefill_chunk, prefill_chunks, prefill_prefix
from .relate import EmbeddingCache, MiniLM, check_embedder, top_neighbours
from .staging import HostStager

CHUNKER_KIND = "paragraph-sentence-v1"


@dataclass
class BuildConfig:
    chunk_tokens: int = 512
    shard_bytes: int = 1 << 30
    progress: bool = True
    enrich: bool = True          # FusionRAG: prefill [prefix][neighbours][chunk]
    neighbours: int = 2          # top-n most similar other chunks
    neighbour_tokens: int = 1024  # token budget for all of a chunk's neighbours together
    neighbour_max_overlap: float | None = 0.5  # skip near-duplicate neighbours (token-set Jaccard >= this:
                                 # conflicting facts, relate.top_neighbours); None: keep them
    embedder: str = "model"      # "model": mean-pooled final hidden states of the model itself
    verify: bool = False         # checksum every reused chunk (else size + header; always after a failed read)
    max_kv_gb: float | None = 64.0  # refuse a release whose KV would exceed this (None: no limit)
    shard_writers: int = 2       # threads checksumming + writing shards while the model computes
    isolated_kv_gb: float = 8.0  # enriched + "model" embedder: isolated KV kept from the embedding pass
                                 # for kv_deviation, per worker, on the model's device (0: run that pass twice)
    kv_dtype: str = "model"      # how chunk KV is stored: "model" (its dtype), "fp8" (e4m3) or "int8" (loader/quant.py)

    def __post_init__(self):
        kv_codec(self.kv_dtype)  # an unknown name fails before any work


@dataclass
class BuildReport:
    release: str
    chunks: int
    computed: int
    reused: int
    tokens: int          # tokens of the computed chunks (what was stored)
    seconds: float
    prefilled: int = 0   # tokens run through the model: embeddings + neighbours + isolated passes not kept
    embedded: int = 0    # chunk contents embedded (not found in the embedding cache)
    stage_seconds: dict = field(default_factory=dict)  # context, chunk, relate, precompute, publish
    notes: list[str] = field(default_factory=list)     # what the build found wrong and did about it
    repaired: list[str] = field(default_factory=list)  # chunk ids found damaged and recomputed
    transcoded: int = 0  # chunks re-encoded from a model-dtype release (--kv-dtype fp8/int8 onto it), not prefilled

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


@dataclass(frozen=True)
class BuildContext:
    """What the driver needs to know about the model (no weights): its spec, prompt and prefix tokens."""

    spec: ModelSpec
    parts: dict
    prefix_ids: tuple[int, ...]
    kv_dtype: str = "model"  # BuildConfig.kv_dtype (the driver sets it)

    @classmethod
    def of(cls, lm: LoadedModel) -> "BuildContext":
        parts = prompt_parts(lm)
        return cls(lm.spec, parts, PromptTemplate.from_manifest(parts).prefix_ids(lm.tokenizer))

    @property
    def dtype(self) -> str:
        return fmt.dtype_name(self.spec.dtype)

    def shard_metadata(self) -> dict[str, str]:
        spec = self.spec
        return {"format_version": str(fmt.FORMAT_VERSION), "model_fingerprint": spec.fingerprint,
                "dtype": self.dtype, "rope": json.dumps({"theta": spec.rope_theta, "type": spec.rope_type}),
                "saliency_signals": ",".join(fmt.SALIENCY_SIGNALS), "kv_dtype": self.kv_dtype}

    def kv_bytes_per_token(self, chunk_tokens: int) -> float:
        """Stored KV bytes per token (codes + scales) for chunks of about chunk_tokens tokens."""
        s = self.spec
        return kv_codec(self.kv_dtype).bytes_per_token(s.n_layers, s.n_kv_heads, s.head_dim, s.dtype, chunk_tokens)


@dataclass(frozen=True)
class Job:
    """One chunk to prefill and write: its id, tokens, and the concatenated tokens of its neighbours."""

    chunk_id: str
    token_ids: tuple[int, ...]
    neighbour_ids: tuple[int, ...] = ()
    is_prefix: bool = False

    @property
    def cost(self) -> int:  # tokens through the model
        return len(self.token_ids) + (len(self.neighbour_ids) + len(self.token_ids) if self.neighbour_ids else 0)


def prompt_parts(lm: LoadedModel) -> dict:
    """The text around the chunks (runtime/prompt.py's template, as the manifest records it)."""
    return PromptTemplate.of(lm.tokenizer).to_manifest()


# ---------------------------------------------------------------- model work (runs where the model is)

def chunk_docs(lm: LoadedModel, docs: Iterable[Document], chunk_tokens: int) -> list[Chunk]:
    lead = PromptTemplate.of(lm.tokenizer).separator_ids(lm.tokenizer)  # every stored chunk starts with it
    return [c for doc in docs for c in chunk_document(doc, lm.tokenizer, chunk_tokens, lead_ids=lead)]


def embed_items(lm: LoadedModel, prefix_ids, items: list[tuple[str, tuple[int, ...], str]],
                embedder: str = "model", minilm: MiniLM | None = None,
                keep: IsolatedKV | None = None) -> dict[str, torch.Tensor]:
    """content_id -> embedding [hidden] for (content_id, token_ids, text) items. With keep (the
    "model" embedder), each chunk's isolated KV is kept there for compute_jobs (pipeline/isolated_kv.py)."""
    if embedder == "minilm":
        vecs = (minilm or MiniLM()).embed([text for _, _, text in items])  # [N, 384]
        return {cid: v for (cid, _, _), v in zip(items, vecs)}
    if not items:
        return {}
    prefix_kv = prefill_prefix(lm, prefix_ids)
    size = GPU_BATCH if lm.model.device.type == "cuda" else 1         # the CPU is compute-bound: no gain
    groups = length_groups(items, lambda item: len(item[1]), size)     # consecutive: items' order kept
    vecs = torch.cat([embed_chunks(lm, prefix_kv, [ids for _, ids, _ in g], keep, prefix_ids, to_cpu=False)
                      for g in groups]).cpu()                           # [N, hidden]; one sync per batch
    return {cid: v.clone() for (cid, _, _), v in zip(items, vecs)}      # own storage each


def length_groups(items: list, length, size: int) -> list[list]:
    """Consecutive items with equal `length(item)` (any comparable key) grouped by up to `size`, in order."""
    groups: list[list] = []
    for item in items:
        last = groups[-1] if groups else None
        if last is not None and len(last) < size and length(last[0]) == length(item):
            last.append(item)
        else:
            groups.append([item])
    return groups


class Computed(list):
    """compute_jobs' WrittenChunks, and how many chunk tokens' isolated pass was taken from the embedding pass."""

    isolated_kept_tokens: int = 0


GPU_BATCH = 8  # isolated chunks of one length prefilled per forward on a GPU (`prefill_chunks`); measured: bench/results/build_throughput_gpu_fp8_256.md


def job_batches(jobs: list[Job], size: int) -> list[list[Job]]:
    """Jobs in order, consecutive isolated chunks of one length grouped by up to `size`
    (the prefix and enriched chunks alone)."""
    def key(job: Job):
        return ("alone", id(job)) if job.is_prefix or job.neighbour_ids else len(job.token_ids)
    return length_groups(jobs, key, size)


def compute_jobs(lm: LoadedModel, prefix_ids, jobs: list[Job], cache_dir: Path, metadata: dict[str, str],
                 shard_bytes: int, on_done=None, writers: int = 2, keep: IsolatedKV | None = None,
                 batch: int | None = None) -> Computed:
    """Prefill every job and write it into complete shards under cache_dir; returns where each went.

    The model thread only computes: each chunk's KV and saliency leave the GPU by an
    asynchronous copy into pinned memory (pipeline/staging.py), and `writers` threads
    checksum, serialise and fsync whole shards meanwhile (loader/shard_writer.py). An
    enriched chunk whose isolated KV the embedding pass kept in `keep` skips that pass.
    Isolated chunks of one length go `batch` to a forward (default GPU_BATCH on a GPU, 1 on
    the CPU, where a forward is bound by its FLOPs, not by launching kernels).
    """
    prefix_kv = prefill_prefix(lm, prefix_ids)  # [L, 2, H_kv, P, D]
    stager = HostStager(prefix_kv.device)
    codec = kv_codec(metadata.get("kv_dtype"))
    # fp8 / int8 on a GPU: encoded there, so half the bytes cross to the host and no CPU thread
    # converts 64 MiB chunks (H200: a CPU-side encode made the fp8 build 2.3x slower than bf16)
    encode_here = codec.quantised and prefix_kv.is_cuda
    S = len(fmt.SALIENCY_SIGNALS)
    per_token = handed_bytes_per_token(lm, codec if encode_here else None,
                                       max((len(j.token_ids) for j in jobs), default=1))
    left = sum(len(j.token_ids) for j in jobs) * per_token
    out = Computed()
    batch = batch or (GPU_BATCH if prefix_kv.is_cuda else 1)
    with ShardWriterPool(Path(cache_dir), metadata, shard_bytes, writers) as pool:
        for group in job_batches(jobs, batch):
            if len(group) > 1:
                computed = prefill_chunks(lm, prefix_kv, [j.token_ids for j in group], to_cpu=False)
            elif group[0].is_prefix:
                computed = [(prefix_kv, torch.zeros(S, len(group[0].token_ids), dtype=torch.float16))]
            else:
                job = group[0]
                iso = keep.take(lm, prefix_ids, job.token_ids) if keep is not None and job.neighbour_ids else None
                out.isolated_kept_tokens += 0 if iso is None else len(job.token_ids)
                computed = [prefill_chunk(lm, prefix_kv, job.token_ids, job.neighbour_ids, to_cpu=False, isolated=iso)]
            left = _write_group(group, computed, pool, stager, codec if encode_here else None, left, per_token,
                                on_done)
    out.extend(pool.written)
    return out


def handed_bytes_per_token(lm: LoadedModel, encoder=None, chunk_tokens: int = 512) -> float:
    """Bytes per token `_write_group` hands the shard writers: the KV (or, with `encoder`, a
    codec, its codes and scales, the per-chunk key scales spread over `chunk_tokens`), the
    token id and the saliency rows. The shard pool's
    `bytes_after` is counted in these, so a task's last shards shrink to about one chunk
    (an fp8 build counted in bf16 bytes closed its first shard at 2/3 of a task, not 1/2)."""
    s = lm.spec
    kv = (encoder.bytes_per_token(s.n_layers, s.n_kv_heads, s.head_dim, s.dtype, chunk_tokens)
          if encoder is not None else s.kv_bytes_per_token())
    return kv + 4 + 2 * len(fmt.SALIENCY_SIGNALS)


def _write_group(group: list[Job], computed, pool: ShardWriterPool, stager: HostStager, encoder, left: int,
                 per_token: int, on_done) -> int:
    """Hand each job's (kv, saliency) to the shard writers (encoded first with `encoder`, a
    codec, or as they are); returns the bytes still to come."""
    for job, (kv, sal) in zip(group, computed):
        scales = None
        if encoder is not None:
            kv, scales = encoder.encode(kv)                                  # codes [L, 2, H_kv, T, D], [L, H_kv, W]
        (kv, sal, *sc), ready = stager.stage(kv, sal, *(() if scales is None else (scales,)))
        left -= len(job.token_ids) * per_token
        pool.add(job.chunk_id, kv, torch.tensor(job.token_ids), sal, ready=ready, bytes_after=left,
                 scales=sc[0] if sc else None)
        if on_done:
            on_done(job)
    return left


class LocalStages:
    """The model stages, run in this process."""

    def __init__(self, lm: LoadedModel, config: BuildConfig):
        self.lm, self.config = lm, config

    def context(self) -> BuildContext:
        return BuildContext.of(self.lm)

    def chunk(self, docs: list[Document]) -> list[Chunk]:
        return chunk_docs(self.lm, tqdm(docs, desc="chunk", disable=not self.config.progress, unit="doc"),
                          self.config.chunk_tokens)

    def embed(self, ctx: BuildContext, items) -> Iterator[dict[str, torch.Tensor]]:
        minilm = MiniLM() if self.config.embedder == "minilm" and items else None
        batch = 256  # persisted per batch, so a crash loses at most one batch
        keep = ISOLATED_KV.configure(int(self.config.isolated_kv_gb * 2**30))
        with tqdm(total=len(items), desc="embed", unit="chunk", disable=not self.config.progress) as bar:
            for i in range(0, len(items), batch):
                yield embed_items(self.lm, ctx.prefix_ids, items[i:i + batch], self.config.embedder, minilm, keep)
                bar.update(len(items[i:i + batch]))

    def precompute(self, ctx: BuildContext, jobs: list[Job], cache_dir: Path) -> Computed:
        with tqdm(total=sum(j.cost for j in jobs), desc="prefill", unit="tok", disable=not self.config.progress) as bar:
            return compute_jobs(self.lm, ctx.prefix_ids, jobs, cache_dir, ctx.shard_metadata(),
                                self.config.shard_bytes, on_done=lambda j: bar.update(j.cost),
                                writers=self.config.shard_writers, keep=ISOLATED_KV)

    def release(self) -> None:
        """Drop the isolated KV the embedding pass kept and the build did not take."""
        ISOLATED_KV.clear()


# ---------------------------------------------------------------- the driver

def build_cache(corpus: str | Path | list[Document], cache_dir: str | Path, lm: LoadedModel,
                config: BuildConfig = BuildConfig()) -> BuildReport:
    """Build (or refresh) the cache in this process; see run_build."""
    return run_build(corpus, cache_dir, LocalStages(lm, config), config)


@dataclass
class _Plan:
    chunks: list[Chunk]
    content: list[str]                                      # content id per chunk
    neighbours: dict[str, tuple[str, ...]] = field(default_factory=dict)  # content id -> neighbour content ids
    chunk_id: dict[str, str] = field(default_factory=dict)  # content id -> chunk id
    embedding_files: list[str] = field(default_factory=list)
    embedded: int = 0
    embedded_tokens: int = 0


def run_build(corpus: str | Path | list[Document], cache_dir: str | Path, stages, config: BuildConfig) -> BuildReport:
    """read -> chunk -> relate -> precompute (+ write shards) -> publish, the model work done by `stages`."""
    t0 = time.perf_counter()
    clock = _StageClock()
    cache_dir = local_dir(cache_dir)  # an object-storage URL: its local mirror (loader/fs.py)
    if config.enrich:
        check_embedder(config.embedder)
    docs = corpus if isinstance(corpus, list) else read_corpus(corpus)
    ctx = replace(stages.context(), kv_dtype=config.kv_dtype)
    codec = kv_codec(config.kv_dtype)
    clock.lap("context")
    spec, P = ctx.spec, len(ctx.prefix_ids)
    chunker_params = {"chunk_tokens": config.chunk_tokens, "kind": CHUNKER_KIND, "prompt": PROMPT_RULE}
    content_ident = dict(model_fingerprint=spec.fingerprint, dtype=ctx.dtype, tokenizer_fingerprint=spec.fingerprint,  # covers the tokenizer too
                         chunker=chunker_params)
    ident = dict(content_ident, kv_scheme=codec.scheme)  # stored ids: an fp8 chunk never shares one with a bf16 chunk
    prefix_content = fmt.chunk_id(**content_ident, token_ids=ctx.prefix_ids, prefix_id="")
    prefix_id = fmt.chunk_id(**ident, token_ids=ctx.prefix_ids, prefix_id="")  # == prefix_content for "model"
    chunks = stages.chunk(docs)
    clock.lap("chunk")
    plan = _Plan(chunks, [fmt.chunk_id(**content_ident, token_ids=c.token_ids, prefix_id=prefix_content)
                          for c in chunks])
    tokens_of = {cid: c.token_ids for cid, c in zip(plan.content, chunks)}
    text_of = {cid: c.text for cid, c in zip(plan.content, chunks)}
    bytes_per_token = ctx.kv_bytes_per_token(config.chunk_tokens)
    check_kv_size(sum(len(t) for t in tokens_of.values()) + P, bytes_per_token, config.max_kv_gb)

    with cache_lock(cache_dir), _released(stages):
        init_cache_dir(cache_dir)
        remove_stale_tmp(cache_dir)
        reuse = _Reuse.of_base_release(cache_dir, spec.fingerprint, ctx.dtype, config.verify)
        if config.enrich:
            _relate(plan, tokens_of, text_of, ctx, stages, cache_dir, config)
        clock.lap("relate")
        for cid in tokens_of:
            nb = plan.neighbours.get(cid, ())
            plan.chunk_id[cid] = fmt.chunk_id(**ident, token_ids=tokens_of[cid], prefix_id=prefix_content,
                                              neighbour_ids=nb) if nb or codec.quantised else cid
        reuse.add_leftovers(cache_dir, {prefix_id, *plan.chunk_id.values()}, spec.fingerprint, ctx.dtype)
        existing = reuse.found

        jobs = [] if prefix_id in existing else [Job(prefix_id, ctx.prefix_ids, is_prefix=True)]
        for cid in sorted(tokens_of):
            if plan.chunk_id[cid] not in existing:
                nb = tuple(t for n in plan.neighbours.get(cid, ()) for t in tokens_of[n])
                jobs.append(Job(plan.chunk_id[cid], tokens_of[cid], nb))
        check_free_space(cache_dir, int(sum(len(j.token_ids) for j in jobs) * bytes_per_token))
        # the same chunks in the model's dtype (their ids are the content-ident ones): a quantised
        # build onto a model-dtype release re-encodes those instead of prefilling them again
        model_ids = {prefix_id: prefix_content, **{
            plan.chunk_id[c]: fmt.chunk_id(**content_ident, token_ids=tokens_of[c], prefix_id=prefix_content,
                                           neighbour_ids=plan.neighbours[c]) if plan.neighbours.get(c) else c
            for c in tokens_of}}
        source, have = _model_dtype_release(cache_dir, reuse, spec.fingerprint, ctx.dtype) if codec.quantised else (None, set())
        transcode = sorted((j.chunk_id, model_ids[j.chunk_id]) for j in jobs if model_ids.get(j.chunk_id) in have)
        jobs = [j for j in jobs if model_ids.get(j.chunk_id) not in have]
        written = stages.precompute(ctx, jobs, cache_dir) if jobs else []
        if transcode:
            written += transcode_chunks(cache_dir, source, transcode, ctx.shard_metadata(), config.shard_bytes)
        clock.lap("precompute")
        where = {**existing, **{w.chunk_id: (w.shard, w.checksum) for w in written}}
        missing = [j.chunk_id for j in jobs if j.chunk_id not in where] + [n for n, _ in transcode if n not in where]
        if missing:
            raise RuntimeError(f"{len(missing)} chunks were not written (e.g. {missing[0]}); nothing was published. "
                               "Run the build again: it resumes from the shards already written.")
        rows = _rows(plan, ctx, prefix_id, where, tokens_of)
        computed = [j for j in jobs if not j.is_prefix]
        n_transcoded = sum(1 for new, _ in transcode if new != prefix_id)
        manifest = {
            "model": {"name": spec.name, "fingerprint": spec.fingerprint, "arch": spec.arch, "dtype": ctx.dtype,
                      "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
                      "rope_theta": spec.rope_theta, "rope_type": spec.rope_type,
                      "kv_bytes_per_token": spec.kv_bytes_per_token(),  # in the model's dtype
                      "kv_dtype": codec.name, "kv_scheme": codec.scheme},
            "prefix": {"chunk_id": prefix_id, "n_tokens": P},
            "prompt": ctx.parts,
            "params": {"chunker": chunker_params, "enrich": config.enrich, "neighbours": config.neighbours,
                       "neighbour_tokens": config.neighbour_tokens, "embedder": config.embedder,
                       "neighbour_max_overlap": config.neighbour_max_overlap},
            "embeddings": plan.embedding_files,
            "stats": {"documents": len(docs), "chunks": len(rows) - 1, "tokens": sum(r["n_tokens"] for r in rows[1:]),
                      "computed": len(computed), "reused": len(rows) - 1 - len(computed) - n_transcoded,
                      "transcoded": n_transcoded},
        }
        shards = {**reuse.shards, **{w.shard: {"bytes": w.shard_bytes, "header": w.shard_header}
                                     for w in written if w.shard_header}}
        release = publish_release(cache_dir, rows, manifest, shards, parent=reuse.base)
        (cache_dir / DAMAGE_FILE).unlink(missing_ok=True)  # whatever readers saw fail was verified above
        clock.lap("publish")
    wanted = {r["chunk_id"] for r in rows}
    return BuildReport(release, len(rows) - 1, len(computed), len(rows) - 1 - len(computed) - n_transcoded,
                       sum(len(j.token_ids) for j in computed), time.perf_counter() - t0, transcoded=n_transcoded,
                       prefilled=sum(j.cost for j in computed) + plan.embedded_tokens - _kept_tokens(written),
                       embedded=plan.embedded,
                       stage_seconds=clock.laps, notes=reuse.notes, repaired=sorted(reuse.bad & wanted))


@contextmanager
def _released(stages):
    """Whatever happens, the stages drop what they kept between embedding and precompute."""
    try:
        yield
    finally:
        release = getattr(stages, "release", None)
        if release is not None:
            release()


def _kept_tokens(written) -> int:
    return getattr(written, "isolated_kept_tokens", 0)


def _model_dtype_release(cache_dir: Path, reuse: "_Reuse", fingerprint: str, dtype: str) -> tuple[str | None, set[str]]:
    """The release a quantised build re-encodes chunks from, and the chunk ids it may take there:
    the base release if it stores model-dtype KV (less the chunks found damaged), else the newest
    release of this model that does (each chunk's checksum is checked when it is read)."""
    if reuse.base is not None and reuse.base_kv_dtype == "model":
        return reuse.base, {c for c in reuse.found if c not in reuse.bad}
    for release in reversed(list_releases(cache_dir)):
        try:
            with Store.open(cache_dir, release, lease=False) as store:
                if (store.codec.name, store.model.get("fingerprint"), store.model.get("dtype")) == ("model", fingerprint, dtype):
                    return release, {r.chunk_id for r in store.records(include_prefix=True)} - reuse.bad
        except StoreError:
            continue
    return None, set()


def transcode_chunks(cache_dir: Path, release: str, pairs: list[tuple[str, str]], metadata: dict[str, str],
                     shard_bytes: int) -> list[WrittenChunk]:
    """Write chunks of a model-dtype release again as `metadata["kv_dtype"]` says, under their new
    ids: (new id, model-dtype id) pairs; each read is checksummed. No model runs: the bytes are
    those a fresh quantised build of the same chunks writes."""
    writer = ShardWriter(Path(cache_dir), metadata, shard_bytes)
    with Store.open(cache_dir, release, lease=False) as source:
        for new, old in pairs:
            chunk = source.read(old, verify=True)  # [L, 2, H_kv, T, D] model dtype
            writer.add(new, chunk.kv, chunk.tokens, chunk.saliency)
    writer.flush()
    return writer.written


class _StageClock:
    def __init__(self):
        self.laps: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.laps[name] = round(now - self._t, 4)
        self._t = now


def _relate(plan: _Plan, tokens_of: dict, text_of: dict, ctx: BuildContext, stages, cache_dir: Path, config: BuildConfig) -> None:
    """Embed the chunk contents not embedded before, then pick each one's neighbours."""
    cache = EmbeddingCache.load(cache_dir, f"{config.embedder}:{ctx.spec.fingerprint}")
    order = sorted(tokens_of)  # content ids: a fixed order, so ties break the same way every build
    todo = [(cid, tokens_of[cid], text_of[cid]) for cid in order if cid not in cache.vectors]
    for batch in stages.embed(ctx, todo):
        cache.add(batch)
        plan.embedded += len(batch)
        plan.embedded_tokens += sum(len(tokens_of[c]) for c in batch)
    budget = max(0, min(config.neighbour_tokens, ctx.spec.max_positions - len(ctx.prefix_ids) - config.chunk_tokens))
    matrix = torch.stack([cache.vectors[cid] for cid in order])  # [N, hidden]
    picks = top_neighbours(matrix, [len(tokens_of[c]) for c in order], config.neighbours, budget,
                           token_ids=[tokens_of[c] for c in order], max_overlap=config.neighbour_max_overlap)
    plan.neighbours = {cid: tuple(order[j] for j in pick) for cid, pick in zip(order, picks)}
    plan.embedding_files = cache.files_for(order)


def _rows(plan: _Plan, ctx: BuildContext, prefix_id: str, where: dict, tokens_of: dict) -> list[dict]:
    P, prefix_text = len(ctx.prefix_ids), ctx.parts["prefix"]
    rows = [_row(prefix_id, fmt.PREFIX_DOC_ID, -1, P, where[prefix_id], 0, [], 0, len(prefix_text), prefix_text)]
    for content, c in zip(plan.content, plan.chunks):  # one row per (doc, chunk_no); identical chunks share KV
        cid = plan.chunk_id[content]
        nbs = plan.neighbours.get(content, ())
        pos_base = P + sum(len(tokens_of[n]) for n in nbs)
        rows.append(_row(cid, c.doc_id, c.chunk_no, len(c.token_ids), where[cid], pos_base,
                         [plan.chunk_id[n] for n in nbs], c.char_start, c.char_end, c.text))
    return rows


def check_kv_size(tokens: int, bytes_per_token: float, max_kv_gb: float | None) -> None:
    """Refuse, before any model work, a release whose KV would exceed max_kv_gb."""
    need = tokens * bytes_per_token
    if max_kv_gb is not None and need > max_kv_gb * 2**30:
        raise ValueError(f"this corpus would store {need / 2**30:.1f} GiB of KV ({tokens} tokens x {bytes_per_token:.0f} "
                         f"bytes), above the limit of {max_kv_gb:g} GiB. Check the corpus (a huge document?), or "
                         f"raise the limit with --max-kv-gb {int(need / 2**30) + 1}.")


def check_free_space(cache_dir: Path, need: int) -> None:
    """Refuse a build whose new shards can't fit on the cache's disk (before any prefill)."""
    free = shutil.disk_usage(cache_dir).free
    if need > free:
        raise OSError(28, f"the new chunks need {need / 2**30:.2f} GiB of KV but {cache_dir} has "
                          f"{free / 2**30:.2f} GiB free; free space (or use another --cache) and rerun")


@dataclass
class _Reuse:
    """The chunks a build may carry forward without recomputing, each verified first.

    From the base release (CURRENT's, else the newest release that verifies): every shard
    is checked for size and header digest, and with verify (or after a reader saw a shard
    fail) every chunk's checksum. From shards outside it (a killed build's, an older
    release's): the shard's size, header and each wanted chunk's bytes are checked against
    the sums its writer recorded. Never is a checksum taken from the bytes on disk.
    """

    found: dict[str, tuple[str, str]] = field(default_factory=dict)  # chunk_id -> (shard, checksum)
    shards: dict[str, dict] = field(default_factory=dict)            # shard -> {"bytes", "header"}
    base: str | None = None
    base_kv_dtype: str | None = None  # how the base release stores KV ("model", "fp8", "int8")
    bad: set[str] = field(default_factory=set)
    notes: list[str] = field(default_factory=list)

    @classmethod
    def of_base_release(cls, cache_dir: Path, fingerprint: str, dtype: str, verify: bool) -> "_Reuse":
        reuse = cls()
        store = reuse._base_store(cache_dir, fingerprint, dtype)
        if store is None:
            return reuse
        fallback = any(n.startswith("falling back") for n in reuse.notes)
        checksums = verify or fallback or (cache_dir / DAMAGE_FILE).exists() or "shards" not in store.manifest
        report = verify_release(cache_dir, store=store, checksums=checksums)
        reuse.base, reuse.bad, reuse.base_kv_dtype = store.release, report.bad_chunks, store.codec.name
        for problem in report.problems:
            reuse.notes.append(f"{problem.file}: {len(problem.chunks)} chunks recomputed: {problem.message}")
        for rec in store.records(include_prefix=True):
            if rec.chunk_id not in reuse.bad:
                reuse.found[rec.chunk_id] = (rec.shard, rec.checksum)
                entry = store.manifest.get("shards", {}).get(rec.shard)
                if entry is not None:
                    reuse.shards[rec.shard] = entry
        store.close()
        return reuse

    def _base_store(self, cache_dir: Path, fingerprint: str, dtype: str) -> Store | None:
        try:
            current = read_current(cache_dir)
        except StoreError as e:
            self.notes.append(str(e))
            current = None
        if current:  # building onto another model's cache is refused
            try:
                store = Store.open(cache_dir, current, lease=False)
            except StoreError as e:
                self.notes.append(f"current release {current} does not verify: {e}")
            else:
                store.check_model(fingerprint, dtype)
                return store
        candidates = [r for r, _ in reversed(read_history(cache_dir))] + list(reversed(list_releases(cache_dir)))
        for release in dict.fromkeys(c for c in candidates if c != current):
            try:
                store = Store.open(cache_dir, release, lease=False)
            except NoReleaseError:
                continue
            except StoreError as e:
                self.notes.append(f"release {release} does not verify: {e}")
                continue
            if store.model.get("fingerprint") == fingerprint and store.model.get("dtype") == dtype:
                self.notes.append(f"falling back to release {release}, the newest that verifies")
                return store
        if current or self.notes:
            self.notes.append("no release verifies: building from an empty store")
        return None

    def add_leftovers(self, cache_dir: Path, wanted: set[str], fingerprint: str, dtype: str) -> None:
        """Add the wanted chunks found in shards outside the base release, each verified."""
        for shard, sums in scan_shards(cache_dir).items():
            meta = sums.get("metadata", {})
            todo = sorted(c for c in sums["chunks"] if c in wanted and c not in self.found)
            if not todo or meta.get("model_fingerprint") != fingerprint or meta.get("dtype") != dtype:
                continue
            try:
                good = verify_leftover(cache_dir, shard, sums, todo)
            except StoreError as e:  # unreadable: recompute its chunks
                self.bad.update(todo)
                self.notes.append(f"{e} (left by an earlier build); its chunks are recomputed")
                continue
            self.bad.update(c for c in todo if c not in good)
            for cid, checksum in good.items():
                self.found[cid] = (shard, checksum)
                self.shards[shard] = {"bytes": sums["bytes"], "header": sums["header"]}


def _row(cid, doc_id, chunk_no, n_tokens, stored: tuple[str, str], pos_base, neighbours, start, end, text) -> dict:
    shard, checksum = stored
    return index_row(chunk_id=cid, doc_id=doc_id, chunk_no=chunk_no, n_tokens=n_tokens, shard=shard,
                     pos_base=pos_base, neighbours=neighbours, checksum=checksum, char_start=start, char_end=end,
                     text=text)
