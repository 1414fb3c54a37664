"""`kvfuse build-cache`: corpus -> chunks -> KV -> shards -> a published release.

Single process here (the Dask job is pipeline/ issue 4's). Resumable: chunks
already in the current release or in any complete shard on disk are skipped,
so a rerun after a crash only computes what is missing, and the previous release
stays readable throughout (CURRENT is replaced last).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from kvfuse.loader import format as fmt
from kvfuse.loader.store import Store, read_current
from kvfuse.loader.writer import (
    ShardWriter, cache_lock, init_cache_dir, publish_release, remove_stale_tmp, scan_shards,
)
from kvfuse.runtime.attention import use_kvfuse_attention
from kvfuse.runtime.model import LoadedModel, chat_prefix_and_suffix

from .chunker import chunk_document
from .corpus import Document, read_corpus
from .precompute import prefill_chunk, prefill_prefix

QUESTION_TEMPLATE = "\n\nAnswer the question using the documents above.\nQuestion: {question}"


@dataclass
class BuildConfig:
    chunk_tokens: int = 512
    shard_bytes: int = 1 << 30
    progress: bool = True


@dataclass
class BuildReport:
    release: str
    chunks: int
    computed: int
    reused: int
    tokens: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def prompt_parts(lm: LoadedModel) -> dict:
    """The text around the chunks: [prefix][chunks][question template][suffix]."""
    prefix, suffix = chat_prefix_and_suffix(lm.tokenizer)
    return {"prefix": prefix, "question_template": QUESTION_TEMPLATE, "suffix": suffix}


def build_cache(corpus: str | Path | list[Document], cache_dir: str | Path, lm: LoadedModel,
                config: BuildConfig = BuildConfig()) -> BuildReport:
    t0 = time.perf_counter()
    cache_dir = Path(cache_dir)
    docs = corpus if isinstance(corpus, list) else read_corpus(corpus)
    use_kvfuse_attention(lm.model)
    spec = lm.spec
    dtype = fmt.dtype_name(spec.dtype)
    chunker_params = {"chunk_tokens": config.chunk_tokens, "kind": "paragraph-sentence-v1"}
    parts = prompt_parts(lm)
    prefix_ids = lm.tokenizer(parts["prefix"], add_special_tokens=False)["input_ids"]
    if not prefix_ids:
        raise ValueError("the shared prefix tokenises to nothing; give the model a chat template")
    ident = dict(model_fingerprint=spec.fingerprint, dtype=dtype, tokenizer_fingerprint=spec.fingerprint,  # covers the tokenizer too
                
                 chunker=chunker_params)
    prefix_id = fmt.chunk_id(**ident, token_ids=prefix_ids, prefix_id="")

    chunks = []
    for doc in tqdm(docs, desc="chunk", disable=not config.progress, unit="doc"):
        chunks.extend(chunk_document(doc, lm.tokenizer, config.chunk_tokens))
    ids = [fmt.chunk_id(**ident, token_ids=c.token_ids, prefix_id=prefix_id) for c in chunks]

    with cache_lock(cache_dir):
        init_cache_dir(cache_dir)
        remove_stale_tmp(cache_dir)
        existing = _existing_chunks(cache_dir, spec.fingerprint, dtype)
        metadata = {"format_version": str(fmt.FORMAT_VERSION), "model_fingerprint": spec.fingerprint,
                    "dtype": dtype, "rope": json.dumps({"theta": spec.rope_theta, "type": spec.rope_type}),
                    "saliency_signals": ",".join(fmt.SALIENCY_SIGNALS)}
        writer = ShardWriter(cache_dir, metadata, config.shard_bytes)
        prefix_kv = prefill_prefix(lm, prefix_ids)
        if prefix_id not in existing:
            writer.add(prefix_id, prefix_kv, torch.tensor(prefix_ids), torch.zeros(len(fmt.SALIENCY_SIGNALS), len(prefix_ids)))
        todo = {cid: c for cid, c in zip(ids, chunks) if cid not in existing}
        n_tokens = sum(len(c.token_ids) for c in todo.values())
        with tqdm(total=n_tokens, desc="prefill", unit="tok", disable=not config.progress) as bar:
            for cid, chunk in todo.items():
                kv, sal = prefill_chunk(lm, prefix_kv, chunk.token_ids)
                writer.add(cid, kv, torch.tensor(chunk.token_ids), sal)
                bar.update(len(chunk.token_ids))
        writer.flush()
        where = {**{k: v[0] for k, v in existing.items()}, **{w.chunk_id: w.shard for w in writer.written}}
        checks = {**{k: v[1] for k, v in existing.items()}, **{w.chunk_id: w.checksum for w in writer.written}}

        P = len(prefix_ids)
        rows = [_row(prefix_id, fmt.PREFIX_DOC_ID, -1, len(prefix_ids), where[prefix_id], 0, checks[prefix_id],
                     0, len(parts["prefix"]), parts["prefix"])]
        seen = {prefix_id}
        for cid, c in zip(ids, chunks):
            if cid in seen:  # identical chunks dedupe
                continue
            seen.add(cid)
            rows.append(_row(cid, c.doc_id, c.chunk_no, len(c.token_ids), where[cid], P, checks[cid],
                             c.char_start, c.char_end, c.text))
        manifest = {
            "model": {"name": spec.name, "fingerprint": spec.fingerprint, "arch": spec.arch, "dtype": dtype,
                      "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads, "head_dim": spec.head_dim,
                      "rope_theta": spec.rope_theta, "rope_type": spec.rope_type,
                      "kv_bytes_per_token": spec.kv_bytes_per_token()},
            "prefix": {"chunk_id": prefix_id, "n_tokens": P},
            "prompt": parts,
            "params": {"chunker": chunker_params, "enrich": False},
            "stats": {"documents": len(docs), "chunks": len(rows) - 1, "tokens": sum(r["n_tokens"] for r in rows[1:]),
                      "computed": len(todo), "reused": len(rows) - 1 - len(todo)},
        }
        release = publish_release(cache_dir, rows, manifest)
    return BuildReport(release, len(rows) - 1, len(todo), len(rows) - 1 - len(todo), n_tokens,
                       time.perf_counter() - t0)


def _existing_chunks(cache_dir: Path, fingerprint: str, dtype: str) -> dict[str, tuple[str, str]]:
    """chunk_id -> (shard, checksum) for chunks a rerun can reuse: the current release's,
    plus those in complete shards a killed build left behind (checksums recomputed)."""
    found: dict[str, tuple[str, str]] = {}
    if read_current(cache_dir):
        store = Store.open(cache_dir)
        store.check_model(fingerprint, dtype)  # building onto another model's cache is refused
        found = {r.chunk_id: (r.shard, r.checksum) for r in store.records(include_prefix=True)}
    for cid, shard in scan_shards(cache_dir).items():
        if cid in found:
            continue
        path = cache_dir / fmt.SHARDS_DIR / f"{shard}{fmt.SHARD_SUFFIX}"
        with safe_open(str(path), framework="pt") as f:
            if f.metadata().get("model_fingerprint") != fingerprint or f.metadata().get("dtype") != dtype:
                continue
            found[cid] = (shard, fmt.checksum(*(f.get_tensor(n(cid)) for n in (fmt.kv_name, fmt.tok_name, fmt.sal_name))))
    return found


def _row(cid, doc_id, chunk_no, n_tokens, shard, pos_base, checksum, start, end, text) -> dict:
    return {"chunk_id": cid, "doc_id": doc_id, "chunk_no": chunk_no, "n_tokens": n_tokens, "shard": shard,
            "pos_base": pos_base, "neighbours": [], "checksum": checksum, "char_start": start, "char_end": end,
            "text": text}
