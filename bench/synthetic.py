"""A store filled with chunk KVs of a model's shapes (random values), for benchmarks and tests.

    prefix_id, chunk_ids = write_synthetic_store("/tmp/store", spec, n_chunks=64)

Timing doesn't depend on the values, so no model runs: keys and values are
drawn at random in the model's dtype; chunks are laid out as the build lays
them (keys at positions prefix_len.., after a shared prefix at 0..).
"""

from __future__ import annotations

from pathlib import Path

import torch

from kvfuse.loader import format as fmt
from kvfuse.runtime.prompt import PromptTemplate
from kvfuse.loader.quant import kv_codec
from kvfuse.loader.writer import ShardWriter, cache_lock, init_cache_dir, publish_release
from kvfuse.runtime.model import ModelSpec


def _chunk(spec: ModelSpec, n_tokens: int, gen: torch.Generator, device) -> torch.Tensor:
    shape = (spec.n_layers, 2, spec.n_kv_heads, n_tokens, spec.head_dim)  # [L, 2, H_kv, T, D]
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32).to(spec.dtype)


def write_synthetic_store(cache_dir, spec: ModelSpec, n_chunks: int, chunk_tokens: int = 512,
                          prefix_tokens: int = 32, vocab: int = 1000, seed: int = 0, device: str = "cpu",
                          shard_bytes: int = 1 << 30, kv_dtype: str = "model") -> tuple[str, list[str]]:
    """Write and publish a release of `n_chunks` chunks of `chunk_tokens` tokens plus a prefix,
    its KV stored as kv_dtype says ("model", "fp8", "int8": loader/quant.py)."""
    codec = kv_codec(kv_dtype)
    cache_dir = Path(cache_dir)
    gen = torch.Generator(device=device).manual_seed(seed)
    tok_gen = torch.Generator().manual_seed(seed)
    n_sal = len(fmt.SALIENCY_SIGNALS)
    meta = {"format_version": str(fmt.FORMAT_VERSION), "model_fingerprint": spec.fingerprint, "kv_dtype": codec.name}
    rows, ids = [], []
    with cache_lock(cache_dir):
        init_cache_dir(cache_dir)
        writer = ShardWriter(cache_dir, meta, target_bytes=shard_bytes)
        prefix_ids = torch.randint(0, vocab, (prefix_tokens,), generator=tok_gen)
        prefix_id = None
        for i in range(n_chunks + 1):
            is_prefix = i == 0
            tokens = prefix_ids if is_prefix else torch.randint(0, vocab, (chunk_tokens,), generator=tok_gen)
            cid = fmt.chunk_id(model_fingerprint=spec.fingerprint, dtype=fmt.dtype_name(spec.dtype),
                               tokenizer_fingerprint="synthetic", chunker={"chunk_tokens": chunk_tokens},
                               token_ids=tokens.tolist(), prefix_id=prefix_id or "", kv_scheme=codec.scheme)
            kv = _chunk(spec, len(tokens), gen, device)
            sal = torch.rand((n_sal, len(tokens)), generator=tok_gen)
            writer.add(cid, kv, tokens, sal)
            rows.append({"chunk_id": cid, "doc_id": fmt.PREFIX_DOC_ID if is_prefix else f"doc{i:05d}",
                         "chunk_no": -1 if is_prefix else 0, "n_tokens": len(tokens),
                         "pos_base": 0 if is_prefix else prefix_tokens, "neighbours": [],
                         "char_start": 0, "char_end": 0, "text": ""})
            if is_prefix:
                prefix_id = cid
            else:
                ids.append(cid)
        writer.flush()
        where = {w.chunk_id: w for w in writer.written}
        for row in rows:
            row["shard"] = where[row["chunk_id"]].shard
            row["checksum"] = where[row["chunk_id"]].checksum
        publish_release(cache_dir, rows, {
            "model": {"name": spec.name, "fingerprint": spec.fingerprint, "dtype": fmt.dtype_name(spec.dtype),
                      "kv_bytes_per_token": spec.kv_bytes_per_token(), "kv_dtype": codec.name,
                      "kv_scheme": codec.scheme, "n_layers": spec.n_layers, "n_kv_heads": spec.n_kv_heads,
                      "head_dim": spec.head_dim},
            "prefix": {"chunk_id": prefix_id},
            "prompt": PromptTemplate("", "{question}", "", separator="").to_manifest(),  # token ids given directly
            "params": {"synthetic": True, "chunk_tokens": chunk_tokens, "seed": seed},
        })
    return prefix_id, ids
